//! What the rest of the control plane sees of the CA: the trust bundle and who signs.

use ring::digest;

use crate::error::CaError;
use crate::material::Material;
use crate::pem;
use crate::rotation::{Phase, RotationStatus};

/// One root certificate of the trust bundle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootInfo {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Subject as `CN=..., O=...`.
    pub subject: String,
    /// Expiry, unix seconds.
    pub not_after: u64,
    pub pem: String,
}

impl RootInfo {
    pub(crate) fn from_der(what: &str, der: &[u8]) -> Result<RootInfo, CaError> {
        let cert = pem::parse_cert(what, der)?;
        Ok(RootInfo {
            fingerprint: pem::fingerprint(der),
            subject: cert.subject().to_string(),
            not_after: u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
            pem: pem::encode("CERTIFICATE", der),
        })
    }
}

/// A snapshot of the trust configuration, published on every change.
#[derive(Debug)]
pub struct TrustState {
    /// Bumps on every change of bundle or signer; persisted so it survives restarts.
    pub epoch: u64,
    /// Every root in the trust bundle (the current one first during a rotation).
    pub roots: Vec<RootInfo>,
    /// All roots concatenated: what the `ROOTCA` secret carries.
    pub bundle_pem: String,
    /// Fingerprint of the root that anchors newly issued certificates.
    pub signer: String,
    pub rotation: Option<RotationStatus>,
}

impl TrustState {
    /// Bundle and signer for the given materials and rotation phase (see [`Phase`]).
    pub(crate) fn build(
        epoch: u64,
        active: &Material,
        next: Option<&Material>,
        rotation: Option<&RotationStatus>,
    ) -> TrustState {
        let (bundle_from, signer): (Vec<&Material>, &Material) = match (rotation, next) {
            (Some(r), Some(next)) => match r.phase {
                Phase::AddNewRoot => (vec![active, next], active),
                Phase::Reissue => (vec![active, next], next),
                Phase::RemoveOldRoot => (vec![next], next),
            },
            _ => (vec![active], active),
        };
        let mut roots: Vec<RootInfo> = Vec::new();
        for m in bundle_from {
            for root in m.roots() {
                if !roots.iter().any(|r| r.fingerprint == root.fingerprint) {
                    roots.push(root.clone());
                }
            }
        }
        let bundle_pem = roots.iter().map(|r| r.pem.as_str()).collect();
        TrustState {
            epoch,
            roots,
            bundle_pem,
            signer: signer.anchor.fingerprint.clone(),
            rotation: rotation.cloned(),
        }
    }

    /// Digest of everything a proxy could observe (bundle, signing certificate and chain,
    /// rotation phase). Stored next to the epoch so a restart that finds different material
    /// (files replaced while the server was down) bumps the epoch.
    pub(crate) fn content_digest(&self, signer: &Material) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for root in &self.roots {
            ctx.update(root.fingerprint.as_bytes());
            ctx.update(b"\n");
        }
        ctx.update(signer.signer_fingerprint.as_bytes());
        ctx.update(b"\n");
        ctx.update(signer.chain_pem.as_bytes());
        if let Some(r) = &self.rotation {
            ctx.update(format!("{:?}", r.phase).as_bytes());
        }
        pem::hex(ctx.finish().as_ref())
    }
}
