//! AuthorizationPolicy -> Envoy RBAC on a sidecar's inbound listeners, as istiod builds it.
//!
//! Evaluation (Istio's): DENY policies first, any match is a 403; then, if any ALLOW
//! policy applies to the workload, the request must match one of its rules, else 403;
//! without policies everything is allowed. So an HTTP chain gets up to two RBAC
//! filters, DENY then ALLOW, after jwt_authn and before the router; a TCP chain gets the
//! network RBAC filter(s) before tcp_proxy. An ALLOW policy without rules generates no
//! Envoy policy, and an ALLOW RBAC filter without policies denies everything: that is
//! Istio's "allow nothing". A DENY policy without rules matches nothing.
//!
//! Each rule becomes one Envoy policy named `ns[NS]-policy[NAME]-rule[N]` (istiod's
//! names, so stats and logs read the same): its permissions are the `to` operations
//! (ORed), its principals the `from` sources (ORed); within one, every field is ANDed,
//! the values of a field ORed, `not*` values negated, and `when` conditions are ANDed
//! onto every permission (destination attributes) or principal (the rest).
//!
//! On a TCP port, HTTP-only attributes (methods, paths, hosts, headers, request
//! principals, JWT claims) cannot be evaluated. Like istiod, an ALLOW rule using one is
//! dropped entirely (it can never allow anything: safer), and in a DENY rule the
//! HTTP-only field is dropped (the rule denies more: safer).

use super::jwt;
use crate::config::security::{
    istio_pattern, parse_cidr, parse_port, Attribute, AuthorizationPolicySpec, AuthzAction, Named,
    Pattern,
};
use crate::mesh::{MeshState, Workload};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{filter::ConfigType, Filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission::{Rule as PermissionRule, Set as PermissionSet},
    principal::{Authenticated, Identifier, Set as PrincipalSet},
    Permission, Policy, Principal,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter::ConfigType as HttpFilterConfig, HttpFilter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher::MatchPattern, PathMatcher, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, UInt32Value};
use std::collections::BTreeMap;

pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// istiod's stat prefix of the network RBAC filter (a required field there).
const TCP_STAT_PREFIX: &str = "tcp.";

/// `envoy.config.rbac.v3.RBAC` with its policies in a BTreeMap: prost encodes a
/// `HashMap` in random order, and a resource's version is the hash of its bytes.
/// Wire-compatible with Envoy's type (same field numbers); tested below.
#[derive(Clone, PartialEq, prost::Message)]
struct Rbac {
    /// `RBAC.Action`: 0 ALLOW, 1 DENY.
    #[prost(int32, tag = "1")]
    action: i32,
    #[prost(btree_map = "string, message", tag = "2")]
    policies: BTreeMap<String, Policy>,
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC` (only `rules`).
#[derive(Clone, PartialEq, prost::Message)]
struct HttpRbac {
    #[prost(message, optional, tag = "1")]
    rules: Option<Rbac>,
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC` (only `rules` and `stat_prefix`).
#[derive(Clone, PartialEq, prost::Message)]
struct NetworkRbac {
    #[prost(message, optional, tag = "1")]
    rules: Option<Rbac>,
    #[prost(string, tag = "3")]
    stat_prefix: String,
}

const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// What a translation depends on besides the policy.
struct Context<'a> {
    tcp: bool,
    action: AuthzAction,
    /// Issuers whose tokens the workload's jwt_authn filter verifies.
    issuers: &'a [&'a str],
}

/// A field (or condition) of a rule: its attribute, values and negated values.
struct Field<'a> {
    attr: Attribute,
    values: &'a [String],
    not_values: &'a [String],
}

fn is_permission(attr: &Attribute) -> bool {
    matches!(
        attr,
        Attribute::DestinationIp
            | Attribute::DestinationPort
            | Attribute::Host
            | Attribute::Method
            | Attribute::Path
    )
}

/// Go's `regexp.QuoteMeta`, which RE2 reads the same way.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn regex(r: String) -> StringMatcher {
    jwt::string(MatchPattern::SafeRegex(RegexMatcher {
        regex: r,
        ..Default::default()
    }))
}

/// istiod's `StringMatcherWithPrefix`: Istio pattern `v` against `prefix + value`.
/// Presence is `.+` (Envoy has no empty prefix or suffix matchers).
fn string_matcher(v: &str, prefix: &str) -> StringMatcher {
    match istio_pattern(v) {
        Ok(Pattern::Any) => regex(".+".into()),
        Ok(Pattern::Suffix(s)) if prefix.is_empty() => jwt::string(MatchPattern::Suffix(s.into())),
        Ok(Pattern::Suffix(s)) => regex(format!("{}.*{}", quote(prefix), quote(s))),
        Ok(Pattern::Prefix(s)) => jwt::string(MatchPattern::Prefix(format!("{prefix}{s}"))),
        Ok(Pattern::Exact(s)) => jwt::string(MatchPattern::Exact(format!("{prefix}{s}"))),
        // Validation rejects malformed patterns; a literal is the narrowest reading.
        Err(_) => jwt::string(MatchPattern::Exact(format!("{prefix}{v}"))),
    }
}

fn header(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    let m = |p| {
        HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(p),
            ignore_case,
        })
    };
    let spec = match istio_pattern(v) {
        Ok(Pattern::Any) => HeaderMatchSpecifier::PresentMatch(true),
        Ok(Pattern::Prefix(s)) => m(MatchPattern::Prefix(s.into())),
        Ok(Pattern::Suffix(s)) => m(MatchPattern::Suffix(s.into())),
        Ok(Pattern::Exact(_)) | Err(_) => m(MatchPattern::Exact(v.into())),
    };
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn cidr(v: &str) -> CidrRange {
    // Validated; an unparsable block falls back to a host route that matches nothing
    // real rather than to 0.0.0.0/0.
    let (ip, len) = parse_cidr(v).unwrap_or((std::net::Ipv6Addr::UNSPECIFIED.into(), 128));
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn id(i: Identifier) -> Principal {
    Principal {
        identifier: Some(i),
    }
}

fn rule(r: PermissionRule) -> Permission {
    Permission { rule: Some(r) }
}

fn authenticated(m: StringMatcher) -> Principal {
    id(Identifier::Authenticated(Authenticated {
        principal_name: Some(m),
    }))
}

/// SPIFFE IDs are `spiffe://TD/ns/NS/sa/SA`; a namespace pattern matches the NS segment.
fn namespace_regex(v: &str) -> String {
    let ns = match istio_pattern(v) {
        Ok(Pattern::Any) => "[^/]+".to_string(),
        Ok(Pattern::Prefix(p)) => format!("{}[^/]*", quote(p)),
        Ok(Pattern::Suffix(s)) => format!("[^/]*{}", quote(s)),
        Ok(Pattern::Exact(e)) => quote(e),
        Err(_) => quote(v),
    };
    format!("spiffe://[^/]+/ns/{ns}/.*")
}

fn principal(attr: &Attribute, v: &str, ctx: &Context) -> Principal {
    match attr {
        Attribute::SourceIp => id(Identifier::DirectRemoteIp(cidr(v))),
        Attribute::RemoteIp => id(Identifier::RemoteIp(cidr(v))),
        Attribute::SourceNamespace => authenticated(regex(namespace_regex(v))),
        // Istio principals omit the URI scheme; the certificate's URI SAN has it.
        Attribute::SourcePrincipal => authenticated(string_matcher(v, "spiffe://")),
        Attribute::RequestPrincipal => jwt::request_principal(ctx.issuers, v),
        Attribute::RequestAudiences => jwt::claim(ctx.issuers, &["aud".into()], v),
        Attribute::RequestPresenter => jwt::claim(ctx.issuers, &["azp".into()], v),
        Attribute::RequestClaim(path) => jwt::claim(ctx.issuers, path, v),
        Attribute::RequestHeader(name) => id(Identifier::Header(header(name, v, false))),
        // Permission attributes never get here (see `is_permission`).
        _ => jwt::nobody(),
    }
}

fn permission(attr: &Attribute, v: &str) -> Permission {
    match attr {
        Attribute::DestinationIp => rule(PermissionRule::DestinationIp(cidr(v))),
        Attribute::DestinationPort => {
            rule(PermissionRule::DestinationPort(parse_port(v).unwrap_or(0)))
        }
        Attribute::Method => rule(PermissionRule::Header(header(":method", v, false))),
        // Host names are case-insensitive (Istio matches them ignoring case too).
        Attribute::Host => rule(PermissionRule::Header(header(":authority", v, true))),
        Attribute::Path => rule(PermissionRule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string_matcher(v, ""))),
        })),
        // Principal attributes never get here.
        _ => rule(PermissionRule::NotRule(Box::new(rule(
            PermissionRule::Any(true),
        )))),
    }
}

fn or_rules(mut rules: Vec<Permission>) -> Permission {
    if rules.len() == 1 {
        return rules.remove(0);
    }
    rule(PermissionRule::OrRules(PermissionSet { rules }))
}

fn and_rules(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => rule(PermissionRule::Any(true)),
        1 => rules.remove(0),
        _ => rule(PermissionRule::AndRules(PermissionSet { rules })),
    }
}

fn and_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => id(Identifier::Any(true)),
        1 => ids.remove(0),
        _ => id(Identifier::AndIds(PrincipalSet { ids })),
    }
}

/// Marker: an ALLOW rule uses an HTTP-only attribute on a TCP port and is dropped.
struct Dropped;

/// Whether a field contributes on this chain: `Err` drops the whole rule (ALLOW),
/// `Ok(false)` drops only the field (DENY).
fn applicable(f: &Field, ctx: &Context) -> Result<bool, Dropped> {
    if f.values.is_empty() && f.not_values.is_empty() {
        // A field the rule does not use (every source field is listed).
        return Ok(false);
    }
    if ctx.tcp && f.attr.http_only() {
        return match ctx.action {
            AuthzAction::Allow => Err(Dropped),
            _ => Ok(false),
        };
    }
    Ok(true)
}

fn principals_of(fields: &[Field], ctx: &Context) -> Result<Principal, Dropped> {
    let mut and = Vec::new();
    for f in fields {
        if !applicable(f, ctx)? {
            continue;
        }
        if !f.values.is_empty() {
            let or = f
                .values
                .iter()
                .map(|v| principal(&f.attr, v, ctx))
                .collect();
            and.push(jwt::or_ids(or));
        }
        if !f.not_values.is_empty() {
            let or = f
                .not_values
                .iter()
                .map(|v| principal(&f.attr, v, ctx))
                .collect();
            and.push(id(Identifier::NotId(Box::new(jwt::or_ids(or)))));
        }
    }
    Ok(and_ids(and))
}

fn permissions_of(fields: &[Field], ctx: &Context) -> Result<Permission, Dropped> {
    let mut and = Vec::new();
    for f in fields {
        if !applicable(f, ctx)? {
            continue;
        }
        if !f.values.is_empty() {
            and.push(or_rules(
                f.values.iter().map(|v| permission(&f.attr, v)).collect(),
            ));
        }
        if !f.not_values.is_empty() {
            let or = or_rules(
                f.not_values
                    .iter()
                    .map(|v| permission(&f.attr, v))
                    .collect(),
            );
            and.push(rule(PermissionRule::NotRule(Box::new(or))));
        }
    }
    Ok(and_rules(and))
}

/// A rule's `from.source` / `to.operation` fields followed by its `when` conditions.
fn with<'a>(
    fields: &[(&'static str, Attribute, &'a [String], &'a [String])],
    when: &[Field<'a>],
) -> Vec<Field<'a>> {
    let own = fields.iter().map(|(_, attr, values, not_values)| Field {
        attr: attr.clone(),
        values,
        not_values,
    });
    let when = when.iter().map(|f| Field {
        attr: f.attr.clone(),
        values: f.values,
        not_values: f.not_values,
    });
    own.chain(when).collect()
}

/// One Istio rule as an Envoy policy; `None` when it is dropped on this chain.
fn policy(r: &crate::config::security::Rule, ctx: &Context) -> Option<Policy> {
    // Conditions apply to every source (principals) or every operation (permissions).
    let mut when_principals = Vec::new();
    let mut when_permissions = Vec::new();
    for c in &r.when {
        // Validated; an unknown key cannot reach translation.
        let Ok(attr) = Attribute::parse_key(&c.key) else {
            return None;
        };
        let f = Field {
            attr,
            values: &c.values,
            not_values: &c.not_values,
        };
        if is_permission(&f.attr) {
            when_permissions.push(f);
        } else {
            when_principals.push(f);
        }
    }
    let mut principals = Vec::new();
    for from in &r.from {
        let fields = from
            .source
            .as_ref()
            .map(|s| s.fields().to_vec())
            .unwrap_or_default();
        principals.push(principals_of(&with(&fields, &when_principals), ctx).ok()?);
    }
    if r.from.is_empty() {
        principals.push(principals_of(&when_principals, ctx).ok()?);
    }
    let mut permissions = Vec::new();
    for to in &r.to {
        let fields = to
            .operation
            .as_ref()
            .map(|o| o.fields().to_vec())
            .unwrap_or_default();
        permissions.push(permissions_of(&with(&fields, &when_permissions), ctx).ok()?);
    }
    if r.to.is_empty() {
        permissions.push(permissions_of(&when_permissions, ctx).ok()?);
    }
    Some(Policy {
        permissions,
        principals,
        ..Default::default()
    })
}

/// The RBAC rules for the policies of one action, `None` when no policy of that action
/// applies (or, for DENY, when none of them has a rule that can match).
fn rbac(
    policies: &[&Named<AuthorizationPolicySpec>],
    action: AuthzAction,
    tcp: bool,
    issuers: &[&str],
) -> Option<Rbac> {
    let ctx = Context {
        tcp,
        action,
        issuers,
    };
    let mut any = false;
    let mut out = BTreeMap::new();
    for p in policies.iter().filter(|p| p.spec.action == action) {
        any = true;
        for (i, r) in p.spec.rules.iter().enumerate() {
            if let Some(policy) = policy(r, &ctx) {
                let name = format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name);
                out.insert(name, policy);
            }
        }
    }
    let keep = match action {
        // Present even when empty: that is what makes "allow nothing" deny.
        AuthzAction::Allow => any,
        _ => !out.is_empty(),
    };
    keep.then_some(Rbac {
        action: match action {
            AuthzAction::Deny => 1,
            _ => 0,
        },
        policies: out,
    })
}

fn applicable_policies<'a>(
    mesh: &'a MeshState,
    w: &'a Workload,
) -> Vec<&'a Named<AuthorizationPolicySpec>> {
    mesh.security
        .authorization_for(&mesh.root_namespace, &w.namespace, &w.labels)
        .collect()
}

/// `normalize_path` for a workload's inbound connection managers: on (RFC 3986 `.`/`..`
/// removal, Istio's default `BASE` normalization) when authorization policies apply,
/// so a path rule sees the path the application will act on (`/public/../admin` is
/// `/admin` to both). Off otherwise, leaving paths untouched as before.
pub fn normalize_path(mesh: &MeshState, w: &Workload) -> Option<BoolValue> {
    let any = mesh
        .security
        .authorization_for(&mesh.root_namespace, &w.namespace, &w.labels)
        .next()
        .is_some();
    any.then_some(BoolValue { value: true })
}

/// Security filters of an inbound HTTP chain, in order: jwt_authn, RBAC DENY, RBAC
/// ALLOW (each only when a policy calls for it). The router goes after them.
pub fn http_filters(mesh: &MeshState, w: &Workload) -> Vec<HttpFilter> {
    let jwt_rules = jwt::rules_for(mesh, w);
    let issuers = jwt::issuers(&jwt_rules);
    let policies = applicable_policies(mesh, w);
    let mut out: Vec<HttpFilter> = jwt::filter(mesh, &jwt_rules).into_iter().collect();
    for action in [AuthzAction::Deny, AuthzAction::Allow] {
        if let Some(rules) = rbac(&policies, action, false, &issuers) {
            let config = HttpRbac { rules: Some(rules) };
            out.push(HttpFilter {
                name: HTTP_RBAC_FILTER.into(),
                config_type: Some(HttpFilterConfig::TypedConfig(Any {
                    type_url: HTTP_RBAC_TYPE.into(),
                    value: prost::Message::encode_to_vec(&config),
                })),
                ..Default::default()
            });
        }
    }
    out
}

/// RBAC filters of an inbound TCP chain (DENY, then ALLOW), to go before tcp_proxy.
pub fn network_filters(mesh: &MeshState, w: &Workload) -> Vec<Filter> {
    let policies = applicable_policies(mesh, w);
    [AuthzAction::Deny, AuthzAction::Allow]
        .into_iter()
        .filter_map(|action| rbac(&policies, action, true, &[]))
        .map(|rules| {
            let config = NetworkRbac {
                rules: Some(rules),
                stat_prefix: TCP_STAT_PREFIX.into(),
            };
            Filter {
                name: NETWORK_RBAC_FILTER.into(),
                config_type: Some(ConfigType::TypedConfig(Any {
                    type_url: NETWORK_RBAC_TYPE.into(),
                    value: prost::Message::encode_to_vec(&config),
                })),
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
