//! Trellis's certificate authority: the part of istiod that gives every workload a short-lived
//! X.509 identity, plus the bootstrap tokens that let a sidecar or relay prove who it is before
//! it has a certificate.
//!
//! # Identity model
//!
//! A workload is named by a SPIFFE ID of Istio's Kubernetes shape,
//! `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT` ([`SpiffeId`]). The trust domain
//! comes from the mesh configuration (default `cluster.local`). A workload certificate carries
//! that URI as its only subject alternative name and nothing else: empty subject, not a CA,
//! `digitalSignature` + `keyEncipherment`, EKU `serverAuth` + `clientAuth`, a random 128-bit
//! serial, valid from one minute ago (clock skew) for the requested lifetime (default 24 h,
//! capped at `max_ttl`, never past the signer's own expiry).
//!
//! The CA never decides *who* a caller is; the server does (client certificate or bootstrap
//! token) and passes the proven identity in. [`Authority::sign_csr`] then checks that the CSR
//! is self-consistent (its signature verifies with its own key) and asks for exactly that
//! identity: one URI SAN equal to the proven ID, no DNS, IP, e-mail or other names. Only the
//! public key is taken from a CSR; everything else in the certificate is the CA's choice.
//! Every issuance is logged at info on the `trellis::audit` target (identity, serial,
//! not_after, caller, signer) and every refusal at warn with the reason. Private keys are
//! never logged; [`PrivateKey`] is wiped from memory when dropped and its `Debug` is redacted.
//!
//! Bootstrap tokens ([`TokenSigner`]) are compact JWS (ES256) with claims `iss` = `trellis`,
//! `sub` = the SPIFFE URI, `kind` (workload or join), `iat`, `exp`, `jti` and extra string
//! claims. They are signed with a key of their own, not with the root, so a root rotation does
//! not invalidate the tokens already written into Envoy bootstraps. Join tokens are one-time:
//! [`TokenSigner::redeem`] records their `jti` on disk before it returns, and refuses a second
//! use ([`CaError::TokenUsed`]) even after a restart.
//!
//! # On-disk layout
//!
//! Everything lives in the state folder [`CaOptions::dir`] (created with mode 0700). Keys are
//! written 0600 from their first byte (temporary file created with that mode, synced, renamed
//! into place), and every file is replaced by write-then-rename, so a crash leaves the old or
//! the new file, never a mix.
//!
//! ```text
//! DIR/
//!   root-cert.pem        self-signed root (ECDSA P-256, CN "Trellis Root CA", O = trust domain, 10 years)
//!   root-key.pem         its key (0600); generated on first start, reused afterwards
//!   token-key.pem        token signing key (ECDSA P-256, 0600), independent of the root
//!   redeemed-tokens.json one-time tokens already used: jti, identity, exp, when (0600)
//!   state.json           {"epoch": N, "digest": ...}: the epoch survives restarts
//!   rotation.json        the running rotation, if any; writing it is the commit point of a step
//!   next/                during a self-signed rotation: the new root-cert.pem and root-key.pem (0600)
//!   prev/                during a plugged rotation: a copy of the previous plugged CA (key 0600)
//!   archive/root-FP.pem  retired roots, certificate only (retired keys are not kept)
//! ```
//!
//! If exactly one of `root-cert.pem` / `root-key.pem` is present, or they do not match, the CA
//! refuses to start rather than silently making a new root (which would break trust with every
//! certificate out there).
//!
//! # Plugging in an existing CA (Istio's layout)
//!
//! Point [`CaOptions::plugged`] at a folder laid out like Istio's `cacerts` secret:
//!
//! | file | content |
//! |---|---|
//! | `ca-cert.pem` | the certificate that signs workloads (an intermediate, or the root itself) |
//! | `ca-key.pem` | its key: PKCS#8, PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) |
//! | `cert-chain.pem` | the chain from `ca-cert.pem` up to the root, in any order; may repeat `ca-cert.pem` and the root (optional when `ca-cert.pem` is signed by the root directly) |
//! | `root-cert.pem` | the trust anchor; further roots in the file are added to the trust bundle |
//!
//! At load the CA checks that the key matches `ca-cert.pem`, that `ca-cert.pem` is a CA allowed
//! to sign certificates and not expired, and that its signature chain verifies to a root of
//! `root-cert.pem` through `cert-chain.pem`; any failure is an error naming the file. Issued
//! chains are the leaf, `ca-cert.pem` and the intermediates above it, never the root and never
//! a duplicate. The plugged files are only read, never written; the state folder still holds
//! `state.json`, the token key and the rotation state.
//!
//! The server watches the folder and calls [`Authority::reload_plugged`]: a new signing
//! certificate under the same root is used at once (epoch + 1); a new root starts a rotation
//! (below) with the new files as the incoming CA; invalid files are reported and the current
//! CA keeps working. Switching an existing deployment from the self-signed root to a plugged
//! CA is a hard cut (the bundle changes at once): add the old self-signed root to the plugged
//! `root-cert.pem` to keep old certificates trusted until they are reissued.
//!
//! # Rotation
//!
//! Every change of the trust bundle or of the signer is published as a new [`TrustState`] with
//! a higher `epoch` over a `tokio::sync::watch` channel ([`Authority::subscribe`]). The server
//! pushes it to every proxy (the `ROOTCA` secret and, when the signer changes, new `default`
//! certificates) and records which epoch each proxy ACKed. Root rotation moves through three
//! phases ([`Phase`]), and the server advances ([`Authority::advance_rotation`]) only once
//! every proxy has ACKed the current epoch:
//!
//! 1. [`Phase::AddNewRoot`]: bundle = old + new, signer = old. Every proxy learns to trust the
//!    new root before any certificate chains to it.
//! 2. [`Phase::Reissue`]: bundle = old + new, signer = new. Every workload gets a certificate
//!    under the new root; peers still holding old certificates stay trusted.
//! 3. [`Phase::RemoveOldRoot`]: bundle = new, signer = new. Nothing depends on the old root.
//!
//! Advancing from the last phase ends the rotation: the new root becomes *the* root (its files
//! move into place, the old certificate goes to `archive/`). A self-signed rotation is started
//! by [`Authority::start_rotation`]; a plugged one by a reload that finds a new root. Each step
//! is on disk before it is published (a new root's files first, then the epoch in state.json,
//! then rotation.json, whose write or removal is the commit point). A restart in any phase
//! resumes that phase with the same bundle, signer and epoch; a start that crashed before its
//! commit point is cleaned up, and a crash in the middle of the final step is completed by the
//! next start. Epochs only grow, across restarts too.

mod authority;
mod csr;
mod error;
mod fsutil;
mod identity;
mod issue;
mod keys;
mod material;
mod pem;
mod rotation;
mod token;
mod trust;

pub use authority::{Authority, CaOptions};
pub use error::CaError;
pub use identity::SpiffeId;
pub use issue::IssuedCert;
pub use keys::PrivateKey;
pub use rotation::{Phase, RotationStatus};
pub use token::{TokenClaims, TokenKind, TokenSigner, TokenVerifier};
pub use trust::{RootInfo, TrustState};

/// RFC 3339 in UTC, seconds precision: how the CA writes times for people (audit lines,
/// error messages); shared so the server's records read the same.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    pem::rfc3339(t)
}

/// The fingerprint (SHA-256 of the DER, lowercase hex) of the first certificate in
/// `pem_text`, as [`TrustState::signer`] and [`RootInfo::fingerprint`] name roots; `None`
/// if it holds no certificate.
pub fn fingerprint_pem(pem_text: &str) -> Option<String> {
    pem::certificates("certificate", pem_text)
        .ok()?
        .first()
        .map(|der| pem::fingerprint(der))
}

/// Writes `bytes` to `path` through a temporary file that is synced and renamed into
/// place, so a reader (Envoy's file watch, a restarting process) never sees half a file;
/// `private` makes it 0600 from the first byte (keys). Shared by the server and the relay.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], private: bool) -> Result<(), CaError> {
    fsutil::write_atomic(path, bytes, if private { 0o600 } else { 0o644 })
}

/// What [`check_tls_files`] found in a TLS credential (a Kubernetes TLS secret's files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFacts {
    /// Certificates in the chain file (0 when there is none).
    pub chain_len: usize,
    /// Certificates in the CA file (0 when there is none).
    pub ca_len: usize,
    /// When the first certificate of the chain expires (unix seconds).
    pub not_after: Option<u64>,
}

/// Checks a TLS credential before a proxy is given it: the chain and CA files hold
/// X.509 certificates, the key is a usable private key that belongs to the chain's first
/// certificate. `(name, text)` pairs; the names are what errors cite. The key text is
/// never part of an error.
pub fn check_tls_files(
    chain: Option<(&str, &str)>,
    key: Option<(&str, &str)>,
    ca: Option<(&str, &str)>,
) -> Result<CredentialFacts, CaError> {
    let mut facts = CredentialFacts {
        chain_len: 0,
        ca_len: 0,
        not_after: None,
    };
    if let Some((what, text)) = ca {
        let certs = pem::certificates(what, text)?;
        for der in &certs {
            pem::parse_cert(what, der)?;
        }
        facts.ca_len = certs.len();
    }
    let Some((chain_what, chain_text)) = chain else {
        return match key {
            Some((what, _)) => Err(CaError::bad_pem(
                what,
                "a private key without a certificate chain (add tls.crt)",
            )),
            None => Ok(facts),
        };
    };
    let certs = pem::certificates(chain_what, chain_text)?;
    let parsed = certs
        .iter()
        .map(|der| pem::parse_cert(chain_what, der))
        .collect::<Result<Vec<_>, _>>()?;
    facts.chain_len = certs.len();
    facts.not_after = parsed
        .first()
        .map(|c| u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0));
    match (key, parsed.first()) {
        (Some((key_what, key_text)), Some(leaf)) => {
            let pair = keys::load_key_pair(key_what, key_text)?;
            if !keys::key_matches_cert(&pair, leaf) {
                return Err(CaError::KeyMismatch {
                    key: key_what.into(),
                    cert: chain_what.into(),
                });
            }
        }
        (None, _) => {
            return Err(CaError::bad_pem(
                chain_what,
                "a certificate chain without its private key (add tls.key)",
            ))
        }
        (Some(_), None) => {}
    }
    Ok(facts)
}
