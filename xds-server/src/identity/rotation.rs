//! Drives a root rotation (see `cert_authority` for the phases): a phase is done when
//! every connected proxy that holds secrets has ACKed the current trust epoch, and every
//! connected member-cluster relay reports itself and its sidecars at that epoch; only
//! then does the CA move on. Nothing else advances a rotation, so a proxy that NACKs
//! or never answers holds it (and shows up as pending in `/debug/ca`). The phase is
//! persisted by the CA, so after a restart this picks up where it was, but only after
//! [`RESUME_GRACE`]: until proxies and relays have reconnected, "nobody is behind"
//! would only mean "nobody is back yet".

use super::registration::RelayProxies;
use crate::ads::status::ProxyRegistry;
use crate::metrics::Metrics;
use cert_authority::{Authority, Phase};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How long a rotation found in progress at start waits before it may move on: sidecars
/// and relays reconnect within their backoff (a few seconds), and relays report their
/// sidecars every 5 s.
pub const RESUME_GRACE: Duration = Duration::from_secs(20);

/// A proxy that has not ACKed the current trust epoch yet.
#[derive(Debug, Serialize)]
pub struct Pending {
    pub node: String,
    pub identity: Option<String>,
    pub epoch_sent: Option<u64>,
    pub epoch_acked: Option<u64>,
}

/// Everything that holds a rotation at `epoch`: proxies connected here, then relays and
/// the sidecars behind them; and the member clusters whose relays are away.
pub fn waiting_for(
    registry: &ProxyRegistry,
    relays: Option<&RelayProxies>,
    epoch: u64,
) -> (Vec<Pending>, Vec<String>) {
    let mut behind = pending(registry, epoch);
    let mut away = Vec::new();
    if let Some(relays) = relays {
        let (more, gone) = relays.pending(epoch);
        behind.extend(more);
        away = gone;
    }
    (behind, away)
}

fn pending(registry: &ProxyRegistry, epoch: u64) -> Vec<Pending> {
    registry
        .all()
        .iter()
        .filter(|p| p.behind_epoch(epoch))
        .map(|p| {
            let s = p.secrets();
            Pending {
                node: p.node.id.clone(),
                identity: p.identity().map(str::to_string),
                epoch_sent: s.epoch_sent,
                epoch_acked: s.epoch_acked,
            }
        })
        .collect()
}

pub fn spawn(
    authority: Authority,
    registry: Arc<ProxyRegistry>,
    relays: Arc<RelayProxies>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let resumed = authority.rotation().is_some();
        let mut waiting_logged = None;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let status = authority.rotation();
            let epoch = authority.current().epoch;
            metrics.ca_trust_epoch.set(epoch as i64);
            metrics
                .ca_rotation_phase
                .set(match status.as_ref().map(|s| s.phase) {
                    None => 0,
                    Some(Phase::AddNewRoot) => 1,
                    Some(Phase::Reissue) => 2,
                    Some(Phase::RemoveOldRoot) => 3,
                });
            let Some(status) = status else {
                continue;
            };
            if resumed && started.elapsed() < RESUME_GRACE {
                continue;
            }
            let (behind, away) = waiting_for(&registry, Some(&relays), epoch);
            if !behind.is_empty() {
                if waiting_logged != Some(epoch) {
                    info!(phase = ?status.phase, epoch, pending = behind.len(), "root rotation waits for proxies to ACK the current trust bundle");
                    waiting_logged = Some(epoch);
                }
                continue;
            }
            if !away.is_empty() {
                warn!(clusters = ?away, phase = ?status.phase, "root rotation moves on without member clusters whose relays are not connected: after the old root is removed they must join again");
            }
            match authority.advance_rotation() {
                Ok(Some(next)) => {
                    info!(from = ?status.phase, to = ?next.phase, epoch = next.epoch, "root rotation: phase done, moving on")
                }
                Ok(None) => {
                    info!(new_root = %status.new_root, "root rotation complete: the old root is gone")
                }
                Err(e) => warn!(error = %e, "root rotation cannot move on"),
            }
        }
    })
}
