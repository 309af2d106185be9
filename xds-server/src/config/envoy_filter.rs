//! `EnvoyFilter` (networking.istio.io/v1alpha3): the escape hatch that patches the Envoy
//! resources Trellis generates, as istiod's `envoyfilter` package does.
//!
//! The serde shape follows Istio's API and denies unknown fields. A patch's `value` is
//! Envoy's proto3 JSON; [`compile`] turns it into the Envoy message its `applyTo` names,
//! checking every field and every `typed_config` type against Envoy's own API (the
//! descriptor set of `envoy-types`), so a typo is a validation error naming the patch
//! rather than a NACK from every proxy it selects. `TypedStruct` configs (`udpa.type.v1`
//! and `xds.type.v3`) are checked against their `type_url` and sent as that type.

use crate::dump::pool;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use serde::Deserialize;
use std::collections::BTreeMap;

type FieldError = (String, String);

fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyFilterSpec {
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub config_patches: Vec<ConfigPatch>,
    /// Lower first; filters of equal priority: root namespace first, then by name.
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigPatch {
    pub apply_to: ApplyTo,
    #[serde(default, rename = "match")]
    pub matches: Option<PatchMatch>,
    #[serde(default)]
    pub patch: Option<Patch>,
}

/// Istio's `EnvoyFilter.ApplyTo`; the kinds Trellis cannot patch yet are parsed so the
/// error can say so instead of "unknown variant".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyTo {
    Listener,
    FilterChain,
    NetworkFilter,
    HttpFilter,
    RouteConfiguration,
    VirtualHost,
    HttpRoute,
    Cluster,
    ExtensionConfig,
    Bootstrap,
    ListenerFilter,
}

impl ApplyTo {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Listener => "LISTENER",
            ApplyTo::FilterChain => "FILTER_CHAIN",
            ApplyTo::NetworkFilter => "NETWORK_FILTER",
            ApplyTo::HttpFilter => "HTTP_FILTER",
            ApplyTo::RouteConfiguration => "ROUTE_CONFIGURATION",
            ApplyTo::VirtualHost => "VIRTUAL_HOST",
            ApplyTo::HttpRoute => "HTTP_ROUTE",
            ApplyTo::Cluster => "CLUSTER",
            ApplyTo::ExtensionConfig => "EXTENSION_CONFIG",
            ApplyTo::Bootstrap => "BOOTSTRAP",
            ApplyTo::ListenerFilter => "LISTENER_FILTER",
        }
    }

    /// The Envoy message a patch value of this kind is.
    fn message(self) -> Option<&'static str> {
        Some(match self {
            ApplyTo::Listener => "envoy.config.listener.v3.Listener",
            ApplyTo::FilterChain => "envoy.config.listener.v3.FilterChain",
            ApplyTo::NetworkFilter => "envoy.config.listener.v3.Filter",
            ApplyTo::HttpFilter => {
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter"
            }
            ApplyTo::RouteConfiguration => "envoy.config.route.v3.RouteConfiguration",
            ApplyTo::VirtualHost => "envoy.config.route.v3.VirtualHost",
            ApplyTo::HttpRoute => "envoy.config.route.v3.Route",
            ApplyTo::Cluster => "envoy.config.cluster.v3.Cluster",
            _ => return None,
        })
    }

    /// The operations istiod applies to this kind (it silently skips the others; Trellis
    /// says so at validation time).
    fn operations(self) -> &'static [Operation] {
        use Operation::*;
        match self {
            ApplyTo::Listener | ApplyTo::FilterChain | ApplyTo::Cluster => &[Add, Remove, Merge],
            ApplyTo::NetworkFilter | ApplyTo::HttpFilter => &[
                Merge,
                Add,
                Remove,
                InsertBefore,
                InsertAfter,
                InsertFirst,
                Replace,
            ],
            ApplyTo::RouteConfiguration => &[Merge],
            ApplyTo::VirtualHost => &[Add, Remove, Merge, Replace],
            ApplyTo::HttpRoute => &[Add, Remove, Merge, InsertBefore, InsertAfter, InsertFirst],
            _ => &[],
        }
    }

    pub fn is_listener_class(self) -> bool {
        matches!(
            self,
            ApplyTo::Listener | ApplyTo::FilterChain | ApplyTo::NetworkFilter | ApplyTo::HttpFilter
        )
    }

    pub fn is_route_class(self) -> bool {
        matches!(
            self,
            ApplyTo::RouteConfiguration | ApplyTo::VirtualHost | ApplyTo::HttpRoute
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PatchContext {
    #[default]
    Any,
    SidecarInbound,
    SidecarOutbound,
    /// Accepted for Istio manifests; Trellis serves no gateways yet, so it matches nothing.
    Gateway,
}

impl PatchContext {
    /// Whether a patch of context `self` applies to a resource generated in `ctx`.
    pub fn applies_to(self, ctx: PatchContext) -> bool {
        self == PatchContext::Any || self == ctx
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchMatch {
    #[serde(default)]
    pub context: PatchContext,
    #[serde(default)]
    pub proxy: Option<serde_json::Value>,
    #[serde(default)]
    pub listener: Option<ListenerMatch>,
    #[serde(default)]
    pub route_configuration: Option<RouteConfigurationMatch>,
    #[serde(default)]
    pub cluster: Option<ClusterMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerMatch {
    #[serde(default)]
    pub port_number: u32,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub filter_chain: Option<FilterChainMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterChainMatch {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub sni: String,
    #[serde(default)]
    pub transport_protocol: String,
    /// Comma-separated; every one must be in the chain's match.
    #[serde(default)]
    pub application_protocols: String,
    #[serde(default)]
    pub destination_port: u32,
    #[serde(default)]
    pub filter: Option<FilterMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterMatch {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub sub_filter: Option<SubFilterMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubFilterMatch {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfigurationMatch {
    #[serde(default)]
    pub port_number: u32,
    /// Gateway matches (Istio ignores them for sidecars).
    #[serde(default)]
    pub port_name: String,
    #[serde(default)]
    pub gateway: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub vhost: Option<VirtualHostMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHostMatch {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub route: Option<RouteMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: RouteAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RouteAction {
    #[default]
    Any,
    Route,
    Redirect,
    DirectResponse,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterMatch {
    #[serde(default)]
    pub port_number: u32,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub subset: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patch {
    pub operation: Operation,
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Istio's `filterClass` orders filters added by WasmPlugin-like tooling; Trellis
    /// accepts only the default.
    #[serde(default)]
    pub filter_class: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    Merge,
    Add,
    Remove,
    InsertBefore,
    InsertAfter,
    InsertFirst,
    Replace,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Merge => "MERGE",
            Operation::Add => "ADD",
            Operation::Remove => "REMOVE",
            Operation::InsertBefore => "INSERT_BEFORE",
            Operation::InsertAfter => "INSERT_AFTER",
            Operation::InsertFirst => "INSERT_FIRST",
            Operation::Replace => "REPLACE",
        }
    }
}

/// A checked patch: its match and its value as the Envoy message `apply_to` names.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledPatch {
    pub apply_to: ApplyTo,
    pub context: PatchContext,
    pub listener: Option<ListenerMatch>,
    pub route_configuration: Option<RouteConfigurationMatch>,
    pub cluster: Option<ClusterMatch>,
    pub operation: Operation,
    pub value: Option<DynamicMessage>,
}

pub fn validate(spec: &EnvoyFilterSpec) -> Result<(), FieldError> {
    compile(spec).map(|_| ())
}

/// Checks every patch and turns its value into the Envoy message it patches.
pub fn compile(spec: &EnvoyFilterSpec) -> Result<Vec<CompiledPatch>, FieldError> {
    spec.config_patches
        .iter()
        .enumerate()
        .map(|(i, p)| compile_patch(p, &format!("spec.configPatches[{i}]")))
        .collect()
}

fn compile_patch(p: &ConfigPatch, at: &str) -> Result<CompiledPatch, FieldError> {
    let Some(message) = p.apply_to.message() else {
        return Err(fe(
            format!("{at}.applyTo"),
            format!("applyTo {} is not supported yet", p.apply_to.as_str()),
        ));
    };
    let m = p.matches.clone().unwrap_or_default();
    check_match(p.apply_to, &m, at)?;
    let patch = p
        .patch
        .as_ref()
        .ok_or_else(|| fe(format!("{at}.patch"), "missing patch"))?;
    if !p.apply_to.operations().contains(&patch.operation) {
        let allowed: Vec<&str> = p.apply_to.operations().iter().map(|o| o.as_str()).collect();
        return Err(fe(
            format!("{at}.patch.operation"),
            format!(
                "operation {} does not apply to {} (Istio ignores it); use one of {}",
                patch.operation.as_str(),
                p.apply_to.as_str(),
                allowed.join(", ")
            ),
        ));
    }
    if let Some(class) = &patch.filter_class {
        if class != "UNSPECIFIED" {
            return Err(fe(
                format!("{at}.patch.filterClass"),
                "filterClass is not supported yet",
            ));
        }
    }
    let value = match &patch.value {
        None if patch.operation == Operation::Remove => None,
        None => {
            return Err(fe(
                format!("{at}.patch.value"),
                format!("missing patch value for {}", patch.operation.as_str()),
            ))
        }
        Some(v) => Some(envoy_message(message, v, &format!("{at}.patch.value"))?),
    };
    Ok(CompiledPatch {
        apply_to: p.apply_to,
        context: m.context,
        listener: m.listener,
        route_configuration: m.route_configuration,
        cluster: m.cluster,
        operation: patch.operation,
        value,
    })
}

fn check_match(apply_to: ApplyTo, m: &PatchMatch, at: &str) -> Result<(), FieldError> {
    let at = format!("{at}.match");
    if m.proxy.is_some() {
        return Err(fe(
            format!("{at}.proxy"),
            "matching on the proxy (version, metadata) is not supported yet",
        ));
    }
    let set = [
        (
            "listener",
            m.listener.is_some(),
            apply_to.is_listener_class(),
        ),
        (
            "routeConfiguration",
            m.route_configuration.is_some(),
            apply_to.is_route_class(),
        ),
        ("cluster", m.cluster.is_some(), apply_to == ApplyTo::Cluster),
    ];
    if set.iter().filter(|(_, s, _)| *s).count() > 1 {
        return Err(fe(
            at,
            "set only one of listener, routeConfiguration and cluster",
        ));
    }
    if let Some((name, _, _)) = set.iter().find(|(_, s, ok)| *s && !*ok) {
        return Err(fe(
            format!("{at}.{name}"),
            format!("a {name} match cannot select {} objects", apply_to.as_str()),
        ));
    }
    let Some(filter) = m
        .listener
        .as_ref()
        .and_then(|l| l.filter_chain.as_ref())
        .and_then(|c| c.filter.as_ref())
    else {
        return Ok(());
    };
    let at = format!("{at}.listener.filterChain.filter");
    if filter.name.is_empty() {
        return Err(fe(
            format!("{at}.name"),
            "filter match has no name to match on",
        ));
    }
    if let Some(sub) = &filter.sub_filter {
        if apply_to != ApplyTo::HttpFilter {
            return Err(fe(
                format!("{at}.subFilter"),
                "a subFilter match is for applyTo HTTP_FILTER only",
            ));
        }
        if filter.name != HCM && filter.name != "envoy.http_connection_manager" {
            return Err(fe(
                format!("{at}.subFilter"),
                format!("a subFilter match needs the filter match `{HCM}`"),
            ));
        }
        if sub.name.is_empty() {
            return Err(fe(
                format!("{at}.subFilter.name"),
                "subFilter match has no name to match on",
            ));
        }
    }
    Ok(())
}

pub const HCM: &str = "envoy.filters.network.http_connection_manager";

const TYPED_STRUCTS: &[&str] = &[
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];

/// `value` (proto3 JSON) as the Envoy message `name`, unknown fields and types refused.
fn envoy_message(
    name: &str,
    value: &serde_json::Value,
    at: &str,
) -> Result<DynamicMessage, FieldError> {
    let pool = pool().map_err(|e| fe(at, e))?;
    let desc = pool
        .get_message_by_name(name)
        .ok_or_else(|| fe(at, format!("Envoy's API has no {name}")))?;
    let mut value = value.clone();
    expand_typed_structs(&mut value, at)?;
    deserialize(desc, &value, at)
}

fn deserialize(
    desc: MessageDescriptor,
    value: &serde_json::Value,
    at: &str,
) -> Result<DynamicMessage, FieldError> {
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(desc.clone(), de, &opts).map_err(|e| {
        let path = track.path().to_string();
        let mut field = if path == "." || path.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{path}")
        };
        // The path ends at the object holding an unknown field; name the field itself.
        let msg = e.to_string();
        if let Some(name) = msg
            .strip_prefix("unrecognized field name '")
            .and_then(|r| r.split('\'').next())
        {
            field = format!("{field}.{name}");
        }
        fe(field, format!("not a valid {}: {msg}", desc.full_name()))
    })
}

/// Replaces every `TypedStruct` in `v` by the message its `type_url` names (checked
/// against that type first, so an error points into the TypedStruct's `value`).
fn expand_typed_structs(v: &mut serde_json::Value, at: &str) -> Result<(), FieldError> {
    match v {
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_typed_structs(item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                expand_typed_structs(item, &format!("{at}.{k}"))?;
            }
            let is_typed_struct = map
                .get("@type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| TYPED_STRUCTS.contains(&t));
            if !is_typed_struct {
                return Ok(());
            }
            let url = map
                .get("type_url")
                .or_else(|| map.get("typeUrl"))
                .and_then(|u| u.as_str())
                .ok_or_else(|| fe(format!("{at}.type_url"), "a TypedStruct needs a type_url"))?
                .to_string();
            let type_name = url.rsplit('/').next().unwrap_or_default();
            let pool = pool().map_err(|e| fe(at, e))?;
            let desc = pool.get_message_by_name(type_name).ok_or_else(|| {
                fe(
                    format!("{at}.type_url"),
                    format!("unknown type `{url}`: not in Envoy's API"),
                )
            })?;
            let body = map
                .get("value")
                .cloned()
                .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
            deserialize(desc, &body, &format!("{at}.value"))?;
            let mut out = match body {
                serde_json::Value::Object(o) => o,
                _ => Default::default(),
            };
            out.insert("@type".into(), serde_json::Value::String(url));
            *v = serde_json::Value::Object(out);
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> EnvoyFilterSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn typed_struct_becomes_its_type() {
        let s = spec(
            r#"
configPatches:
- applyTo: HTTP_FILTER
  match: {context: SIDECAR_INBOUND}
  patch:
    operation: INSERT_BEFORE
    value:
      name: envoy.filters.http.local_ratelimit
      typed_config:
        "@type": type.googleapis.com/udpa.type.v1.TypedStruct
        type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
        value:
          stat_prefix: http_local_rate_limiter
          token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}
"#,
        );
        let p = compile(&s).unwrap();
        let json = serde_json::to_value(p[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(
            json["typedConfig"]["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
        );
        assert_eq!(json["typedConfig"]["tokenBucket"]["maxTokens"], 4);
    }

    #[test]
    fn errors_name_the_patch_and_field() {
        let s = spec(
            r#"
configPatches:
- applyTo: CLUSTER
  patch: {operation: MERGE, value: {connect_timeout: 1s}}
- applyTo: HTTP_FILTER
  patch:
    operation: ADD
    value:
      name: x
      typed_config:
        "@type": type.googleapis.com/udpa.type.v1.TypedStruct
        type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
        value: {stat_prefx: a}
"#,
        );
        let (field, msg) = compile(&s).unwrap_err();
        assert_eq!(
            field, "spec.configPatches[1].patch.value.typed_config.value.stat_prefx",
            "{msg}"
        );
    }
}
