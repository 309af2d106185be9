//! `MeshState`: every file's objects joined into one consistent, immutable model.
//!
//! Building it performs the cross-object checks (a route's host is a service, its subset
//! is defined, no two objects claim the same host), so translation can trust it and never
//! fails half-way.

use crate::config::model::*;
use crate::config::peer_authentication::{PeerAuthenticationSpec, PeerAuthentications};
use crate::config::security::{Named, SecurityPolicies};
use crate::config::{parse_duration, ConfigError, ConfigObject, Object, Source};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

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
    fn parse(s: Option<&str>) -> Protocol {
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
    /// `name.namespace` of the WorkloadEntry, `None` for inline ServiceEntry endpoints.
    pub workload: Option<String>,
    /// The WorkloadEntry's service account (its SPIFFE identity), `None` for inline
    /// endpoints; part of the endpoint so a change re-translates the service's clusters.
    pub service_account: Option<String>,
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
    pub name: String,
    pub namespace: String,
    pub address: IpAddr,
    pub app_address: IpAddr,
    pub outbound_address: IpAddr,
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub locality: Option<String>,
}

impl Workload {
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
    pub lb: Option<String>,
    /// `trafficPolicy.tls.mode` of the subset (DISABLE / ISTIO_MUTUAL).
    pub tls: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRuleInfo {
    pub key: String,
    pub lb: Option<String>,
    /// `trafficPolicy.tls.mode` (DISABLE / ISTIO_MUTUAL); `None`: automatic mTLS.
    pub tls: Option<String>,
    pub subsets: BTreeMap<String, SubsetInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshState {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub connect_timeout: Duration,
    /// Istio's root namespace: where mesh-wide policies live.
    pub root_namespace: String,
    /// Mutual TLS modes by workload and port (PeerAuthentication).
    pub peer_authentication: Arc<PeerAuthentications>,
    /// AuthorizationPolicies and RequestAuthentications (inbound RBAC and JWT).
    pub security: SecurityPolicies,
    pub services: BTreeMap<String, Arc<Service>>,
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Host FQDN -> the VirtualService routing it.
    pub virtual_services: BTreeMap<String, Arc<VirtualService>>,
    /// Host FQDN -> its DestinationRule.
    pub destination_rules: BTreeMap<String, Arc<DestinationRuleInfo>>,
    /// Workload id -> FQDNs of the services selecting it.
    pub workload_services: BTreeMap<String, Vec<String>>,
    /// Object counts per kind, for the admin API.
    pub counts: BTreeMap<&'static str, usize>,
}

impl Default for MeshState {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            connect_timeout: Duration::from_secs(10),
            root_namespace: "istio-system".into(),
            peer_authentication: Arc::default(),
            security: SecurityPolicies::default(),
            services: BTreeMap::new(),
            workloads: BTreeMap::new(),
            virtual_services: BTreeMap::new(),
            destination_rules: BTreeMap::new(),
            workload_services: BTreeMap::new(),
            counts: BTreeMap::new(),
        }
    }
}

/// Workloads by (namespace, label key, label value).
struct LabelIndex {
    map: std::collections::HashMap<(String, String, String), Vec<Arc<Workload>>>,
}

impl LabelIndex {
    fn new<'a>(workloads: impl Iterator<Item = &'a Arc<Workload>>) -> Self {
        let mut map: std::collections::HashMap<_, Vec<Arc<Workload>>> = Default::default();
        for w in workloads {
            for (k, v) in &w.labels {
                map.entry((w.namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .push(w.clone());
            }
        }
        Self { map }
    }

    /// Workloads that carry at least the rarest label of `selector`.
    fn candidates(&self, ns: &str, selector: &BTreeMap<String, String>) -> &[Arc<Workload>] {
        selector
            .iter()
            .map(|(k, v)| {
                let key = (ns.to_string(), k.clone(), v.clone());
                self.map.get(&key).map(Vec::as_slice).unwrap_or_default()
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default()
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

struct Errors(Vec<ConfigError>);
impl Errors {
    fn push<T>(
        &mut self,
        o: &Object<T>,
        kind: &str,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) {
        self.0.push(ConfigError::new(
            &o.source,
            Some(format!("{kind} {}", o.key())),
            Some(field.into()),
            msg.into(),
        ));
    }
}

/// A policy without its file position, so moving it between files is not a mesh change.
fn named<T: Clone>(o: &Object<T>) -> Named<T> {
    Named {
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        spec: o.spec.clone(),
    }
}

fn describe(s: &Source) -> String {
    format!("{} document {}", s.file, s.document)
}

impl MeshState {
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

    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a ConfigObject>,
    ) -> Result<MeshState, Vec<ConfigError>> {
        let mut mesh = MeshState::default();
        let mut errs = Errors(Vec::new());
        let mut seen: BTreeMap<(&'static str, String), Source> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut wes = Vec::new();
        let mut vss = Vec::new();
        let mut drs = Vec::new();
        let mut pas: Vec<&Object<PeerAuthenticationSpec>> = Vec::new();
        let (mut authz, mut authn) = (Vec::new(), Vec::new());
        let mut mesh_config: Option<&Object<MeshConfigSpec>> = None;
        for obj in objects {
            *mesh.counts.entry(obj.kind()).or_default() += 1;
            if let Some(prev) = seen.insert((obj.kind(), obj.key()), obj.source().clone()) {
                errs.0.push(ConfigError::new(
                    obj.source(),
                    Some(format!("{} {}", obj.kind(), obj.key())),
                    Some("metadata.name".into()),
                    format!("already defined in {}", describe(&prev)),
                ));
                continue;
            }
            match obj {
                ConfigObject::MeshConfig(o) => {
                    if let Some(prev) = mesh_config {
                        errs.push(
                            o,
                            "MeshConfig",
                            "metadata.name",
                            format!(
                                "only one MeshConfig is allowed; another is in {}",
                                describe(&prev.source)
                            ),
                        );
                    }
                    mesh_config = Some(o);
                }
                ConfigObject::ServiceEntry(o) => entries.push(o),
                ConfigObject::WorkloadEntry(o) => wes.push(o),
                ConfigObject::VirtualService(o) => vss.push(o),
                ConfigObject::DestinationRule(o) => drs.push(o),
                ConfigObject::PeerAuthentication(o) => pas.push(o),
                ConfigObject::AuthorizationPolicy(o) => authz.push(named(o)),
                ConfigObject::RequestAuthentication(o) => authn.push(named(o)),
            }
        }
        if let Some(mc) = mesh_config {
            if let Some(td) = &mc.spec.trust_domain {
                mesh.trust_domain = td.clone();
            }
            if let Some(cd) = &mc.spec.cluster_domain {
                mesh.cluster_domain = cd.clone();
            }
            if let Some(t) = &mc.spec.connect_timeout {
                // Already validated per document.
                mesh.connect_timeout = parse_duration(t).unwrap_or(mesh.connect_timeout);
            }
            if let Some(ns) = &mc.spec.root_namespace {
                mesh.root_namespace = ns.clone();
            }
        }

        // Istio never applies a selector policy of the root namespace (it is neither
        // mesh-wide nor a workload policy there); Trellis says so instead of ignoring it.
        pas.retain(|pa| {
            let misplaced =
                pa.namespace == mesh.root_namespace && pa.spec.match_labels().is_some();
            if misplaced {
                errs.push(
                    pa,
                    "PeerAuthentication",
                    "spec.selector",
                    format!(
                        "a policy with a selector in the root namespace `{}` applies to no workload (Istio ignores it); put it in the workload's namespace, or drop the selector for a mesh-wide policy",
                        mesh.root_namespace
                    ),
                );
            }
            !misplaced
        });
        mesh.peer_authentication = Arc::new(PeerAuthentications::new(
            &mesh.root_namespace,
            pas.iter()
                .map(|pa| (pa.namespace.as_str(), pa.name.as_str(), &pa.spec)),
        ));
        mesh.security = SecurityPolicies::new(authz, authn);

        for we in &wes {
            let annotation_ip = |key: &str, errs: &mut Errors| -> Option<IpAddr> {
                match we.annotations.get(key) {
                    None => Some(IpAddr::from([127, 0, 0, 1])),
                    Some(v) => match v.parse() {
                        Ok(ip) => Some(ip),
                        Err(_) => {
                            errs.push(
                                we,
                                "WorkloadEntry",
                                format!("metadata.annotations.{key}"),
                                format!("`{v}` is not an IP address"),
                            );
                            None
                        }
                    },
                }
            };
            let app = annotation_ip(APP_ADDRESS_ANNOTATION, &mut errs);
            let outbound = annotation_ip(OUTBOUND_ADDRESS_ANNOTATION, &mut errs);
            let (Some(app_address), Some(outbound_address), Ok(address)) =
                (app, outbound, we.spec.address.parse())
            else {
                continue;
            };
            let w = Workload {
                name: we.name.clone(),
                namespace: we.namespace.clone(),
                address,
                app_address,
                outbound_address,
                ports: we.spec.ports.clone(),
                labels: we.spec.labels.clone(),
                service_account: we
                    .spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                locality: we.spec.locality.clone(),
            };
            mesh.workloads.insert(w.id(), Arc::new(w));
        }

        // Selecting workloads by scanning all of them per service is O(services x
        // workloads); an index by (namespace, label) keeps large meshes fast.
        let by_label = LabelIndex::new(mesh.workloads.values());
        let mut selected: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut host_owner: BTreeMap<String, Source> = BTreeMap::new();
        for se in &entries {
            for (i, host) in se.spec.hosts.iter().enumerate() {
                let fqdn = mesh.resolve_host(host, &se.namespace);
                if let Some(prev) = host_owner.get(&fqdn) {
                    errs.push(
                        se,
                        "ServiceEntry",
                        format!("spec.hosts[{i}]"),
                        format!(
                            "host `{fqdn}` is already defined by the ServiceEntry in {}",
                            describe(prev)
                        ),
                    );
                    continue;
                }
                host_owner.insert(fqdn.clone(), se.source.clone());
                let ports: Vec<ServicePortInfo> = se
                    .spec
                    .ports
                    .iter()
                    .map(|p| ServicePortInfo {
                        number: p.number,
                        name: p.name.clone(),
                        protocol: Protocol::parse(p.protocol.as_deref()),
                        target_port: p.target_port,
                    })
                    .collect();
                let selector = se.spec.workload_selector.as_ref().map(|s| s.labels.clone());
                let mut endpoints: Vec<Endpoint> = se
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        Some(Endpoint {
                            address: e.address.parse().ok()?,
                            ports: e.ports.clone(),
                            labels: e.labels.clone(),
                            locality: e.locality.clone(),
                            weight: e.weight,
                            workload: None,
                            service_account: None,
                        })
                    })
                    .collect();
                if let Some(sel) = &selector {
                    for w in by_label.candidates(&se.namespace, sel) {
                        if selects(sel, &w.labels) {
                            endpoints.push(Endpoint {
                                address: w.address,
                                ports: w.ports.clone(),
                                labels: w.labels.clone(),
                                locality: w.locality.clone(),
                                weight: None,
                                workload: Some(w.id()),
                                service_account: Some(w.service_account.clone()),
                            });
                            selected.entry(w.id()).or_default().push(fqdn.clone());
                        }
                    }
                }
                mesh.services.insert(
                    fqdn.clone(),
                    Arc::new(Service {
                        fqdn,
                        namespace: se.namespace.clone(),
                        entry: se.key(),
                        ports,
                        mesh_internal: se.spec.location.as_deref() != Some("MESH_EXTERNAL"),
                        selector,
                        endpoints,
                    }),
                );
            }
        }

        drop(by_label);
        mesh.workload_services = selected;

        for dr in &drs {
            let host = mesh.resolve_host(&dr.spec.host, &dr.namespace);
            if !mesh.services.contains_key(&host) {
                errs.push(
                    dr,
                    "DestinationRule",
                    "spec.host",
                    format!("`{host}` is not a service in the mesh"),
                );
                continue;
            }
            if mesh.destination_rules.contains_key(&host) {
                errs.push(
                    dr,
                    "DestinationRule",
                    "spec.host",
                    format!("another DestinationRule already applies to `{host}`"),
                );
                continue;
            }
            let lb = |tp: &Option<TrafficPolicy>| {
                tp.as_ref()
                    .and_then(|t| t.load_balancer.as_ref())
                    .map(|l| l.simple.clone())
            };
            let tls = |tp: &Option<TrafficPolicy>| {
                tp.as_ref()
                    .and_then(|t| t.tls.as_ref())
                    .map(|t| t.mode.clone())
            };
            mesh.destination_rules.insert(
                host,
                Arc::new(DestinationRuleInfo {
                    key: dr.key(),
                    lb: lb(&dr.spec.traffic_policy),
                    tls: tls(&dr.spec.traffic_policy),
                    subsets: dr
                        .spec
                        .subsets
                        .iter()
                        .map(|s| {
                            (
                                s.name.clone(),
                                SubsetInfo {
                                    labels: s.labels.clone(),
                                    lb: lb(&s.traffic_policy),
                                    tls: tls(&s.traffic_policy),
                                },
                            )
                        })
                        .collect(),
                }),
            );
        }

        for vs in &vss {
            let mut hosts = Vec::new();
            let mut ok = true;
            for (i, h) in vs.spec.hosts.iter().enumerate() {
                let fqdn = mesh.resolve_host(h, &vs.namespace);
                if !mesh.services.contains_key(&fqdn) {
                    errs.push(
                        vs,
                        "VirtualService",
                        format!("spec.hosts[{i}]"),
                        format!("`{fqdn}` is not a service in the mesh"),
                    );
                    ok = false;
                } else if let Some(other) = mesh.virtual_services.get(&fqdn) {
                    errs.push(
                        vs,
                        "VirtualService",
                        format!("spec.hosts[{i}]"),
                        format!("`{fqdn}` is already routed by VirtualService {}", other.key),
                    );
                    ok = false;
                }
                hosts.push(fqdn);
            }
            let mut http = Vec::new();
            for (i, r) in vs.spec.http.iter().enumerate() {
                let mut destinations = Vec::new();
                for (j, d) in r.route.iter().enumerate() {
                    let f = format!("spec.http[{i}].route[{j}].destination");
                    let host = mesh.resolve_host(&d.destination.host, &vs.namespace);
                    let Some(svc) = mesh.services.get(&host) else {
                        errs.push(
                            vs,
                            "VirtualService",
                            format!("{f}.host"),
                            format!("`{host}` is not a service in the mesh"),
                        );
                        ok = false;
                        continue;
                    };
                    let port = d.destination.port.as_ref().map(|p| p.number);
                    if let Some(p) = port {
                        if svc.port(p).is_none() {
                            errs.push(
                                vs,
                                "VirtualService",
                                format!("{f}.port.number"),
                                format!("service `{host}` has no port {p}"),
                            );
                            ok = false;
                        }
                    }
                    if let Some(subset) = &d.destination.subset {
                        let defined = mesh
                            .destination_rules
                            .get(&host)
                            .is_some_and(|dr| dr.subsets.contains_key(subset));
                        if !defined {
                            errs.push(vs, "VirtualService", format!("{f}.subset"), format!("subset `{subset}` of `{host}` is not defined by any DestinationRule"));
                            ok = false;
                        }
                    }
                    let weight = d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 });
                    destinations.push(RouteDestination {
                        host,
                        subset: d.destination.subset.clone(),
                        port,
                        weight,
                    });
                }
                http.push(HttpRouteRule {
                    name: r.name.clone(),
                    matches: r.matches.clone(),
                    destinations,
                    timeout: r.timeout.as_deref().and_then(|t| parse_duration(t).ok()),
                    retries: r.retries.as_ref().map(|rt| RetryPolicy {
                        attempts: rt.attempts,
                        per_try_timeout: rt
                            .per_try_timeout
                            .as_deref()
                            .and_then(|t| parse_duration(t).ok()),
                        retry_on: rt.retry_on.clone(),
                    }),
                });
            }
            if ok {
                let info = Arc::new(VirtualService {
                    key: vs.key(),
                    namespace: vs.namespace.clone(),
                    hosts: hosts.clone(),
                    http,
                });
                for h in hosts {
                    mesh.virtual_services.insert(h, info.clone());
                }
            }
        }

        // Two workloads on one inbound address:port would make two sidecars fight for a socket.
        let mut inbound: BTreeMap<(IpAddr, u32), String> = BTreeMap::new();
        for w in mesh.workloads.values() {
            for port in mesh.inbound_ports(w) {
                if let Some(other) = inbound.insert((w.address, port.0), w.id()) {
                    if other != w.id() {
                        if let Some(we) = wes
                            .iter()
                            .find(|we| we.name == w.name && we.namespace == w.namespace)
                        {
                            errs.push(
                                we,
                                "WorkloadEntry",
                                "spec.address",
                                format!(
                                    "{}:{} is already the inbound address of workload {other}",
                                    w.address, port.0
                                ),
                            );
                        }
                    }
                }
            }
        }

        if errs.0.is_empty() {
            Ok(mesh)
        } else {
            Err(errs.0)
        }
    }

    /// Services whose selector picks this workload.
    pub fn services_of<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.workload_services
            .get(&w.id())
            .into_iter()
            .flatten()
            .filter_map(|fqdn| self.services.get(fqdn))
    }

    /// Distinct (workload port, protocol) pairs the sidecar must accept inbound.
    pub fn inbound_ports(&self, w: &Workload) -> BTreeSet<(u32, Protocol)> {
        let mut out = BTreeSet::new();
        for s in self.services_of(w) {
            for p in &s.ports {
                let ep_port = w
                    .ports
                    .get(&p.name)
                    .copied()
                    .or(p.target_port)
                    .unwrap_or(p.number);
                out.insert((ep_port, p.protocol));
            }
        }
        out
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
}
