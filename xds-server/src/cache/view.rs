//! What a proxy class is served: [`ProxyView`], a few shared resource sets per type, and
//! the response bodies built from it once and shared by every stream of the class
//! ([`SotwBody`], [`DeltaUpdate`]).

use super::{Resource, ResourceSet, TypeKind};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh3::Xxh3;

fn idx(kind: TypeKind) -> usize {
    match kind {
        TypeKind::Cluster => 0,
        TypeKind::Endpoint => 1,
        TypeKind::Listener => 2,
        TypeKind::Route => 3,
        TypeKind::Secret => 4,
    }
}

/// The resources of a SotW response for one subscription, and their concatenated wire
/// fragments: built once per (class, type, subscription) and snapshot, then every stream
/// of that class sends `body` behind its own few header bytes.
#[derive(Debug)]
pub struct SotwBody {
    pub resources: Vec<Arc<Resource>>,
    pub version: String,
    pub body: Bytes,
}

impl SotwBody {
    pub fn new(resources: Vec<Arc<Resource>>) -> SotwBody {
        let mut h = Xxh3::new();
        let mut body = BytesMut::with_capacity(resources.iter().map(|r| r.sotw_field.len()).sum());
        for r in &resources {
            h.update(r.name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            body.extend_from_slice(&r.sotw_field);
        }
        SotwBody {
            version: format!("{:016x}", h.digest()),
            body: body.freeze(),
            resources,
        }
    }
}

/// A Delta response's content between two [`SotwBody`]s of one subscription: the
/// resources that are new or changed (pre-concatenated wire fragments) and the names
/// that are gone. Computed once per (previous body, class, subscription) and shared by
/// every Delta stream that moves between the same two states.
#[derive(Debug)]
pub struct DeltaUpdate {
    pub resources: usize,
    pub body: Bytes,
    pub removed: Vec<String>,
    /// Names the proxy held in another version (not new ones): for CDS, the clusters Envoy
    /// rebuilds, whose endpoints it then waits for again.
    pub updated: Vec<Arc<str>>,
}

impl DeltaUpdate {
    /// `known(name) -> version` is what the proxy holds; `wanted` its subscription
    /// (`None`: wildcard), so names it unsubscribed are not reported removed.
    pub fn between<'a>(
        known: impl Iterator<Item = (&'a str, &'a str)>,
        known_version: impl Fn(&str) -> Option<&'a str>,
        next: &SotwBody,
        wanted: Option<&BTreeSet<String>>,
    ) -> DeltaUpdate {
        let mut body = BytesMut::new();
        let mut resources = 0;
        let mut updated = Vec::new();
        for r in &next.resources {
            let held = known_version(&r.name);
            if held != Some(&*r.version) {
                body.extend_from_slice(&r.delta_field);
                resources += 1;
                if held.is_some() {
                    updated.push(r.name.clone());
                }
            }
        }
        let present: BTreeSet<&str> = next.resources.iter().map(|r| &*r.name).collect();
        let mut removed: Vec<String> = known
            .filter(|(n, _)| !present.contains(n) && wanted.is_none_or(|w| w.contains(*n)))
            .map(|(n, _)| n.to_string())
            .collect();
        removed.sort();
        DeltaUpdate {
            resources,
            body: body.freeze(),
            removed,
            updated,
        }
    }
}

/// Identifies a subscription (a set of resource names) compactly; `None` is wildcard.
pub type SubscriptionKey = Option<u128>;

/// Key of a (sorted, distinct) list of names.
pub fn subscription_key<'a>(names: impl IntoIterator<Item = &'a str>) -> SubscriptionKey {
    let mut h = Xxh3::new();
    for name in names {
        h.update(name.as_bytes());
        h.update(&[0]);
    }
    Some(h.digest128())
}

/// What one proxy class receives: per type, a few shared sets layered together
/// (mesh-wide outbound clusters plus the workload's own inbound clusters, say).
#[derive(Debug, Default)]
pub struct ProxyView {
    layers: [Vec<Arc<ResourceSet>>; 5],
    sotw: Mutex<HashMap<(TypeKind, SubscriptionKey), Arc<SotwBody>>>,
    /// Keyed by the previous body's address; the value holds that body, so the address
    /// cannot be reused by another body while the entry exists.
    deltas: Mutex<DeltaMemo>,
}

type DeltaMemo = HashMap<(TypeKind, SubscriptionKey, usize), (Arc<SotwBody>, Arc<DeltaUpdate>)>;

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

    /// A new view with this one's layers and `set` on top for `kind` (its own memos).
    pub fn layered(&self, kind: TypeKind, set: Arc<ResourceSet>) -> ProxyView {
        let mut v = ProxyView {
            layers: self.layers.clone(),
            ..Default::default()
        };
        v.push_layer(kind, set);
        v
    }

    /// The SotW response content for a subscription (`None`: wildcard), shared by every
    /// stream of this class with the same subscription.
    pub fn sotw_body(
        &self,
        kind: TypeKind,
        names: Option<&BTreeSet<String>>,
        key: SubscriptionKey,
    ) -> Arc<SotwBody> {
        if let Some(b) = self
            .sotw
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(kind, key))
        {
            return b.clone();
        }
        let resources: Vec<Arc<Resource>> = match names {
            None => self.iter(kind).cloned().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| self.get(kind, n).cloned())
                .collect(),
        };
        let body = Arc::new(SotwBody::new(resources));
        // Two streams may build the same body concurrently; either result is identical.
        self.sotw
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind, key))
            .or_insert(body)
            .clone()
    }
}

impl ProxyView {
    /// The Delta update from `prev` (what the proxy holds) to this view's `next`.
    pub fn delta_update(
        &self,
        kind: TypeKind,
        key: SubscriptionKey,
        prev: &Arc<SotwBody>,
        next: &SotwBody,
        wanted: Option<&BTreeSet<String>>,
    ) -> Arc<DeltaUpdate> {
        let memo_key = (kind, key, Arc::as_ptr(prev) as usize);
        let mut memo = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, u)) = memo.get(&memo_key) {
            if Arc::ptr_eq(p, prev) {
                return u.clone();
            }
        }
        let had: HashMap<&str, &str> = prev
            .resources
            .iter()
            .map(|r| (&*r.name, &*r.version))
            .collect();
        let update = Arc::new(DeltaUpdate::between(
            had.iter().map(|(n, v)| (*n, *v)),
            |n| had.get(n).copied(),
            next,
            wanted,
        ));
        memo.insert(memo_key, (prev.clone(), update.clone()));
        update
    }
}
