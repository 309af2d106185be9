//! Serde shapes of the Istio-style documents Trellis accepts.
//!
//! Every spec struct denies unknown fields: a field Trellis does not implement is a
//! validation error naming that field, never silently ignored (an ignored retry or
//! fault rule is worse than a rejected one). Kubernetes object metadata is lenient
//! because `uid`, `resourceVersion` and friends carry no mesh meaning.

use serde::Deserialize;
use std::collections::BTreeMap;

pub use super::virtual_service::*;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// SPIFFE trust domain; also the cluster domain used for short host names.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Kubernetes cluster domain (`svc.<clusterDomain>` suffix of service hosts).
    #[serde(default)]
    pub cluster_domain: Option<String>,
    /// Upstream connect timeout for every outbound cluster (Go duration, e.g. `2s`).
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Istio's root namespace (default `istio-system`): policies here without a
    /// selector are mesh-wide.
    #[serde(default)]
    pub root_namespace: Option<String>,
    /// The cluster the config folder's workloads run in (default `primary`): EDS ranks
    /// endpoints by cluster relative to each proxy's (member clusters have other names).
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// The network of that cluster (default: the cluster name).
    #[serde(default)]
    pub network: Option<String>,
    /// DNS servers (`IP` or `IP:PORT`) the sidecars ask for the hosts of `resolution: DNS`
    /// ServiceEntries; empty: the resolvers of each sidecar's host (`/etc/resolv.conf`).
    #[serde(default)]
    pub dns_resolvers: Vec<String>,
    /// PEM file of the CAs sidecars trust when they fetch an `https://` `jwksUri`
    /// (a path on the sidecar's host; default `/etc/ssl/certs/ca-certificates.crt`,
    /// the system bundle of Debian, Ubuntu and Alpine, and of Istio's proxy image).
    #[serde(default)]
    pub jwks_ca_certificates: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Virtual IPs or CIDRs of the service (used to match traffic by destination address
    /// under transparent interception).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// SPIFFE ids (or DNS names) the service's endpoints may present under mutual TLS;
    /// replaces the ids Trellis derives from the selected workloads.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    pub name: String,
    #[serde(default)]
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

// DestinationRule and its traffic policy: `destination_rule.rs`.
pub use super::destination_rule::*;
