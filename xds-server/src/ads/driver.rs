//! The life of one ADS stream, shared by SotW and Delta: identify the proxy from its first
//! request, register it, then alternate between reading requests and pushing whatever
//! the newest snapshot changed, until either side goes away.

use super::codec::Frame;
use super::grpc::RequestReader;
use super::node::NodeInfo;
use super::secrets::ProxySecrets;
use super::service::Caller;
use super::source::ConfigSource;
use super::status::ProxyStatus;
use super::{AdsShared, ConnectedGauge};
use crate::cache::{ProxyView, ResourceSet, TypeKind};
use envoy_types::pb::envoy::config::core::v3::Node;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info, warn};

pub(crate) type Responses = mpsc::Sender<Result<Frame, Status>>;

/// What a stream serves from: its class's shared view, and its own secrets.
pub(crate) struct Views<'a> {
    pub class: &'a ProxyView,
    pub own: &'a ProxyView,
    /// False until the provider has the proxy's secrets: SDS is not answered before
    /// (an empty answer would tell the proxy its certificate does not exist).
    pub own_ready: bool,
}

impl Views<'_> {
    pub fn of(&self, kind: TypeKind) -> &ProxyView {
        if kind == TypeKind::Secret {
            self.own
        } else {
            self.class
        }
    }
}

/// One protocol variant's per-stream state machine.
pub(crate) trait Protocol: Send + Sized {
    type Request: prost::Message + Default + Send + 'static;
    const MODE: &'static str;

    fn node(req: &Self::Request) -> Option<&Node>;
    /// Resource names the request carries (subscribed and unsubscribed).
    fn names(req: &Self::Request) -> usize;
    fn new(status: Arc<ProxyStatus>) -> Self;
    fn on_request(&mut self, req: Self::Request, shared: &AdsShared);
    /// Sends what changed for this proxy; `Err` when the proxy is gone.
    fn flush(
        &mut self,
        snap: &dyn ConfigSource,
        views: &Views<'_>,
        shared: &AdsShared,
        tx: &Responses,
    ) -> impl Future<Output = Result<(), ()>> + Send;
}

pub(crate) async fn run<P: Protocol>(
    shared: Arc<AdsShared>,
    caller: Option<Caller>,
    mut requests: RequestReader<P::Request>,
    tx: Responses,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            debug!(error = %e, mode = P::MODE, "ADS stream failed before its first request");
            return;
        }
    };
    let node = match P::node(&first).map(NodeInfo::from_node) {
        Some(Ok(n)) => n,
        Some(Err(msg)) => {
            let _ = tx.send(Err(Status::invalid_argument(msg))).await;
            return;
        }
        None => {
            let msg = "the first request of a stream must carry node";
            let _ = tx.send(Err(Status::invalid_argument(msg))).await;
            return;
        }
    };
    let mut snapshots = shared.snapshots.clone();
    let mut snap = snapshots.borrow_and_update().clone();
    if let Some(msg) = snap.claim_error(&node, caller.as_ref()) {
        warn!(node = %node.id, error = %msg, "proxy refused");
        shared.metrics.refused(tonic::Code::PermissionDenied);
        let _ = tx.send(Err(Status::permission_denied(msg))).await;
        return;
    }
    if let Some(status) = snap.admission_error(&node) {
        warn!(node = %node.id, error = %status.message(), "proxy refused");
        shared.metrics.refused(status.code());
        let _ = tx.send(Err(status)).await;
        return;
    }
    let registration = shared.registry.register(node.clone(), P::MODE);
    let status = registration.status.clone();
    let _gauge = ConnectedGauge::new(shared.metrics.clone(), P::MODE);
    let mut secrets = match (&caller, &shared.secrets) {
        // A relay fetches config for its cluster's classes; it gets its own certificates
        // through CreateCertificate, never a proxy's secrets.
        (Some(c), Some(provider)) if c.relay_of.is_none() => {
            status.set_identity(c.identity.uri());
            match provider.open(&c.identity, &node.id) {
                Ok(rx) => Some(rx),
                Err(e) => {
                    warn!(node = %node.id, identity = %c.identity, error = %e, "cannot make the proxy's certificate");
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "cannot issue a certificate for {}: {e}",
                            c.identity
                        ))))
                        .await;
                    return;
                }
            }
        }
        _ => None,
    };
    let mut own: Arc<ProxySecrets> = match secrets.as_mut() {
        Some(rx) => rx.borrow_and_update().clone(),
        None => Arc::default(),
    };
    info!(node = %node.id, workload = ?node.workload, identity = ?caller.as_ref().map(|c| c.identity.uri()), mode = P::MODE, "proxy connected");
    // The proxy's class can change with the mesh (its WorkloadEntry appears, say), so the
    // view is looked up again for every snapshot, and only then.
    // `None`: the source has nothing for this class yet (a relay still fetching it):
    // answer nothing rather than an empty config that would wipe a reconnecting proxy's.
    let mut view = snap.view_for(&node);
    // The proxy's own secrets, plus its namespace's credentials when it has an identity.
    let authenticated = secrets.is_some();
    let credentials = |snap: &dyn ConfigSource| {
        authenticated
            .then(|| snap.credential_secrets(&node))
            .flatten()
    };
    let mut shared_secrets = credentials(&*snap);
    let mut own_view = secret_view(&own, shared_secrets.as_ref());
    let mut stream = P::new(status.clone());
    if let Some(e) = too_many_names::<P>(&first, &shared) {
        let _ = tx.send(Err(e)).await;
        return;
    }
    stream.on_request(first, &shared);
    loop {
        if let Some(class) = &view {
            let secret_pushes = status.type_status(TypeKind::Secret).map(|t| t.pushes);
            let views = Views {
                class,
                own: &own_view,
                // Without a provider nothing will come: answer (empty) at once.
                own_ready: own.ready || secrets.is_none(),
            };
            if stream.flush(&*snap, &views, &shared, &tx).await.is_err() {
                break;
            }
            if secrets.is_some() {
                track_secrets(&status, &own, secret_pushes);
            }
        }
        tokio::select! {
            r = requests.message() => match r {
                Ok(Some(req)) => {
                    if let Some(e) = too_many_names::<P>(&req, &shared) {
                        warn!(node = %node.id, error = %e.message(), "request refused");
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                    stream.on_request(req, &shared)
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(node = %node.id, error = %e, "ADS stream error");
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                snap = snapshots.borrow_and_update().clone();
                if let Some(msg) = snap.claim_error(&node, caller.as_ref()) {
                    warn!(node = %node.id, error = %msg, "proxy no longer matches its identity");
                    shared.metrics.refused(tonic::Code::PermissionDenied);
                    let _ = tx.send(Err(Status::permission_denied(msg))).await;
                    break;
                }
                view = snap.view_for(&node);
                let next = credentials(&*snap);
                let same = match (&next, &shared_secrets) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.version == b.version,
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    shared_secrets = next;
                    own_view = secret_view(&own, shared_secrets.as_ref());
                }
            }
            changed = async {
                match secrets.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                match (changed, secrets.as_mut()) {
                    (Ok(()), Some(rx)) => {
                        own = rx.borrow_and_update().clone();
                        own_view = secret_view(&own, shared_secrets.as_ref());
                    }
                    // The provider gave up on this proxy (its task ended): better to
                    // drop the stream than to serve a certificate nobody renews.
                    _ => break,
                }
            }
        }
    }
    info!(node = %node.id, mode = P::MODE, "proxy disconnected");
}

/// A request naming more resources than the limit ends the stream: its cost would be
/// paid on every push.
fn too_many_names<P: Protocol>(req: &P::Request, shared: &AdsShared) -> Option<Status> {
    let (n, max) = (P::names(req), shared.limits.max_names_per_request);
    (n > max).then(|| {
        Status::resource_exhausted(format!(
            "the request names {n} resources, more than the limit of {max} (--max-names-per-request)"
        ))
    })
}

/// The secrets a stream serves: its own, with its namespace's credentials on top.
fn secret_view(own: &ProxySecrets, shared: Option<&Arc<ResourceSet>>) -> Arc<ProxyView> {
    match shared {
        Some(set) if !set.map.is_empty() => {
            Arc::new(own.view.layered(TypeKind::Secret, set.clone()))
        }
        _ => own.view.clone(),
    }
}

/// Keeps the proxy's secret epochs right after a flush. A push means the proxy was sent
/// this epoch's secrets (its ACK will say it holds them); no push means what it was
/// sent before is already what this epoch asks for.
fn track_secrets(status: &ProxyStatus, own: &ProxySecrets, pushes_before: Option<u64>) {
    let ts = status.type_status(TypeKind::Secret);
    let pushed = ts.as_ref().map(|t| t.pushes) != pushes_before;
    let synced = ts
        .as_ref()
        .is_some_and(|t| t.sent_version.is_some() && t.synced());
    status.update_secrets(|s| {
        s.cert_serial.clone_from(&own.cert_serial);
        s.cert_not_after = own.cert_not_after;
        s.cert_root.clone_from(&own.cert_root);
        if pushed {
            s.epoch_sent = Some(own.epoch);
        } else if s.epoch_sent.is_some_and(|e| e < own.epoch) {
            s.epoch_sent = Some(own.epoch);
            if synced {
                s.epoch_acked = Some(own.epoch);
            }
        }
    });
}
