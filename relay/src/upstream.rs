//! Upstream: one Delta ADS stream per proxy class present in the cluster, all over one
//! HTTP/2 connection to the control plane. Each stream subscribes to everything of its
//! class (`*`) and feeds the [`RelayCache`]. A lost stream comes back with backoff and
//! jitter and reports what the cache holds (`initial_resource_versions`), so the control
//! plane answers with only what changed and unchanged config moves nothing downstream.

use crate::cache::{ClassKey, RelayCache, Update, CLASS_TYPES};
use crate::RelayError;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use xds_server::cache::{Resource, TypeKind};

/// Envoy's ADS backoff: a random delay below base x 2^attempt, at most the cap.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub fn backoff(attempt: u32, seed: u64) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    // Full jitter: relays (and their classes) that lost the control plane together must
    // not come back together.
    let h = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes());
    ceiling.mul_f64((h % 10_000) as f64 / 10_000.0)
}

/// Upstream streams currently open, for the admin API and tests.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub streams: AtomicUsize,
}

/// Opens a class stream for every class asked for, once, and keeps it up.
pub async fn run(
    cache: Arc<RelayCache>,
    channel: Channel,
    cluster: String,
    mut wanted: mpsc::UnboundedReceiver<ClassKey>,
    stats: Arc<UpstreamStats>,
) {
    let mut open: BTreeSet<ClassKey> = BTreeSet::new();
    let mut tasks = JoinSet::new();
    while let Some(key) = wanted.recv().await {
        if !open.insert(key.clone()) {
            continue;
        }
        info!(cluster = %cluster, workload = ?key.workload, namespace = %key.namespace, "opening an upstream stream for a new proxy class");
        tasks.spawn(class_loop(
            cache.clone(),
            channel.clone(),
            cluster.clone(),
            key,
            stats.clone(),
        ));
    }
}

async fn class_loop(
    cache: Arc<RelayCache>,
    channel: Channel,
    cluster: String,
    key: ClassKey,
    stats: Arc<UpstreamStats>,
) {
    let mut attempt = 0u32;
    let mut seed = xxhash_rust::xxh3::xxh3_64(format!("{key:?}").as_bytes());
    loop {
        stats.streams.fetch_add(1, Ordering::Relaxed);
        let result = stream_once(&cache, channel.clone(), &cluster, &key, &mut attempt).await;
        stats.streams.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                debug!(workload = ?key.workload, "upstream stream closed by the control plane")
            }
            Err(e) => {
                warn!(workload = ?key.workload, namespace = %key.namespace, error = %e, attempt, "upstream stream lost; serving the cache meanwhile")
            }
        }
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        tokio::time::sleep(backoff(attempt, seed)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn stream_once(
    cache: &RelayCache,
    channel: Channel,
    cluster: &str,
    key: &ClassKey,
    attempt: &mut u32,
) -> Result<(), RelayError> {
    let (tx, rx) = mpsc::channel(16);
    for (i, kind) in CLASS_TYPES.iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| key.upstream_node(cluster)),
            type_url: kind.type_url().to_string(),
            resource_names_subscribe: vec!["*".to_string()],
            initial_resource_versions: cache.versions(key, *kind),
            ..Default::default()
        };
        tx.send(req).await.map_err(|_| RelayError::Closed)?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = stream.message().await? {
        let Some(kind) = TypeKind::from_type_url(&resp.type_url) else {
            continue;
        };
        let resources: Vec<Arc<Resource>> = resp
            .resources
            .iter()
            .filter_map(|r| {
                let any = r.resource.as_ref()?;
                Some(Resource::from_body(
                    kind,
                    r.name.as_str().into(),
                    Bytes::from(any.value.clone()),
                ))
            })
            .collect();
        debug!(workload = ?key.workload, type_url = %resp.type_url, nonce = %resp.nonce, resources = resources.len(), removed = resp.removed_resources.len(), "upstream update");
        cache.apply(
            key,
            Update {
                kind,
                resources,
                removed: &resp.removed_resources,
            },
        );
        // A response means the connection works: the next loss backs off from scratch.
        *attempt = 0;
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack).await.map_err(|_| RelayError::Closed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 0..20 {
            for seed in 0..50 {
                let d = backoff(attempt, seed);
                let ceiling = BACKOFF_BASE * 2u32.pow(attempt.min(16));
                assert!(d <= ceiling.min(BACKOFF_MAX), "{attempt} {d:?}");
            }
        }
        let distinct: BTreeSet<Duration> = (0..50).map(|s| backoff(3, s)).collect();
        assert!(distinct.len() > 40, "jitter spreads retries");
    }
}
