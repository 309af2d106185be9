//! Drives a root rotation (see `cert_authority` for the phases): a phase is done when
//! every connected proxy that holds secrets has ACKed the current trust epoch; only
//! then does the CA move on. Nothing else advances a rotation, so a proxy that NACKs
//! or never answers holds it (and shows up as pending in `/debug/ca`). The phase is
//! persisted by the CA, so after a restart this simply picks up where it was.

use crate::ads::status::ProxyRegistry;
use crate::metrics::Metrics;
use cert_authority::{Authority, Phase};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

const CHECK_EVERY: Duration = Duration::from_millis(200);

/// A proxy that has not ACKed the current trust epoch yet.
#[derive(Debug, Serialize)]
pub struct Pending {
    pub node: String,
    pub identity: Option<String>,
    pub epoch_sent: Option<u64>,
    pub epoch_acked: Option<u64>,
}

pub fn pending(registry: &ProxyRegistry, epoch: u64) -> Vec<Pending> {
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
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
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
            let behind = pending(&registry, epoch);
            if !behind.is_empty() {
                if waiting_logged != Some(epoch) {
                    info!(phase = ?status.phase, epoch, pending = behind.len(), "root rotation waits for proxies to ACK the current trust bundle");
                    waiting_logged = Some(epoch);
                }
                continue;
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
