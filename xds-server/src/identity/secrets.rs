//! Secrets for proxies whose keys the server makes (single-cluster mode): one key pair
//! per proxy, in memory only, with a certificate renewed at half its life (plus jitter,
//! so a fleet started together does not renew together) and re-issued as soon as the
//! CA's signer changes (rotation). The previous certificate is never revoked: the proxy
//! keeps using it until it ACKs the new one, and connections made with it live on.

use crate::ads::secrets::{ProxySecrets, SecretProvider, DEFAULT_SECRET, ROOT_SECRET};
use crate::cache::{ProxyView, Resource, ResourceSet, TypeKind};
use crate::metrics::{HowLabel, Metrics};
use cert_authority::{Authority, IssuedCert, PrivateKey, SpiffeId, TrustState};
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{info, warn};

const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

pub struct CaSecrets {
    authority: Authority,
    ttl: Option<Duration>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CaSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSecrets").field("ttl", &self.ttl).finish()
    }
}

impl CaSecrets {
    /// `ttl`: workload certificate lifetime (`None`: the CA's default).
    pub fn new(authority: Authority, ttl: Option<Duration>, metrics: Arc<Metrics>) -> Self {
        Self {
            authority,
            ttl,
            metrics,
        }
    }
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

/// The `default` (chain + key) and `ROOTCA` (trust bundle) secrets.
pub fn secret_resources(chain_pem: &str, key: &PrivateKey, bundle_pem: &str) -> [Arc<Resource>; 2] {
    let default = Secret {
        name: DEFAULT_SECRET.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key.pem()),
            ..Default::default()
        })),
    };
    let root = Secret {
        name: ROOT_SECRET.into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem),
                ..Default::default()
            },
        )),
    };
    [
        Resource::new(TypeKind::Secret, DEFAULT_SECRET, &default),
        Resource::new(TypeKind::Secret, ROOT_SECRET, &root),
    ]
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn proxy_secrets(trust: &TrustState, cert: &IssuedCert, key: &PrivateKey) -> ProxySecrets {
    let mut view = ProxyView::default();
    view.push_layer(
        TypeKind::Secret,
        ResourceSet::new(secret_resources(&cert.chain_pem, key, &trust.bundle_pem)),
    );
    ProxySecrets {
        epoch: trust.epoch,
        view: Arc::new(view),
        cert_serial: Some(cert.serial.clone()),
        cert_not_after: Some(unix(cert.not_after)),
        cert_root: Some(cert.root_fingerprint.clone()),
        ready: true,
    }
}

/// Spreads renewals of a fleet over 10% of the lifetime, stable per certificate.
pub fn jitter(proxy: &str, serial: &str) -> f64 {
    let h = xxhash_rust::xxh3::xxh3_64(format!("{proxy}\0{serial}").as_bytes());
    (h % 10_000) as f64 / 10_000.0
}

impl SecretProvider for CaSecrets {
    fn open(
        &self,
        id: &SpiffeId,
        proxy: &str,
    ) -> Result<watch::Receiver<Arc<ProxySecrets>>, String> {
        let authority = self.authority.clone();
        let ttl = self.ttl;
        let caller = format!("proxy {proxy}");
        let metrics = self.metrics.clone();
        let issue = move |id: &SpiffeId| {
            let issued = authority.issue_with_new_key(id, ttl, &caller);
            if issued.is_ok() {
                metrics
                    .ca_issued
                    .get_or_create(&HowLabel { how: "proxy_key" })
                    .inc();
            }
            issued
        };
        let (mut cert, mut key) = issue(id).map_err(|e| e.to_string())?;
        let mut trust_rx = self.authority.subscribe();
        let mut trust = trust_rx.borrow_and_update().clone();
        let (tx, rx) = watch::channel(Arc::new(proxy_secrets(&trust, &cert, &key)));
        let (id, proxy) = (id.clone(), proxy.to_string());
        tokio::spawn(async move {
            loop {
                let renew_at = cert.renew_at(jitter(&proxy, &cert.serial));
                // Never sooner than a second: a certificate that is already due (a
                // clock jump, a TTL shorter than the clock-skew margin) must not turn
                // into a hot loop of issuance.
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .max(MIN_RENEW_INTERVAL);
                let renew = tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(wait) => true,
                    changed = trust_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        trust = trust_rx.borrow_and_update().clone();
                        cert.root_fingerprint != trust.signer
                    }
                };
                if renew {
                    match issue(&id) {
                        Ok((c, k)) => {
                            info!(node = %proxy, identity = %id, serial = %c.serial, "workload certificate renewed");
                            (cert, key) = (c, k);
                        }
                        Err(e) => {
                            // The current certificate stays until it can be replaced.
                            warn!(node = %proxy, identity = %id, error = %e, "cannot renew the workload certificate; retrying in 5 s");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            continue;
                        }
                    }
                }
                if tx
                    .send(Arc::new(proxy_secrets(&trust, &cert, &key)))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
