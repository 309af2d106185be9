//! Upstream: one Delta ADS stream per proxy class present in the cluster, all over one
//! HTTP/2 connection to the control plane. Each stream subscribes to everything of its
//! class (`*`) and feeds the [`RelayCache`]. A lost stream comes back with backoff and
//! jitter and reports what the cache holds (`initial_resource_versions`), so the control
//! plane answers with only what changed and unchanged config moves nothing downstream.
//!
//! A class no sidecar has used for a while (and that is not a workload of the registry
//! folder, which the relay keeps ready for sidecars started while the control plane is
//! out of reach) is retired: its stream closed and its cache dropped, so the relay's
//! upstream streams and memory follow the classes present, not every class ever seen.

use crate::cache::{ClassKey, RelayCache, Update, CLASS_TYPES};
use crate::RelayError;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use xds_server::ads::status::ProxyRegistry;
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

/// Counts an open stream for as long as it lives, also when its task is aborted.
struct Open(Arc<UpstreamStats>);

impl Open {
    fn new(stats: &Arc<UpstreamStats>) -> Open {
        stats.streams.fetch_add(1, Ordering::Relaxed);
        Open(stats.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the class streams need besides the cache.
pub struct Upstream {
    pub channel: Channel,
    pub cluster: String,
    pub stats: Arc<UpstreamStats>,
    /// The sidecars connected downstream: a class with one is in use.
    pub downstream: Arc<ProxyRegistry>,
    /// How long a class may go unused before its stream is closed.
    pub idle_after: Duration,
}

/// Classes to retire: open, not in use, not pinned, and unused for `idle_after`. Marks
/// the ones in use or pinned as seen `now`.
fn idle(
    open: &mut BTreeMap<ClassKey, (AbortHandle, Instant)>,
    in_use: &BTreeSet<ClassKey>,
    pinned: &BTreeSet<ClassKey>,
    now: Instant,
    idle_after: Duration,
) -> Vec<ClassKey> {
    let mut gone = Vec::new();
    for (key, (_, seen)) in open.iter_mut() {
        if in_use.contains(key) || pinned.contains(key) {
            *seen = now;
        } else if now.duration_since(*seen) >= idle_after {
            gone.push(key.clone());
        }
    }
    gone
}

/// Opens a class stream for every class asked for, once, keeps it up while the class is
/// in use, and retires it once it has been idle for `idle_after`.
pub async fn run(
    cache: Arc<RelayCache>,
    mut wanted: mpsc::UnboundedReceiver<ClassKey>,
    up: Upstream,
) {
    let mut open: BTreeMap<ClassKey, (AbortHandle, Instant)> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let mut sweep = tokio::time::interval((up.idle_after / 2).min(Duration::from_secs(30)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            key = wanted.recv() => {
                let Some(key) = key else { return };
                if let Some((_, seen)) = open.get_mut(&key) {
                    *seen = Instant::now();
                    continue;
                }
                if open.len() >= cache.limit.max {
                    warn!(cluster = %up.cluster, workload = ?key.workload, namespace = %key.namespace, max = cache.limit.max, "proxy class limit reached: no upstream stream for this class");
                    continue;
                }
                cache.limit.open.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone());
                info!(cluster = %up.cluster, workload = ?key.workload, namespace = %key.namespace, "opening an upstream stream for a new proxy class");
                let handle = tasks.spawn(class_loop(
                    cache.clone(),
                    up.channel.clone(),
                    up.cluster.clone(),
                    key.clone(),
                    up.stats.clone(),
                ));
                open.insert(key, (handle, Instant::now()));
            }
            _ = sweep.tick() => {
                let in_use: BTreeSet<ClassKey> = up
                    .downstream
                    .all()
                    .iter()
                    .map(|p| ClassKey::of(&p.node))
                    .collect();
                let pinned = cache.pinned();
                for key in idle(&mut open, &in_use, &pinned, Instant::now(), up.idle_after) {
                    if let Some((handle, _)) = open.remove(&key) {
                        handle.abort();
                    }
                    cache.limit.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    cache.forget(&key);
                    info!(cluster = %up.cluster, workload = ?key.workload, namespace = %key.namespace, idle_s = up.idle_after.as_secs(), "no sidecar of this class for a while: upstream stream closed, cache dropped");
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
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
        let counted = Open::new(&stats);
        let result = stream_once(&cache, channel.clone(), &cluster, &key, &mut attempt).await;
        drop(counted);
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

    #[tokio::test]
    async fn only_classes_unused_and_unpinned_for_the_idle_time_are_retired() {
        let key = |w: &str| ClassKey {
            workload: Some(format!("{w}.default")),
            namespace: "default".into(),
        };
        let t0 = Instant::now();
        let idle_after = Duration::from_secs(600);
        let task = tokio::spawn(async {});
        let mut open: BTreeMap<ClassKey, (AbortHandle, Instant)> = ["used", "pinned", "idle"]
            .into_iter()
            .map(|w| (key(w), (task.abort_handle(), t0)))
            .collect();
        let in_use = BTreeSet::from([key("used")]);
        let pinned = BTreeSet::from([key("pinned")]);
        // Not idle long enough yet: nothing goes.
        let soon = t0 + Duration::from_secs(599);
        assert!(idle(&mut open, &in_use, &pinned, soon, idle_after).is_empty());
        let later = t0 + idle_after;
        assert_eq!(
            idle(&mut open, &in_use, &pinned, later, idle_after),
            vec![key("idle")]
        );
        // A class in use was seen then: its idle time starts over when the sidecar goes.
        let none = BTreeSet::new();
        let after = later + Duration::from_secs(599);
        let gone = idle(&mut open, &none, &none, after, idle_after);
        assert_eq!(gone, vec![key("idle")]);
        let gone = idle(&mut open, &none, &none, later + idle_after, idle_after);
        assert_eq!(gone.len(), 3);
    }
}
