//! State-of-the-world ADS streams.

use super::codec::Frame;
use super::driver::{Protocol, Responses};
use super::status::ProxyStatus;
use super::{list_version, record_ack, record_nack, record_push, AdsShared, Sent};
use crate::cache::{wire, Resource, Snapshot, TypeKind};
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::{debug, warn};

#[derive(Default)]
struct TypeState {
    /// `None`: wildcard (everything of the type).
    names: Option<BTreeSet<String>>,
    /// Respond even if the content is unchanged (new subscription, initial request).
    dirty: bool,
    sent: Option<Sent>,
    sent_generation: u64,
    /// Clusters last sent, to keep removed ones alive until routes stop using them.
    sent_clusters: Vec<Arc<Resource>>,
}

pub(crate) struct Stream {
    status: Arc<ProxyStatus>,
    types: BTreeMap<TypeKind, TypeState>,
    nonce: u64,
}

fn subscription(kind: TypeKind, names: &[String]) -> Option<BTreeSet<String>> {
    if names.iter().any(|n| n == "*") || (names.is_empty() && kind.wildcard_by_default()) {
        None
    } else {
        Some(names.iter().cloned().collect())
    }
}

pub(super) fn frame(
    version: &str,
    kind: TypeKind,
    nonce: &str,
    resources: &[Arc<Resource>],
) -> Frame {
    // DiscoveryResponse { version_info = 1; resources = 2; type_url = 4; nonce = 5; }
    let mut head = BytesMut::with_capacity(64 + version.len() + nonce.len());
    wire::string_field(&mut head, 1, version);
    wire::string_field(&mut head, 4, kind.type_url());
    wire::string_field(&mut head, 5, nonce);
    let mut parts: Vec<Bytes> = Vec::with_capacity(resources.len() + 1);
    parts.push(head.freeze());
    parts.extend(resources.iter().map(|r| r.sotw_field.clone()));
    Frame { parts }
}

impl Protocol for Stream {
    type Request = DiscoveryRequest;
    const MODE: &'static str = "sotw";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn new(status: Arc<ProxyStatus>) -> Self {
        Stream {
            status,
            types: BTreeMap::new(),
            nonce: 0,
        }
    }

    fn on_request(&mut self, req: DiscoveryRequest, shared: &AdsShared) {
        let Some(kind) = TypeKind::from_type_url(&req.type_url) else {
            warn!(node = %self.status.node.id, type_url = %req.type_url, "request for a type this server does not serve");
            return;
        };
        let is_new = !self.types.contains_key(&kind);
        let st = self.types.entry(kind).or_default();
        if !req.response_nonce.is_empty() {
            let Some(sent) = st.sent.as_ref().filter(|s| s.nonce == req.response_nonce) else {
                // The protocol says to ignore requests answering a superseded response:
                // the proxy will answer the newest one too.
                debug!(node = %self.status.node.id, type_url = %req.type_url, nonce = %req.response_nonce, "stale nonce ignored");
                return;
            };
            match &req.error_detail {
                Some(e) => record_nack(shared, &self.status, kind, sent, &e.message),
                None => record_ack(shared, &self.status, kind, sent),
            }
        } else {
            st.dirty = true;
        }
        let names = subscription(kind, &req.resource_names);
        if is_new || names != st.names {
            st.names = names;
            st.dirty = true;
        }
    }

    /// Sends every type whose content changed for this proxy, in make-before-break order.
    async fn flush(
        &mut self,
        snap: &Snapshot,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        let scope = snap.scope(
            self.status.node.workload.as_deref(),
            &self.status.node.namespace,
        );
        let view = snap.view(&scope);
        let mut deferred_clusters = None;
        for kind in TypeKind::PUSH_ORDER {
            let Some(st) = self.types.get_mut(&kind) else {
                continue;
            };
            let resources: Vec<Arc<Resource>> = match &st.names {
                None => view.iter(kind).cloned().collect(),
                Some(names) => names
                    .iter()
                    .filter_map(|n| view.get(kind, n).cloned())
                    .collect(),
            };
            let unchanged = st
                .sent
                .as_ref()
                .is_some_and(|s| s.version == list_version(&resources));
            if unchanged && !st.dirty {
                continue;
            }
            st.dirty = false;
            if kind == TypeKind::Cluster && st.sent.is_some() {
                let keep: BTreeSet<&str> = resources.iter().map(|r| &*r.name).collect();
                let removed: Vec<Arc<Resource>> = st
                    .sent_clusters
                    .iter()
                    .filter(|r| !keep.contains(&*r.name))
                    .cloned()
                    .collect();
                if !removed.is_empty() {
                    // Removed clusters stay until listeners and routes have moved off them.
                    let mut union = resources.clone();
                    union.extend(removed);
                    union.sort_by(|a, b| a.name.cmp(&b.name));
                    self.send(kind, &union, snap, shared, tx).await?;
                    deferred_clusters = Some(resources);
                    continue;
                }
            }
            self.send(kind, &resources, snap, shared, tx).await?;
        }
        if let Some(resources) = deferred_clusters {
            self.send(TypeKind::Cluster, &resources, snap, shared, tx)
                .await?;
        }
        Ok(())
    }
}

impl Stream {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    async fn send(
        &mut self,
        kind: TypeKind,
        resources: &[Arc<Resource>],
        snap: &Snapshot,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        let version = list_version(resources);
        let nonce = self.next_nonce();
        let f = frame(&version, kind, &nonce, resources);
        let bytes = f.len();
        tx.send(Ok(f)).await.map_err(|_| ())?;
        let Some(st) = self.types.get_mut(&kind) else {
            return Ok(());
        };
        let change_started =
            (st.sent.is_some() && st.sent_generation < snap.generation).then_some(snap.created);
        let sent = Sent {
            version,
            nonce,
            change_started,
        };
        record_push(shared, &self.status, kind, &sent, resources.len(), bytes);
        st.sent = Some(sent);
        st.sent_generation = snap.generation;
        if kind == TypeKind::Cluster {
            st.sent_clusters = resources.to_vec();
        }
        Ok(())
    }
}
