//! Private keys: the type handed to callers, and loading CA keys in the formats operators have.

use std::fmt;

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::Zeroizing;

use crate::error::CaError;
use crate::pem;

/// A private key in PEM (PKCS#8). Wiped from memory on drop; its `Debug` never shows it.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<String>);

impl PrivateKey {
    pub(crate) fn from_key_pair(key: &KeyPair) -> PrivateKey {
        // serialize_der hands out a plain Vec: wipe it once it is encoded.
        let der = Zeroizing::new(key.serialize_der());
        PrivateKey(Zeroizing::new(pem::encode("PRIVATE KEY", &der)))
    }

    /// What an agent (or a relay for its sidecars) does: a fresh ECDSA P-256 key and a
    /// CSR for `id` (its URI SAN only), to send to `CreateCertificate`.
    pub fn generate_with_csr(id: &crate::SpiffeId) -> Result<(PrivateKey, String), CaError> {
        let key = generate_p256()?;
        let mut params = rcgen::CertificateParams::default();
        let uri = id
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Crypto(format!("{id} in a CSR: {e}")))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| CaError::Crypto(format!("making a CSR for {id}: {e}")))?;
        Ok((PrivateKey::from_key_pair(&key), csr))
    }

    /// A key kept on disk (by a relay, for its sidecars), checked to be a usable key;
    /// `what` names it in errors.
    pub fn from_pem(what: &str, text: &str) -> Result<PrivateKey, CaError> {
        Ok(PrivateKey::from_key_pair(&load_key_pair(what, text)?))
    }

    /// The key as PEM ("PRIVATE KEY", PKCS#8): what Envoy's `tls_certificate.private_key` gets.
    pub fn pem(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Fresh ECDSA P-256 key: what workloads and the control plane's own TLS port get.
pub(crate) fn generate_p256() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::crypto("generating an ECDSA P-256 key", e))
}

/// Loads a private key from PEM. Besides PKCS#8 this takes PKCS#1 ("RSA PRIVATE KEY") and
/// SEC1 ("EC PRIVATE KEY"), since that is what `openssl genrsa`/`ecparam` and Istio's sample
/// CA files contain, and the ring backend only reads PKCS#8.
pub(crate) fn load_key_pair(what: &str, text: &str) -> Result<KeyPair, CaError> {
    let sections = pem::sections(what, text)?;
    let (kind, der) = sections
        .into_iter()
        .find(|(kind, _)| {
            matches!(
                kind,
                SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
            )
        })
        .ok_or_else(|| {
            CaError::bad_pem(
                what,
                "contains no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block",
            )
        })?;
    let der = Zeroizing::new(der);
    let candidates: Vec<Zeroizing<Vec<u8>>> = match kind {
        SectionKind::RsaPrivateKey => vec![wrap_pkcs8(&RSA_ALGORITHM, &der)],
        SectionKind::EcPrivateKey => vec![
            wrap_pkcs8(&EC_P256_ALGORITHM, &der),
            wrap_pkcs8(&EC_P384_ALGORITHM, &der),
        ],
        _ => vec![Zeroizing::new(der.to_vec())],
    };
    for pkcs8 in &candidates {
        if let Ok(key) = KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8.as_slice())) {
            return Ok(key);
        }
    }
    Err(CaError::bad_pem(
        what,
        "unsupported or corrupt private key (supported: ECDSA P-256/P-384, RSA 2048-8192, Ed25519)",
    ))
}

/// True when `key` is the private half of the public key in the certificate.
pub(crate) fn key_matches_cert(
    key: &KeyPair,
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> bool {
    // Compare whole SubjectPublicKeyInfos first; fall back to the raw key bits because an
    // RSA SPKI may or may not carry the NULL parameters depending on who wrote it.
    let spki = key.subject_public_key_info();
    spki == cert.public_key().raw
        || key.der_bytes() == cert.public_key().subject_public_key.data.as_ref()
}

// AlgorithmIdentifier DER for the PKCS#8 wrappers.
/// rsaEncryption with NULL parameters.
const RSA_ALGORITHM: [u8; 15] = [
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// id-ecPublicKey, prime256v1.
const EC_P256_ALGORITHM: [u8; 21] = [
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// id-ecPublicKey, secp384r1.
const EC_P384_ALGORITHM: [u8; 18] = [
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];

/// PrivateKeyInfo ::= SEQUENCE { version 0, AlgorithmIdentifier, OCTET STRING key }.
fn wrap_pkcs8(algorithm: &[u8], inner: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut body = Zeroizing::new(Vec::with_capacity(inner.len() + algorithm.len() + 16));
    body.extend_from_slice(&[0x02, 0x01, 0x00]);
    body.extend_from_slice(algorithm);
    der_header(&mut body, 0x04, inner.len());
    body.extend_from_slice(inner);
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + 6));
    der_header(&mut out, 0x30, body.len());
    out.extend_from_slice(&body);
    out
}

fn der_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    if len < 0x80 {
        // Short form: the length fits in seven bits.
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let significant = &bytes[skip..];
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unwraps our own PKCS#8 wrapper to get back the inner key, to build PKCS#1/SEC1 inputs.
    fn inner_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
        // SEQUENCE header, version (3 bytes), AlgorithmIdentifier, OCTET STRING header.
        fn header_len(b: &[u8]) -> (usize, usize) {
            if b[1] < 0x80 {
                (2, b[1] as usize)
            } else {
                let n = (b[1] & 0x7f) as usize;
                let mut len = 0usize;
                for x in &b[2..2 + n] {
                    len = (len << 8) | *x as usize;
                }
                (2 + n, len)
            }
        }
        let (h, _) = header_len(pkcs8);
        let mut rest = &pkcs8[h..];
        rest = &rest[3..];
        let (ah, al) = header_len(rest);
        rest = &rest[ah + al..];
        let (oh, ol) = header_len(rest);
        rest[oh..oh + ol].to_vec()
    }

    #[test]
    fn debug_is_redacted() {
        let key = PrivateKey::from_key_pair(&generate_p256().unwrap());
        assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
        assert!(key.pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
    }

    #[test]
    fn loads_pkcs8_and_sec1() {
        let key = generate_p256().unwrap();
        let pkcs8 = key.serialize_der();
        let loaded = load_key_pair("k", &pem::encode("PRIVATE KEY", &pkcs8)).unwrap();
        assert_eq!(loaded.der_bytes(), key.der_bytes());

        let sec1 = inner_of_pkcs8(&pkcs8);
        let loaded = load_key_pair("k", &pem::encode("EC PRIVATE KEY", &sec1)).unwrap();
        assert_eq!(loaded.der_bytes(), key.der_bytes());

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let sec1 = inner_of_pkcs8(&p384.serialize_der());
        let loaded = load_key_pair("k", &pem::encode("EC PRIVATE KEY", &sec1)).unwrap();
        assert_eq!(loaded.der_bytes(), p384.der_bytes());
    }

    #[test]
    fn der_lengths() {
        let mut v = Vec::new();
        der_header(&mut v, 0x04, 0x7f);
        assert_eq!(v, [0x04, 0x7f]);
        v.clear();
        der_header(&mut v, 0x04, 0x80);
        assert_eq!(v, [0x04, 0x81, 0x80]);
        v.clear();
        der_header(&mut v, 0x30, 0x1234);
        assert_eq!(v, [0x30, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn garbage_key_names_the_file() {
        let err = load_key_pair("/x/ca-key.pem", "nothing here").unwrap_err();
        assert!(err.to_string().contains("/x/ca-key.pem"), "{err}");
        let err = load_key_pair("/x/ca-key.pem", &pem::encode("PRIVATE KEY", b"junk")).unwrap_err();
        assert!(err.to_string().contains("/x/ca-key.pem"), "{err}");
    }
}
