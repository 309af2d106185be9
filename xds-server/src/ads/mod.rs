//! The ADS server: SotW and Delta aggregated streams over one gRPC service.
//!
//! Each stream is one task holding only bookkeeping (subscriptions, what it sent, the
//! nonce it waits for). Resources come encoded from the shared [`Snapshot`]; a stream
//! woken by a new snapshot compares versions and sends what changed for its proxy.
//! Streams read the newest snapshot when they get to it, so a slow proxy skips
//! intermediate versions instead of queueing them (latest wins, bounded memory).
//!
//! Subscriptions follow the xDS spec the same way for SotW and Delta (`subscription.rs`):
//! the first request of a CDS or LDS type that names nothing is a legacy wildcard, and
//! stays one while requests keep naming nothing. The first name sent (in Delta, any
//! subscribe or unsubscribe) ends that: an empty list then means no resources, and only
//! an explicit `*` means everything; `*` may stand next to explicit names, which stay
//! subscribed when `*` goes. EDS, RDS and SDS are never wildcard by default. A Delta
//! stream that unsubscribes a name while it stays wildcard is told whether `*` still
//! covers it: the resource is resent if it exists, named in `removed_resources` if not.
//! Equal name sets are interned, so streams with the same subscription share one set and
//! one cached response body.

pub mod codec;
mod delta;
mod driver;
pub mod grpc;
pub mod interner;
pub mod node;
pub mod secrets;
mod service;
mod sotw;
pub mod source;
pub mod status;
mod subscription;

pub use codec::Frame;
pub use service::{AdsService, Authenticate, Caller};

use crate::cache::TypeKind;
use crate::metrics::{Metrics, ModeLabel, TypeLabel};
use status::{ProxyRegistry, ProxyStatus};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What every stream shares.
#[derive(Debug, Clone)]
pub struct AdsShared {
    pub snapshots: watch::Receiver<Arc<dyn source::ConfigSource>>,
    /// Serves `default` and `ROOTCA` to proxies that proved an identity; `None` where
    /// this server hands out no secrets (the plaintext port).
    pub secrets: Option<Arc<dyn secrets::SecretProvider>>,
    pub subscriptions: Arc<interner::Interner>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    /// Request size and names per request (the connection limits are the listener's).
    pub limits: crate::net::NetLimits,
}

/// Keeps the connected-proxies gauge right however the stream ends.
struct ConnectedGauge {
    metrics: Arc<Metrics>,
    mode: &'static str,
}

impl ConnectedGauge {
    fn new(metrics: Arc<Metrics>, mode: &'static str) -> Self {
        metrics.connected.get_or_create(&ModeLabel { mode }).inc();
        Self { metrics, mode }
    }
}

impl Drop for ConnectedGauge {
    fn drop(&mut self) {
        self.metrics
            .connected
            .get_or_create(&ModeLabel { mode: self.mode })
            .dec();
    }
}

/// Bookkeeping common to both protocol variants for one sent response.
pub(crate) struct Sent {
    pub version: String,
    pub nonce: String,
    /// Set when the push was caused by a config change, to measure change -> ACK latency.
    pub change_started: Option<Instant>,
}

pub(crate) fn record_push(
    shared: &AdsShared,
    status: &ProxyStatus,
    kind: TypeKind,
    sent: &Sent,
    resources: usize,
    bytes: usize,
) {
    let label = TypeLabel {
        r#type: kind.short(),
    };
    shared.metrics.pushes.get_or_create(&label).inc();
    shared
        .metrics
        .push_bytes
        .get_or_create(&label)
        .inc_by(bytes as u64);
    if let Some(t) = sent.change_started {
        shared
            .metrics
            .push_latency
            .get_or_create(&label)
            .observe(t.elapsed().as_secs_f64());
    }
    status.sent(kind, &sent.version, &sent.nonce, resources);
    tracing::debug!(
        node = %status.node.id,
        type_url = kind.type_url(),
        version = %sent.version,
        nonce = %sent.nonce,
        resources,
        bytes,
        "sent xDS response"
    );
}

pub(crate) fn record_ack(shared: &AdsShared, status: &ProxyStatus, kind: TypeKind, sent: &Sent) {
    let label = TypeLabel {
        r#type: kind.short(),
    };
    shared.metrics.acks.get_or_create(&label).inc();
    if let Some(t) = sent.change_started {
        shared
            .metrics
            .ack_latency
            .get_or_create(&label)
            .observe(t.elapsed().as_secs_f64());
    }
    status.acked(kind, &sent.version);
    if kind == TypeKind::Secret {
        // Stale nonces never get here, so this ACK is for the latest secrets sent.
        status.update_secrets(|s| s.epoch_acked = s.epoch_sent);
    }
    tracing::debug!(node = %status.node.id, type_url = kind.type_url(), version = %sent.version, nonce = %sent.nonce, "ACK");
}

pub(crate) fn record_nack(
    shared: &AdsShared,
    status: &ProxyStatus,
    kind: TypeKind,
    sent: &Sent,
    error: &str,
) {
    shared
        .metrics
        .nacks
        .get_or_create(&TypeLabel {
            r#type: kind.short(),
        })
        .inc();
    status.nacked(kind, &sent.version, error);
    tracing::warn!(
        node = %status.node.id,
        type_url = kind.type_url(),
        version = %sent.version,
        nonce = %sent.nonce,
        error,
        "NACK: proxy rejected config; it keeps its last accepted version"
    );
}
