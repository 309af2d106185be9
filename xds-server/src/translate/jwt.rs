//! RequestAuthentication -> `envoy.filters.http.jwt_authn` on a sidecar's inbound HTTP
//! chain, and the RBAC matchers that read what it verified.
//!
//! As istiod does: one provider per JWT rule (`origins-N`), a token, if present, must be
//! valid for one of them (401 otherwise), a request without one passes (an
//! AuthorizationPolicy decides whether it needs one). Each provider writes the verified
//! payload to the filter's dynamic metadata under the issuer as key
//! (`payload_in_metadata`). istiod re-publishes that through its own `istio_authn`
//! filter, which stock Envoy lacks; Trellis has RBAC match the jwt_authn metadata
//! directly (filter `envoy.filters.http.jwt_authn`, path `[ISSUER, claim...]`). Knowing
//! the issuer is then part of the match, so RBAC matchers are built from the issuers
//! configured for the workload: a token from any other issuer is never verified, so
//! it can never match either.

use crate::config::request_authentication::{JwksSource, JwtRule};
use crate::config::security::{istio_pattern, Pattern};
use crate::mesh::{MeshState, Workload};
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::config::rbac::v3::{
    principal::{Identifier, Set as PrincipalSet},
    Principal, SourcedMetadata,
};
use envoy_types::pb::envoy::config::route::v3::{route_match::PathSpecifier, RouteMatch};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider::{JwksSourceSpecifier, NormalizePayload},
    jwt_requirement::RequiresType,
    requirement_rule::RequirementType,
    JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement, JwtRequirementAndList,
    JwtRequirementOrList, RequirementRule,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter::ConfigType as HttpFilterConfig, HttpFilter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, metadata_matcher::path_segment::Segment, metadata_matcher::PathSegment,
    string_matcher::MatchPattern, value_matcher, ListMatcher, MetadataMatcher, StringMatcher,
    ValueMatcher,
};
use envoy_types::pb::google::protobuf::{Any, Empty};
use std::collections::BTreeMap;

pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";

/// `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication` with its providers in a
/// BTreeMap: prost encodes a `HashMap` in its random iteration order, and a resource's
/// version is the hash of its bytes, so the generated type would change version on
/// every translation. Wire-compatible (same field numbers); tested below.
#[derive(Clone, PartialEq, prost::Message)]
struct JwtAuthentication {
    #[prost(btree_map = "string, message", tag = "1")]
    providers: BTreeMap<String, JwtProvider>,
    #[prost(message, repeated, tag = "2")]
    rules: Vec<RequirementRule>,
    #[prost(bool, tag = "4")]
    bypass_cors_preflight: bool,
}

const JWT_AUTHN_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";

/// JWT rules of every RequestAuthentication applying to the workload, in policy order
/// (as istiod merges them).
pub fn rules_for<'a>(mesh: &'a MeshState, w: &'a Workload) -> Vec<&'a JwtRule> {
    mesh.security
        .authentication_for(&mesh.root_namespace, &w.namespace, &w.labels)
        .flat_map(|p| &p.spec.jwt_rules)
        .collect()
}

/// Distinct issuers of `rules`, sorted: the metadata keys RBAC matchers look under.
pub fn issuers<'a>(rules: &[&'a JwtRule]) -> Vec<&'a str> {
    let mut out: Vec<&str> = rules.iter().map(|r| r.issuer.as_str()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn provider(mesh: &MeshState, rule: &JwtRule) -> JwtProvider {
    let local = |specifier| {
        JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(specifier),
            ..Default::default()
        })
    };
    let keys = match rule.jwks_source() {
        Ok(JwksSource::Inline(text)) => local(Specifier::InlineString(text.to_string())),
        Ok(JwksSource::File(path)) => local(Specifier::Filename(path.to_string())),
        Ok(JwksSource::Remote(uri)) => {
            JwksSourceSpecifier::RemoteJwks(super::jwks::remote_jwks(mesh, rule, &uri))
        }
        // Validation rejected every other form; an empty key set rejects every token
        // (fails closed) should one ever get here.
        Err(_) => local(Specifier::InlineString(r#"{"keys":[]}"#.into())),
    };
    JwtProvider {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        forward: rule.forward_original_token,
        from_headers: rule
            .from_headers
            .iter()
            .map(|h| JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        forward_payload_header: rule.output_payload_to_header.clone().unwrap_or_default(),
        payload_in_metadata: rule.issuer.clone(),
        // As istiod: OAuth scopes arrive as one space-separated string; as a list they
        // can be matched one by one (`request.auth.claims[scope]`).
        normalize_payload_in_metadata: Some(NormalizePayload {
            space_delimited_claims: vec!["scope".into(), "permission".into()],
        }),
        claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|c| JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        jwks_source_specifier: Some(keys),
        ..Default::default()
    }
}

fn requires(t: RequiresType) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(t),
    }
}

fn any_of(requirements: Vec<JwtRequirement>) -> JwtRequirement {
    requires(RequiresType::RequiresAny(JwtRequirementOrList {
        requirements,
    }))
}

/// istiod's requirement: with one provider `{P or allow_missing}`; with several
/// `{P1 or P2 ... or AND(P1 or allow_missing, P2 or allow_missing, ...)}`, where the
/// inner AND makes every present token count and the outer ORs let providers that share
/// a token location (each sees the other's token as invalid) still succeed.
fn requirement(names: &[String]) -> JwtRequirement {
    let provider = |n: &String| requires(RequiresType::ProviderName(n.clone()));
    let optional = |n: &String| {
        any_of(vec![
            provider(n),
            requires(RequiresType::AllowMissing(Empty {})),
        ])
    };
    if let [one] = names {
        return optional(one);
    }
    let mut or: Vec<JwtRequirement> = names.iter().map(provider).collect();
    or.push(requires(RequiresType::RequiresAll(JwtRequirementAndList {
        requirements: names.iter().map(optional).collect(),
    })));
    any_of(or)
}

/// The jwt_authn filter for `rules`, `None` without any.
pub fn filter(mesh: &MeshState, rules: &[&JwtRule]) -> Option<HttpFilter> {
    if rules.is_empty() {
        return None;
    }
    let names: Vec<String> = (0..rules.len()).map(|i| format!("origins-{i}")).collect();
    let config = JwtAuthentication {
        providers: names
            .iter()
            .cloned()
            .zip(rules.iter().map(|r| provider(mesh, r)))
            .collect(),
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(RequirementType::Requires(requirement(&names))),
        }],
        // CORS preflights carry no credentials; istiod lets them through too.
        bypass_cors_preflight: true,
    };
    Some(HttpFilter {
        name: JWT_FILTER.into(),
        config_type: Some(HttpFilterConfig::TypedConfig(Any {
            type_url: JWT_AUTHN_TYPE.into(),
            value: prost::Message::encode_to_vec(&config),
        })),
        ..Default::default()
    })
}

pub(crate) fn string(p: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ignore_case: false,
    }
}

fn principal(id: Identifier) -> Principal {
    Principal {
        identifier: Some(id),
    }
}

/// Never matches: the principal of a request no configured issuer could have verified.
pub(crate) fn nobody() -> Principal {
    principal(Identifier::NotId(Box::new(principal(Identifier::Any(
        true,
    )))))
}

pub(crate) fn or_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => nobody(),
        1 => ids.remove(0),
        _ => principal(Identifier::OrIds(PrincipalSet { ids })),
    }
}

fn metadata(path: &[&str], value: value_matcher::MatchPattern) -> Principal {
    // Dynamic metadata (the default source): what jwt_authn wrote for this request.
    principal(Identifier::SourcedMetadata(SourcedMetadata {
        metadata_matcher: Some(MetadataMatcher {
            filter: JWT_FILTER.into(),
            path: path
                .iter()
                .map(|k| PathSegment {
                    segment: Some(Segment::Key(k.to_string())),
                })
                .collect(),
            value: Some(ValueMatcher {
                match_pattern: Some(value),
            }),
            invert: false,
        }),
        metadata_source: 0,
    }))
}

fn present(path: &[&str]) -> Principal {
    metadata(path, value_matcher::MatchPattern::PresentMatch(true))
}

fn sub_is(issuer: &str, p: MatchPattern) -> Principal {
    metadata(
        &[issuer, "sub"],
        value_matcher::MatchPattern::StringMatch(string(p)),
    )
}

/// The principal of a verified token is `ISS/SUB` (Istio's `request.auth.principal`).
/// For one issuer, which `sub` values make `ISS/SUB` match Istio pattern `p`: the
/// pattern is split at the `/` that separates issuer and subject wherever it can fall.
fn principal_for_issuer(issuer: &str, p: Pattern) -> Vec<Principal> {
    let head = format!("{issuer}/");
    match p {
        // Any verified token from this issuer.
        Pattern::Any => vec![present(&[issuer])],
        Pattern::Exact(v) => match v.strip_prefix(&head) {
            Some(sub) => vec![sub_is(issuer, MatchPattern::Exact(sub.into()))],
            None => vec![],
        },
        Pattern::Prefix(x) => match x.strip_prefix(&head) {
            Some("") => vec![present(&[issuer])],
            Some(rest) => vec![sub_is(issuer, MatchPattern::Prefix(rest.into()))],
            None if head.starts_with(x) => vec![present(&[issuer])],
            None => vec![],
        },
        Pattern::Suffix(x) => {
            // Either the suffix lies within the subject, or the separator falls on one
            // of its slashes: then the part before is a suffix of the issuer and the
            // part after is the whole subject.
            let mut out = vec![sub_is(issuer, MatchPattern::Suffix(x.into()))];
            for (k, _) in x.match_indices('/') {
                if issuer.ends_with(&x[..k]) {
                    out.push(sub_is(issuer, MatchPattern::Exact(x[k + 1..].into())));
                }
            }
            out
        }
    }
}

/// `requestPrincipals` / `request.auth.principal` value `v` (validated).
pub fn request_principal(issuers: &[&str], v: &str) -> Principal {
    let Ok(p) = istio_pattern(v) else {
        return nobody();
    };
    or_ids(
        issuers
            .iter()
            .flat_map(|iss| principal_for_issuer(iss, p))
            .collect(),
    )
}

/// A claim of a verified token (`request.auth.claims[a][b]`, audiences = `aud`,
/// presenter = `azp`) matching Istio pattern `v`. A claim is a string or a list of
/// strings (`aud`, `groups`, a normalized `scope`): either form may match.
pub fn claim(issuers: &[&str], claim_path: &[String], v: &str) -> Principal {
    let Ok(p) = istio_pattern(v) else {
        return nobody();
    };
    let pattern = match p {
        Pattern::Any => None,
        Pattern::Exact(s) => Some(MatchPattern::Exact(s.into())),
        Pattern::Prefix(s) => Some(MatchPattern::Prefix(s.into())),
        Pattern::Suffix(s) => Some(MatchPattern::Suffix(s.into())),
    };
    let mut out = Vec::new();
    for iss in issuers {
        let mut path = vec![*iss];
        path.extend(claim_path.iter().map(String::as_str));
        match &pattern {
            None => out.push(present(&path)),
            Some(m) => {
                let one = ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::StringMatch(string(
                        m.clone(),
                    ))),
                };
                out.push(metadata(
                    &path,
                    value_matcher::MatchPattern::StringMatch(string(m.clone())),
                ));
                out.push(metadata(
                    &path,
                    value_matcher::MatchPattern::ListMatch(Box::new(ListMatcher {
                        match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(one))),
                    })),
                ));
            }
        }
    }
    or_ids(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::JwtAuthentication as Envoy;
    use prost::Message;

    fn rule(issuer: &str) -> JwtRule {
        JwtRule {
            issuer: issuer.into(),
            jwks: Some(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
            ..Default::default()
        }
    }

    #[test]
    fn sorted_config_decodes_as_envoys_type() {
        let (a, b) = (rule("https://a.example"), rule("https://b.example"));
        let f = filter(&MeshState::default(), &[&a, &b]).unwrap();
        let Some(HttpFilterConfig::TypedConfig(any)) = f.config_type else {
            panic!("no typed config")
        };
        let envoy = Envoy::decode(any.value.as_slice()).unwrap();
        assert_eq!(envoy.providers.len(), 2);
        assert_eq!(envoy.providers["origins-1"].issuer, "https://b.example");
        assert_eq!(
            envoy.providers["origins-0"].payload_in_metadata,
            "https://a.example"
        );
        assert!(envoy.bypass_cors_preflight);
        // Deterministic bytes: equal configs encode equally.
        let again = filter(&MeshState::default(), &[&a, &b]).unwrap();
        assert_eq!(again, filter(&MeshState::default(), &[&a, &b]).unwrap());
    }

    #[test]
    fn one_provider_is_optional_but_validated() {
        let r = requirement(&["origins-0".into()]);
        let Some(RequiresType::RequiresAny(or)) = r.requires_type else {
            panic!("{r:?}")
        };
        assert_eq!(
            or.requirements[0].requires_type,
            Some(RequiresType::ProviderName("origins-0".into()))
        );
        assert_eq!(
            or.requirements[1].requires_type,
            Some(RequiresType::AllowMissing(Empty {}))
        );
    }

    fn sub_patterns(p: &Principal) -> Vec<(String, String)> {
        let ids = match &p.identifier {
            Some(Identifier::OrIds(s)) => s.ids.clone(),
            _ => vec![p.clone()],
        };
        ids.iter()
            .map(|id| match &id.identifier {
                Some(Identifier::SourcedMetadata(SourcedMetadata {
                    metadata_matcher: Some(m),
                    ..
                })) => {
                    let path: Vec<String> = m
                        .path
                        .iter()
                        .map(|s| match &s.segment {
                            Some(Segment::Key(k)) => k.clone(),
                            None => String::new(),
                        })
                        .collect();
                    let value = match m.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
                        Some(value_matcher::MatchPattern::PresentMatch(_)) => "present".into(),
                        Some(value_matcher::MatchPattern::StringMatch(s)) => {
                            format!("{:?}", s.match_pattern.as_ref().unwrap())
                        }
                        other => format!("{other:?}"),
                    };
                    (path.join("|"), value)
                }
                other => (format!("{other:?}"), String::new()),
            })
            .collect()
    }

    #[test]
    fn request_principals_split_issuer_and_subject() {
        let iss = ["https://idp.example/realm"];
        assert_eq!(
            sub_patterns(&request_principal(&iss, "https://idp.example/realm/alice")),
            [(
                "https://idp.example/realm|sub".into(),
                r#"Exact("alice")"#.into()
            )]
        );
        assert_eq!(
            sub_patterns(&request_principal(&iss, "*")),
            [("https://idp.example/realm".into(), "present".into())]
        );
        // A prefix ending inside the issuer: any subject of this issuer.
        assert_eq!(
            sub_patterns(&request_principal(&iss, "https://idp.example/*")),
            [("https://idp.example/realm".into(), "present".into())]
        );
        assert_eq!(
            sub_patterns(&request_principal(&iss, "https://idp.example/realm/adm*")),
            [(
                "https://idp.example/realm|sub".into(),
                r#"Prefix("adm")"#.into()
            )]
        );
        // Suffix: within the subject, or spanning the separator.
        assert_eq!(
            sub_patterns(&request_principal(&iss, "*realm/bob")),
            [
                (
                    "https://idp.example/realm|sub".into(),
                    r#"Suffix("realm/bob")"#.into()
                ),
                (
                    "https://idp.example/realm|sub".into(),
                    r#"Exact("bob")"#.into()
                ),
            ]
        );
        // An issuer nobody configured: no token can carry it.
        assert_eq!(
            request_principal(&iss, "https://other.example/alice"),
            nobody()
        );
        assert_eq!(request_principal(&[], "*"), nobody());
    }

    #[test]
    fn claims_match_strings_and_lists() {
        let p = claim(&["iss"], &["groups".into()], "admin");
        let Some(Identifier::OrIds(set)) = p.identifier else {
            panic!("{p:?}")
        };
        assert_eq!(set.ids.len(), 2);
        assert!(matches!(
            &set.ids[1].identifier,
            Some(Identifier::SourcedMetadata(SourcedMetadata {
                metadata_matcher: Some(MetadataMatcher {
                    value: Some(ValueMatcher {
                        match_pattern: Some(value_matcher::MatchPattern::ListMatch(_))
                    }),
                    ..
                }),
                ..
            }))
        ));
    }
}
