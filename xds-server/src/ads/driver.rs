//! The life of one ADS stream, shared by SotW and Delta: identify the proxy from its first
//! request, register it, then alternate between reading requests and pushing whatever
//! the newest snapshot changed, until either side goes away.

use super::codec::Frame;
use super::grpc::RequestReader;
use super::node::NodeInfo;
use super::status::ProxyStatus;
use super::{AdsShared, ConnectedGauge};
use crate::cache::{ProxyView, Snapshot};
use envoy_types::pb::envoy::config::core::v3::Node;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info};

pub(crate) type Responses = mpsc::Sender<Result<Frame, Status>>;

/// One protocol variant's per-stream state machine.
pub(crate) trait Protocol: Send + Sized {
    type Request: prost::Message + Default + Send + 'static;
    const MODE: &'static str;

    fn node(req: &Self::Request) -> Option<&Node>;
    fn new(status: Arc<ProxyStatus>) -> Self;
    fn on_request(&mut self, req: Self::Request, shared: &AdsShared);
    /// Sends what changed for this proxy; `Err` when the proxy is gone.
    fn flush(
        &mut self,
        snap: &Snapshot,
        view: &ProxyView,
        shared: &AdsShared,
        tx: &Responses,
    ) -> impl Future<Output = Result<(), ()>> + Send;
}

pub(crate) async fn run<P: Protocol>(
    shared: Arc<AdsShared>,
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
    let registration = shared.registry.register(node.clone(), P::MODE);
    let _gauge = ConnectedGauge::new(shared.metrics.clone(), P::MODE);
    info!(node = %node.id, workload = ?node.workload, mode = P::MODE, "proxy connected");
    let mut snapshots = shared.snapshots.clone();
    let mut snap = snapshots.borrow_and_update().clone();
    // The proxy's class can change with the mesh (its WorkloadEntry appears, say), so the
    // view is looked up again for every snapshot, and only then.
    let view_of =
        |snap: &Snapshot| snap.view(&snap.scope(node.workload.as_deref(), &node.namespace));
    let mut view = view_of(&snap);
    let mut stream = P::new(registration.status.clone());
    stream.on_request(first, &shared);
    loop {
        if stream.flush(&snap, &view, &shared, &tx).await.is_err() {
            break;
        }
        tokio::select! {
            r = requests.message() => match r {
                Ok(Some(req)) => stream.on_request(req, &shared),
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
                view = view_of(&snap);
            }
        }
    }
    info!(node = %node.id, mode = P::MODE, "proxy disconnected");
}
