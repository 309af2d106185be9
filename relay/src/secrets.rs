//! Certificates through the relay. Local sidecars prove their identity with the same
//! bootstrap tokens as on the control plane; the relay checks them itself with the
//! control plane's token verification key (fetched once and kept in the state dir, so
//! this works while the control plane is out of reach). Per identity the relay keeps one
//! key pair and certificate, signed upstream: it forwards the sidecar's token with the
//! CSR, so the control plane, not the relay, decides which identity a certificate gets.
//! A sidecar only ever receives the secrets of the identity it proved.
//!
//! Secrets follow the mesh's trust state (see `trust`): a new bundle goes out at once,
//! and a certificate under a root that no longer signs is issued again at once, so a
//! root rotation reaches these sidecars as it reaches the control plane's own; each
//! sidecar's secrets carry the trust epoch they belong to, which the relay reports.

use crate::trust::Trust;
use crate::RelayError;
use cert_authority::{PrivateKey, SpiffeId, TokenKind, TokenVerifier};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tracing::{info, warn};
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;
use trellis_proto::trellis::relay::v1::registration_client::RegistrationClient;
use trellis_proto::trellis::relay::v1::TokenKeysRequest;
use xds_server::ads::secrets::{ProxySecrets, SecretProvider};
use xds_server::ads::{Authenticate, Caller};
use xds_server::cache::{ProxyView, ResourceSet, TypeKind};
use xds_server::identity::ca_service::FORWARDED_TOKEN;
use xds_server::identity::secrets::secret_resources;

const KEYS_FILE: &str = "token-keys.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredKeys {
    trust_domain: String,
    /// Hex of each key.
    keys: Vec<String>,
}

/// Checks sidecars' bootstrap tokens with the control plane's public key(s).
pub struct RelayAuth {
    trust_domain: String,
    verifiers: Vec<TokenVerifier>,
    /// The latest token each identity proved itself with: forwarded upstream with CSRs.
    tokens: Mutex<HashMap<SpiffeId, String>>,
}

impl std::fmt::Debug for RelayAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayAuth")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl RelayAuth {
    /// Asks the control plane for its token keys and keeps them in `state_dir`; if the
    /// control plane cannot be reached, uses the kept ones.
    pub async fn load(channel: Channel, state_dir: &Path) -> Result<RelayAuth, RelayError> {
        let path = state_dir.join(KEYS_FILE);
        let fetched = RegistrationClient::new(channel)
            .get_token_keys(TokenKeysRequest {})
            .await;
        let stored = match fetched {
            Ok(resp) => {
                let resp = resp.into_inner();
                let stored = StoredKeys {
                    trust_domain: resp.trust_domain,
                    keys: resp.es256_public_keys.iter().map(|k| hex(k)).collect(),
                };
                let text = serde_json::to_string_pretty(&stored)
                    .map_err(|e| RelayError::Tls(e.to_string()))?;
                std::fs::write(&path, text).map_err(|source| RelayError::State {
                    path: path.display().to_string(),
                    source,
                })?;
                stored
            }
            Err(status) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|_| RelayError::Refused(status))?;
                warn!("control plane unreachable: checking sidecar tokens with the kept keys");
                serde_json::from_str(&text).map_err(|e| RelayError::State {
                    path: path.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?
            }
        };
        let verifiers = stored
            .keys
            .iter()
            .filter_map(|k| unhex(k))
            .map(|k| TokenVerifier::from_public_key(&k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RelayError::Tls(e.to_string()))?;
        Ok(RelayAuth {
            trust_domain: stored.trust_domain,
            verifiers,
            tokens: Mutex::default(),
        })
    }

    fn verify(&self, token: &str) -> Result<SpiffeId, Status> {
        let mut last = None;
        for v in &self.verifiers {
            match v.verify(token, TokenKind::Workload) {
                Ok(claims) => {
                    let id = claims.identity().map_err(|e| {
                        Status::unauthenticated(format!("bearer token refused: {e}"))
                    })?;
                    if id.trust_domain != self.trust_domain {
                        return Err(Status::unauthenticated(format!(
                            "bearer token is for trust domain {:?}, this mesh is {:?}",
                            id.trust_domain, self.trust_domain
                        )));
                    }
                    if xds_server::clusters::relay_cluster_name(&id).is_some() {
                        return Err(Status::permission_denied(format!(
                            "{id} is a relay identity, not a sidecar's"
                        )));
                    }
                    return Ok(id);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(Status::unauthenticated(match last {
            Some(e) => format!("bearer token refused: {e}"),
            None => "the relay has no token keys".to_string(),
        }))
    }

    fn token_for(&self, id: &SpiffeId) -> Option<String> {
        self.tokens.lock().ok()?.get(id).cloned()
    }
}

impl Authenticate for RelayAuth {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        _extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        let token = xds_server::identity::auth::bearer(headers).ok_or_else(|| {
            Status::unauthenticated(
                "no bearer token: sidecars prove their identity to the relay with a bootstrap token",
            )
        })?;
        let id = self.verify(token)?;
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(id.clone(), token.to_string());
        }
        Ok(Caller {
            identity: id,
            via: "token",
            relay_of: None,
        })
    }
}

/// One key pair and certificate per identity present in the cluster, shared by its
/// sidecars, signed upstream and renewed at half its life.
pub struct RelaySecrets {
    channel: Channel,
    auth: Arc<RelayAuth>,
    trust: watch::Receiver<Arc<Trust>>,
    /// Where each identity's key and certificate are kept (0600).
    state_dir: std::path::PathBuf,
    identities: Mutex<HashMap<SpiffeId, watch::Receiver<Arc<ProxySecrets>>>>,
    /// Keeps the identity tasks' senders alive for the relay's lifetime.
    keep: RwLock<Vec<watch::Sender<Arc<ProxySecrets>>>>,
}

impl std::fmt::Debug for RelaySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySecrets").finish_non_exhaustive()
    }
}

impl RelaySecrets {
    pub fn new(
        channel: Channel,
        auth: Arc<RelayAuth>,
        trust: watch::Receiver<Arc<Trust>>,
        state_dir: std::path::PathBuf,
    ) -> Self {
        RelaySecrets {
            channel,
            auth,
            trust,
            state_dir,
            identities: Mutex::default(),
            keep: RwLock::default(),
        }
    }

    /// Identities with a certificate, for the admin API.
    pub fn identities(&self) -> Vec<String> {
        self.identities
            .lock()
            .map(|m| m.keys().map(SpiffeId::uri).collect())
            .unwrap_or_default()
    }
}

struct Issued {
    chain_pem: String,
    key: PrivateKey,
    serial: String,
    /// Fingerprint of the root the chain is under.
    anchor: Option<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

async fn issue(channel: Channel, id: &SpiffeId, token: &str) -> Result<Issued, RelayError> {
    let (key, csr) =
        PrivateKey::generate_with_csr(id).map_err(|e| RelayError::Tls(e.to_string()))?;
    let mut req = Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    let v = token
        .parse()
        .map_err(|_| RelayError::Tls("a sidecar token a header cannot carry".into()))?;
    req.metadata_mut().insert(FORWARDED_TOKEN, v);
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain;
    let (root, rest) = chain
        .split_last()
        .ok_or_else(|| RelayError::Tls("the control plane returned an empty chain".into()))?;
    Issued::parse(rest.concat(), key, cert_authority::fingerprint_pem(root))
}

impl Issued {
    fn parse(
        chain_pem: String,
        key: PrivateKey,
        anchor: Option<String>,
    ) -> Result<Issued, RelayError> {
        let der = rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .and_then(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.ok())
            .ok_or_else(|| RelayError::Tls("no certificate in the chain".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| RelayError::Tls(e.to_string()))?;
        let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        Ok(Issued {
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_before: t(cert.validity().not_before.timestamp()),
            not_after: t(cert.validity().not_after.timestamp()),
            chain_pem,
            anchor,
            key,
        })
    }
}

/// One identity's key and certificate as kept in `<state-dir>/identities/` (0600), so a
/// relay restarted while the control plane is out of reach still serves its sidecars.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptIdentity {
    chain_pem: String,
    key_pem: String,
    anchor: Option<String>,
}

fn kept_path(state_dir: &Path, id: &SpiffeId) -> std::path::PathBuf {
    state_dir
        .join("identities")
        .join(format!("{}.{}.json", id.namespace, id.service_account))
}

fn keep_identity(state_dir: &Path, id: &SpiffeId, issued: &Issued) {
    let path = kept_path(state_dir, id);
    let kept = KeptIdentity {
        chain_pem: issued.chain_pem.clone(),
        key_pem: issued.key.pem().to_string(),
        anchor: issued.anchor.clone(),
    };
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec(&kept).map_err(|e| e.to_string()))
        .and_then(|b| cert_authority::write_atomic(&path, &b, true).map_err(|e| e.to_string()));
    if let Err(e) = result {
        warn!(identity = %id, error = %e, "cannot keep the certificate in the state dir");
    }
}

/// A kept certificate for `id` that has not expired.
fn kept_identity(state_dir: &Path, id: &SpiffeId) -> Option<Issued> {
    let path = kept_path(state_dir, id);
    let text = std::fs::read(&path).ok()?;
    let kept = serde_json::from_slice::<KeptIdentity>(&text)
        .map_err(|e| e.to_string())
        .and_then(|k| {
            let key = PrivateKey::from_pem(&path.display().to_string(), &k.key_pem)
                .map_err(|e| e.to_string())?;
            Issued::parse(k.chain_pem, key, k.anchor).map_err(|e| e.to_string())
        });
    match kept {
        Ok(i) if i.not_after > SystemTime::now() => Some(i),
        Ok(_) => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "kept certificate unreadable; ignoring it");
            None
        }
    }
}

fn secrets_of(issued: &Issued, bundle_pem: &str, epoch: u64) -> ProxySecrets {
    let mut view = ProxyView::default();
    view.push_layer(
        TypeKind::Secret,
        ResourceSet::new(secret_resources(&issued.chain_pem, &issued.key, bundle_pem)),
    );
    ProxySecrets {
        epoch,
        view: Arc::new(view),
        cert_serial: Some(issued.serial.clone()),
        cert_not_after: issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
        cert_root: issued.anchor.clone(),
        ready: true,
    }
}

impl SecretProvider for RelaySecrets {
    fn open(
        &self,
        id: &SpiffeId,
        proxy: &str,
    ) -> Result<watch::Receiver<Arc<ProxySecrets>>, String> {
        let mut identities = self.identities.lock().map_err(|e| e.to_string())?;
        if let Some(rx) = identities.get(id) {
            return Ok(rx.clone());
        }
        // Until the first certificate arrives the view is empty: the sidecar's SDS
        // request simply waits, as Envoy's does for a slow control plane.
        let (tx, rx) = watch::channel(Arc::new(ProxySecrets::default()));
        identities.insert(id.clone(), rx.clone());
        let (channel, auth, trust) = (self.channel.clone(), self.auth.clone(), self.trust.clone());
        let (id, proxy) = (id.clone(), proxy.to_string());
        let task_tx = tx.clone();
        if let Ok(mut keep) = self.keep.write() {
            keep.push(tx);
        }
        let state_dir = self.state_dir.clone();
        tokio::spawn(identity_task(
            channel, auth, trust, state_dir, id, proxy, task_tx,
        ));
        Ok(rx)
    }
}

/// Keeps one identity's certificate current: issued when first asked for (or taken
/// from the state dir), again at half its life, and again at once when the mesh's signer
/// moves to another root. While that fails the current certificate stays in use.
async fn identity_task(
    channel: Channel,
    auth: Arc<RelayAuth>,
    mut trust: watch::Receiver<Arc<Trust>>,
    state_dir: std::path::PathBuf,
    id: SpiffeId,
    proxy: String,
    tx: watch::Sender<Arc<ProxySecrets>>,
) {
    let mut current = kept_identity(&state_dir, &id);
    let mut renew_due = current.is_none();
    // The last trust epoch the certificate in use was right for: what the sidecar is
    // reported at while a re-issue under a new signer has not come through.
    let mut valid_epoch = 0u64;
    loop {
        let t = trust.borrow_and_update().clone();
        let reissue = current
            .as_ref()
            .is_some_and(|c| t.needs_reissue(c.anchor.as_deref()));
        let mut retry = None;
        if renew_due || reissue {
            match auth.token_for(&id) {
                None => {
                    warn!(identity = %id, "no valid token to renew with; keeping the current certificate");
                    retry = Some(Duration::from_secs(10));
                }
                Some(token) => match issue(channel.clone(), &id, &token).await {
                    Ok(issued) => {
                        info!(identity = %id, node = %proxy, serial = %issued.serial, epoch = t.epoch, reissue, "certificate for local sidecars signed upstream");
                        keep_identity(&state_dir, &id, &issued);
                        current = Some(issued);
                        renew_due = false;
                    }
                    Err(e) => {
                        warn!(identity = %id, error = %e, "cannot get a certificate signed upstream; retrying in 5 s");
                        retry = Some(Duration::from_secs(5));
                    }
                },
            }
        }
        let wait = match &current {
            Some(c) => {
                if !t.needs_reissue(c.anchor.as_deref()) {
                    // Asked for under this trust (or a later one): the signer only moves
                    // on once this relay reported the sidecars at the current epoch.
                    valid_epoch = t.epoch;
                }
                if tx
                    .send(Arc::new(secrets_of(c, &t.bundle_pem, valid_epoch)))
                    .is_err()
                {
                    return;
                }
                let life = c.not_after.duration_since(c.not_before).unwrap_or_default();
                let half = (c.not_before + life / 2)
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_secs(1));
                retry.map_or(half, |r| r.min(half))
            }
            None => retry.unwrap_or(Duration::from_secs(5)),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => if retry.is_none() { renew_due = true },
            changed = trust.changed() => if changed.is_err() { return },
        }
    }
}
