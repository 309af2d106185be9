//! The relay's own identity: obtained once with a one-time join token, kept in the
//! state dir (key 0600), renewed over mTLS before it expires.
//!
//! Joining: the relay makes a key pair and a CSR for the identity the token names
//! (`spiffe://TD/ns/trellis-system/sa/relay-CLUSTER`) and calls Istio's
//! `CreateCertificate` with the token as bearer; the control plane redeems the token
//! (it cannot be used again) and records the member cluster.

use crate::tls;
use crate::RelayError;
use base64::Engine;
use cert_authority::SpiffeId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Request;
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;

const KEY_FILE: &str = "relay-key.pem";
const CHAIN_FILE: &str = "relay-chain.pem";
const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Fingerprint of the root the relay's certificate is under: when the mesh's signer is
/// another root (a rotation), the certificate is issued again.
const ANCHOR_FILE: &str = "relay-anchor";

#[derive(Clone)]
pub struct RelayIdentity {
    pub id: SpiffeId,
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
    /// Fingerprint of the root `chain_pem` is under (`None`: not known, e.g. kept by an
    /// older relay; the certificate is then issued again once the trust state is heard).
    pub anchor: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for RelayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayIdentity")
            .field("id", &self.id.uri())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl RelayIdentity {
    /// Half-way through the certificate's life, as for workloads.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn tls(&self) -> Result<Arc<rustls::ClientConfig>, RelayError> {
        tls::client_config(&self.bundle_pem, Some((&self.chain_pem, &self.key_pem)))
    }
}

/// The identity a join token is for, read from its claims. The relay cannot verify the
/// token (only the control plane holds the key); the control plane does, on redemption.
pub fn token_identity(token: &str) -> Result<SpiffeId, RelayError> {
    let bad = |why: &str| RelayError::JoinToken(why.to_string());
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("not a token (expected three dot-separated parts)"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| bad("its payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| bad("its payload is not JSON"))?;
    if claims["kind"] != "join" {
        return Err(bad(
            "not a join token (make one with `xds-server cluster join-token`)",
        ));
    }
    let sub = claims["sub"]
        .as_str()
        .ok_or_else(|| bad("it names no identity"))?;
    SpiffeId::parse(sub).map_err(|e| bad(&e.to_string()))
}

fn validity(chain_pem: &str) -> Result<(SystemTime, SystemTime), RelayError> {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| RelayError::Tls("the control plane returned no certificate".into()))?
        .map_err(|e| RelayError::Tls(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| RelayError::Tls(e.to_string()))?;
    let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
    Ok((
        t(cert.validity().not_before.timestamp()),
        t(cert.validity().not_after.timestamp()),
    ))
}

/// Has `csr` signed: with `bearer` (a join token) or over the mTLS `channel`.
async fn sign(
    channel: tonic::transport::Channel,
    id: &SpiffeId,
    bearer: Option<&str>,
    bundle_pem: &str,
) -> Result<RelayIdentity, RelayError> {
    let (key, csr) = cert_authority::PrivateKey::generate_with_csr(id)
        .map_err(|e| RelayError::Tls(e.to_string()))?;
    let key_pem = key.pem().to_string();
    let mut req = Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    if let Some(t) = bearer {
        let v = format!("Bearer {}", t.trim())
            .parse()
            .map_err(|_| RelayError::JoinToken("it has characters a header cannot carry".into()))?;
        req.metadata_mut().insert("authorization", v);
    }
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain;
    let (root, leaf_and_intermediates) = chain
        .split_last()
        .ok_or_else(|| RelayError::Tls("the control plane returned an empty chain".into()))?;
    let chain_pem = leaf_and_intermediates.concat();
    let (not_before, not_after) = validity(&chain_pem)?;
    // The bundle the relay trusts: what it had plus the root this chain is under (on
    // joining, before the control plane's trust state has been heard).
    let mut bundle_pem = bundle_pem.to_string();
    if !bundle_pem.contains(root.trim()) {
        bundle_pem.push_str(root);
    }
    Ok(RelayIdentity {
        id: id.clone(),
        chain_pem,
        key_pem,
        bundle_pem,
        anchor: cert_authority::fingerprint_pem(root),
        not_before,
        not_after,
    })
}

/// Joins the mesh with a one-time token over TLS trusting `bundle_pem`.
pub async fn join(
    upstream: SocketAddr,
    bundle_pem: &str,
    token: &str,
) -> Result<RelayIdentity, RelayError> {
    let id = token_identity(token)?;
    let live = Arc::new(RwLock::new(tls::client_config(bundle_pem, None)?));
    sign(tls::channel(upstream, live), &id, Some(token), bundle_pem).await
}

/// A new certificate for the same identity, asked for over the current mTLS identity;
/// it will trust `bundle_pem` (the mesh's current bundle).
pub async fn renew(
    channel: tonic::transport::Channel,
    current: &RelayIdentity,
    bundle_pem: &str,
) -> Result<RelayIdentity, RelayError> {
    sign(channel, &current.id, None, bundle_pem).await
}

fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<(), RelayError> {
    cert_authority::write_atomic(&dir.join(name), text.as_bytes(), private)
        .map_err(|e| RelayError::Tls(e.to_string()))
}

pub fn save(dir: &Path, id: &RelayIdentity) -> Result<(), RelayError> {
    std::fs::create_dir_all(dir).map_err(|source| RelayError::State {
        path: dir.display().to_string(),
        source,
    })?;
    write(dir, KEY_FILE, &id.key_pem, true)?;
    write(dir, CHAIN_FILE, &id.chain_pem, false)?;
    write(
        dir,
        ANCHOR_FILE,
        id.anchor.as_deref().unwrap_or_default(),
        false,
    )?;
    write(dir, BUNDLE_FILE, &id.bundle_pem, false)
}

/// The identity kept in `dir`, if there is one that has not expired.
pub fn load(dir: &Path) -> Result<Option<RelayIdentity>, RelayError> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(key_pem), Ok(chain_pem), Ok(bundle_pem)) =
        (read(KEY_FILE), read(CHAIN_FILE), read(BUNDLE_FILE))
    else {
        return Ok(None);
    };
    let (not_before, not_after) = validity(&chain_pem)?;
    if not_after <= SystemTime::now() {
        return Ok(None);
    }
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            RelayError::Tls(format!(
                "{}: no certificate",
                dir.join(CHAIN_FILE).display()
            ))
        })?;
    let id = xds_server::identity::tls::spiffe_id_of(&der).ok_or_else(|| {
        RelayError::Tls(format!("{}: no SPIFFE id", dir.join(CHAIN_FILE).display()))
    })?;
    let anchor = read(ANCHOR_FILE)
        .ok()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty());
    Ok(Some(RelayIdentity {
        id,
        chain_pem,
        key_pem,
        bundle_pem,
        anchor,
        not_before,
        not_after,
    }))
}
