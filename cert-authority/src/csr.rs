//! Checking a CSR before anything of it is signed. Only the public key is taken from the CSR;
//! everything else in the certificate is the CA's own choice, so the check is about refusing
//! requests that ask for more than the caller proved.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::pem::SectionKind;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::error::CaError;
use crate::identity::SpiffeId;
use crate::pem;

/// RSA keys below this are refused: too weak for a certificate that authenticates a workload.
const MIN_RSA_BITS: usize = 2048;

/// Parses `csr_pem`, verifies its self-signature and that its SANs are exactly one URI SAN
/// equal to `proven`; returns the public key to certify.
pub(crate) fn check(csr_pem: &str, proven: &SpiffeId) -> Result<SubjectPublicKeyInfo, CaError> {
    let der = pem::sections("CSR", csr_pem)
        .map_err(|e| CaError::CsrInvalid(e.to_string()))?
        .into_iter()
        .find(|(kind, _)| *kind == SectionKind::Csr)
        .map(|(_, der)| der)
        .ok_or_else(|| {
            CaError::CsrInvalid("no CERTIFICATE REQUEST block in the PEM".to_string())
        })?;
    let csr = match X509CertificationRequest::from_der(&der) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(CaError::CsrInvalid(
                "trailing bytes after the request".to_string(),
            ))
        }
        Err(e) => return Err(CaError::CsrInvalid(format!("not a PKCS#10 request: {e}"))),
    };
    csr.verify_signature().map_err(|_| CaError::CsrSignature)?;

    let mut requested: Vec<String> = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    requested.extend(san.general_names.iter().map(describe));
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CaError::CsrInvalid(
                        "the request asks for a CA certificate (basicConstraints CA:TRUE)"
                            .to_string(),
                    ));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(CaError::CsrInvalid(format!(
                        "a requested extension cannot be parsed: {error}"
                    )));
                }
                // Key usages and the like are ignored: the CA sets its own.
                _ => {}
            }
        }
    }
    let expected = format!("URI:{}", proven.uri());
    if requested.len() != 1 || requested[0] != expected {
        return Err(CaError::CsrIdentity {
            proven: proven.uri(),
            requested,
        });
    }

    let spki = &csr.certification_request_info.subject_pki;
    if let Ok(PublicKey::RSA(rsa)) = spki.parsed() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(CaError::CsrInvalid(format!(
                "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
            )));
        }
    }
    SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| {
        CaError::CsrInvalid(format!(
            "unsupported public key (use ECDSA P-256/P-384, RSA or Ed25519): {e}"
        ))
    })
}

/// A SAN as `TYPE:value`, for the refusal message and the audit line.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(bytes);
                format!("IP:{}", std::net::Ipv4Addr::from(a))
            }
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(bytes);
                format!("IP:{}", std::net::Ipv6Addr::from(a))
            }
            _ => format!("IP:{}", pem::hex(bytes)),
        },
        GeneralName::DirectoryName(dn) => format!("dirName:{dn}"),
        GeneralName::OtherName(oid, _) => format!("otherName:{oid}"),
        GeneralName::RegisteredID(oid) => format!("registeredID:{oid}"),
        GeneralName::X400Address(_) => "x400Address".to_string(),
        GeneralName::EDIPartyName(_) => "ediPartyName".to_string(),
        GeneralName::Invalid(tag, _) => format!("invalid name (tag {})", tag.0),
    }
}
