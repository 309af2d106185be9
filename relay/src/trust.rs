//! The mesh's trust state as the relay knows it, and what follows from it for the
//! relay's own identity.
//!
//! The control plane streams its trust state (epoch, bundle, signing root) to every
//! relay (`Registration/WatchTrust`). A root rotation is three such changes, and the
//! control plane moves from one to the next only when every connected relay reports
//! itself and its sidecars at the current epoch (see `proxies`). For the relay "at an
//! epoch" means: its own certificate is under that epoch's signer, it trusts exactly
//! that epoch's bundle (upstream and for sidecars' client certificates), and the trust
//! files its sidecars' bootstraps watch hold that bundle. Its sidecars' secrets follow
//! the same state in `secrets`.

use crate::join::{self, RelayIdentity};
use crate::upstream::backoff;
use crate::{tls, RelayError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tracing::{info, warn};
use trellis_proto::trellis::relay::v1::registration_client::RegistrationClient;
use trellis_proto::trellis::relay::v1::TrustRequest;

/// One trust state of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// The control plane's trust epoch; 0 until the relay has heard it.
    pub epoch: u64,
    pub bundle_pem: String,
    /// Fingerprint of the root new certificates are issued under; `None` until heard.
    pub signer: Option<String>,
}

impl Trust {
    /// What the relay knows before it hears the control plane: the bundle it kept.
    pub fn kept(bundle_pem: &str) -> Trust {
        Trust {
            epoch: 0,
            bundle_pem: bundle_pem.to_string(),
            signer: None,
        }
    }

    /// Whether a certificate under the root `anchor` must be issued again.
    pub fn needs_reissue(&self, anchor: Option<&str>) -> bool {
        self.signer.as_deref().is_some_and(|s| anchor != Some(s))
    }
}

/// Follows the control plane's trust state for the relay's lifetime, reconnecting with
/// backoff; an update that changes nothing is not passed on.
pub async fn watch_loop(channel: Channel, tx: watch::Sender<Arc<Trust>>) {
    let mut attempt = 0u32;
    loop {
        match watch_once(&channel, &tx, &mut attempt).await {
            Ok(()) => info!("trust stream closed by the control plane; reconnecting"),
            Err(e) => warn!(error = %e, attempt, "trust stream lost; retrying"),
        }
        tokio::time::sleep(backoff(attempt, u64::from(attempt) ^ 0x7f4a_7c15)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn watch_once(
    channel: &Channel,
    tx: &watch::Sender<Arc<Trust>>,
    attempt: &mut u32,
) -> Result<(), RelayError> {
    let mut updates = RegistrationClient::new(channel.clone())
        .watch_trust(TrustRequest {})
        .await?
        .into_inner();
    while let Some(u) = updates.message().await? {
        *attempt = 0;
        if cert_authority::fingerprint_pem(&u.bundle_pem).is_none() || u.signer.is_empty() {
            // Failing closed: an empty bundle would make the relay trust nobody.
            warn!(
                epoch = u.epoch,
                "trust update without a bundle or signer ignored"
            );
            continue;
        }
        let next = Trust {
            epoch: u.epoch,
            bundle_pem: u.bundle_pem,
            signer: Some(u.signer),
        };
        tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            info!(epoch = next.epoch, signer = ?next.signer, "trust state from the control plane");
            *cur = Arc::new(next.clone());
            true
        });
    }
    Ok(())
}

/// Where the relay's own certificate and trust go when they change.
pub(crate) struct Own {
    pub live: tls::LiveConfig,
    pub server_tls: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    pub state_dir: PathBuf,
    /// The trust epoch the relay itself is at (0: not yet known).
    pub applied: Arc<AtomicU64>,
    /// Woken when `applied` moves, so the report goes out without waiting its turn.
    pub moved: Arc<Notify>,
}

fn current(identity: &RwLock<RelayIdentity>) -> RelayIdentity {
    identity
        .read()
        .map(|i| i.clone())
        .unwrap_or_else(|e| e.into_inner().clone())
}

/// Renews the relay's certificate at half its life, issues it again at once when the
/// mesh's signer changes, and follows the mesh's bundle.
pub(crate) async fn own_loop(
    channel: Channel,
    identity: Arc<RwLock<RelayIdentity>>,
    mut trust: watch::Receiver<Arc<Trust>>,
    own: Own,
) {
    let mut renew_due = false;
    loop {
        let t = trust.borrow_and_update().clone();
        let id = current(&identity);
        let reissue = t.needs_reissue(id.anchor.as_deref());
        let heard = t.signer.is_some();
        let ok = if renew_due || reissue {
            let bundle = if heard { &t.bundle_pem } else { &id.bundle_pem };
            match join::renew(channel.clone(), &id, bundle).await {
                Ok(next) => {
                    info!(identity = %next.id, epoch = t.epoch, reissue, "relay certificate renewed");
                    renew_due = false;
                    apply(&own, &identity, next)
                }
                Err(e) => {
                    // Still valid until it expires: retry, without hammering the control plane.
                    warn!(error = %e, "cannot renew the relay certificate; retrying in 10 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        r = trust.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            }
        } else if heard && id.bundle_pem != t.bundle_pem {
            let mut next = id;
            next.bundle_pem.clone_from(&t.bundle_pem);
            apply(&own, &identity, next)
        } else {
            true
        };
        if ok && heard && own.applied.swap(t.epoch, Ordering::SeqCst) != t.epoch {
            info!(epoch = t.epoch, "relay at the mesh's trust epoch");
            own.moved.notify_one();
        }
        let wait = current(&identity)
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => renew_due = true,
            r = trust.changed() => if r.is_err() { return },
        }
    }
}

/// Puts `next` in use everywhere, or nowhere: false (and the current identity stays) if
/// its TLS config cannot be built.
fn apply(own: &Own, identity: &RwLock<RelayIdentity>, next: RelayIdentity) -> bool {
    let client = match next.tls() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "new relay certificate or bundle unusable; keeping the current one");
            return false;
        }
    };
    let server = match &own.server_tls {
        Some(_) => match xds_server::identity::tls::server_config(
            &next.chain_pem,
            &next.key_pem,
            &next.bundle_pem,
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "cannot serve sidecars with the new relay certificate; keeping the current one");
                return false;
            }
        },
        None => None,
    };
    *own.live.write().unwrap_or_else(|e| e.into_inner()) = client;
    if let (Some(swap), Some(config)) = (&own.server_tls, server) {
        swap.store(config);
    }
    // Sidecars' bootstraps watch the trust files: until they are written the relay is
    // not at this epoch (a rotation waits, and shows the relay as pending).
    let saved = join::save(&own.state_dir, &next).and_then(|()| {
        xds_server::identity::write_trust_bundle(&own.state_dir, &next.bundle_pem)
            .map_err(|e| RelayError::Tls(e.to_string()))
    });
    if let Err(e) = &saved {
        warn!(error = %e, "cannot save the relay's certificate and trust bundle");
    }
    *identity.write().unwrap_or_else(|e| e.into_inner()) = next;
    saved.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reissue_only_once_the_signer_is_known_and_differs() {
        let mut t = Trust::kept("bundle");
        assert!(!t.needs_reissue(None));
        assert!(!t.needs_reissue(Some("a")));
        t.signer = Some("a".into());
        assert!(!t.needs_reissue(Some("a")));
        assert!(t.needs_reissue(Some("b")));
        assert!(t.needs_reissue(None), "unknown anchor: issue again");
    }
}
