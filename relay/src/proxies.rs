//! Tells the control plane which sidecars this relay serves (for its admin API) and
//! which trust epoch they and the relay are at (a root rotation waits for them): the
//! whole list, sent when it changed, at most every few seconds, over one client stream
//! that comes back with backoff when lost. Deliberately coarse: no per-type versions
//! (every ACK would change the list), so the control plane's cost stays per relay, not
//! per sidecar; the relay's own `/debug/syncz` has the details. A change of trust epochs
//! goes out within a second: a rotation phase waits on it.

use crate::upstream::backoff;
use crate::RelayError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::warn;
use trellis_proto::trellis::relay::v1::registration_client::RegistrationClient;
use trellis_proto::trellis::relay::v1::{ProxyList, ProxySummary};
use xds_server::ads::status::ProxyRegistry;

const EVERY: Duration = Duration::from_secs(5);
const TRUST_EVERY: Duration = Duration::from_secs(1);

pub fn summarize(registry: &ProxyRegistry, relay_trust_epoch: u64) -> ProxyList {
    let mut proxies: Vec<ProxySummary> = registry
        .all()
        .iter()
        .map(|p| {
            let v = p.view();
            let secrets = p.secrets();
            ProxySummary {
                id: v.id,
                workload: v.workload.unwrap_or_default(),
                namespace: v.namespace,
                mode: v.mode.to_string(),
                synced: v.synced,
                identity: v.identity.unwrap_or_default(),
                connected_at_ms: v.connected_at_ms,
                acked: Default::default(),
                trust_epoch_sent: secrets.epoch_sent,
                trust_epoch_acked: secrets.epoch_acked,
            }
        })
        .collect();
    proxies.sort_by(|a, b| a.id.cmp(&b.id));
    ProxyList {
        proxies,
        relay_trust_epoch,
    }
}

/// Per sidecar, the trust epochs (sent, ACKed) a list reports.
type Epochs = HashMap<String, (Option<u64>, Option<u64>)>;

fn epochs(list: &ProxyList) -> Epochs {
    list.proxies
        .iter()
        .map(|p| (p.id.clone(), (p.trust_epoch_sent, p.trust_epoch_acked)))
        .collect()
}

/// What the report loop reads.
#[derive(Clone)]
pub struct Source {
    pub registry: Arc<ProxyRegistry>,
    /// The relay's own trust epoch (see `trust`).
    pub trust_epoch: Arc<AtomicU64>,
    pub trust_moved: Arc<Notify>,
}

impl Source {
    fn summarize(&self) -> ProxyList {
        summarize(&self.registry, self.trust_epoch.load(Ordering::SeqCst))
    }

    /// Whether the relay or a sidecar of `last` moved to another trust epoch since, or a
    /// sidecar came that holds secrets of an older epoch than the relay's: what a root
    /// rotation waits on, so it goes out at once. Other sidecars that came or went wait for
    /// the next regular report (a storm of them must not cost the control plane a full
    /// list every second).
    fn trust_changed_since(&self, last: &ProxyList, last_epochs: &Epochs) -> bool {
        let relay = self.trust_epoch.load(Ordering::SeqCst);
        relay != last.relay_trust_epoch
            || self.registry.all().iter().any(|p| {
                let s = p.secrets();
                match last_epochs.get(&p.node.id) {
                    Some(e) => *e != (s.epoch_sent, s.epoch_acked),
                    None => s.epoch_sent.is_some_and(|e| e < relay),
                }
            })
    }
}

pub async fn report_loop(channel: Channel, source: Source) {
    let mut attempt = 0u32;
    loop {
        if let Err(e) = report_once(&channel, &source, &mut attempt).await {
            warn!(error = %e, attempt, "proxy report stream lost; retrying");
        }
        tokio::time::sleep(backoff(attempt, u64::from(attempt) ^ 0x2545_f491)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn report_once(
    channel: &Channel,
    source: &Source,
    attempt: &mut u32,
) -> Result<(), RelayError> {
    let (tx, rx) = mpsc::channel::<ProxyList>(2);
    let mut last = source.summarize();
    let mut last_epochs = epochs(&last);
    tx.send(last.clone())
        .await
        .map_err(|_| RelayError::Closed)?;
    let mut client = RegistrationClient::new(channel.clone());
    let call = client.report_proxies(ReceiverStream::new(rx));
    let sender = async {
        let mut sent_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TRUST_EVERY) => {}
                () = source.trust_moved.notified() => {}
            }
            if !(sent_at.elapsed() >= EVERY || source.trust_changed_since(&last, &last_epochs)) {
                continue;
            }
            let now = source.summarize();
            if now != last {
                if tx.send(now.clone()).await.is_err() {
                    return;
                }
                last_epochs = epochs(&now);
                last = now;
            }
            sent_at = tokio::time::Instant::now();
            *attempt = 0;
        }
    };
    tokio::select! {
        r = call => { r?; Ok(()) }
        () = sender => Ok(()),
    }
}
