//! `MeshState`: every file's objects joined into one consistent, immutable model.
//!
//! [`MeshStore`] sits on the config store (`crate::config::store`, which knows files and
//! nothing of the mesh) and decides whether a change takes effect. It keeps the objects
//! in effect one store per kind ([`inputs`]) and assembles the mesh one stage per kind
//! ([`stages`]): a reload reruns only the stages whose inputs changed, and an incremental
//! build always equals a fresh one (`tests/mesh_incremental.rs` holds it to that). The
//! stages perform the cross-object checks (a route's host is a service, its subset is
//! defined, no two objects claim the same host), so translation can trust the mesh and
//! never fails half-way.
//!
//! **Clusters.** Workloads come from the config folder (they run in the mesh control
//! plane's own cluster, `MeshConfig.clusterName`, default `primary`) and from the
//! registries that member clusters' relays report. Every workload
//! knows its cluster, network and locality. Keys in [`MeshState::workloads`] stay unique
//! across clusters: `NAME.NAMESPACE` for the own cluster (as before, so single-cluster
//! meshes, node ids and the CLI are unchanged) and `NAME.NAMESPACE@CLUSTER` for a member
//! cluster's workload ([`MeshState::workload_key`]). Services select workloads of every
//! cluster.

mod destination_rules;
pub mod inputs;
mod policies;
mod services;
mod settings;
pub mod stages;
mod store;
mod virtual_services;
mod workloads;

pub use crate::config::store::member_kind_error;
pub use crate::config::ClusterMeta;
pub use stages::StageError;
pub use store::MeshStore;

use crate::config::model::*;
use crate::config::peer_authentication::PeerAuthentications;
use crate::config::security::SecurityPolicies;
use crate::config::{ConfigError, ConfigObject};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The mesh control plane's own cluster when `MeshConfig.clusterName` is not set.
pub const DEFAULT_CLUSTER_NAME: &str = "primary";

/// Annotations that place a sidecar in explicit interception mode (DESIGN.md): where the
/// application listens and where the sidecar binds its outbound listeners.
pub const APP_ADDRESS_ANNOTATION: &str = "sidecar.trellis.dev/app-address";
pub const OUTBOUND_ADDRESS_ANNOTATION: &str = "sidecar.trellis.dev/outbound-address";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub(crate) fn parse(s: Option<&str>) -> Protocol {
        match s.map(str::to_ascii_uppercase).as_deref() {
            Some("HTTP") => Protocol::Http,
            Some("HTTP2") => Protocol::Http2,
            Some("GRPC") => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    }
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
    /// Upstream needs HTTP/2 (gRPC cannot be downgraded to HTTP/1.1).
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub number: u32,
    pub name: String,
    pub protocol: Protocol,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
    /// Key of the workload ([`MeshState::workload_key`]), `None` for inline ServiceEntry
    /// endpoints.
    pub workload: Option<String>,
    /// The WorkloadEntry's service account (its SPIFFE identity), `None` for inline
    /// endpoints; part of the endpoint so a change re-translates the service's clusters.
    pub service_account: Option<String>,
    /// The cluster the workload runs in, `None` for inline endpoints (they are not in a
    /// cluster of the mesh). EDS ranks endpoints by it relative to the proxy's cluster.
    pub cluster: Option<String>,
}

impl Endpoint {
    pub fn port_for(&self, p: &ServicePortInfo) -> u32 {
        self.ports
            .get(&p.name)
            .copied()
            .or(p.target_port)
            .unwrap_or(p.number)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub fqdn: String,
    pub namespace: String,
    pub entry: String,
    pub ports: Vec<ServicePortInfo>,
    pub mesh_internal: bool,
    pub selector: Option<BTreeMap<String, String>>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePortInfo> {
        self.ports.iter().find(|p| p.number == number)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique across clusters: `name.namespace`, with `@cluster` for a member cluster's.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub address: IpAddr,
    pub app_address: IpAddr,
    pub outbound_address: IpAddr,
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// `region[/zone[/subzone]]`: the WorkloadEntry's own, else its member cluster's.
    pub locality: Option<String>,
    /// The cluster it runs in: the mesh's own (`MeshConfig.clusterName`) or a member's.
    pub cluster: String,
    /// Its network: the WorkloadEntry's `network`, else its cluster's.
    pub network: String,
}

impl Workload {
    /// `name.namespace`, as the sidecar's node id names it (without the cluster).
    pub fn id(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteDestination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u32>,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpMatchRequest>,
    pub destinations: Vec<RouteDestination>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub key: String,
    pub namespace: String,
    pub hosts: Vec<String>,
    pub http: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubsetInfo {
    pub labels: BTreeMap<String, String>,
    /// The subset's own `trafficPolicy` (validated), merged over the rule's per cluster.
    pub policy: Option<TrafficPolicy>,
}

/// A DestinationRule in effect for one host. The validated policies are kept as written
/// and resolved per cluster ([`DestinationRuleInfo::policy`]), so comparing two infos
/// compares everything translation reads from them.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRuleInfo {
    pub key: String,
    pub policy: Option<TrafficPolicy>,
    pub subsets: BTreeMap<String, SubsetInfo>,
}

impl DestinationRuleInfo {
    /// The policy of the cluster for service port `port` and `subset`.
    pub fn policy(&self, subset: Option<&str>, port: u32) -> ClusterPolicy {
        let sub = subset
            .and_then(|s| self.subsets.get(s))
            .and_then(|s| s.policy.as_ref());
        ClusterPolicy::resolve(self.policy.as_ref(), sub, port)
    }

    /// Every `consistentHash` of the rule with where it sits (subset, port-level port):
    /// all that routes read from a rule, so routes are rebuilt only when this changes.
    pub fn consistent_hashes(&self) -> Vec<(Option<&str>, Option<u32>, &ConsistentHash)> {
        fn of<'a>(
            subset: Option<&'a str>,
            tp: Option<&'a TrafficPolicy>,
            out: &mut Vec<(Option<&'a str>, Option<u32>, &'a ConsistentHash)>,
        ) {
            let Some(tp) = tp else { return };
            let top = tp
                .load_balancer
                .as_ref()
                .and_then(|l| l.consistent_hash.as_ref());
            out.extend(top.map(|ch| (subset, None, ch)));
            for p in &tp.port_level_settings {
                let ch = p
                    .load_balancer
                    .as_ref()
                    .and_then(|l| l.consistent_hash.as_ref());
                let port = p.port.as_ref().map(|p| p.number);
                out.extend(ch.map(|ch| (subset, port, ch)));
            }
        }
        let mut out = Vec::new();
        of(None, self.policy.as_ref(), &mut out);
        for (name, s) in &self.subsets {
            of(Some(name), s.policy.as_ref(), &mut out);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshState {
    pub trust_domain: String,
    /// The cluster of the config folder's workloads (`MeshConfig.clusterName`).
    pub cluster_name: String,
    /// The network of that cluster (`MeshConfig.network`, default: the cluster name).
    pub network: String,
    /// Member clusters whose relays reported a registry, by name.
    pub members: BTreeMap<String, ClusterMeta>,
    pub cluster_domain: String,
    pub connect_timeout: Duration,
    /// Istio's root namespace: where mesh-wide policies live.
    pub root_namespace: String,
    /// Mutual TLS modes by workload and port (PeerAuthentication).
    pub peer_authentication: Arc<PeerAuthentications>,
    /// AuthorizationPolicies and RequestAuthentications (inbound RBAC and JWT).
    pub security: Arc<SecurityPolicies>,
    pub services: Arc<BTreeMap<String, Arc<Service>>>,
    /// By [`Workload::key`].
    pub workloads: Arc<BTreeMap<String, Arc<Workload>>>,
    /// Host FQDN -> the VirtualService routing it.
    pub virtual_services: Arc<BTreeMap<String, Arc<VirtualService>>>,
    /// Host FQDN -> its DestinationRule.
    pub destination_rules: Arc<BTreeMap<String, Arc<DestinationRuleInfo>>>,
    /// Workload key -> FQDNs of the services selecting it.
    pub workload_services: Arc<BTreeMap<String, Vec<String>>>,
    /// Object counts per kind, for the admin API.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Default for MeshState {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_name: DEFAULT_CLUSTER_NAME.into(),
            network: DEFAULT_CLUSTER_NAME.into(),
            members: BTreeMap::new(),
            cluster_domain: "cluster.local".into(),
            connect_timeout: Duration::from_secs(10),
            root_namespace: "istio-system".into(),
            peer_authentication: Arc::default(),
            security: Arc::default(),
            services: Arc::default(),
            workloads: Arc::default(),
            virtual_services: Arc::default(),
            destination_rules: Arc::default(),
            workload_services: Arc::default(),
            counts: BTreeMap::new(),
        }
    }
}

pub(crate) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl MeshState {
    /// The mesh of loose objects (a single-cluster mesh, as if each came from the file its
    /// source names), built from scratch.
    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a ConfigObject>,
    ) -> Result<MeshState, Vec<ConfigError>> {
        let inputs = inputs::Inputs::of_objects(objects);
        stages::build(&inputs, &stages::Outputs::default()).map(|(mesh, _)| mesh)
    }

    /// The key of workload `id` (`name.namespace`) of `cluster` in [`MeshState::workloads`].
    pub fn workload_key(&self, id: &str, cluster: &str) -> String {
        if cluster == self.cluster_name {
            id.to_string()
        } else {
            format!("{id}@{cluster}")
        }
    }

    /// The workload a proxy claims: `id` (`name.namespace`) in `cluster` (`None`: the
    /// mesh's own cluster).
    pub fn workload(&self, id: &str, cluster: Option<&str>) -> Option<&Arc<Workload>> {
        match cluster {
            None => self.workloads.get(id),
            Some(c) if c == self.cluster_name => self.workloads.get(id),
            Some(c) => self.workloads.get(&format!("{id}@{c}")),
        }
    }

    /// Turns a short host (`reviews`) into the FQDN Istio would (`reviews.NS.svc.DOMAIN`).
    pub fn resolve_host(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') {
            host.to_string()
        } else {
            format!("{host}.{namespace}.svc.{}", self.cluster_domain)
        }
    }

    /// Host names a proxy in `namespace` can use for a service: the short forms only
    /// when they are unambiguous, i.e. for Kubernetes-style hosts of its own namespace
    /// (short name) or any namespace (`name.ns`), as kube-dns search paths allow.
    pub fn host_aliases(&self, fqdn: &str, namespace: &str) -> Vec<String> {
        let mut out = vec![fqdn.to_string()];
        let suffix = format!(".svc.{}", self.cluster_domain);
        if let Some(stem) = fqdn.strip_suffix(&suffix) {
            if let Some((name, ns)) = stem.split_once('.') {
                if !ns.contains('.') {
                    out.push(format!("{name}.{ns}"));
                    out.push(format!("{name}.{ns}.svc"));
                    if ns == namespace {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out
    }

    /// Services whose selector picks this workload.
    pub fn services_of<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.workload_services
            .get(&w.key)
            .into_iter()
            .flatten()
            .filter_map(|fqdn| self.services.get(fqdn))
    }

    /// Distinct (workload port, protocol) pairs the sidecar must accept inbound.
    pub fn inbound_ports(&self, w: &Workload) -> BTreeSet<(u32, Protocol)> {
        services::inbound_ports(w, &self.services, &self.workload_services)
    }

    /// Endpoints of a service port, optionally narrowed to a subset.
    pub fn subset_endpoints<'a>(
        &'a self,
        svc: &'a Service,
        subset: Option<&str>,
    ) -> Vec<&'a Endpoint> {
        let labels = subset.and_then(|s| {
            self.destination_rules
                .get(&svc.fqdn)
                .and_then(|dr| dr.subsets.get(s))
                .map(|s| &s.labels)
        });
        svc.endpoints
            .iter()
            .filter(|e| labels.is_none_or(|l| selects(l, &e.labels)))
            .collect()
    }

    /// The DestinationRule policy of one outbound cluster of `svc`; empty without a rule.
    pub fn cluster_policy(&self, svc: &Service, subset: Option<&str>, port: u32) -> ClusterPolicy {
        self.destination_rules
            .get(&svc.fqdn)
            .map(|dr| dr.policy(subset, port))
            .unwrap_or_default()
    }
}
