use super::{Resource, ResourceSet, TypeKind};
use crate::mesh::MeshState;
use crate::translate::{self, ProxyScope};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// What one proxy class receives: per type, a few shared sets layered together
/// (mesh-wide outbound clusters plus the workload's own inbound clusters, say).
#[derive(Debug, Default)]
pub struct ProxyView {
    layers: [Vec<Arc<ResourceSet>>; 5],
}

fn idx(kind: TypeKind) -> usize {
    match kind {
        TypeKind::Cluster => 0,
        TypeKind::Endpoint => 1,
        TypeKind::Listener => 2,
        TypeKind::Route => 3,
        TypeKind::Secret => 4,
    }
}

impl ProxyView {
    pub fn get(&self, kind: TypeKind, name: &str) -> Option<&Arc<Resource>> {
        self.layers[idx(kind)].iter().find_map(|s| s.map.get(name))
    }

    pub fn iter(&self, kind: TypeKind) -> impl Iterator<Item = &Arc<Resource>> {
        self.layers[idx(kind)].iter().flat_map(|s| s.map.values())
    }

    pub fn len(&self, kind: TypeKind) -> usize {
        self.layers[idx(kind)].iter().map(|s| s.map.len()).sum()
    }

    pub fn is_empty(&self, kind: TypeKind) -> bool {
        self.len(kind) == 0
    }

    /// Version of everything of `kind` in this view: changes iff any member changes.
    pub fn version(&self, kind: TypeKind) -> u64 {
        let layers = &self.layers[idx(kind)];
        if layers.len() == 1 {
            return layers[0].version;
        }
        let mut h = Xxh3::new();
        for s in layers {
            h.update(&s.version.to_le_bytes());
        }
        h.digest()
    }

    pub fn push_layer(&mut self, kind: TypeKind, set: Arc<ResourceSet>) {
        self.layers[idx(kind)].push(set);
    }
}

/// An immutable, fully translated state of the mesh. Streams hold an `Arc<Snapshot>`
/// and move to the newest one when they get to it: slow streams skip intermediate
/// snapshots (latest wins) and memory is bounded by the snapshots still referenced.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub created: Instant,
    pub mesh: Arc<MeshState>,
    clusters: Arc<ResourceSet>,
    endpoints: Arc<ResourceSet>,
    /// Lazily built per proxy class: only classes with connected proxies cost anything.
    views: Mutex<HashMap<ProxyScope, Arc<OnceLock<Arc<ProxyView>>>>>,
    routes: Mutex<HashMap<String, Arc<OnceLock<Arc<ResourceSet>>>>>,
}

impl Snapshot {
    pub fn build(generation: u64, mesh: Arc<MeshState>) -> Snapshot {
        let clusters = ResourceSet::new(
            translate::outbound_clusters(&mesh)
                .iter()
                .map(|c| Resource::new(TypeKind::Cluster, c.name.as_str(), c)),
        );
        let endpoints = ResourceSet::new(
            translate::endpoints(&mesh)
                .iter()
                .map(|c| Resource::new(TypeKind::Endpoint, c.cluster_name.as_str(), c)),
        );
        Snapshot {
            generation,
            created: Instant::now(),
            mesh,
            clusters,
            endpoints,
            views: Mutex::default(),
            routes: Mutex::default(),
        }
    }

    /// Which class a proxy belongs to in this snapshot: its workload if the mesh knows
    /// it, else outbound-only in its namespace.
    pub fn scope(&self, workload: Option<&str>, namespace: &str) -> ProxyScope {
        match workload {
            Some(w) if self.mesh.workloads.contains_key(w) => ProxyScope::Workload(w.to_string()),
            _ => ProxyScope::Namespace(namespace.to_string()),
        }
    }

    fn namespace_routes(&self, ns: &str) -> Arc<ResourceSet> {
        let cell = {
            let mut m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(ns.to_string()).or_default().clone()
        };
        cell.get_or_init(|| {
            ResourceSet::new(
                translate::routes(&self.mesh, ns)
                    .iter()
                    .map(|r| Resource::new(TypeKind::Route, r.name.as_str(), r)),
            )
        })
        .clone()
    }

    pub fn view(&self, scope: &ProxyScope) -> Arc<ProxyView> {
        let cell = {
            let mut m = self.views.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(scope.clone()).or_default().clone()
        };
        cell.get_or_init(|| Arc::new(self.build_view(scope)))
            .clone()
    }

    fn build_view(&self, scope: &ProxyScope) -> ProxyView {
        let mut v = ProxyView::default();
        let ns = match scope {
            ProxyScope::Workload(id) => self
                .mesh
                .workloads
                .get(id)
                .map(|w| w.namespace.clone())
                .unwrap_or_default(),
            ProxyScope::Namespace(ns) => ns.clone(),
        };
        v.push_layer(TypeKind::Cluster, self.clusters.clone());
        if let ProxyScope::Workload(id) = scope {
            if let Some(w) = self.mesh.workloads.get(id) {
                let inbound = translate::inbound_clusters(&self.mesh, w);
                v.push_layer(
                    TypeKind::Cluster,
                    ResourceSet::new(
                        inbound
                            .iter()
                            .map(|c| Resource::new(TypeKind::Cluster, c.name.as_str(), c)),
                    ),
                );
            }
        }
        v.push_layer(TypeKind::Endpoint, self.endpoints.clone());
        v.push_layer(TypeKind::Route, self.namespace_routes(&ns));
        let listeners = translate::listeners(&self.mesh, scope);
        v.push_layer(
            TypeKind::Listener,
            ResourceSet::new(
                listeners
                    .iter()
                    .map(|l| Resource::new(TypeKind::Listener, l.name.as_str(), l)),
            ),
        );
        v
    }
}
