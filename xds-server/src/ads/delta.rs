//! Incremental (Delta) ADS streams: only changed resources are sent, removals are named.
//!
//! After every flush a stream's proxy holds exactly the view's resources for its
//! subscription, i.e. one shared [`SotwBody`]. So a stream remembers that body instead of
//! a per-resource version map, and moving to the next snapshot is a diff between two
//! shared bodies that the view computes once for every stream of the class.

use super::codec::Frame;
use super::driver::{Protocol, Responses, Views};
use super::source::ConfigSource;
use super::status::ProxyStatus;
use super::subscription::Subscription;
use super::{record_ack, record_nack, record_push, AdsShared, Sent};
use crate::cache::{wire, DeltaUpdate, ProxyView, Resource, SotwBody, TypeKind};
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tracing::{debug, warn};

/// What the proxy holds of one type.
enum Known {
    /// Exactly these resources (the state after any flush).
    Body(Arc<SotwBody>),
    /// Versions the proxy reported on reconnect (`initial_resource_versions`).
    Initial(HashMap<String, String>),
}

struct TypeState {
    sub: Subscription,
    known: Known,
    /// Newly subscribed names that may not exist: answered with a removal so the proxy
    /// does not wait for its initial fetch timeout.
    announce: BTreeSet<String>,
    /// Names unsubscribed under wildcard: the proxy must be told whether they exist
    /// (resent in full if so, named removed if not). Empty for nearly every stream,
    /// which keeps them on the shared-body fast path.
    force: BTreeSet<String>,
    /// Respond even if nothing changed (the first request of a type must be answered).
    must_respond: bool,
    sent: Option<Sent>,
    sent_generation: u64,
}

impl TypeState {
    fn known_version(&self, name: &str) -> Option<&str> {
        match &self.known {
            Known::Body(b) => b
                .resources
                .iter()
                .find(|r| &*r.name == name)
                .map(|r| &*r.version),
            Known::Initial(m) => m.get(name).map(String::as_str),
        }
    }
}

pub(crate) struct Stream {
    status: Arc<ProxyStatus>,
    types: BTreeMap<TypeKind, TypeState>,
    nonce: u64,
    /// Endpoint assignments to send again though unchanged: Envoy rebuilds an updated
    /// cluster and its new EDS watch waits for an assignment (else it sits out the initial
    /// fetch timeout, 15 s), but with Delta nothing would be sent for an unchanged one.
    resend_eds: BTreeSet<Arc<str>>,
}

fn frame(
    system_version: &str,
    kind: TypeKind,
    nonce: &str,
    body: &Bytes,
    removed: &[String],
) -> Frame {
    // DeltaDiscoveryResponse { system_version_info = 1; resources = 2; type_url = 4;
    //                          nonce = 5; removed_resources = 6; }
    let mut head = BytesMut::with_capacity(96 + removed.iter().map(|r| r.len() + 4).sum::<usize>());
    wire::string_field(&mut head, 1, system_version);
    wire::string_field(&mut head, 4, kind.type_url());
    wire::string_field(&mut head, 5, nonce);
    for r in removed {
        prost::encoding::string::encode(6, r, &mut head);
    }
    Frame {
        parts: vec![head.freeze(), body.clone()],
    }
}

/// One type's next response.
struct Update {
    next: Arc<SotwBody>,
    diff: Arc<DeltaUpdate>,
    /// Unchanged resources the proxy must get again beyond the shared diff.
    extra: Vec<Arc<Resource>>,
    /// Removals beyond the shared diff (announced or forced missing names).
    extra_removed: Vec<String>,
    must_send: bool,
}

impl Protocol for Stream {
    type Request = DeltaDiscoveryRequest;
    const MODE: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn names(req: &DeltaDiscoveryRequest) -> usize {
        req.resource_names_subscribe.len()
            + req.resource_names_unsubscribe.len()
            + req.initial_resource_versions.len()
    }

    fn new(status: Arc<ProxyStatus>) -> Self {
        Stream {
            status,
            types: BTreeMap::new(),
            nonce: 0,
            resend_eds: BTreeSet::new(),
        }
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest, shared: &AdsShared) {
        let Some(kind) = TypeKind::from_type_url(&req.type_url) else {
            warn!(node = %self.status.node.id, type_url = %req.type_url, "request for a type this server does not serve");
            return;
        };
        let st = self.types.entry(kind).or_insert_with(|| TypeState {
            sub: Subscription::new(kind),
            known: Known::Initial(req.initial_resource_versions.clone()),
            announce: BTreeSet::new(),
            force: BTreeSet::new(),
            must_respond: true,
            sent: None,
            sent_generation: 0,
        });
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
        let change = st.sub.update(
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
            &shared.subscriptions,
        );
        if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty() {
            return;
        }
        st.announce.extend(change.added);
        st.force.extend(change.force);
        let names = st.sub.names();
        st.announce.retain(|n| names.contains(n));
        // Envoy forgets what it unsubscribed from; the next diff must not assume it still
        // holds it (a later subscribe resends it).
        if let Known::Initial(m) = &mut st.known {
            if !st.sub.is_wildcard() {
                m.retain(|k, _| names.contains(k));
            }
        }
    }

    async fn flush(
        &mut self,
        snap: &dyn ConfigSource,
        views: &Views<'_>,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        let mut deferred_removals = Vec::new();
        for kind in TypeKind::PUSH_ORDER {
            if kind == TypeKind::Secret && !views.own_ready {
                continue;
            }
            let Some(mut update) = self.plan(kind, views.of(kind)) else {
                continue;
            };
            if kind == TypeKind::Cluster {
                self.resend_eds.extend(update.diff.updated.iter().cloned());
            }
            if kind == TypeKind::Endpoint && !self.resend_eds.is_empty() {
                let resend = std::mem::take(&mut self.resend_eds);
                if let Some(st) = self.types.get(&kind) {
                    let already: BTreeSet<&str> = update.extra.iter().map(|r| &*r.name).collect();
                    let more: Vec<Arc<Resource>> = update
                        .next
                        .resources
                        .iter()
                        .filter(|r| resend.contains(&r.name) && !already.contains(&*r.name))
                        // Changed ones are in the diff already.
                        .filter(|r| st.known_version(&r.name) == Some(&*r.version))
                        .cloned()
                        .collect();
                    update.extra.extend(more);
                }
            }
            let resources = update.diff.resources + update.extra.len();
            let body = if update.extra.is_empty() {
                update.diff.body.clone()
            } else {
                let mut body = BytesMut::from(&update.diff.body[..]);
                for r in &update.extra {
                    body.extend_from_slice(&r.delta_field);
                }
                body.freeze()
            };
            let mut removed: Vec<String> = update.diff.removed.clone();
            removed.append(&mut update.extra_removed);
            if kind == TypeKind::Cluster && !removed.is_empty() {
                // Make before break: clusters go only after routes have moved off them.
                deferred_removals = std::mem::take(&mut removed);
                if resources == 0 && !update.must_send {
                    self.set_known(kind, update.next);
                    continue;
                }
            }
            self.send(
                kind,
                update.next,
                &body,
                resources,
                &removed,
                snap,
                shared,
                tx,
            )
            .await?;
        }
        // Only meaningful within this flush (EDS follows CDS in it).
        self.resend_eds.clear();
        if !deferred_removals.is_empty() {
            let next = match self.types.get(&TypeKind::Cluster).map(|s| &s.known) {
                Some(Known::Body(b)) => b.clone(),
                _ => return Ok(()),
            };
            self.send(
                TypeKind::Cluster,
                next,
                &Bytes::new(),
                0,
                &deferred_removals,
                snap,
                shared,
                tx,
            )
            .await?;
        }
        Ok(())
    }
}

impl Stream {
    fn plan(&mut self, kind: TypeKind, view: &ProxyView) -> Option<Update> {
        let st = self.types.get_mut(&kind)?;
        let wanted = st.sub.wanted();
        let next = view.sotw_body(kind, wanted, st.sub.key());
        let resend = kind == TypeKind::Endpoint
            && next
                .resources
                .iter()
                .any(|r| self.resend_eds.contains(&r.name));
        let diff = match &st.known {
            Known::Body(prev)
                if Arc::ptr_eq(prev, &next)
                    && st.announce.is_empty()
                    && st.force.is_empty()
                    && !st.must_respond
                    && !resend =>
            {
                return None
            }
            Known::Body(prev) => view.delta_update(kind, st.sub.key(), prev, &next, wanted),
            Known::Initial(m) => Arc::new(DeltaUpdate::between(
                m.iter().map(|(n, v)| (n.as_str(), v.as_str())),
                |n| m.get(n).map(String::as_str),
                &next,
                wanted,
            )),
        };
        let mut extra_removed = BTreeSet::new();
        for n in std::mem::take(&mut st.announce) {
            let exists = next.resources.iter().any(|r| *r.name == *n);
            if !exists && st.known_version(&n).is_none() && !diff.removed.contains(&n) {
                extra_removed.insert(n);
            }
        }
        let mut extra = Vec::new();
        // Forced names only matter while wildcard: a proxy that left `*` since does not
        // expect them. Wildcard, `next` is the whole view, so the view answers.
        let force = std::mem::take(&mut st.force);
        for n in force.into_iter().filter(|_| st.sub.is_wildcard()) {
            match view.get(kind, &n) {
                // A changed or new one is in the diff already.
                Some(r) if st.known_version(&n) == Some(&*r.version) => extra.push(r.clone()),
                Some(_) => {}
                None if !diff.removed.contains(&n) => {
                    extra_removed.insert(n);
                }
                None => {}
            }
        }
        let must_send = std::mem::take(&mut st.must_respond) || resend;
        if diff.resources == 0
            && diff.removed.is_empty()
            && extra_removed.is_empty()
            && extra.is_empty()
            && !must_send
        {
            st.known = Known::Body(next);
            return None;
        }
        Some(Update {
            next,
            diff,
            extra,
            extra_removed: extra_removed.into_iter().collect(),
            must_send,
        })
    }

    fn set_known(&mut self, kind: TypeKind, next: Arc<SotwBody>) {
        if let Some(st) = self.types.get_mut(&kind) {
            st.known = Known::Body(next);
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        kind: TypeKind,
        next: Arc<SotwBody>,
        body: &Bytes,
        resources: usize,
        removed: &[String],
        snap: &dyn ConfigSource,
        shared: &AdsShared,
        tx: &Responses,
    ) -> Result<(), ()> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = snap.generation().to_string();
        let f = frame(&version, kind, &nonce, body, removed);
        let bytes = f.len();
        tx.send(Ok(f)).await.map_err(|_| ())?;
        let Some(st) = self.types.get_mut(&kind) else {
            return Ok(());
        };
        st.known = Known::Body(next);
        let change_started =
            (st.sent.is_some() && st.sent_generation < snap.generation()).then_some(snap.created());
        let sent = Sent {
            version,
            nonce,
            change_started,
        };
        record_push(shared, &self.status, kind, &sent, resources, bytes);
        st.sent = Some(sent);
        st.sent_generation = snap.generation();
        Ok(())
    }
}
