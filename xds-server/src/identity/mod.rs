//! Identity on the control plane's side: the secure port (15012) and what it needs.
//!
//! - [`tls`]: the port's TLS, with a serving certificate from the mesh's own CA and
//!   client certificates verified against the current trust bundle; both are rebuilt
//!   and swapped in whenever the CA's trust state changes (rotation), so new
//!   connections always see the current bundle and existing ones are never cut.
//! - [`auth`]: who is calling, from a client certificate or a bearer token made by
//!   `xds-server token create`.
//! - [`secrets`]: each authenticated proxy's `default` and `ROOTCA` secrets, with
//!   renewal at half-life and re-issuance when the signer changes.
//! - [`ca_service`]: Istio's `CreateCertificate`, for agents that bring their own keys.
//! - [`rotation`]: moves a root rotation to its next phase once every proxy holding
//!   secrets ACKed the current one.

pub mod auth;
pub mod ca_service;
pub mod registration;
pub mod rotation;
pub mod secrets;
pub mod tls;

use cert_authority::{CaError, SpiffeId};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot build the secure port's TLS config: {0}")]
    Tls(String),
}

/// The identity the control plane serves its secure port with.
pub fn server_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, "trellis-system", "xds-server")
}

/// The file `xds-server bootstrap` reads the trust bundle from: kept current by the
/// server so bootstraps made during or after a rotation trust the right roots.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// File-based SDS for the sidecars' own connection to the secure port: a
/// `DiscoveryResponse` with one validation-context secret, [`XDS_TRUST_SECRET`]. Envoy
/// watches it (bootstraps reference it with `path_config_source`), so a sidecar that
/// reconnects after a root rotation trusts the new root without a new bootstrap.
pub const XDS_TRUST_FILE: &str = "xds-trust.json";
pub const XDS_TRUST_SECRET: &str = "trellis-xds-trust";

/// Writes the trust bundle as PEM and as the file-based SDS secret, each atomically
/// (renamed into place: Envoy's watch reacts to the move, never sees half a file).
pub fn write_trust_bundle(ca_dir: &Path, bundle_pem: &str) -> Result<(), IdentityError> {
    let sds = serde_json::json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": XDS_TRUST_SECRET,
            "validation_context": { "trusted_ca": { "inline_string": bundle_pem } },
        }]
    });
    cert_authority::write_atomic(
        &ca_dir.join(TRUST_BUNDLE_FILE),
        bundle_pem.as_bytes(),
        false,
    )?;
    cert_authority::write_atomic(
        &ca_dir.join(XDS_TRUST_FILE),
        sds.to_string().as_bytes(),
        false,
    )?;
    Ok(())
}

/// Watches a plugged-in CA folder and hands changes to the CA. Operators replace the
/// four files one by one, so a change is acted on only after 500 ms of quiet; a
/// half-written or inconsistent set is refused by the CA and the running CA stays.
pub fn watch_plugged(
    authority: cert_authority::Authority,
    dir: &Path,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if !ev.kind.is_access() => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "plugged CA watch error"),
        })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let dir = dir.display().to_string();
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            loop {
                tokio::select! {
                    more = rx.recv() => if more.is_none() { return },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => break,
                }
            }
            match authority.reload_plugged() {
                Ok(true) => tracing::info!(dir = %dir, "plugged CA changed: now in use"),
                Ok(false) => {
                    tracing::debug!(dir = %dir, "plugged CA files touched, content unchanged")
                }
                Err(e) => {
                    tracing::error!(dir = %dir, error = %e, "plugged CA change refused; the previous CA stays in use")
                }
            }
        }
    }))
}
