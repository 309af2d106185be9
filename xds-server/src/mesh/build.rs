//! [`MeshState::build`]: joins every object into one mesh and checks what needs more than
//! one object (hosts claimed twice, routes to unknown services or subsets, two workloads
//! on one inbound address).

use super::workloads::{self, LabelIndex, MemberRegistry};
use super::*;
use crate::config::peer_authentication::PeerAuthenticationSpec;
use crate::config::security::Named;
use crate::config::{parse_duration, ConfigError, ConfigObject, Object, Source};

pub(super) struct Errors(pub Vec<ConfigError>);

impl Errors {
    pub fn push<T>(
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
    /// The mesh of the config folder's objects alone (a single-cluster mesh).
    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a ConfigObject>,
    ) -> Result<MeshState, Vec<ConfigError>> {
        Self::build_with_members(objects, &[])
    }

    /// The mesh of the config folder's objects plus the workloads member clusters
    /// reported. Errors name the file each object came from (for a member cluster's
    /// file, `cluster NAME: FILE`).
    pub fn build_with_members<'a>(
        objects: impl IntoIterator<Item = &'a ConfigObject>,
        members: &[MemberRegistry<'a>],
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
            if let Some(c) = &mc.spec.cluster_name {
                mesh.cluster_name = c.clone();
            }
        }
        mesh.network = mesh_config
            .and_then(|mc| mc.spec.network.clone())
            .unwrap_or_else(|| mesh.cluster_name.clone());

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

        let own_cluster = mesh.cluster_name.clone();
        let own = workloads::Origin {
            cluster: &own_cluster,
            member: false,
            network: mesh.network.clone(),
            locality: None,
        };
        let mut by_key = workloads::add(&mut mesh, &mut errs, &wes, &own);
        for m in members {
            if m.cluster == mesh.cluster_name {
                // The store refuses such a registry; only a renamed own cluster gets here.
                let msg = format!(
                    "`{}` is the name of a member cluster whose relay reports workloads; \
                     the mesh control plane's own cluster needs another name",
                    m.cluster
                );
                match mesh_config {
                    Some(mc) => errs.push(mc, "MeshConfig", "spec.clusterName", msg),
                    None => errs
                        .0
                        .push(ConfigError::file(&format!("cluster {}", m.cluster), msg)),
                }
                continue;
            }
            mesh.members.insert(m.cluster.to_string(), m.meta.clone());
            let mut seen: BTreeMap<String, Source> = BTreeMap::new();
            let mut entries = Vec::with_capacity(m.objects.len());
            for obj in &m.objects {
                *mesh.counts.entry(obj.kind()).or_default() += 1;
                let ConfigObject::WorkloadEntry(we) = obj else {
                    errs.0.push(workloads::member_kind_error(m.cluster, obj));
                    continue;
                };
                if let Some(prev) = seen.insert(we.key(), we.source.clone()) {
                    errs.push(
                        we,
                        "WorkloadEntry",
                        "metadata.name",
                        format!("already defined in {}", describe(&prev)),
                    );
                    continue;
                }
                entries.push(we);
            }
            let origin = workloads::Origin {
                cluster: m.cluster,
                member: true,
                network: m.meta.network_of(m.cluster),
                locality: m.meta.locality(),
            };
            by_key.extend(workloads::add(&mut mesh, &mut errs, &entries, &origin));
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
                            cluster: None,
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
                                workload: Some(w.key.clone()),
                                service_account: Some(w.service_account.clone()),
                                cluster: Some(w.cluster.clone()),
                            });
                            selected
                                .entry(w.key.clone())
                                .or_default()
                                .push(fqdn.clone());
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
                match super::http_route::http_rule(&mesh, &mut errs, vs, i, r) {
                    Some(rule) => http.push(rule),
                    None => ok = false,
                }
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

        // Two workloads on one inbound address:port of one cluster would make two sidecars
        // fight for a socket; other clusters are other hosts.
        let by_key: BTreeMap<String, &Object<WorkloadEntrySpec>> = by_key.into_iter().collect();
        let mut inbound: BTreeMap<(&str, IpAddr, u32), &str> = BTreeMap::new();
        for w in mesh.workloads.values() {
            for port in mesh.inbound_ports(w) {
                let Some(other) = inbound.insert((&w.cluster, w.address, port.0), &w.key) else {
                    continue;
                };
                if let Some(we) = by_key.get(&w.key).filter(|_| other != w.key) {
                    errs.push(
                        *we,
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

        if errs.0.is_empty() {
            Ok(mesh)
        } else {
            Err(errs.0)
        }
    }
}
