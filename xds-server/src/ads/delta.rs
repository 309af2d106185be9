//! Incremental (Delta) ADS streams: only changed resources are sent, removals are named.

use super::codec::Frame;
use super::driver::{Protocol, Responses};
use super::status::ProxyStatus;
use super::{record_ack, record_nack, record_push, AdsShared, Sent};
use crate::cache::{wire, ProxyView, Resource, Snapshot, TypeKind};
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tracing::{debug, warn};

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy holds: name -> version (from initial_resource_versions and our sends).
    known: HashMap<Arc<str>, Arc<str>>,
    /// Newly subscribed names that may not exist: answered with a removal so the proxy
    /// does not wait for its initial fetch timeout.
    announce: BTreeSet<String>,
    /// Respond even if nothing changed (the first request of a type must be answered).
    must_respond: bool,
    sent: Option<Sent>,
    sent_generation: u64,
}

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub(crate) struct Stream {
    status: Arc<ProxyStatus>,
    types: BTreeMap<TypeKind, TypeState>,
    nonce: u64,
}

fn frame(
    system_version: &str,
    kind: TypeKind,
    nonce: &str,
    resources: &[Arc<Resource>],
    removed: &[String],
) -> Frame {
    // DeltaDiscoveryResponse { system_version_info = 1; resources = 2; type_url = 4;
    //                          nonce = 5; removed_resources = 6; }
    let mut head = BytesMut::with_capacity(96 + removed.iter().map(|r| r.len() + 4).sum::<usize>());
    wire::string_field(&mut head, 1, system_version);
    wire::string_field(&mut head, 4, kind.type_url());
    wire::string_field(&mut head, 5, nonce);
    for r in removed {
        // An empty name is still a removal entry, so encode it even if empty.
        prost::encoding::string::encode(6, r, &mut head);
    }
    let mut parts: Vec<Bytes> = Vec::with_capacity(resources.len() + 1);
    parts.push(head.freeze());
    parts.extend(resources.iter().map(|r| r.delta_field.clone()));
    Frame { parts }
}

/// What one type's next response holds.
struct Update {
    resources: Vec<Arc<Resource>>,
    removed: Vec<String>,
}

impl Protocol for Stream {
    type Request = DeltaDiscoveryRequest;
    const MODE: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn new(status: Arc<ProxyStatus>) -> Self {
        Stream {
            status,
            types: BTreeMap::new(),
            nonce: 0,
        }
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest, shared: &AdsShared) {
        let Some(kind) = TypeKind::from_type_url(&req.type_url) else {
            warn!(node = %self.status.node.id, type_url = %req.type_url, "request for a type this server does not serve");
            return;
        };
        let is_new = !self.types.contains_key(&kind);
        let st = self.types.entry(kind).or_default();
        if is_new {
            st.must_respond = true;
            // Legacy wildcard: the first request of CDS/LDS subscribing to nothing.
            st.wildcard = req.resource_names_subscribe.is_empty() && kind.wildcard_by_default();
            for (name, version) in &req.initial_resource_versions {
                st.known
                    .insert(Arc::from(name.as_str()), Arc::from(version.as_str()));
            }
        }
        if !req.response_nonce.is_empty() {
            match st.sent.as_ref().filter(|s| s.nonce == req.response_nonce) {
                Some(sent) => match &req.error_detail {
                    Some(e) => record_nack(shared, &self.status, kind, sent, &e.message),
                    None => record_ack(shared, &self.status, kind, sent),
                },
                None => {
                    debug!(node = %self.status.node.id, type_url = %req.type_url, nonce = %req.response_nonce, "ACK/NACK for a superseded response")
                }
            }
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                st.wildcard = true;
            } else if st.names.insert(n.clone()) {
                st.announce.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(n);
                st.announce.remove(n);
            }
            // Envoy forgets what it unsubscribed from; a later subscribe must resend it.
            if !st.wants(n) {
                st.known.remove(n.as_str());
            }
        }
        if !st.wildcard {
            let names = &st.names;
            st.known.retain(|k, _| names.contains(&**k));
        }
    }

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
        let mut deferred_removals = Vec::new();
        for kind in TypeKind::PUSH_ORDER {
            let Some(mut update) = self.plan(kind, &view) else {
                continue;
            };
            if kind == TypeKind::Cluster && !update.removed.is_empty() {
                // Make before break: clusters go only after routes have moved off them.
                deferred_removals = std::mem::take(&mut update.removed);
                if update.resources.is_empty() {
                    continue;
                }
            }
            self.send(kind, update, snap, shared, tx).await?;
        }
        if !deferred_removals.is_empty() {
            let update = Update {
                resources: Vec::new(),
                removed: deferred_removals,
            };
            self.send(TypeKind::Cluster, update, snap, shared, tx)
                .await?;
        }
        Ok(())
    }
}

impl Stream {
    fn plan(&mut self, kind: TypeKind, view: &ProxyView) -> Option<Update> {
        let st = self.types.get_mut(&kind)?;
        let mut resources = Vec::new();
        if st.wildcard {
            resources.extend(
                view.iter(kind)
                    .filter(|r| st.known.get(&r.name) != Some(&r.version))
                    .cloned(),
            );
        } else {
            for n in &st.names {
                if let Some(r) = view.get(kind, n) {
                    if st.known.get(&r.name) != Some(&r.version) {
                        resources.push(r.clone());
                    }
                }
            }
        }
        let mut removed: Vec<String> = st
            .known
            .keys()
            .filter(|k| view.get(kind, k).is_none())
            .map(|k| k.to_string())
            .collect();
        for n in std::mem::take(&mut st.announce) {
            if view.get(kind, &n).is_none() && !st.known.contains_key(n.as_str()) {
                removed.push(n);
            }
        }
        removed.sort();
        removed.dedup();
        if resources.is_empty() && removed.is_empty() && !st.must_respond {
            return None;
        }
        st.must_respond = false;
        Some(Update { resources, removed })
    }

    async fn send(
        &mut self,
        kind: TypeKind,
        update: Update,
        snap: &Snapshot,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = snap.generation.to_string();
        let f = frame(&version, kind, &nonce, &update.resources, &update.removed);
        let bytes = f.len();
        tx.send(Ok(f)).await.map_err(|_| ())?;
        let Some(st) = self.types.get_mut(&kind) else {
            return Ok(());
        };
        for r in &update.resources {
            st.known.insert(r.name.clone(), r.version.clone());
        }
        for n in &update.removed {
            st.known.remove(n.as_str());
        }
        let change_started =
            (st.sent.is_some() && st.sent_generation < snap.generation).then_some(snap.created);
        let sent = Sent {
            version,
            nonce,
            change_started,
        };
        record_push(
            shared,
            &self.status,
            kind,
            &sent,
            update.resources.len(),
            bytes,
        );
        st.sent = Some(sent);
        st.sent_generation = snap.generation;
        Ok(())
    }
}
