//! Signing material: a signing certificate with its key, the chain up to a root, and the roots.
//! Made here (self-signed root) or loaded from a plugged folder in Istio's layout.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use zeroize::Zeroizing;

use crate::error::CaError;
use crate::fsutil;
use crate::keys;
use crate::pem;
use crate::trust::RootInfo;

/// Files of a self-signed root (in the state folder, or in `next/` during a rotation).
pub(crate) const ROOT_CERT: &str = "root-cert.pem";
pub(crate) const ROOT_KEY: &str = "root-key.pem";
/// Files of Istio's plugged-in CA layout (`cacerts` secret).
pub(crate) const CA_CERT: &str = "ca-cert.pem";
pub(crate) const CA_KEY: &str = "ca-key.pem";
pub(crate) const CERT_CHAIN: &str = "cert-chain.pem";
pub(crate) const PLUGGED_ROOT: &str = "root-cert.pem";

/// How long a self-signed root lives: long enough that expiry is never the reason to rotate.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of every certificate, for peers whose clocks run behind.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A signer and what a leaf it signs chains to.
pub(crate) struct Material {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) signer_pem: String,
    pub(crate) signer_fingerprint: String,
    pub(crate) signer_not_after: SystemTime,
    /// What follows the leaf in an issued chain: the signer and the intermediates above it,
    /// never a root. Empty when the signer is the root itself.
    pub(crate) chain_pem: String,
    /// The root the signer's chain verifies to.
    pub(crate) anchor: RootInfo,
    /// Other roots of a plugged `root-cert.pem`, kept in the bundle as the operator asked.
    pub(crate) extra_roots: Vec<RootInfo>,
}

impl Material {
    fn new(
        signer_der: &[u8],
        key: KeyPair,
        intermediates: &[Vec<u8>],
        anchor_der: &[u8],
        extra_roots: &[Vec<u8>],
    ) -> Result<Material, CaError> {
        let signer = pem::parse_cert("signing certificate", signer_der)?;
        let signer_not_after = pem::unix_to_system(signer.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&signer_der.into(), key)
            .map_err(|e| CaError::crypto("using the signing certificate as issuer", e))?;
        let anchor = RootInfo::from_der("root certificate", anchor_der)?;
        let signer_fingerprint = pem::fingerprint(signer_der);
        let signer_pem = pem::encode("CERTIFICATE", signer_der);
        let mut chain_pem = String::new();
        if signer_fingerprint != anchor.fingerprint {
            chain_pem.push_str(&signer_pem);
            for der in intermediates {
                chain_pem.push_str(&pem::encode("CERTIFICATE", der));
            }
        }
        let extra_roots = extra_roots
            .iter()
            .map(|der| RootInfo::from_der("root certificate", der))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Material {
            issuer,
            signer_pem,
            signer_fingerprint,
            signer_not_after,
            chain_pem,
            anchor,
            extra_roots,
        })
    }

    /// The anchor first, then any other roots.
    pub(crate) fn roots(&self) -> impl Iterator<Item = &RootInfo> {
        std::iter::once(&self.anchor).chain(self.extra_roots.iter())
    }

    /// Same signer, same chain, same roots: nothing a proxy could notice changed.
    pub(crate) fn same_as(&self, other: &Material) -> bool {
        self.signer_fingerprint == other.signer_fingerprint
            && self.chain_pem == other.chain_pem
            && self
                .roots()
                .map(|r| &r.fingerprint)
                .eq(other.roots().map(|r| &r.fingerprint))
    }

    fn key_pem(&self) -> Zeroizing<String> {
        let der = Zeroizing::new(self.issuer.key().serialize_der());
        Zeroizing::new(pem::encode("PRIVATE KEY", &der))
    }
}

/// A random positive 128-bit serial, as RFC 5280 and the CA/B rules want. The top byte is
/// forced into 0x40..0x7f so the number is positive and has no leading zero byte, which keeps
/// its hex form identical to what x509 tools print.
pub(crate) fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| CaError::Crypto("the system random generator failed".to_string()))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// Whole seconds, since certificates cannot carry less.
pub(crate) fn whole_seconds(t: SystemTime) -> SystemTime {
    pem::unix_to_system(i64::try_from(pem::system_to_unix(t)).unwrap_or(i64::MAX))
}

/// A new self-signed root: ECDSA P-256, CN "Trellis Root CA", O = trust domain, 10 years.
pub(crate) fn generate_root(trust_domain: &str, now: SystemTime) -> Result<Material, CaError> {
    let key = keys::generate_p256()?;
    let now = whole_seconds(now);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Trellis Root CA");
    dn.push(DnType::OrganizationName, trust_domain);
    // Two roots live side by side during a rotation; a distinct subject lets operators (and
    // chain builders that go by name) tell them apart.
    dn.push(
        DnType::OrganizationalUnitName,
        format!("generated {}", pem::rfc3339(now)),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::crypto("self-signing the root certificate", e))?;
    let der = cert.der().to_vec();
    Material::new(&der, key, &[], &der, &[])
}

/// Writes a self-signed root into `dir`: key first (0600), then the certificate, so a
/// certificate on disk always has its key next to it.
pub(crate) fn write_root(dir: &Path, material: &Material) -> Result<(), CaError> {
    fsutil::ensure_dir(dir)?;
    fsutil::write_atomic(
        &dir.join(ROOT_KEY),
        material.key_pem().as_bytes(),
        fsutil::PRIVATE,
    )?;
    fsutil::write_atomic(
        &dir.join(ROOT_CERT),
        material.anchor.pem.as_bytes(),
        fsutil::PUBLIC,
    )
}

/// Loads a self-signed root from `dir`; `None` when neither file is there.
pub(crate) fn load_root(dir: &Path) -> Result<Option<Material>, CaError> {
    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    let cert_text = fsutil::read_optional(&cert_path)?;
    let key_text = fsutil::read_optional(&key_path)?;
    let (cert_text, key_text) = match (cert_text, key_text) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, Zeroizing::new(k)),
        (Some(_), None) => {
            return Err(CaError::bad_pem(
                key_path.display(),
                format!(
                    "missing while {} exists; restore the key or remove both files to generate a new root (which breaks trust with every issued certificate)",
                    cert_path.display()
                ),
            ))
        }
        (None, Some(_)) => {
            return Err(CaError::bad_pem(
                cert_path.display(),
                format!(
                    "missing while {} exists; restore the certificate or remove both files to generate a new root",
                    key_path.display()
                ),
            ))
        }
    };
    let what = cert_path.display().to_string();
    let der = pem::certificates(&what, &cert_text)?
        .into_iter()
        .next()
        .ok_or_else(|| CaError::bad_pem(&what, "contains no certificate"))?;
    let key = keys::load_key_pair(&key_path.display().to_string(), &key_text)?;
    let cert = pem::parse_cert(&what, &der)?;
    if !keys::key_matches_cert(&key, &cert) {
        return Err(CaError::KeyMismatch {
            key: key_path,
            cert: cert_path,
        });
    }
    Material::new(&der, key, &[], &der, &[]).map(Some)
}

/// Loads and checks a plugged CA folder (Istio's `cacerts` layout):
/// `ca-cert.pem` + `ca-key.pem` sign, `cert-chain.pem` (optional) holds the certificates from
/// `ca-cert.pem` up to the root in any order (duplicates and the root itself are fine), and
/// `root-cert.pem` holds the root(s). The key must match `ca-cert.pem` and `ca-cert.pem` must
/// chain to a root of `root-cert.pem` through the given intermediates.
pub(crate) fn load_plugged(folder: &Path, now: SystemTime) -> Result<Material, CaError> {
    let cert_path = folder.join(CA_CERT);
    let key_path = folder.join(CA_KEY);
    let chain_path = folder.join(CERT_CHAIN);
    let root_path = folder.join(PLUGGED_ROOT);
    let cert_name = cert_path.display().to_string();
    let root_name = root_path.display().to_string();

    let mut ca_certs = pem::certificates(&cert_name, &fsutil::read(&cert_path)?)?;
    let signer_der = ca_certs.remove(0);
    let key_text = Zeroizing::new(fsutil::read(&key_path)?);
    let key = keys::load_key_pair(&key_path.display().to_string(), &key_text)?;
    let roots = pem::certificates(&root_name, &fsutil::read(&root_path)?)?;
    let chain = match fsutil::read_optional(&chain_path)? {
        Some(text) => pem::certificates(&chain_path.display().to_string(), &text)?,
        None => Vec::new(),
    };

    let signer = pem::parse_cert(&cert_name, &signer_der)?;
    if !keys::key_matches_cert(&key, &signer) {
        return Err(CaError::KeyMismatch {
            key: key_path,
            cert: cert_path,
        });
    }
    check_can_sign(&cert_name, &signer, now)?;
    let parsed_roots = roots
        .iter()
        .map(|der| pem::parse_cert(&root_name, der))
        .collect::<Result<Vec<_>, _>>()?;

    // Candidates for intermediates: everything offered that is neither the signer nor a root.
    let mut pool: Vec<&Vec<u8>> = Vec::new();
    for der in chain.iter().chain(ca_certs.iter()) {
        if *der != signer_der && !roots.contains(der) && !pool.contains(&der) {
            pool.push(der);
        }
    }
    let parsed_pool = pool
        .iter()
        .map(|der| pem::parse_cert(&chain_path.display().to_string(), der))
        .collect::<Result<Vec<_>, _>>()?;

    let mut intermediates: Vec<Vec<u8>> = Vec::new();
    let mut used = vec![false; pool.len()];
    let mut current = signer.clone();
    let anchor_index = loop {
        if let Some(i) = roots.iter().position(|r| *r == signer_der) {
            // ca-cert.pem is the root itself: Istio allows a plugged root that signs directly.
            break i;
        }
        if let Some(i) = parsed_roots
            .iter()
            .position(|r| current.verify_signature(Some(r.public_key())).is_ok())
        {
            break i;
        }
        let next = (0..parsed_pool.len()).find(|&i| {
            !used[i]
                && current
                    .verify_signature(Some(parsed_pool[i].public_key()))
                    .is_ok()
        });
        match next {
            Some(i) => {
                used[i] = true;
                intermediates.push(pool[i].clone());
                current = parsed_pool[i].clone();
            }
            None => {
                return Err(CaError::Plugged(format!(
                    "{cert_name} does not chain to {root_name}: nothing in {root_name} or {} verifies the signature of {:?} (issued by {:?})",
                    chain_path.display(),
                    current.subject().to_string(),
                    current.issuer().to_string()
                )))
            }
        }
    };
    let anchor = &parsed_roots[anchor_index];
    if anchor.validity().not_after.timestamp() <= unix(now) {
        return Err(CaError::Plugged(format!(
            "the root {:?} in {root_name} has expired",
            anchor.subject().to_string()
        )));
    }
    let extra: Vec<Vec<u8>> = roots
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != anchor_index)
        .map(|(_, der)| der.clone())
        .collect();
    Material::new(
        &signer_der,
        key,
        &intermediates,
        &roots[anchor_index],
        &extra,
    )
}

/// Writes `material` in the plugged layout, so a rotation can fall back on the previous
/// plugged CA after a restart even though the operator has replaced the original files.
pub(crate) fn write_plugged(dir: &Path, material: &Material) -> Result<(), CaError> {
    fsutil::ensure_dir(dir)?;
    fsutil::write_atomic(
        &dir.join(CA_KEY),
        material.key_pem().as_bytes(),
        fsutil::PRIVATE,
    )?;
    let chain = if material.chain_pem.is_empty() {
        material.signer_pem.clone()
    } else {
        material.chain_pem.clone()
    };
    fsutil::write_atomic(&dir.join(CERT_CHAIN), chain.as_bytes(), fsutil::PUBLIC)?;
    let roots: String = material.roots().map(|r| r.pem.as_str()).collect();
    fsutil::write_atomic(&dir.join(PLUGGED_ROOT), roots.as_bytes(), fsutil::PUBLIC)?;
    // ca-cert.pem last: the folder counts as complete once it is there.
    fsutil::write_atomic(
        &dir.join(CA_CERT),
        material.signer_pem.as_bytes(),
        fsutil::PUBLIC,
    )
}

fn check_can_sign(
    what: &str,
    cert: &x509_parser::certificate::X509Certificate<'_>,
    now: SystemTime,
) -> Result<(), CaError> {
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(CaError::Plugged(format!(
            "{what} is not a CA certificate (basicConstraints CA:TRUE is missing)"
        )));
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(CaError::Plugged(format!(
                "{what} may not sign certificates (keyUsage lacks keyCertSign)"
            )));
        }
    }
    if cert.validity().not_after.timestamp() <= unix(now) {
        return Err(CaError::Plugged(format!(
            "{what} expired at {}",
            pem::rfc3339(pem::unix_to_system(cert.validity().not_after.timestamp()))
        )));
    }
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(pem::system_to_unix(t)).unwrap_or(i64::MAX)
}
