//! The CA as the server uses it: issuance, the published trust state, rotation and reload.

mod layout;
mod rotation;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::PublicKeyData;
use tokio::sync::watch;

use crate::csr;
use crate::error::CaError;
use crate::fsutil;
use crate::identity::{self, SpiffeId};
use crate::issue::{self, IssuedCert, Leaf};
use crate::keys::{self, PrivateKey};
use crate::material::Material;
use crate::pem;
use crate::rotation::RotationStatus;
use crate::token::TokenSigner;
use crate::trust::TrustState;

use layout::Rotating;

/// Where the CA keeps its state and what it issues.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// CA state folder (see the crate docs for its layout); created with mode 0700 if missing.
    pub dir: PathBuf,
    /// Plugged-in CA in Istio's layout (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// `cert-chain.pem`); `None` = self-signed root kept in `dir`.
    pub plugged: Option<PathBuf>,
    pub trust_domain: String,
    /// Lifetime of workload certificates when the caller does not ask for one.
    pub default_ttl: Duration,
    /// Longer requests are capped to this, not refused.
    pub max_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            dir: PathBuf::from("./ca"),
            plugged: None,
            trust_domain: "cluster.local".to_string(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The certificate authority. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

struct Inner {
    opts: CaOptions,
    tokens: TokenSigner,
    /// Serializes changes (rotation steps, reloads) so their file writes never interleave;
    /// issuance only takes the `state` read lock and never waits for disk.
    changes: Mutex<()>,
    state: RwLock<Current>,
    tx: watch::Sender<Arc<TrustState>>,
}

#[derive(Clone)]
struct Current {
    epoch: u64,
    active: Arc<Material>,
    rotating: Option<Rotating>,
}

impl Current {
    fn signer(&self) -> &Arc<Material> {
        match &self.rotating {
            Some(r) if r.status.phase != crate::rotation::Phase::AddNewRoot => &r.next,
            _ => &self.active,
        }
    }

    fn trust_state(&self) -> TrustState {
        TrustState::build(
            self.epoch,
            &self.active,
            self.rotating.as_ref().map(|r| r.next.as_ref()),
            self.rotating.as_ref().map(|r| &r.status),
        )
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("Authority")
            .field("dir", &self.inner.opts.dir)
            .field("plugged", &self.inner.opts.plugged)
            .field("epoch", &current.epoch)
            .field("signer", &current.signer)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Opens the CA: creates the state folder and the self-signed root on first start, or
    /// loads and checks the plugged CA; resumes a rotation that was running.
    pub fn open(opts: CaOptions) -> Result<Authority, CaError> {
        identity::check_trust_domain(&opts.trust_domain).map_err(CaError::InvalidOptions)?;
        if opts.default_ttl.is_zero() || opts.max_ttl.is_zero() {
            return Err(CaError::InvalidOptions(
                "default_ttl and max_ttl must be positive".to_string(),
            ));
        }
        if opts.default_ttl > opts.max_ttl {
            return Err(CaError::InvalidOptions(format!(
                "default_ttl ({} s) exceeds max_ttl ({} s)",
                opts.default_ttl.as_secs(),
                opts.max_ttl.as_secs()
            )));
        }
        let dir = opts.dir.clone();
        fsutil::ensure_dir(&dir)?;
        let tokens = TokenSigner::open(&dir)?;
        let now = SystemTime::now();
        let rotation = layout::load_rotation(&dir)?;
        let loaded = match &opts.plugged {
            None => layout::load_self_signed(&dir, &opts.trust_domain, rotation, now)?,
            Some(folder) => layout::load_plugged(&dir, folder, rotation, now)?,
        };
        let mut current = Current {
            epoch: 0,
            active: Arc::new(loaded.active),
            rotating: loaded.rotating.map(|(status, next)| Rotating {
                status,
                next: Arc::new(next),
            }),
        };
        let saved = layout::load_state(&dir)?;
        current.epoch = saved.as_ref().map_or(0, |s| s.epoch);
        let digest = current.trust_state().content_digest(current.signer());
        if saved.as_ref().map(|s| s.digest.as_str()) != Some(digest.as_str()) {
            // First start, or the material changed while the server was down.
            current.epoch += 1;
            let digest = current.trust_state().content_digest(current.signer());
            layout::save_state(&dir, current.epoch, &digest)?;
        }
        let trust = current.trust_state();
        tracing::info!(
            dir = %dir.display(),
            plugged = ?opts.plugged,
            epoch = trust.epoch,
            signer = %trust.signer,
            roots = trust.roots.len(),
            rotation = ?trust.rotation.as_ref().map(|r| r.phase),
            "certificate authority ready"
        );
        let (tx, _) = watch::channel(Arc::new(trust));
        Ok(Authority {
            inner: Arc::new(Inner {
                opts,
                tokens,
                changes: Mutex::new(()),
                state: RwLock::new(current),
                tx,
            }),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.opts.trust_domain
    }

    /// A receiver of every published trust state (rotation phases, plugged CA reloads).
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustState>> {
        self.inner.tx.subscribe()
    }

    /// The trust state published last.
    pub fn current(&self) -> Arc<TrustState> {
        self.inner.tx.borrow().clone()
    }

    /// The bootstrap token signer.
    pub fn tokens(&self) -> &TokenSigner {
        &self.inner.tokens
    }

    /// The rotation running now, if any.
    pub fn rotation(&self) -> Option<RotationStatus> {
        self.inner.read().rotating.map(|r| r.status)
    }

    /// Signs a CSR for `proven`, the identity the caller authenticated as. The CSR's own
    /// signature must verify and its SANs must be exactly one URI SAN equal to `proven`.
    /// `ttl`: `None` (or zero, as in Istio's API) = the default; capped at the maximum.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        proven: &SpiffeId,
        ttl: Option<Duration>,
        caller: &str,
    ) -> Result<IssuedCert, CaError> {
        let result = csr::check(csr_pem, proven).and_then(|public_key| {
            let ttl = self.effective_ttl(ttl, proven, caller);
            self.issue(&public_key, proven, &[], &[], ttl, caller)
        });
        if let Err(e) = &result {
            tracing::warn!(
                target: "trellis::audit",
                identity = %proven,
                caller,
                reason = %e,
                "certificate refused"
            );
        }
        result
    }

    /// Checks a CSR as [`Authority::sign_csr`] would (self-signature, exactly one URI SAN
    /// equal to `proven`) without signing it: for callers that must refuse a bad request
    /// before spending something, such as a one-time join token.
    pub fn check_csr(&self, csr_pem: &str, proven: &SpiffeId) -> Result<(), CaError> {
        csr::check(csr_pem, proven).map(|_| ())
    }

    /// Makes an ECDSA P-256 key in memory and certifies it (when the server makes sidecar keys).
    pub fn issue_with_new_key(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        caller: &str,
    ) -> Result<(IssuedCert, PrivateKey), CaError> {
        let key = keys::generate_p256()?;
        let ttl = self.effective_ttl(ttl, id, caller);
        let cert = self.issue(&key, id, &[], &[], ttl, caller)?;
        Ok((cert, PrivateKey::from_key_pair(&key)))
    }

    /// Serving certificate for the control plane's own TLS port: URI SAN `id` plus DNS names
    /// and IPs. `ttl` is taken as given (the server renews its own certificate).
    pub fn server_certificate(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(IssuedCert, PrivateKey), CaError> {
        let key = keys::generate_p256()?;
        let cert = self.issue(&key, id, dns, ips, ttl, "control-plane")?;
        Ok((cert, PrivateKey::from_key_pair(&key)))
    }

    fn effective_ttl(&self, ttl: Option<Duration>, id: &SpiffeId, caller: &str) -> Duration {
        let opts = &self.inner.opts;
        let ttl = match ttl {
            Some(t) if !t.is_zero() => t,
            _ => opts.default_ttl,
        };
        if ttl > opts.max_ttl {
            tracing::info!(
                target: "trellis::audit",
                identity = %id,
                caller,
                requested_s = ttl.as_secs(),
                max_s = opts.max_ttl.as_secs(),
                "requested lifetime capped"
            );
            return opts.max_ttl;
        }
        ttl
    }

    fn issue(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        caller: &str,
    ) -> Result<IssuedCert, CaError> {
        let signer = Arc::clone(self.inner.read().signer());
        let leaf = Leaf { id, dns, ips, ttl };
        let cert = issue::sign_leaf(&signer, public_key, &leaf, SystemTime::now())?;
        tracing::info!(
            target: "trellis::audit",
            identity = %id,
            serial = %cert.serial,
            not_after = %pem::rfc3339(cert.not_after),
            caller,
            signer = %cert.root_fingerprint,
            "certificate issued"
        );
        Ok(cert)
    }
}

impl Inner {
    fn read(&self) -> Current {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Persists `next` (state.json first, then `persist`, whose write is the commit point),
    /// then makes it current and publishes it. Nothing is published that is not on disk.
    fn commit(
        &self,
        _changes: &MutexGuard<'_, ()>,
        next: Current,
        persist: impl FnOnce() -> Result<(), CaError>,
    ) -> Result<Arc<TrustState>, CaError> {
        let trust = next.trust_state();
        let digest = trust.content_digest(next.signer());
        layout::save_state(&self.opts.dir, next.epoch, &digest)?;
        persist()?;
        let trust = Arc::new(trust);
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = next;
        self.tx.send_replace(Arc::clone(&trust));
        Ok(trust)
    }
}

#[cfg(test)]
mod tests;
