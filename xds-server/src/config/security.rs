//! `AuthorizationPolicy` (security.istio.io/v1, v1beta1): serde shapes, per-document
//! validation and Istio's match values; and, for it and `RequestAuthentication`
//! (`super::request_authentication`), the mesh-wide set with Istio's rules for which
//! policies apply to a workload.
//!
//! As everywhere in `config`, unknown fields are errors, and so is every field or value
//! Trellis cannot enforce (AUDIT and CUSTOM actions, remote JWKS, unknown condition
//! keys): an authorization rule that is silently ignored is a hole in the mesh.

use super::peer_authentication::PolicySelector;
use super::request_authentication::RequestAuthenticationSpec;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

type FieldError = (String, String);

fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum AuthzAction {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    /// Parsed so that validation can say "not supported" instead of "unknown variant".
    #[serde(rename = "AUDIT")]
    Audit,
    #[serde(rename = "CUSTOM")]
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<PolicySelector>,
    #[serde(default)]
    pub action: AuthzAction,
    /// Empty (or absent) with ALLOW is Istio's "allow nothing"; with DENY it denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Only meaningful with CUSTOM; parsed so the error names the unsupported action.
    #[serde(default)]
    pub provider: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<RequestSource>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// What an Istio rule field or `when` key talks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    RequestHeader(String),
    /// Claim path: `request.auth.claims[a][b]` is `["a", "b"]`.
    RequestClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
    Host,
    Method,
    Path,
}

impl Attribute {
    /// Parses a `when` key (Istio's "authorization policy conditions").
    pub fn parse_key(key: &str) -> Result<Attribute, String> {
        let bracketed = |prefix: &str| -> Option<Result<Vec<String>, String>> {
            let rest = key.strip_prefix(prefix)?;
            let inner = rest.strip_suffix(']').and_then(|r| r.strip_prefix('['));
            Some(match inner {
                Some(inner) if !inner.is_empty() && inner.split("][").all(|p| !p.is_empty()) => {
                    Ok(inner.split("][").map(str::to_string).collect())
                }
                _ => Err(format!("`{key}` is not of the form {prefix}[NAME]")),
            })
        };
        if let Some(h) = bracketed("request.headers") {
            let mut names = h?;
            if names.len() != 1 {
                return Err(format!("`{key}` names more than one header"));
            }
            let name = names.remove(0);
            header_name(&name)?;
            return Ok(Attribute::RequestHeader(name));
        }
        if let Some(c) = bracketed("request.auth.claims") {
            return Ok(Attribute::RequestClaim(c?));
        }
        Ok(match key {
            "source.ip" => Attribute::SourceIp,
            "remote.ip" => Attribute::RemoteIp,
            "source.namespace" => Attribute::SourceNamespace,
            "source.principal" => Attribute::SourcePrincipal,
            "request.auth.principal" => Attribute::RequestPrincipal,
            "request.auth.audiences" => Attribute::RequestAudiences,
            "request.auth.presenter" => Attribute::RequestPresenter,
            "destination.ip" => Attribute::DestinationIp,
            "destination.port" => Attribute::DestinationPort,
            "connection.sni" => return Err("condition key `connection.sni` is not supported".into()),
            k if k.starts_with("experimental.") => {
                return Err(format!("condition key `{k}` is not supported"))
            }
            k => return Err(format!("unknown condition key `{k}` (supported: request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME], destination.ip, destination.port)")),
        })
    }

    /// Attributes only an HTTP request has; on a TCP port Istio drops them (see
    /// `crate::translate::authz`).
    pub fn http_only(&self) -> bool {
        matches!(
            self,
            Attribute::RequestPrincipal
                | Attribute::RequestAudiences
                | Attribute::RequestPresenter
                | Attribute::RequestHeader(_)
                | Attribute::RequestClaim(_)
                | Attribute::Host
                | Attribute::Method
                | Attribute::Path
        )
    }

    /// Checks one value the way translation will read it.
    fn check_value(&self, v: &str) -> Result<(), String> {
        if v.is_empty() {
            return Err("values must not be empty".into());
        }
        match self {
            Attribute::SourceIp | Attribute::RemoteIp | Attribute::DestinationIp => {
                parse_cidr(v).map(|_| ())
            }
            Attribute::DestinationPort => parse_port(v).map(|_| ()),
            Attribute::Path => {
                if v.contains('{') || v.contains('}') {
                    return Err(format!("path `{v}`: path templates are not supported"));
                }
                if !(v.starts_with('/') || v.starts_with('*')) {
                    return Err(format!("path `{v}` must start with '/' or '*'"));
                }
                istio_pattern(v).map(|_| ())
            }
            _ => istio_pattern(v).map(|_| ()),
        }
    }
}

/// Istio's string match forms: exact `abc`, prefix `abc*`, suffix `*abc`, presence `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
    Any,
}

/// Reads an Istio match value; a `*` anywhere else (`a*b`, `*a*`) has no Istio meaning
/// and is an error rather than a literal star.
pub fn istio_pattern(v: &str) -> Result<Pattern<'_>, String> {
    if v == "*" {
        return Ok(Pattern::Any);
    }
    let (p, inner) = if let Some(s) = v.strip_prefix('*') {
        (Pattern::Suffix(s), s)
    } else if let Some(p) = v.strip_suffix('*') {
        (Pattern::Prefix(p), p)
    } else {
        (Pattern::Exact(v), v)
    };
    if inner.contains('*') {
        return Err(format!(
            "`{v}`: `*` is only allowed alone, as a prefix (`*abc`) or as a suffix (`abc*`)"
        ));
    }
    Ok(p)
}

/// An IP (a host route) or a CIDR block, as Istio's ipBlocks accept.
pub fn parse_cidr(v: &str) -> Result<(IpAddr, u32), String> {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (v, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("`{v}` is not an IP address or CIDR block"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{v}`: prefix length must be 0-{max}"))?,
    };
    Ok((ip, len))
}

pub fn parse_port(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("`{v}` is not a port number (1-65535)"))
}

/// Header names as HTTP/1.1 tokens (lowercase not required: Envoy matches them
/// case-insensitively).
pub(crate) fn header_name(name: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("`{name}` is not a valid HTTP header name"));
    }
    Ok(())
}

fn values(attr: &Attribute, list: &[String], f: &str) -> Result<(), FieldError> {
    for (i, v) in list.iter().enumerate() {
        attr.check_value(v)
            .map_err(|m| fe(format!("{f}[{i}]"), m))?;
    }
    Ok(())
}

pub(crate) fn selector(sel: &Option<PolicySelector>) -> Result<(), FieldError> {
    for (k, v) in sel.iter().flat_map(|s| &s.match_labels) {
        if k.is_empty() {
            return Err(fe(
                "spec.selector.matchLabels",
                "label keys must not be empty",
            ));
        }
        if v.contains('*') {
            return Err(fe(
                format!("spec.selector.matchLabels.{k}"),
                "wildcards are not allowed in label values",
            ));
        }
    }
    Ok(())
}

impl RequestSource {
    /// (field name, attribute, values) in Istio's order, `not*` fields flagged.
    pub fn fields(&self) -> [(&'static str, Attribute, &[String], &[String]); 5] {
        [
            (
                "principals",
                Attribute::SourcePrincipal,
                &self.principals,
                &self.not_principals,
            ),
            (
                "requestPrincipals",
                Attribute::RequestPrincipal,
                &self.request_principals,
                &self.not_request_principals,
            ),
            (
                "namespaces",
                Attribute::SourceNamespace,
                &self.namespaces,
                &self.not_namespaces,
            ),
            (
                "remoteIpBlocks",
                Attribute::RemoteIp,
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
            ),
            (
                "ipBlocks",
                Attribute::SourceIp,
                &self.ip_blocks,
                &self.not_ip_blocks,
            ),
        ]
    }
}

impl Operation {
    pub fn fields(&self) -> [(&'static str, Attribute, &[String], &[String]); 4] {
        [
            ("hosts", Attribute::Host, &self.hosts, &self.not_hosts),
            (
                "methods",
                Attribute::Method,
                &self.methods,
                &self.not_methods,
            ),
            ("paths", Attribute::Path, &self.paths, &self.not_paths),
            (
                "ports",
                Attribute::DestinationPort,
                &self.ports,
                &self.not_ports,
            ),
        ]
    }
}

/// `notPrincipals` for `principals` and so on.
fn not_field(name: &str) -> String {
    let mut c = name.chars();
    match c.next() {
        Some(first) => format!("not{}{}", first.to_ascii_uppercase(), c.as_str()),
        None => String::new(),
    }
}

fn field_lists(
    fields: &[(&'static str, Attribute, &[String], &[String])],
    prefix: &str,
) -> Result<bool, FieldError> {
    let mut any = false;
    for (name, attr, vals, nots) in fields {
        values(attr, vals, &format!("{prefix}.{name}"))?;
        values(attr, nots, &format!("{prefix}.{}", not_field(name)))?;
        any |= !vals.is_empty() || !nots.is_empty();
    }
    Ok(any)
}

/// Istio's own validation of an AuthorizationPolicy, plus what Trellis does not enforce.
pub fn validate_authorization(spec: &AuthorizationPolicySpec) -> Result<(), FieldError> {
    selector(&spec.selector)?;
    match spec.action {
        AuthzAction::Allow | AuthzAction::Deny => {}
        AuthzAction::Audit => {
            return Err(fe(
                "spec.action",
                "action AUDIT is not supported (only ALLOW and DENY)",
            ))
        }
        AuthzAction::Custom => {
            return Err(fe(
                "spec.action",
                "action CUSTOM (external authorization) is not supported (only ALLOW and DENY)",
            ))
        }
    }
    if spec.provider.is_some() {
        return Err(fe(
            "spec.provider",
            "provider is only for action CUSTOM, which is not supported",
        ));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let rf = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let f = format!("{rf}.from[{j}].source");
            let Some(source) = &from.source else {
                return Err(fe(f, "source must be set"));
            };
            if !field_lists(&source.fields(), &f)? {
                return Err(fe(f, "source must not be empty"));
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let f = format!("{rf}.to[{j}].operation");
            let Some(op) = &to.operation else {
                return Err(fe(f, "operation must be set"));
            };
            if !field_lists(&op.fields(), &f)? {
                return Err(fe(f, "operation must not be empty"));
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let f = format!("{rf}.when[{j}]");
            let attr = Attribute::parse_key(&cond.key).map_err(|m| fe(format!("{f}.key"), m))?;
            if cond.values.is_empty() && cond.not_values.is_empty() {
                return Err(fe(
                    f,
                    format!("condition `{}` needs values or notValues", cond.key),
                ));
            }
            values(&attr, &cond.values, &format!("{f}.values"))?;
            values(&attr, &cond.not_values, &format!("{f}.notValues"))?;
        }
    }
    Ok(())
}

/// A policy of either kind with the identity that names it in Envoy (`ns[NS]-policy[NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Named<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}

impl<T> Named<T> {
    fn selector(&self) -> Option<&BTreeMap<String, String>>
    where
        T: Selected,
    {
        self.spec
            .selector()
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
    }
}

trait Selected {
    fn selector(&self) -> Option<&PolicySelector>;
}

impl Selected for AuthorizationPolicySpec {
    fn selector(&self) -> Option<&PolicySelector> {
        self.selector.as_ref()
    }
}

impl Selected for RequestAuthenticationSpec {
    fn selector(&self) -> Option<&PolicySelector> {
        self.selector.as_ref()
    }
}

/// Every AuthorizationPolicy and RequestAuthentication of the mesh, in (namespace, name)
/// order. Istio orders by creation time; files have none, and for policies applied
/// together Istio falls back to the same name order. Only JWT provider names depend on
/// it: RBAC evaluates policies as a set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecurityPolicies {
    pub authorization: Vec<Arc<Named<AuthorizationPolicySpec>>>,
    pub authentication: Vec<Arc<Named<RequestAuthenticationSpec>>>,
}

impl SecurityPolicies {
    pub fn new(
        mut authorization: Vec<Named<AuthorizationPolicySpec>>,
        mut authentication: Vec<Named<RequestAuthenticationSpec>>,
    ) -> SecurityPolicies {
        authorization.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        authentication.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        SecurityPolicies {
            authorization: authorization.into_iter().map(Arc::new).collect(),
            authentication: authentication.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.authorization.is_empty() && self.authentication.is_empty()
    }

    /// AuthorizationPolicies that apply to a workload (namespace, labels).
    pub fn authorization_for<'a>(
        &'a self,
        root_namespace: &'a str,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Named<AuthorizationPolicySpec>> + 'a {
        self.authorization
            .iter()
            .map(|p| &**p)
            .filter(move |p| applies(p, root_namespace, namespace, labels))
    }

    /// RequestAuthentications that apply to a workload (namespace, labels).
    pub fn authentication_for<'a>(
        &'a self,
        root_namespace: &'a str,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Named<RequestAuthenticationSpec>> + 'a {
        self.authentication
            .iter()
            .map(|p| &**p)
            .filter(move |p| applies(p, root_namespace, namespace, labels))
    }
}

/// Istio's selection for both kinds: a policy applies to the workloads of its namespace
/// (all of them without a selector); in the root namespace, a policy without selector
/// applies to every workload of the mesh and one with a selector to matching workloads
/// of every namespace (unlike PeerAuthentication, whose root-namespace selectors Istio
/// ignores).
fn applies<T: Selected>(
    p: &Named<T>,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    if p.namespace != namespace && p.namespace != root_namespace {
        return false;
    }
    p.selector()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[cfg(test)]
#[path = "security_tests.rs"]
mod tests;
