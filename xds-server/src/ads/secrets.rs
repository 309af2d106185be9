//! Per-proxy secrets (SDS over ADS): unlike every other type, `default` (the proxy's own
//! certificate and key) differs per proxy, so it is never part of a shared class view.
//! A [`SecretProvider`] hands each authenticated stream a watch of its own secrets; the
//! stream serves them from a one-type [`ProxyView`] beside its class view.

use crate::cache::ProxyView;
use cert_authority::SpiffeId;
use std::sync::Arc;
use tokio::sync::watch;

/// Istio's names, so Istio-generated config and dumps read the same.
pub const DEFAULT_SECRET: &str = "default";
pub const ROOT_SECRET: &str = "ROOTCA";

/// One proxy's secrets at one trust epoch.
#[derive(Debug, Default)]
pub struct ProxySecrets {
    /// The CA's trust epoch these secrets belong to (bundle and signer of that epoch).
    pub epoch: u64,
    /// Secret resources only.
    pub view: Arc<ProxyView>,
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<u64>,
    pub cert_root: Option<String>,
    /// The provider has this proxy's secrets (not just an empty placeholder).
    pub ready: bool,
}

pub trait SecretProvider: Send + Sync + std::fmt::Debug {
    /// Starts keeping secrets for one proxy of identity `id` (renewals, rotation) for as
    /// long as the returned receiver lives. `proxy` names the caller in audit lines.
    fn open(
        &self,
        id: &SpiffeId,
        proxy: &str,
    ) -> Result<watch::Receiver<Arc<ProxySecrets>>, String>;
}
