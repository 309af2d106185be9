use super::service_resources::{MeshInputs, ServiceResources};
use super::{ProxyView, Resource, ResourceSet, TypeKind};
use crate::config::envoy_filter::{ApplyTo, PatchContext};
use crate::config::model::ConsistentHash;
use crate::mesh::envoy_filters::{PatchKey, PatchSet};
use crate::mesh::{MeshState, Workload};
use crate::translate::envoy_filter::{patch_clusters, patch_listeners, patch_routes};
use crate::translate::{self, EdsClass, EdsNeeds, ProxyLocality, ProxyScope};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// A class's listeners and inbound clusters, with the workload they were built for.
type WorkloadSets = (Option<Arc<Workload>>, Arc<ResourceSet>, Arc<ResourceSet>);

pub(super) type Memo<K, V> = Mutex<HashMap<K, Arc<OnceLock<V>>>>;

pub(super) fn carry<K: Clone, V>(m: &Memo<K, V>, ok: bool) -> HashMap<K, Arc<OnceLock<V>>> {
    if ok {
        m.lock().unwrap_or_else(|e| e.into_inner()).clone()
    } else {
        HashMap::new()
    }
}

pub(super) fn memo<K: std::hash::Hash + Eq + Clone, V: Clone>(
    m: &Memo<K, V>,
    key: &K,
    build: impl FnOnce() -> V,
) -> V {
    let cell = m
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.clone())
        .or_default()
        .clone();
    cell.get_or_init(build).clone()
}

/// Outbound listeners depend on the services' ports only; routes on ports and routing
/// rules. When those did not change, per-class results carry over to the next snapshot.
fn same_ports(a: &MeshState, b: &MeshState) -> bool {
    if Arc::ptr_eq(&a.services, &b.services) {
        return true;
    }
    a.services.len() == b.services.len()
        && a.services
            .iter()
            .zip(b.services.iter())
            .all(|((ka, sa), (kb, sb))| ka == kb && sa.ports == sb.ports)
}

/// The VirtualServices' `tcp` and `tls` rules, which shape outbound listeners (HTTP rules
/// shape routes only, so an HTTP routing change keeps the listeners).
fn same_l4_routes(a: &MeshState, b: &MeshState) -> bool {
    if Arc::ptr_eq(&a.virtual_services, &b.virtual_services) {
        return true;
    }
    let l4 = |m: &MeshState| {
        m.virtual_services
            .iter()
            .filter(|(_, vs)| !vs.tcp.is_empty() || !vs.tls.is_empty())
            .map(|(h, vs)| (h.clone(), vs.tcp.clone(), vs.tls.clone()))
            .collect::<Vec<_>>()
    };
    l4(a) == l4(b)
}

fn same_filters(a: &MeshState, b: &MeshState) -> bool {
    Arc::ptr_eq(&a.envoy_filters, &b.envoy_filters) || a.envoy_filters == b.envoy_filters
}

fn same_routing(a: &MeshState, b: &MeshState) -> bool {
    same_ports(a, b)
        && a.cluster_domain == b.cluster_domain
        && a.virtual_services == b.virtual_services
        && same_filters(a, b)
        && same_hashing(a, b)
}

/// Routes carry the hash policy of DestinationRules with a `consistentHash`; the rest
/// of a rule shapes clusters only.
fn same_hashing(a: &MeshState, b: &MeshState) -> bool {
    if Arc::ptr_eq(&a.destination_rules, &b.destination_rules) {
        return true;
    }
    type HashView<'a> = Vec<(
        &'a String,
        Vec<(Option<&'a str>, Option<u32>, &'a ConsistentHash)>,
    )>;
    fn view(m: &MeshState) -> HashView<'_> {
        m.destination_rules
            .iter()
            .map(|(host, dr)| (host, dr.consistent_hashes()))
            .filter(|(_, hashes)| !hashes.is_empty())
            .collect()
    }
    view(a) == view(b)
}

/// Everything besides the workload itself that a class's listeners and inbound clusters
/// are built from: service ports, which services select which workload (the inbound
/// ports), and the inbound policies (mTLS modes, trust domain). A policy that shapes
/// inbound listeners must be compared here, or a class keeps its stale listeners.
fn same_listener_inputs(a: &MeshState, b: &MeshState) -> bool {
    same_ports(a, b)
        && same_l4_routes(a, b)
        && a.connect_timeout == b.connect_timeout
        && a.trust_domain == b.trust_domain
        && a.peer_authentication == b.peer_authentication
        && a.workload_services == b.workload_services
        && a.root_namespace == b.root_namespace
        && a.security == b.security
        && same_filters(a, b)
        && translate::jwks::provider_clusters(a) == translate::jwks::provider_clusters(b)
        && same_tcp_idle_timeouts(a, b)
}

/// Outbound TCP listeners carry the DestinationRule's `connectionPool.tcp.idleTimeout`.
fn same_tcp_idle_timeouts(a: &MeshState, b: &MeshState) -> bool {
    if Arc::ptr_eq(&a.destination_rules, &b.destination_rules) {
        return true;
    }
    fn view(m: &MeshState) -> Vec<(&str, u32, Option<String>)> {
        m.services
            .values()
            .flat_map(|svc| {
                svc.ports.iter().filter(|p| !p.protocol.is_http()).map(|p| {
                    let idle = translate::tcp_idle_timeout(m, svc, p.number);
                    (svc.fqdn.as_str(), p.number, idle)
                })
            })
            .filter(|(_, _, idle)| idle.is_some())
            .collect()
    }
    view(a) == view(b)
}

/// An immutable, fully translated state of the mesh. Streams hold an `Arc<Snapshot>`
/// and move to the newest one when they get to it: slow streams skip intermediate
/// snapshots (latest wins) and memory is bounded by the snapshots still referenced.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub created: Instant,
    pub mesh: Arc<MeshState>,
    services: BTreeMap<String, Arc<ServiceResources>>,
    clusters: Arc<ResourceSet>,
    /// Clusters of the remote JWKS servers RequestAuthentications name, for every proxy
    /// (see `translate::jwks`); rebuilt per snapshot, they are few.
    jwks_clusters: Arc<ResourceSet>,
    /// Outbound clusters for proxies with an identity; built when the first such view is.
    identity_clusters: OnceLock<Arc<ResourceSet>>,
    /// The assignments for no proxy in particular (every endpoint at priority 0 where
    /// they are ranked by cluster): what proxies whose class of `eds_needs` is empty get.
    endpoints: Arc<ResourceSet>,
    /// What of a proxy some service's assignments depend on (the union of the services'
    /// needs): the clusters where some service has endpoints and other clusters have
    /// more, and the locality and labels `localityLbSetting`s look at. Empty in a
    /// single-cluster mesh without such settings.
    eds_needs: EdsNeeds,
    /// EDS per proxy class of `eds_needs`, built when its first proxy's view is: one
    /// set for every proxy of one locality, say.
    class_endpoints: Memo<EdsClass, Arc<ResourceSet>>,
    /// Lazily built per proxy class: only classes with connected proxies cost anything.
    views: Memo<ProxyScope, Arc<ProxyView>>,
    /// By namespace and the EnvoyFilters patching its route configurations (none: the
    /// plain set), so proxies under the same filters share the patched set.
    routes: Memo<(String, PatchKey), Arc<ResourceSet>>,
    /// Outbound clusters patched by EnvoyFilters: by identity variant, the namespace when
    /// it matters (see `credential_clusters`), and the filters.
    patched_clusters: Memo<(bool, Option<String>, PatchKey), Arc<ResourceSet>>,
    /// Clusters whose TLS uses a credential: name -> (the rule's namespace, credential).
    /// Only proxies of that namespace get them (`translate::credentials`).
    credential_clusters: BTreeMap<String, (String, String)>,
    /// Identity clusters without other namespaces' credential clusters, by namespace.
    namespace_clusters: Memo<String, Arc<ResourceSet>>,
    /// Credential secrets by namespace (for proxies with an identity).
    credential_secrets: Memo<String, Arc<ResourceSet>>,
    /// Keyed by scope; the workload is part of the value so a carried-over entry is only
    /// reused for an identical workload.
    listeners: Memo<ProxyScope, WorkloadSets>,
}

impl Snapshot {
    pub fn build(generation: u64, mesh: Arc<MeshState>) -> Snapshot {
        Self::build_from(generation, mesh, None)
    }

    /// Builds a snapshot reusing whatever `prev` computed from unchanged inputs.
    pub fn build_from(generation: u64, mesh: Arc<MeshState>, prev: Option<&Snapshot>) -> Snapshot {
        let inputs = prev.map(|p| MeshInputs::between(&p.mesh, &mesh));
        let services: BTreeMap<String, Arc<ServiceResources>> = mesh
            .services
            .iter()
            .map(|(fqdn, svc)| {
                let last = prev.and_then(|p| p.services.get(fqdn)).zip(inputs);
                let resources = match last {
                    Some((r, i)) if r.still_valid(&mesh, svc, i) => r.clone(),
                    _ => Arc::new(ServiceResources::build(
                        &mesh,
                        svc,
                        last.map(|(r, i)| (&**r, i)),
                    )),
                };
                (fqdn.clone(), resources)
            })
            .collect();
        let clusters = ResourceSet::new(services.values().flat_map(|s| s.clusters.iter().cloned()));
        let jwks_clusters = ResourceSet::new(
            translate::jwks::clusters(&mesh)
                .iter()
                .map(|c| Resource::new(TypeKind::Cluster, c.name.as_str(), c)),
        );
        let endpoints =
            ResourceSet::new(services.values().flat_map(|s| s.endpoints.iter().cloned()));
        let mut eds_needs = EdsNeeds::default();
        for s in services.values() {
            eds_needs.merge(&s.needs);
        }
        let credential_clusters = translate::credentials::credential_clusters(&mesh);
        let (routes, listeners) = match prev {
            Some(p) => (
                carry(&p.routes, same_routing(&p.mesh, &mesh)),
                carry(&p.listeners, same_listener_inputs(&p.mesh, &mesh)),
            ),
            None => Default::default(),
        };
        Snapshot {
            generation,
            created: Instant::now(),
            mesh,
            services,
            clusters,
            jwks_clusters,
            identity_clusters: OnceLock::new(),
            endpoints,
            eds_needs,
            class_endpoints: Mutex::default(),
            views: Mutex::default(),
            routes: Mutex::new(routes),
            patched_clusters: Mutex::default(),
            credential_clusters,
            namespace_clusters: Mutex::default(),
            credential_secrets: Mutex::default(),
            listeners: Mutex::new(listeners),
        }
    }

    /// Which class a proxy belongs to in this snapshot: its workload (`name.namespace`)
    /// in its cluster (`None`: the mesh's own) if the mesh knows it, else outbound-only
    /// in its namespace and cluster.
    pub fn scope(
        &self,
        workload: Option<&str>,
        namespace: &str,
        cluster: Option<&str>,
    ) -> ProxyScope {
        match workload.and_then(|w| self.mesh.workload(w, cluster)) {
            Some(w) => ProxyScope::Workload(w.key.clone()),
            None => ProxyScope::namespace(namespace, cluster.unwrap_or(&self.mesh.cluster_name)),
        }
    }

    /// The EDS set of `proxy`: shared by its class, since every service's class is a
    /// part of it.
    fn endpoints_for(&self, proxy: &ProxyLocality) -> Arc<ResourceSet> {
        let class = self.eds_needs.class(proxy);
        if class == EdsClass::default() {
            return self.endpoints.clone();
        }
        memo(&self.class_endpoints, &class, || {
            let mut all = Vec::with_capacity(self.endpoints.map.len());
            for s in self.services.values() {
                match s.endpoints_for(&self.mesh, proxy) {
                    Some(own) => all.extend(own.iter().cloned()),
                    None => all.extend(s.endpoints.iter().cloned()),
                }
            }
            ResourceSet::new(all)
        })
    }

    /// Outbound clusters for proxies with an identity, built once per snapshot from the
    /// per-service sets (which carry over between snapshots like the plaintext ones).
    fn identity_clusters(&self) -> Arc<ResourceSet> {
        self.identity_clusters
            .get_or_init(|| {
                ResourceSet::new(
                    self.services
                        .values()
                        .flat_map(|s| s.identity_clusters(&self.mesh).iter().cloned()),
                )
            })
            .clone()
    }

    /// Route configurations for proxies of `ns` whose workload has `labels` (none for a
    /// proxy that is not a workload), patched by the class's route EnvoyFilter patches.
    /// Shared by every proxy of the namespace that the same `sourceLabels` selectors pick
    /// and the same patches apply to, so the key is the namespace, those selectors and
    /// the patches.
    fn namespace_routes(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        patches: &PatchSet,
    ) -> Arc<ResourceSet> {
        let patches = patches.only(ApplyTo::is_route_class);
        let key = translate::route_key(&self.mesh, ns, labels);
        memo(&self.routes, &(key, patches.key()), || {
            let routes: Vec<Arc<Resource>> = translate::routes(&self.mesh, ns, labels)
                .iter()
                .map(|r| {
                    // Not `Resource::new`: routes carry protobuf maps, which prost would
                    // encode in random order (see encode_route_configuration).
                    let body = translate::encode_route_configuration(r);
                    Resource::from_body(TypeKind::Route, r.name.as_str().into(), body.into())
                })
                .collect();
            ResourceSet::new(patch_routes(routes, &patches))
        })
    }

    /// The outbound clusters of a class: the shared set, or its variant patched by the
    /// class's CLUSTER patches (shared by every class with the same ones).
    fn outbound_clusters(&self, identity: bool, ns: &str, patches: &PatchSet) -> Arc<ResourceSet> {
        let (base, scoped) = if identity {
            self.identity_clusters_for(ns)
        } else {
            (self.clusters.clone(), None)
        };
        let patches = patches.only(|a| a == ApplyTo::Cluster);
        if patches.is_empty() {
            return base;
        }
        memo(
            &self.patched_clusters,
            &(identity, scoped, patches.key()),
            || {
                ResourceSet::new(patch_clusters(
                    base.map.values(),
                    &patches,
                    PatchContext::SidecarOutbound,
                    &[],
                ))
            },
        )
    }

    /// The identity clusters a proxy of `ns` gets, and `Some(ns)` when that set is its
    /// namespace's own: without the clusters using credentials of other namespaces.
    fn identity_clusters_for(&self, ns: &str) -> (Arc<ResourceSet>, Option<String>) {
        let foreign = |(_, (owner, _)): (&String, &(String, String))| owner != ns;
        if !self.credential_clusters.iter().any(foreign) {
            return (self.identity_clusters(), None);
        }
        let set = memo(&self.namespace_clusters, &ns.to_string(), || {
            let all = self.identity_clusters();
            ResourceSet::new(
                all.map
                    .iter()
                    .filter(|(name, _)| {
                        self.credential_clusters
                            .get(name.as_ref())
                            .is_none_or(|(owner, _)| owner == ns)
                    })
                    .map(|(_, r)| r.clone()),
            )
        });
        (set, Some(ns.to_string()))
    }

    /// The credential secrets proxies with an identity in `ns` get (`None`: no rule of
    /// the mesh names a credential).
    pub fn credential_secrets(&self, ns: &str) -> Option<Arc<ResourceSet>> {
        if self.credential_clusters.is_empty() {
            return None;
        }
        Some(memo(&self.credential_secrets, &ns.to_string(), || {
            translate::credentials::namespace_secrets(&self.mesh, ns)
        }))
    }

    /// The EnvoyFilters that apply to a class.
    fn patches(&self, scope: &ProxyScope) -> PatchSet {
        if self.mesh.envoy_filters.is_empty() {
            return PatchSet::default();
        }
        match scope {
            ProxyScope::Workload(id) => match self.mesh.workloads.get(id) {
                Some(w) => self
                    .mesh
                    .envoy_filters
                    .select(&w.namespace, Some(&w.labels)),
                None => PatchSet::default(),
            },
            ProxyScope::Namespace { namespace, .. } => {
                self.mesh.envoy_filters.select(namespace, None)
            }
        }
    }

    /// Listeners and inbound clusters of a class.
    fn workload_sets(&self, scope: &ProxyScope) -> (Arc<ResourceSet>, Arc<ResourceSet>) {
        let workload = match scope {
            ProxyScope::Workload(id) => self.mesh.workloads.get(id).cloned(),
            ProxyScope::Namespace { .. } => None,
        };
        let build = || {
            let patches = self.patches(scope);
            let listeners: Vec<Arc<Resource>> = translate::listeners(&self.mesh, scope)
                .iter()
                .map(|l| Resource::new(TypeKind::Listener, l.name.as_str(), l))
                .collect();
            let inbound: Vec<Arc<Resource>> = match &workload {
                Some(w) => translate::inbound_clusters(&self.mesh, w)
                    .iter()
                    .map(|c| Resource::new(TypeKind::Cluster, c.name.as_str(), c))
                    .collect(),
                None => Vec::new(),
            };
            let inbound = if patches.has(ApplyTo::Cluster) {
                let hosts: Vec<String> = workload
                    .iter()
                    .flat_map(|w| self.mesh.services_of(w).map(|s| s.fqdn.clone()))
                    .collect();
                patch_clusters(
                    inbound.iter(),
                    &patches,
                    PatchContext::SidecarInbound,
                    &hosts,
                )
            } else {
                inbound
            };
            (
                workload.clone(),
                ResourceSet::new(patch_listeners(listeners, &patches)),
                ResourceSet::new(inbound),
            )
        };
        let (w, l, c) = memo(&self.listeners, scope, build);
        if w.as_deref() == workload.as_deref() {
            return (l, c);
        }
        // Carried over from a snapshot where this workload differed: rebuild and replace.
        let (w, l, c) = build();
        let cell = Arc::new(OnceLock::new());
        let _ = cell.set((w, l.clone(), c.clone()));
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(scope.clone(), cell);
        (l, c)
    }

    pub fn view(&self, scope: &ProxyScope) -> Arc<ProxyView> {
        memo(&self.views, scope, || Arc::new(self.build_view(scope)))
    }

    fn build_view(&self, scope: &ProxyScope) -> ProxyView {
        let mut v = ProxyView::default();
        let workload = match scope {
            ProxyScope::Workload(id) => self.mesh.workloads.get(id),
            ProxyScope::Namespace { .. } => None,
        };
        let (ns, cluster) = match (scope, workload) {
            (_, Some(w)) => (w.namespace.as_str(), w.cluster.as_str()),
            (ProxyScope::Namespace { namespace, cluster }, None) => {
                (namespace.as_str(), cluster.as_str())
            }
            (ProxyScope::Workload(_), None) => ("", self.mesh.cluster_name.as_str()),
        };
        let (listeners, inbound) = self.workload_sets(scope);
        let patches = self.patches(scope);
        // Only a sidecar that receives the `default` and `ROOTCA` secrets may be given
        // clusters that reference them; everyone else keeps the plaintext set.
        let identity = workload.is_some_and(|w| translate::tls::has_identity(&w.labels));
        v.push_layer(
            TypeKind::Cluster,
            self.outbound_clusters(identity, ns, &patches),
        );
        if !inbound.map.is_empty() {
            v.push_layer(TypeKind::Cluster, inbound);
        }
        if !self.jwks_clusters.map.is_empty() {
            v.push_layer(TypeKind::Cluster, self.jwks_clusters.clone());
        }
        let proxy = match workload {
            Some(w) => ProxyLocality::of_workload(w),
            None => ProxyLocality::of_cluster(&self.mesh, cluster),
        };
        v.push_layer(TypeKind::Endpoint, self.endpoints_for(&proxy));
        let no_labels = BTreeMap::new();
        let labels = workload.map_or(&no_labels, |w| &w.labels);
        v.push_layer(TypeKind::Route, self.namespace_routes(ns, labels, &patches));
        v.push_layer(TypeKind::Listener, listeners);
        v
    }
}
