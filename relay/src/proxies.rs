//! Tells the control plane which sidecars this relay serves (for its admin API): the
//! whole list, sent when it changed, at most every few seconds, over one client stream
//! that comes back with backoff when lost. Deliberately coarse: no per-type versions
//! (every ACK would change the list), so the control plane's cost stays per relay, not
//! per sidecar; the relay's own `/debug/syncz` has the details.

use crate::upstream::backoff;
use crate::RelayError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::warn;
use trellis_proto::trellis::relay::v1::registration_client::RegistrationClient;
use trellis_proto::trellis::relay::v1::{ProxyList, ProxySummary};
use xds_server::ads::status::ProxyRegistry;

const EVERY: Duration = Duration::from_secs(5);

pub fn summarize(registry: &ProxyRegistry) -> ProxyList {
    let mut proxies: Vec<ProxySummary> = registry
        .all()
        .iter()
        .map(|p| {
            let v = p.view();
            ProxySummary {
                id: v.id,
                workload: v.workload.unwrap_or_default(),
                namespace: v.namespace,
                mode: v.mode.to_string(),
                synced: v.synced,
                identity: v.identity.unwrap_or_default(),
                connected_at_ms: v.connected_at_ms,
                acked: Default::default(),
            }
        })
        .collect();
    proxies.sort_by(|a, b| a.id.cmp(&b.id));
    ProxyList { proxies }
}

pub async fn report_loop(channel: Channel, registry: Arc<ProxyRegistry>) {
    let mut attempt = 0u32;
    loop {
        if let Err(e) = report_once(&channel, &registry, &mut attempt).await {
            warn!(error = %e, attempt, "proxy report stream lost; retrying");
        }
        tokio::time::sleep(backoff(attempt, u64::from(attempt) ^ 0x2545_f491)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn report_once(
    channel: &Channel,
    registry: &ProxyRegistry,
    attempt: &mut u32,
) -> Result<(), RelayError> {
    let (tx, rx) = mpsc::channel::<ProxyList>(2);
    let mut last = summarize(registry);
    tx.send(last.clone())
        .await
        .map_err(|_| RelayError::Closed)?;
    let mut client = RegistrationClient::new(channel.clone());
    let call = client.report_proxies(ReceiverStream::new(rx));
    let sender = async {
        loop {
            tokio::time::sleep(EVERY).await;
            let now = summarize(registry);
            if now != last {
                if tx.send(now.clone()).await.is_err() {
                    return;
                }
                last = now;
            }
            *attempt = 0;
        }
    };
    tokio::select! {
        r = call => { r?; Ok(()) }
        () = sender => Ok(()),
    }
}
