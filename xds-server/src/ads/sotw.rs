//! State-of-the-world ADS streams.

use super::codec::Frame;
use super::driver::{Protocol, Responses, Views};
use super::source::ConfigSource;
use super::status::ProxyStatus;
use super::subscription::Subscription;
use super::{record_ack, record_nack, record_push, AdsShared, Sent};
use crate::cache::{wire, Resource, SotwBody, TypeKind};
use bytes::BytesMut;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tracing::{debug, warn};

struct TypeState {
    sub: Subscription,
    /// Respond even if the content is unchanged (new subscription, initial request).
    dirty: bool,
    sent: Option<Sent>,
    sent_generation: u64,
    /// Last CDS content sent, to keep removed clusters until routes stop using them.
    sent_body: Option<Arc<SotwBody>>,
}

pub(crate) struct Stream {
    status: Arc<ProxyStatus>,
    types: BTreeMap<TypeKind, TypeState>,
    nonce: u64,
}

fn frame(kind: TypeKind, nonce: &str, body: &SotwBody) -> Frame {
    // DiscoveryResponse { version_info = 1; resources = 2; type_url = 4; nonce = 5; }:
    // the per-stream fields, then the shared, pre-concatenated resources.
    let mut head = BytesMut::with_capacity(96 + nonce.len());
    wire::string_field(&mut head, 1, &body.version);
    wire::string_field(&mut head, 4, kind.type_url());
    wire::string_field(&mut head, 5, nonce);
    Frame {
        parts: vec![head.freeze(), body.body.clone()],
    }
}

impl Protocol for Stream {
    type Request = DiscoveryRequest;
    const MODE: &'static str = "sotw";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn names(req: &DiscoveryRequest) -> usize {
        req.resource_names.len()
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
        let st = self.types.entry(kind).or_insert_with(|| TypeState {
            sub: Subscription::new(kind),
            dirty: true,
            sent: None,
            sent_generation: 0,
            sent_body: None,
        });
        // A nonce on a type this stream never answered is not stale: the proxy reconnected
        // carrying what it last saw, and the request counts as an initial one.
        if !req.response_nonce.is_empty() && st.sent.is_some() {
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
        if st.sub.set_names(&req.resource_names, &shared.subscriptions) {
            st.dirty = true;
        }
    }

    /// Sends every type whose content changed for this proxy, in make-before-break order.
    async fn flush(
        &mut self,
        snap: &dyn ConfigSource,
        views: &Views<'_>,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        let mut deferred_clusters = None;
        // Clusters sent in a new version in this flush. Envoy rebuilds an updated cluster,
        // and the new one warms until an EDS response names its assignment: an unchanged
        // one would never come, and the cluster would wait out its initial fetch timeout
        // (15 s; Envoy 1.40 then falls back to its cached assignment). EDS follows CDS in
        // PUSH_ORDER, so it is sent again, unchanged, in this same flush.
        let mut updated_clusters = BTreeSet::new();
        for kind in TypeKind::PUSH_ORDER {
            if kind == TypeKind::Secret && !views.own_ready {
                continue;
            }
            let Some(st) = self.types.get_mut(&kind) else {
                continue;
            };
            let body = views
                .of(kind)
                .sotw_body(kind, st.sub.wanted(), st.sub.key());
            let unchanged = st.sent.as_ref().is_some_and(|s| s.version == body.version);
            let resend = kind == TypeKind::Endpoint
                && !updated_clusters.is_empty()
                && body
                    .resources
                    .iter()
                    .any(|r| updated_clusters.contains(&r.name));
            if unchanged && !st.dirty && !resend {
                continue;
            }
            st.dirty = false;
            if let Some(prev) = st.sent_body.as_ref().filter(|_| kind == TypeKind::Cluster) {
                updated_clusters = updated(prev, &body);
                let keep: BTreeSet<&str> = body.resources.iter().map(|r| &*r.name).collect();
                let removed = prev.resources.iter().filter(|r| !keep.contains(&*r.name));
                let mut union: Vec<Arc<Resource>> = removed.cloned().collect();
                if !union.is_empty() {
                    // Removed clusters stay until listeners and routes have moved off them.
                    union.extend(body.resources.iter().cloned());
                    union.sort_by(|a, b| a.name.cmp(&b.name));
                    // With nothing added or changed, the proxy already holds the union.
                    let had: BTreeMap<&str, &str> = prev
                        .resources
                        .iter()
                        .map(|r| (&*r.name, &*r.version))
                        .collect();
                    let only_removals = body
                        .resources
                        .iter()
                        .all(|r| had.get(&*r.name) == Some(&&*r.version));
                    if !only_removals {
                        self.send(kind, Arc::new(SotwBody::new(union)), snap, shared, tx)
                            .await?;
                    }
                    deferred_clusters = Some(body);
                    continue;
                }
            }
            self.send(kind, body, snap, shared, tx).await?;
        }
        if let Some(body) = deferred_clusters {
            self.send(TypeKind::Cluster, body, snap, shared, tx).await?;
        }
        Ok(())
    }
}

/// The resources of `next` that `prev` holds in another version (not new ones).
fn updated(prev: &SotwBody, next: &SotwBody) -> BTreeSet<Arc<str>> {
    let had: HashMap<&str, &str> = prev
        .resources
        .iter()
        .map(|r| (&*r.name, &*r.version))
        .collect();
    next.resources
        .iter()
        .filter(|r| had.get(&*r.name).is_some_and(|v| *v != &*r.version))
        .map(|r| r.name.clone())
        .collect()
}

impl Stream {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    async fn send(
        &mut self,
        kind: TypeKind,
        body: Arc<SotwBody>,
        snap: &dyn ConfigSource,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        let nonce = self.next_nonce();
        let f = frame(kind, &nonce, &body);
        let bytes = f.len();
        tx.send(Ok(f)).await.map_err(|_| ())?;
        let Some(st) = self.types.get_mut(&kind) else {
            return Ok(());
        };
        let change_started =
            (st.sent.is_some() && st.sent_generation < snap.generation()).then_some(snap.created());
        let sent = Sent {
            version: body.version.clone(),
            nonce,
            change_started,
        };
        record_push(
            shared,
            &self.status,
            kind,
            &sent,
            body.resources.len(),
            bytes,
        );
        st.sent = Some(sent);
        st.sent_generation = snap.generation();
        if kind == TypeKind::Cluster {
            st.sent_body = Some(body);
        }
        Ok(())
    }
}
