//! What a matched rule does: forward (`route`, with rewrite, mirrors, retries and
//! per-destination headers), `redirect` or `directResponse`; and the rule's header
//! changes. Mirrors istiod's `applyHTTPRouteDestination`, `ApplyRedirect` and
//! `TranslateHeadersOperations`.

use super::super::{any, duration, outbound_cluster_name};
use super::matching::regex;
use crate::config::model::{HeaderOperations, Headers, HttpDirectResponse, HttpRedirect};
use crate::config::virtual_service_validate::direct_response_body;
use crate::mesh::{HttpRouteRule, MeshState, MirrorTarget, RetryPolicy as MeshRetry};
use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, header_value_option::HeaderAppendAction, DataSource, HeaderValue,
    HeaderValueOption, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    retry_policy::{retry_priority, RetryPriority},
    route_action::{ClusterSpecifier, HostRewriteSpecifier, RequestMirrorPolicy},
    weighted_cluster::{cluster_weight, ClusterWeight},
    DirectResponseAction, RedirectAction, RetryPolicy, RouteAction, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

/// Istio's retry default for routes without a VirtualService retry policy: two attempts on
/// failures that are safe to retry (the request never reached the application).
pub(super) fn default_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn retry(r: &MeshRetry) -> Option<RetryPolicy> {
    if r.attempts == 0 {
        return None;
    }
    let mut policy = RetryPolicy {
        num_retries: Some(UInt32Value { value: r.attempts }),
        per_try_timeout: r.per_try_timeout.map(duration),
        ..Default::default()
    };
    let mut conditions = Vec::new();
    for c in r
        .retry_on
        .as_deref()
        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,5xx")
        .split(',')
    {
        let c = c.trim();
        match c.parse::<u32>() {
            Ok(code) => policy.retriable_status_codes.push(code),
            Err(_) => conditions.push(c.to_string()),
        }
    }
    if !policy.retriable_status_codes.is_empty()
        && !conditions.iter().any(|c| c == "retriable-status-codes")
    {
        conditions.push("retriable-status-codes".into());
    }
    policy.retry_on = conditions.join(",");
    if r.retry_remote_localities {
        // istiod's translation: skip the priorities (localities) already tried.
        policy.retry_priority = Some(RetryPriority {
            name: "envoy.retry_priorities.previous_priorities".into(),
            config_type: Some(retry_priority::ConfigType::TypedConfig(any(
                &PreviousPrioritiesConfig {
                    update_frequency: 2,
                },
            ))),
        });
    }
    Some(policy)
}

/// Header changes of a rule or destination, in Envoy's terms.
#[derive(Default)]
pub(super) struct HeaderOps {
    pub request_add: Vec<HeaderValueOption>,
    pub request_remove: Vec<String>,
    pub response_add: Vec<HeaderValueOption>,
    pub response_remove: Vec<String>,
    /// A request `set` (or else `add`) of `:authority` / `host`: a host rewrite.
    pub authority: Option<String>,
}

fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn header_options(ops: &HeaderOperations) -> (Vec<HeaderValueOption>, Option<String>) {
    let mut out = Vec::new();
    let mut authority = None;
    // `set` before `add`, each sorted by name (BTreeMap order), as istiod emits them.
    for (map, action) in [
        (&ops.set, HeaderAppendAction::OverwriteIfExistsOrAdd),
        (&ops.add, HeaderAppendAction::AppendIfExistsOrAdd),
    ] {
        for (key, value) in map {
            if is_authority(key) {
                // `set` wins over `add`: it comes first.
                authority.get_or_insert_with(|| value.clone());
                continue;
            }
            out.push(HeaderValueOption {
                header: Some(HeaderValue {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                }),
                append_action: action as i32,
                ..Default::default()
            });
        }
    }
    (out, authority)
}

pub(super) fn header_ops(h: Option<&Headers>) -> HeaderOps {
    let mut out = HeaderOps::default();
    let Some(h) = h else {
        return out;
    };
    if let Some(req) = &h.request {
        (out.request_add, out.authority) = header_options(req);
        out.request_remove = req.remove.clone();
    }
    if let Some(resp) = &h.response {
        out.response_add = header_options(resp).0;
        out.response_remove = resp.remove.clone();
    }
    out
}

/// The cluster a destination maps to when reached through route config `port`: an explicit
/// port wins, then the same port on the destination, then the destination's only port.
pub(super) fn destination_cluster(
    mesh: &MeshState,
    port: u32,
    host: &str,
    subset: Option<&str>,
    dport: Option<u32>,
) -> String {
    let p = dport.unwrap_or_else(|| match mesh.services.get(host) {
        Some(s) if s.port(port).is_none() && s.ports.len() == 1 => s.ports[0].number,
        _ => port,
    });
    outbound_cluster_name(p, subset, host)
}

/// `value` percent of requests (0..=100, fractional), as istiod converts Istio's
/// `Percent`: parts per million.
pub(super) fn fraction(value: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (value * 10_000.0) as u32,
        denominator: DenominatorType::Million as i32,
    }
}

pub(super) fn whole_percent(value: u32) -> FractionalPercent {
    FractionalPercent {
        numerator: value,
        denominator: DenominatorType::Hundred as i32,
    }
}

fn mirror_policy(mesh: &MeshState, port: u32, m: &MirrorTarget) -> Option<RequestMirrorPolicy> {
    let share = match m.percentage {
        // An explicit 0 mirrors nothing (istiod leaves the policy out).
        Some(p) if p <= 0.0 => return None,
        Some(p) => fraction(p),
        None => whole_percent(100),
    };
    Some(RequestMirrorPolicy {
        cluster: destination_cluster(mesh, port, &m.host, m.subset.as_deref(), m.port),
        runtime_fraction: Some(RuntimeFractionalPercent {
            default_value: Some(share),
            ..Default::default()
        }),
        trace_sampled: Some(BoolValue { value: false }),
        ..Default::default()
    })
}

/// The forwarding action of a rule with destinations. Destination headers of a single
/// destination go on the route (`route_ops`), of weighted ones on their cluster weight.
pub(super) fn route_action(
    mesh: &MeshState,
    port: u32,
    rule: &HttpRouteRule,
    route_ops: &mut HeaderOps,
) -> RouteAction {
    let mut action = RouteAction {
        // Istio disables Envoy's 15 s default: a route without a timeout never times out.
        timeout: Some(duration(rule.timeout.unwrap_or_default())),
        retry_policy: match &rule.retries {
            Some(r) => retry(r),
            None => Some(default_retry()),
        },
        request_mirror_policies: rule
            .mirrors
            .iter()
            .filter_map(|m| mirror_policy(mesh, port, m))
            .collect(),
        ..Default::default()
    };
    let mut authority = route_ops.authority.clone();
    if let Some(rw) = &rule.rewrite {
        if let Some(rr) = &rw.uri_regex_rewrite {
            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(regex(&rr.pattern)),
                substitution: rr.rewrite.clone(),
            });
        } else if let Some(uri) = &rw.uri {
            action.prefix_rewrite = uri.clone();
        }
        if rw.authority.is_some() {
            authority = rw.authority.clone();
        }
    }
    let live: Vec<_> = rule.destinations.iter().filter(|d| d.weight > 0).collect();
    let cluster = |d: &crate::mesh::RouteDestination| {
        destination_cluster(mesh, port, &d.host, d.subset.as_deref(), d.port)
    };
    if let [d] = live.as_slice() {
        action.cluster_specifier = Some(ClusterSpecifier::Cluster(cluster(d)));
        let ops = header_ops(d.headers.as_ref());
        route_ops.request_add.extend(ops.request_add);
        route_ops.request_remove.extend(ops.request_remove);
        route_ops.response_add.extend(ops.response_add);
        route_ops.response_remove.extend(ops.response_remove);
        // The rule's own rewrite takes precedence over a destination's (as in istiod).
        authority = authority.or(ops.authority);
    } else {
        let clusters = live
            .iter()
            .map(|d| {
                let ops = header_ops(d.headers.as_ref());
                ClusterWeight {
                    name: cluster(d),
                    weight: Some(UInt32Value { value: d.weight }),
                    request_headers_to_add: ops.request_add,
                    request_headers_to_remove: ops.request_remove,
                    response_headers_to_add: ops.response_add,
                    response_headers_to_remove: ops.response_remove,
                    host_rewrite_specifier: ops
                        .authority
                        .map(cluster_weight::HostRewriteSpecifier::HostRewriteLiteral),
                    ..Default::default()
                }
            })
            .collect();
        action.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters,
            ..Default::default()
        }));
    }
    action.host_rewrite_specifier = authority.map(HostRewriteSpecifier::HostRewriteLiteral);
    action.hash_policy = super::super::hash_policy::for_targets(
        mesh,
        live.iter().map(|d| super::super::hash_policy::Target {
            host: &d.host,
            subset: d.subset.as_deref(),
            port: d.port,
            route_port: port,
        }),
    );
    action
}

/// istiod's `ApplyRedirect` for a sidecar (no TLS on the outbound listener).
pub(super) fn redirect(r: &HttpRedirect, port: u32) -> RedirectAction {
    let mut out = RedirectAction {
        host_redirect: r.authority.clone().unwrap_or_default(),
        path_rewrite_specifier: r.uri.clone().map(PathRewriteSpecifier::PathRedirect),
        scheme_rewrite_specifier: r.scheme.clone().map(SchemeRewriteSpecifier::SchemeRedirect),
        response_code: match r.redirect_code.unwrap_or(301) {
            302 => RedirectResponseCode::Found,
            303 => RedirectResponseCode::SeeOther,
            307 => RedirectResponseCode::TemporaryRedirect,
            308 => RedirectResponseCode::PermanentRedirect,
            _ => RedirectResponseCode::MovedPermanently,
        } as i32,
        ..Default::default()
    };
    let explicit_port = r.port.or_else(|| {
        // Envoy cannot derive the port per request, but a route configuration serves
        // one port, so the request's port is known here.
        (r.derive_port.as_deref() == Some("FROM_REQUEST_PORT")).then_some(port)
    });
    if let Some(p) = explicit_port {
        let scheme = r.scheme.as_deref().unwrap_or("http");
        // No explicit :80 / :443 for their own scheme.
        let default = (p == 80 && scheme == "http") || (p == 443 && scheme == "https");
        out.port_redirect = if default { 0 } else { p };
    }
    out
}

pub(super) fn direct_response(d: &HttpDirectResponse) -> DirectResponseAction {
    let body = d.body.as_ref().and_then(|b| {
        let specifier = match &b.string {
            Some(s) => Specifier::InlineString(s.clone()),
            // Validated: the bytes decode.
            None => Specifier::InlineBytes(direct_response_body(b).ok()?),
        };
        Some(DataSource {
            specifier: Some(specifier),
            ..Default::default()
        })
    });
    DirectResponseAction {
        status: d.status,
        body,
        ..Default::default()
    }
}
