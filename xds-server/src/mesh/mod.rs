//! `MeshState`: every file's objects joined into one consistent, immutable model.
//!
//! [`MeshStore`] sits on the config store (`crate::config::store`, which knows files and
//! nothing of the mesh) and decides whether a change takes effect. It keeps the objects
//! in effect one store per kind ([`inputs`]) and assembles the mesh one stage per kind
//! ([`stages`]): a reload reruns only the stages whose inputs changed, and an incremental
//! build always equals a fresh one (`tests/mesh_incremental.rs` holds it to that). The
//! stages perform the cross-object checks (a route's host is a service, its subset is
//! defined, no two objects claim the same host), so translation can trust the mesh and
//! never fails half-way. Delegate VirtualServices are merged into their roots there too
//! (`delegates.rs`), so translation only ever sees plain rules.
//!
//! **Clusters.** Workloads come from the config folder (they run in the mesh control
//! plane's own cluster, `MeshConfig.clusterName`, default `primary`) and from the
//! registries that member clusters' relays report. Every workload
//! knows its cluster, network and locality. Keys in [`MeshState::workloads`] stay unique
//! across clusters: `NAME.NAMESPACE` for the own cluster (as before, so single-cluster
//! meshes, node ids and the CLI are unchanged) and `NAME.NAMESPACE@CLUSTER` for a member
//! cluster's workload ([`MeshState::workload_key`]). Services select workloads of every
//! cluster.

mod delegates;
mod destination_rules;
pub mod envoy_filters;
mod http_route;
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
pub use stages::{StageError, StageWarning};
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
/// The system CA bundle sidecars verify `https://` JWKS servers with, unless MeshConfig
/// names another (`jwksCaCertificates`).
pub const DEFAULT_JWKS_CA_CERTIFICATES: &str = "/etc/ssl/certs/ca-certificates.crt";

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
    /// TLS the application opens itself (HTTPS, TLS): routed by SNI, never terminated.
    Tls,
}

impl Protocol {
    pub(crate) fn parse(s: Option<&str>) -> Protocol {
        match s.map(str::to_ascii_uppercase).as_deref() {
            Some("HTTP") => Protocol::Http,
            Some("HTTP2") => Protocol::Http2,
            Some("GRPC") => Protocol::Grpc,
            Some("HTTPS" | "TLS") => Protocol::Tls,
            _ => Protocol::Tcp,
        }
    }
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp | Protocol::Tls)
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
    /// The workload's network, or the inline endpoint's `network`: the value of the
    /// `topology.istio.io/network` label a `failoverPriority` may compare.
    pub network: Option<String>,
}

impl ServicePortInfo {
    /// The port an endpoint with `ports` (by port name) takes this service port on: its
    /// own, else the `targetPort`, else the service port.
    pub fn endpoint_port(&self, ports: &BTreeMap<String, u32>) -> u32 {
        ports
            .get(&self.name)
            .copied()
            .or(self.target_port)
            .unwrap_or(self.number)
    }
}

impl Endpoint {
    pub fn port_for(&self, p: &ServicePortInfo) -> u32 {
        p.endpoint_port(&self.ports)
    }
}

/// How a service's endpoints are found (ServiceEntry `resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// IP endpoints, sent over EDS.
    Static,
    /// Host names the sidecar resolves itself and connects to every address (Envoy's
    /// STRICT_DNS).
    Dns,
    /// Host names the sidecar resolves, connecting to one address at a time (LOGICAL_DNS).
    DnsRoundRobin,
    /// No endpoints: traffic goes where the caller dialled (ORIGINAL_DST), which needs
    /// transparent interception to know.
    None,
}

impl Resolution {
    pub(crate) fn parse(s: Option<&str>) -> Resolution {
        match s {
            Some("STATIC") => Resolution::Static,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            _ => Resolution::None,
        }
    }

    pub fn is_dns(self) -> bool {
        matches!(self, Resolution::Dns | Resolution::DnsRoundRobin)
    }
}

/// An endpoint of a DNS-resolved service: a host name (or IP) the sidecar resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    pub address: String,
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
}

impl DnsEndpoint {
    pub fn port_for(&self, p: &ServicePortInfo) -> u32 {
        p.endpoint_port(&self.ports)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The host; a wildcard `*.example.com` for a ServiceEntry that names a domain.
    pub fqdn: String,
    pub namespace: String,
    pub entry: String,
    pub ports: Vec<ServicePortInfo>,
    pub mesh_internal: bool,
    pub selector: Option<BTreeMap<String, String>>,
    pub resolution: Resolution,
    /// IP endpoints (resolution STATIC).
    pub endpoints: Vec<Endpoint>,
    /// Named endpoints (resolution DNS and DNS_ROUND_ROBIN); the host itself when the
    /// ServiceEntry lists none.
    pub dns_endpoints: Vec<DnsEndpoint>,
    /// ServiceEntry `addresses`: VIPs and CIDRs.
    pub addresses: Vec<String>,
    /// ServiceEntry `subjectAltNames`: who its endpoints may be under mutual TLS.
    pub subject_alt_names: Vec<String>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePortInfo> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Endpoints go over EDS (as opposed to DNS or the caller's destination).
    pub fn uses_eds(&self) -> bool {
        self.resolution == Resolution::Static
    }

    /// A sidecar in explicit interception mode can reach it: every resolution but NONE,
    /// whose destination only an intercepted connection carries.
    pub fn explicitly_reachable(&self) -> bool {
        self.resolution != Resolution::None
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
    /// Header changes for requests to (and responses from) this destination only.
    pub headers: Option<Headers>,
}

/// Where a copy of each request goes (`mirror` / `mirrors`), fire and forget.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorTarget {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u32>,
    /// Share of requests mirrored, 0..=100; `None`: all of them.
    pub percentage: Option<f64>,
}

/// One `http` rule of a VirtualService, its hosts resolved and checked against the mesh;
/// the options that need no resolving stay in their validated spec form.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpMatchRequest>,
    /// Empty when the rule redirects or answers directly.
    pub destinations: Vec<RouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub fault: Option<HttpFaultInjection>,
    pub mirrors: Vec<MirrorTarget>,
    pub headers: Option<Headers>,
    pub cors: Option<CorsPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Option<String>,
    /// Retries prefer other localities than the ones already tried.
    pub retry_remote_localities: bool,
}

/// A `tcp` or `tls` route: connections matching any of `matches` (none: all) go to the
/// weighted destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct L4RouteRule {
    pub matches: Vec<crate::config::l4_routes::L4Match>,
    pub destinations: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub key: String,
    pub namespace: String,
    /// Namespaces whose proxies see it (`exportTo`; empty: all).
    pub export_to: Vec<String>,
    pub hosts: Vec<String>,
    pub http: Vec<HttpRouteRule>,
    pub tcp: Vec<L4RouteRule>,
    pub tls: Vec<L4RouteRule>,
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
    pub namespace: String,
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

    /// Every `credentialName` of the rule with its tls mode, in rule order.
    pub fn credentials(&self) -> Vec<(&str, &str)> {
        let policies = std::iter::once(self.policy.as_ref())
            .chain(self.subsets.values().map(|s| s.policy.as_ref()))
            .flatten();
        let mut out = Vec::new();
        for tp in policies {
            let tls = tp
                .tls
                .iter()
                .chain(tp.port_level_settings.iter().filter_map(|p| p.tls.as_ref()));
            for t in tls {
                if let Some(name) = t.credential() {
                    out.push((t.mode(), name));
                }
            }
        }
        out
    }

    pub fn names_credentials(&self) -> bool {
        !self.credentials().is_empty()
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
    /// DNS servers sidecars resolve DNS ServiceEntries with (`MeshConfig.dnsResolvers`);
    /// empty: each sidecar's host resolvers.
    pub dns_resolvers: Vec<std::net::SocketAddr>,
    /// CA bundle (a path on the sidecars' hosts) for `https://` `jwksUri`s
    /// (`MeshConfig.jwksCaCertificates`).
    pub jwks_ca_certificates: String,
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
    /// EnvoyFilters, in the order they apply (patches on the translated resources).
    pub envoy_filters: Arc<envoy_filters::EnvoyFilters>,
    /// Credential folders by name (`credentialName`), served over SDS only.
    pub credentials: Arc<BTreeMap<String, Arc<crate::config::credentials::Credential>>>,
    /// Object counts per kind, for the admin API.
    pub counts: BTreeMap<&'static str, usize>,
    /// What is in effect but routes nothing (a rule naming a missing delegate
    /// VirtualService), for `/debug/configz` and `xds-server analyze`.
    pub warnings: Arc<Vec<crate::config::ConfigWarning>>,
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
            dns_resolvers: Vec::new(),
            jwks_ca_certificates: DEFAULT_JWKS_CA_CERTIFICATES.into(),
            root_namespace: "istio-system".into(),
            peer_authentication: Arc::default(),
            security: Arc::default(),
            services: Arc::default(),
            workloads: Arc::default(),
            virtual_services: Arc::default(),
            destination_rules: Arc::default(),
            workload_services: Arc::default(),
            envoy_filters: Arc::default(),
            credentials: Arc::default(),
            counts: BTreeMap::new(),
            warnings: Arc::default(),
        }
    }
}

pub(crate) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `exportTo` (`*`, `.` or namespaces; empty: everywhere) of an object in
/// namespace `own` lets `namespace` see it.
pub(crate) fn exported_to(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == namespace || (e == "." && own == namespace))
}

impl VirtualService {
    /// Whether proxies of `namespace` see it (`exportTo`: `*`, `.` or namespaces).
    pub fn visible_in(&self, namespace: &str) -> bool {
        exported_to(&self.export_to, &self.namespace, namespace)
    }
}

impl MeshState {
    /// The VirtualService routing `fqdn` for proxies of `namespace`, if one is visible there.
    pub fn virtual_service_for(&self, fqdn: &str, namespace: &str) -> Option<&Arc<VirtualService>> {
        self.virtual_services
            .get(fqdn)
            .filter(|vs| vs.visible_in(namespace))
    }

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
