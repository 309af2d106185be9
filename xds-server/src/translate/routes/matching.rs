//! `http[].match` -> Envoy `RouteMatch`, as istiod's `TranslateRouteMatch` does: header
//! and inverted (`withoutHeaders`) matchers sorted by name, then `:method`,
//! `:authority` and `:scheme`, then query parameters.

use crate::config::model::{HttpMatchRequest, StringMatch};
use crate::mesh::selects;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    route_match::PathSpecifier, HeaderMatcher, QueryParameterMatcher, RouteMatch,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::BoolValue;
use std::collections::BTreeMap;

pub(super) fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &m.exact {
        MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        MatchPattern::Prefix(p.clone())
    } else {
        MatchPattern::SafeRegex(regex(m.regex.as_ref()?))
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

pub(super) fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

fn header(name: &str, m: &StringMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: string_matcher(m).map(HeaderMatchSpecifier::StringMatch),
        ..Default::default()
    }
}

/// The match-all of a rule without `match`.
pub(super) fn catch_all() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    }
}

pub(super) fn route_match(m: &HttpMatchRequest) -> RouteMatch {
    let path = match &m.uri {
        Some(StringMatch { exact: Some(e), .. }) => PathSpecifier::Path(e.clone()),
        Some(StringMatch {
            prefix: Some(p), ..
        }) => PathSpecifier::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => PathSpecifier::SafeRegex(regex(r)),
        _ => PathSpecifier::Prefix("/".into()),
    };
    let mut headers: Vec<HeaderMatcher> = m.headers.iter().map(|(n, v)| header(n, v)).collect();
    headers.extend(m.without_headers.iter().map(|(n, v)| HeaderMatcher {
        invert_match: true,
        // An absent header is "not matching" too, as Istio reads withoutHeaders.
        treat_missing_header_as_empty: true,
        ..header(n, v)
    }));
    headers.sort_by(|a, b| a.name.cmp(&b.name));
    for (name, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            headers.push(header(name, sm));
        }
    }
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, sm)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: string_matcher(sm)
                .map(QueryParameterMatchSpecifier::StringMatch),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        headers,
        query_parameters,
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// Whether a match applies to a route configuration of `port` served to proxies of
/// `namespace` whose workload has `labels` (istiod's `sourceMatchHTTP` plus the port
/// check): `gateways` overrides the source checks, as there.
pub(super) fn applies(
    m: &HttpMatchRequest,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u32,
) -> bool {
    // A match naming gateways applies to sidecars only if it names `mesh`.
    let source = if m.gateways.is_empty() {
        selects(&m.source_labels, labels)
            && m.source_namespace
                .as_deref()
                .is_none_or(|ns| ns == namespace)
    } else {
        m.gateways.iter().any(|g| g == "mesh")
    };
    m.port.is_none_or(|p| p == port) && source
}
