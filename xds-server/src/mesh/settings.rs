//! The settings stage: the one MeshConfig (or the defaults).

use super::inputs::KindStore;
use super::stages::{describe, Errors, StageError};
use super::DEFAULT_CLUSTER_NAME;
use crate::config::model::MeshConfigSpec;
use crate::config::{parse_duration, Object};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub connect_timeout: Duration,
    pub root_namespace: String,
    pub cluster_name: String,
    pub network: String,
    pub dns_resolvers: Vec<std::net::SocketAddr>,
    pub jwks_ca_certificates: String,
    /// The MeshConfig in effect, for errors about its fields found by later stages.
    pub object: Option<Arc<Object<MeshConfigSpec>>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            connect_timeout: Duration::from_secs(10),
            root_namespace: "istio-system".into(),
            cluster_name: DEFAULT_CLUSTER_NAME.into(),
            network: DEFAULT_CLUSTER_NAME.into(),
            dns_resolvers: Vec::new(),
            jwks_ca_certificates: super::DEFAULT_JWKS_CA_CERTIFICATES.into(),
            object: None,
        }
    }
}

impl Settings {
    /// Turns a short host (`reviews`) into the FQDN Istio would (`reviews.NS.svc.DOMAIN`).
    pub fn resolve_host(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') {
            host.to_string()
        } else {
            format!("{host}.{namespace}.svc.{}", self.cluster_domain)
        }
    }
}

pub fn build(store: &KindStore<MeshConfigSpec>, errs: &mut Errors) -> Settings {
    let mut out = Settings::default();
    let mut seen: Option<&Arc<Object<MeshConfigSpec>>> = None;
    for (_, mc) in store.iter() {
        if let Some(prev) = seen {
            let previous = describe(&prev.source);
            let e = if prev.key() == mc.key() {
                StageError::Duplicate { previous }
            } else {
                StageError::SecondMeshConfig { previous }
            };
            errs.push(mc, "MeshConfig", "metadata.name", e);
            continue;
        }
        seen = Some(mc);
    }
    let Some(mc) = seen else {
        return out;
    };
    let spec = &mc.spec;
    if let Some(td) = &spec.trust_domain {
        out.trust_domain = td.clone();
    }
    if let Some(cd) = &spec.cluster_domain {
        out.cluster_domain = cd.clone();
    }
    if let Some(t) = &spec.connect_timeout {
        // Already validated per document.
        out.connect_timeout = parse_duration(t).unwrap_or(out.connect_timeout);
    }
    if let Some(ns) = &spec.root_namespace {
        out.root_namespace = ns.clone();
    }
    if let Some(c) = &spec.cluster_name {
        out.cluster_name = c.clone();
    }
    out.network = spec
        .network
        .clone()
        .unwrap_or_else(|| out.cluster_name.clone());
    // Already validated per document.
    out.dns_resolvers = spec
        .dns_resolvers
        .iter()
        .filter_map(|r| crate::config::validate::dns_resolver(r).ok())
        .collect();
    if let Some(p) = &spec.jwks_ca_certificates {
        out.jwks_ca_certificates = p.clone();
    }
    out.object = Some(mc.clone());
    out
}
