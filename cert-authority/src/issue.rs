//! Workload and serving certificates.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};

use crate::error::CaError;
use crate::identity::SpiffeId;
use crate::material::{self, Material, CLOCK_SKEW};
use crate::pem;

/// A certificate the CA issued, with what a proxy needs next to it.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub identity: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Backdated by a minute for clock skew between hosts: not when it was made.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the CA made it: renewal is timed from here, since `not_before` is backdated
    /// (with a short TTL, half of `not_after - not_before` would already be past).
    pub issued_at: SystemTime,
    /// Leaf + intermediates, never the root: what Envoy's `tls_certificate.certificate_chain` gets.
    pub chain_pem: String,
    /// The root this chain verifies to.
    pub root_pem: String,
    pub root_fingerprint: String,
}

impl IssuedCert {
    /// When to ask for the next certificate: half of the lifetime, plus up to 10 % of the
    /// lifetime scaled by `jitter` (0..1, from the caller's rng), so a fleet issued in the same
    /// second does not come back in the same second.
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.issued_at + lifetime / 2 + lifetime.mul_f64(0.1 * jitter)
    }
}

/// What goes into a leaf besides the identity.
pub(crate) struct Leaf<'a> {
    pub(crate) id: &'a SpiffeId,
    pub(crate) dns: &'a [String],
    pub(crate) ips: &'a [IpAddr],
    pub(crate) ttl: Duration,
}

/// Signs a leaf for `public_key` under `signer`. The lifetime ends at `now + ttl` or at the
/// signer's own expiry, whichever comes first, since a chain is only as valid as its weakest link.
pub(crate) fn sign_leaf(
    signer: &Material,
    public_key: &impl PublicKeyData,
    leaf: &Leaf<'_>,
    now: SystemTime,
) -> Result<IssuedCert, CaError> {
    let now = material::whole_seconds(now);
    let not_before = now - CLOCK_SKEW;
    let ttl = Duration::from_secs(leaf.ttl.as_secs().max(1));
    let not_after = (now + ttl).min(material::whole_seconds(signer.signer_not_after));
    if not_after <= now {
        return Err(CaError::Crypto(format!(
            "the signing certificate {} has expired",
            signer.signer_fingerprint
        )));
    }
    let serial = material::random_serial()?;

    let mut sans = Vec::with_capacity(1 + leaf.dns.len() + leaf.ips.len());
    sans.push(SanType::URI(leaf.id.uri().try_into().map_err(|e| {
        CaError::InvalidIdentity {
            input: leaf.id.uri(),
            reason: format!("not an IA5 string: {e}"),
        }
    })?));
    for name in leaf.dns {
        sans.push(SanType::DnsName(name.clone().try_into().map_err(|e| {
            CaError::InvalidOptions(format!(
                "DNS name {name:?} cannot go into a certificate: {e}"
            ))
        })?));
    }
    sans.extend(leaf.ips.iter().copied().map(SanType::IpAddress));

    let mut params = CertificateParams::default();
    // Empty subject (the SAN extension becomes critical), as Istio's workload certificates:
    // the identity is the URI SAN and nothing else.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params
        .signed_by(public_key, &signer.issuer)
        .map_err(|e| CaError::crypto("signing the certificate", e))?;

    let mut chain_pem = pem::encode("CERTIFICATE", cert.der());
    chain_pem.push_str(&signer.chain_pem);
    Ok(IssuedCert {
        identity: leaf.id.clone(),
        serial: pem::hex(&serial),
        not_before,
        not_after,
        issued_at: now,
        chain_pem,
        root_pem: signer.anchor.pem.clone(),
        root_fingerprint: signer.anchor.fingerprint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn cert(not_before: u64, not_after: u64) -> IssuedCert {
        IssuedCert {
            identity: SpiffeId::new("td", "ns", "sa"),
            serial: "40".into(),
            not_before: UNIX_EPOCH + Duration::from_secs(not_before),
            not_after: UNIX_EPOCH + Duration::from_secs(not_after),
            issued_at: UNIX_EPOCH + Duration::from_secs(not_before),
            chain_pem: String::new(),
            root_pem: String::new(),
            root_fingerprint: String::new(),
        }
    }

    #[test]
    fn renew_at_is_half_life_plus_scaled_jitter() {
        let c = cert(1_000, 1_000 + 86_400);
        let at = |j: f64| c.renew_at(j).duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(at(0.0), Duration::from_secs(1_000 + 43_200));
        assert_eq!(at(1.0), Duration::from_secs(1_000 + 43_200 + 8_640));
        assert_eq!(at(0.5), Duration::from_secs(1_000 + 43_200 + 4_320));
        // Out-of-range and nonsense jitter stays within the bounds instead of panicking.
        assert_eq!(at(-3.0), at(0.0));
        assert_eq!(at(7.0), at(1.0));
        assert_eq!(at(f64::NAN), at(0.0));
        for j in [0.0, 0.1, 0.33, 0.9, 1.0] {
            let t = at(j);
            assert!(t >= at(0.0) && t <= at(1.0));
        }
    }

    #[test]
    fn short_lived_certificates_renew_in_the_future_despite_backdating() {
        // 20 s TTL, not_before backdated 60 s: renewal is 10-12 s after issuance,
        // not in the past (which made proxies renew without pause).
        let mut c = cert(1_000 - 60, 1_000 + 20);
        c.issued_at = UNIX_EPOCH + Duration::from_secs(1_000);
        let at = c.renew_at(0.0).duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(at, Duration::from_secs(1_010));
    }

    #[test]
    fn renew_at_of_a_broken_certificate_is_its_start() {
        let c = cert(5_000, 4_000);
        assert_eq!(c.renew_at(1.0), UNIX_EPOCH + Duration::from_secs(5_000));
    }
}
