//! The mesh configuration as users write it: Istio-style YAML documents in a folder.
//!
//! `parse` turns one file into validated objects, and `store` keeps the files (of the
//! folder and of member clusters' registries) with the last good version of each. This
//! module knows nothing of the mesh: `crate::mesh::MeshStore`, above it, joins the
//! objects of all files into one consistent [`crate::mesh::MeshState`] and tells the
//! store which changes take effect.

pub mod credentials;
pub mod destination_rule;
pub mod envoy_filter;
pub mod l4_routes;
pub mod model;
pub mod parse;
pub mod peer_authentication;
pub mod request_authentication;
pub mod security;
pub mod store;
mod traffic_policy_checks;
pub mod validate;
pub mod virtual_service;
pub mod virtual_service_validate;

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a member cluster runs, from its join record: the defaults for its workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterMeta {
    /// The cluster's network; empty: the cluster's name (as the join token defaults it).
    pub network: String,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl ClusterMeta {
    /// The locality of a workload that sets none itself: `region/zone` (Envoy takes an
    /// empty region, so a zone alone is `/zone`).
    pub fn locality(&self) -> Option<String> {
        match (&self.region, &self.zone) {
            (Some(r), Some(z)) => Some(format!("{r}/{z}")),
            (Some(r), None) => Some(r.clone()),
            (None, Some(z)) => Some(format!("/{z}")),
            (None, None) => None,
        }
    }

    pub fn network_of(&self, cluster: &str) -> String {
        if self.network.is_empty() {
            cluster.to_string()
        } else {
            self.network.clone()
        }
    }
}

/// Where a document came from, so every error can point at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub file: Arc<str>,
    /// 1-based index of the document within its file.
    pub document: usize,
    /// Line of the file where the document starts.
    pub line: usize,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: document {} (line {})",
            self.file, self.document, self.line
        )
    }
}

/// A rejected document or file. Display reads as one line an operator can act on:
/// `examples/vs.yaml: document 2 (line 14): VirtualService default/reviews: spec.http[0].route: ...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ConfigError {
    pub file: Arc<str>,
    pub document: Option<usize>,
    pub line: Option<usize>,
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        source: &Source,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) -> Self {
        Self {
            file: source.file.clone(),
            document: Some(source.document),
            line: Some(source.line),
            object,
            field,
            message,
        }
    }

    /// An error about a whole file (unreadable, not UTF-8).
    pub fn file(file: &str, message: String) -> Self {
        Self {
            file: Arc::from(file),
            document: None,
            line: None,
            object: None,
            field: None,
            message,
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(d), Some(l)) = (self.document, self.line) {
            write!(f, ": document {d} (line {l})")?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A located remark about config that takes effect but does less than it says (a rule
/// naming a delegate VirtualService that does not exist, which Istio drops too). It has
/// the shape of a [`ConfigError`] but keeps nothing from taking effect: `/debug/configz`
/// and `xds-server analyze` list it beside the errors.
pub type ConfigWarning = ConfigError;

/// A parsed, individually validated Kubernetes-style object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T> {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub source: Source,
    pub spec: T,
}

impl<T> Object<T> {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConfigObject {
    MeshConfig(Object<model::MeshConfigSpec>),
    ServiceEntry(Object<model::ServiceEntrySpec>),
    WorkloadEntry(Object<model::WorkloadEntrySpec>),
    VirtualService(Object<model::VirtualServiceSpec>),
    DestinationRule(Object<model::DestinationRuleSpec>),
    PeerAuthentication(Object<peer_authentication::PeerAuthenticationSpec>),
    AuthorizationPolicy(Object<security::AuthorizationPolicySpec>),
    RequestAuthentication(Object<request_authentication::RequestAuthenticationSpec>),
    EnvoyFilter(Object<envoy_filter::EnvoyFilterSpec>),
}

impl ConfigObject {
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigObject::MeshConfig(_) => "MeshConfig",
            ConfigObject::ServiceEntry(_) => "ServiceEntry",
            ConfigObject::WorkloadEntry(_) => "WorkloadEntry",
            ConfigObject::VirtualService(_) => "VirtualService",
            ConfigObject::DestinationRule(_) => "DestinationRule",
            ConfigObject::PeerAuthentication(_) => "PeerAuthentication",
            ConfigObject::AuthorizationPolicy(_) => "AuthorizationPolicy",
            ConfigObject::RequestAuthentication(_) => "RequestAuthentication",
            ConfigObject::EnvoyFilter(_) => "EnvoyFilter",
        }
    }

    pub fn source(&self) -> &Source {
        match self {
            ConfigObject::MeshConfig(o) => &o.source,
            ConfigObject::ServiceEntry(o) => &o.source,
            ConfigObject::WorkloadEntry(o) => &o.source,
            ConfigObject::VirtualService(o) => &o.source,
            ConfigObject::DestinationRule(o) => &o.source,
            ConfigObject::PeerAuthentication(o) => &o.source,
            ConfigObject::AuthorizationPolicy(o) => &o.source,
            ConfigObject::RequestAuthentication(o) => &o.source,
            ConfigObject::EnvoyFilter(o) => &o.source,
        }
    }

    pub fn key(&self) -> String {
        match self {
            ConfigObject::MeshConfig(o) => o.key(),
            ConfigObject::ServiceEntry(o) => o.key(),
            ConfigObject::WorkloadEntry(o) => o.key(),
            ConfigObject::VirtualService(o) => o.key(),
            ConfigObject::DestinationRule(o) => o.key(),
            ConfigObject::PeerAuthentication(o) => o.key(),
            ConfigObject::AuthorizationPolicy(o) => o.key(),
            ConfigObject::RequestAuthentication(o) => o.key(),
            ConfigObject::EnvoyFilter(o) => o.key(),
        }
    }
}

/// Parses a Go-style duration as Istio users write them (`1.5s`, `300ms`, `2m`, `1h`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration `{s}` has no unit (use e.g. 500ms, 2s, 1m)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration `{s}` does not start with a number"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "duration `{s}` has unknown unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=315_576_000_000.0).contains(&secs) {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}
