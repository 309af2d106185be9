//! The relay's cache: per proxy class, the resources the control plane last sent, as the
//! same shared [`ProxyView`]s the control plane's own streams serve. Every change
//! publishes a new immutable [`RelayState`] (latest wins), which downstream streams read
//! through [`ConfigSource`] exactly as they read the control plane's snapshots.
//!
//! A class is a (workload, namespace) pair of this cluster: every sidecar of a workload,
//! or every outbound-only proxy of a namespace, shares one upstream stream and one view.

use envoy_types::pb::envoy::config::core::v3::Node;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use xds_server::ads::node::NodeInfo;
use xds_server::ads::source::ConfigSource;
use xds_server::ads::Caller;
use xds_server::cache::{ProxyView, Resource, ResourceSet, TypeKind};

/// The types a class's view holds (secrets are per identity, not per class).
pub const CLASS_TYPES: [TypeKind; 4] = [
    TypeKind::Cluster,
    TypeKind::Endpoint,
    TypeKind::Listener,
    TypeKind::Route,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey {
    /// `name.namespace` of the workload, or `None` for an outbound-only proxy.
    pub workload: Option<String>,
    pub namespace: String,
}

impl ClassKey {
    pub fn of(node: &NodeInfo) -> ClassKey {
        ClassKey {
            workload: node.workload.clone(),
            namespace: node.namespace.clone(),
        }
    }

    /// The node the relay presents upstream for this class: Istio's node id form, so the
    /// control plane finds the workload (and its cluster in `CLUSTER_ID`).
    pub fn upstream_node(&self, cluster: &str) -> Node {
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        let mut fields = BTreeMap::new();
        fields.insert("NAMESPACE".to_string(), s(&self.namespace));
        fields.insert("CLUSTER_ID".to_string(), s(cluster));
        let id = match &self.workload {
            Some(w) => {
                let name = w.strip_suffix(&format!(".{}", self.namespace)).unwrap_or(w);
                fields.insert("WORKLOAD_NAME".to_string(), s(name));
                format!("relay~{cluster}~{w}~{}.svc", self.namespace)
            }
            None => format!("relay~{cluster}~~{}.svc", self.namespace),
        };
        Node {
            id,
            cluster: format!("relay-{cluster}"),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }
}

/// What the relay knows of one class.
#[derive(Debug, Default)]
struct Class {
    resources: [BTreeMap<Arc<str>, Arc<Resource>>; 4],
    /// Types that have had a first response: the view is served only once all have.
    received: [bool; 4],
    view: Option<Arc<ProxyView>>,
}

fn idx(kind: TypeKind) -> Option<usize> {
    CLASS_TYPES.iter().position(|k| *k == kind)
}

impl Class {
    fn build_view(&self) -> Arc<ProxyView> {
        let mut v = ProxyView::default();
        for (i, kind) in CLASS_TYPES.iter().enumerate() {
            v.push_layer(*kind, ResourceSet::new(self.resources[i].values().cloned()));
        }
        Arc::new(v)
    }
}

/// An immutable state of the cache, as downstream streams see it.
#[derive(Debug)]
pub struct RelayState {
    generation: u64,
    created: Instant,
    views: HashMap<ClassKey, Arc<ProxyView>>,
    wants: mpsc::UnboundedSender<ClassKey>,
    cluster: String,
    /// Service account of each workload of the registry folder.
    accounts: Arc<HashMap<String, String>>,
    limit: Arc<ClassLimit>,
}

/// Classes with an upstream stream, and how many there may be: each costs an upstream
/// stream, the control plane's work for it, and its cached config, and any proxy on the
/// plaintext port can name a new one.
#[derive(Debug)]
pub struct ClassLimit {
    pub max: usize,
    pub open: Mutex<BTreeSet<ClassKey>>,
}

impl ClassLimit {
    /// Whether `key` has, or may get, a stream.
    pub fn admits(&self, key: &ClassKey) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.contains(key) || open.len() < self.max
    }
}

impl ConfigSource for RelayState {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn created(&self) -> Instant {
        self.created
    }

    fn view_for(&self, node: &NodeInfo) -> Option<Arc<ProxyView>> {
        let key = ClassKey::of(node);
        let view = self.views.get(&key).cloned();
        if view.is_none() {
            // First proxy of this class: have it fetched upstream (idempotent).
            let _ = self.wants.send(key);
        }
        view
    }

    fn admission_error(&self, node: &NodeInfo) -> Option<tonic::Status> {
        let key = ClassKey::of(node);
        if self.views.contains_key(&key) || self.limit.admits(&key) {
            return None;
        }
        Some(tonic::Status::resource_exhausted(format!(
            "the relay of cluster {} serves at most {} proxy classes (relay --max-classes) and \
             all are in use; workload {:?} of namespace {:?} would be one more (classes no \
             sidecar uses are dropped after --idle-class-after)",
            self.cluster,
            self.limit.max,
            key.workload.as_deref().unwrap_or("(outbound-only)"),
            key.namespace
        )))
    }

    fn claim_error(&self, node: &NodeInfo, caller: Option<&Caller>) -> Option<String> {
        let caller = caller?;
        let id = &caller.identity;
        if node.namespace != id.namespace {
            return Some(format!(
                "identity {id} may not act for a proxy in namespace {:?} (cluster {})",
                node.namespace, self.cluster
            ));
        }
        // As on the control plane: a workload of the registry runs as one service account.
        let workload = node.workload.as_deref()?;
        let sa = self.accounts.get(workload)?;
        (*sa != id.service_account).then(|| {
            format!(
                "identity {id} may not claim workload {workload}: it runs as service account {sa:?} (cluster {})",
                self.cluster
            )
        })
    }
}

/// The mutable cache behind the published states.
#[derive(Debug)]
pub struct RelayCache {
    cluster: String,
    accounts: Mutex<Arc<HashMap<String, String>>>,
    classes: Mutex<BTreeMap<ClassKey, Class>>,
    generation: Mutex<u64>,
    tx: watch::Sender<Arc<dyn ConfigSource>>,
    wants: mpsc::UnboundedSender<ClassKey>,
    pub limit: Arc<ClassLimit>,
    /// Classes kept even with no sidecar connected: the registry folder's workloads.
    pinned: Mutex<BTreeSet<ClassKey>>,
}

/// A change to one class from one upstream response.
pub struct Update<'a> {
    pub kind: TypeKind,
    pub resources: Vec<Arc<Resource>>,
    pub removed: &'a [String],
}

impl RelayCache {
    /// The cache and the receiver of classes downstream proxies asked for.
    pub fn new(
        cluster: &str,
        max_classes: usize,
    ) -> (Arc<RelayCache>, mpsc::UnboundedReceiver<ClassKey>) {
        let (wants, wanted) = mpsc::unbounded_channel();
        let limit = Arc::new(ClassLimit {
            max: max_classes,
            open: Mutex::default(),
        });
        let state: Arc<dyn ConfigSource> = Arc::new(RelayState {
            generation: 0,
            created: Instant::now(),
            views: HashMap::new(),
            wants: wants.clone(),
            cluster: cluster.to_string(),
            accounts: Arc::default(),
            limit: limit.clone(),
        });
        let (tx, _) = watch::channel(state);
        let cache = Arc::new(RelayCache {
            cluster: cluster.to_string(),
            accounts: Mutex::default(),
            classes: Mutex::default(),
            generation: Mutex::new(0),
            tx,
            wants,
            limit,
            pinned: Mutex::default(),
        });
        (cache, wanted)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<dyn ConfigSource>> {
        self.tx.subscribe()
    }

    /// Asks for a class to be fetched even before a proxy of it connects (the relay
    /// prefetches the workloads of its registry, so a sidecar started while the
    /// control plane is unreachable still finds its config).
    pub fn want(&self, key: ClassKey) {
        let _ = self.wants.send(key);
    }

    /// The classes to keep ready even with no sidecar connected (the registry folder's
    /// workloads), fetched now if they are not yet.
    pub fn pin(&self, keys: BTreeSet<ClassKey>) {
        for key in &keys {
            let _ = self.wants.send(key.clone());
        }
        *self.pinned.lock().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    pub fn pinned(&self) -> BTreeSet<ClassKey> {
        self.pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The complete classes and their resources (for `persist`).
    pub fn export(&self) -> crate::persist::Kept {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes
            .iter()
            .filter(|(_, c)| c.view.is_some())
            .map(|(k, c)| {
                (
                    k.clone(),
                    c.resources
                        .iter()
                        .flat_map(|m| m.values().cloned())
                        .collect(),
                )
            })
            .collect()
    }

    /// Serves kept classes (from `persist`) until their streams bring news, and has
    /// them fetched.
    pub fn restore(&self, kept: crate::persist::Kept) {
        if kept.is_empty() {
            return;
        }
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        for (key, resources) in kept {
            let mut class = Class {
                received: [true; 4],
                ..Class::default()
            };
            for r in resources {
                if let Some(i) = idx(r.kind) {
                    class.resources[i].insert(r.name.clone(), r);
                }
            }
            class.view = Some(class.build_view());
            let _ = self.wants.send(key.clone());
            classes.insert(key, class);
        }
        self.publish(&classes);
    }

    /// Drops a class (its stream was retired); a proxy of it that comes later has it
    /// fetched again.
    pub fn forget(&self, key: &ClassKey) {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        if classes.remove(key).is_some_and(|c| c.view.is_some()) {
            self.publish(&classes);
        }
    }

    /// Versions the cache holds for a class and type: what a reconnecting upstream
    /// stream reports as `initial_resource_versions`.
    pub fn versions(&self, key: &ClassKey, kind: TypeKind) -> HashMap<String, String> {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = idx(kind) else {
            return HashMap::new();
        };
        classes
            .get(key)
            .map(|c| {
                c.resources[i]
                    .iter()
                    .map(|(n, r)| (n.to_string(), r.version.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies one upstream response; publishes a new state only if the class's
    /// content actually changed (a resync that brings nothing new moves nothing
    /// downstream).
    pub fn apply(&self, key: &ClassKey, update: Update<'_>) {
        let Some(i) = idx(update.kind) else {
            return;
        };
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        let class = classes.entry(key.clone()).or_default();
        let mut changed = !class.received[i];
        class.received[i] = true;
        for r in update.resources {
            let same = class.resources[i]
                .get(&r.name)
                .is_some_and(|old| old.version == r.version);
            if !same {
                class.resources[i].insert(r.name.clone(), r);
                changed = true;
            }
        }
        for name in update.removed {
            changed |= class.resources[i].remove(name.as_str()).is_some();
        }
        if !changed || !class.received.iter().all(|r| *r) {
            return;
        }
        class.view = Some(class.build_view());
        self.publish(&classes);
    }

    fn publish(&self, classes: &BTreeMap<ClassKey, Class>) {
        let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        let views = classes
            .iter()
            .filter_map(|(k, c)| c.view.clone().map(|v| (k.clone(), v)))
            .collect();
        self.tx.send_replace(Arc::new(RelayState {
            generation: *generation,
            created: Instant::now(),
            views,
            wants: self.wants.clone(),
            cluster: self.cluster.clone(),
            accounts: self.accounts.lock().map(|a| a.clone()).unwrap_or_default(),
            limit: self.limit.clone(),
        }));
    }

    /// The registry's workloads and their service accounts (for claim checks).
    pub fn set_service_accounts(&self, accounts: HashMap<String, String>) {
        let changed = {
            let mut cur = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            let changed = **cur != accounts;
            *cur = Arc::new(accounts);
            changed
        };
        if changed {
            let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
            self.publish(&classes);
        }
    }

    /// Classes with a complete view, and how many resources each holds.
    pub fn classes(&self) -> Vec<(ClassKey, usize)> {
        let classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes
            .iter()
            .filter(|(_, c)| c.view.is_some())
            .map(|(k, c)| (k.clone(), c.resources.iter().map(BTreeMap::len).sum()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    fn cluster(name: &str, timeout_s: i64) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        };
        Resource::new(TypeKind::Cluster, name, &c)
    }

    fn key() -> ClassKey {
        ClassKey {
            workload: Some("reviews-v1.default".into()),
            namespace: "default".into(),
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            id: "sidecar~127.0.1.3~reviews-v1.default~default.svc.cluster.local".into(),
            workload: Some("reviews-v1.default".into()),
            namespace: "default".into(),
            cluster: String::new(),
            cluster_id: None,
        }
    }

    #[test]
    fn a_class_is_served_once_every_type_arrived_and_only_changes_publish() {
        let (cache, mut wanted) = RelayCache::new("b", 100);
        let mut rx = cache.subscribe();
        // Nothing yet: the stream waits, and the class is requested upstream.
        assert!(rx.borrow().view_for(&node()).is_none());
        assert_eq!(wanted.try_recv().unwrap(), key());

        for kind in CLASS_TYPES {
            let resources = if kind == TypeKind::Cluster {
                vec![cluster("a", 1)]
            } else {
                vec![]
            };
            cache.apply(
                &key(),
                Update {
                    kind,
                    resources,
                    removed: &[],
                },
            );
        }
        assert!(rx.has_changed().unwrap());
        let state = rx.borrow_and_update().clone();
        let view = state.view_for(&node()).unwrap();
        assert_eq!(view.len(TypeKind::Cluster), 1);
        let generation = state.generation();

        // The same content again (a resync after reconnecting): nothing is published.
        cache.apply(
            &key(),
            Update {
                kind: TypeKind::Cluster,
                resources: vec![cluster("a", 1)],
                removed: &[],
            },
        );
        assert!(!rx.has_changed().unwrap());

        // A change and a removal do publish.
        cache.apply(
            &key(),
            Update {
                kind: TypeKind::Cluster,
                resources: vec![cluster("a", 2)],
                removed: &[],
            },
        );
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().generation() > generation);
        cache.apply(
            &key(),
            Update {
                kind: TypeKind::Cluster,
                resources: vec![],
                removed: &["a".to_string()],
            },
        );
        let view = rx.borrow_and_update().view_for(&node()).unwrap();
        assert_eq!(view.len(TypeKind::Cluster), 0);
        assert_eq!(cache.versions(&key(), TypeKind::Cluster).len(), 0);
    }
}
