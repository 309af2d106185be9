//! PEM in and out, fingerprints, and the few facts about a certificate the CA needs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::digest;
use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::CaError;

/// Lowercase hex without separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// SHA-256 of the DER, hex: how roots are named everywhere (TrustState, logs, rotation.json).
pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, der).as_ref())
}

/// Encodes one PEM block with 64-column lines, as OpenSSL and Go write them.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Every PEM section of a known kind in `text`, in order. `what` names the input in errors.
pub(crate) fn sections(what: &str, text: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, CaError> {
    <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::bad_pem(what, format!("not valid PEM: {e}")))
}

/// All certificates in a PEM text, in order (other sections are ignored).
pub(crate) fn certificates(what: &str, text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let certs: Vec<Vec<u8>> = sections(what, text)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| der)
        .collect();
    if certs.is_empty() {
        return Err(CaError::bad_pem(what, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, CaError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CaError::bad_pem(
            what,
            "trailing bytes after the certificate",
        )),
        Err(e) => Err(CaError::bad_pem(
            what,
            format!("not an X.509 certificate: {e}"),
        )),
    }
}

/// Converts an X.509 time (seconds) to a `SystemTime`; times before 1970 clamp to the epoch.
pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Unix seconds of a `SystemTime`; times before 1970 clamp to 0.
pub(crate) fn system_to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 in UTC, for audit lines (a unix number is hard to read in a log).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = i64::try_from(system_to_unix(t)).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let text = encode("CERTIFICATE", &der);
        assert!(text.lines().all(|l| l.len() <= 64));
        let back = certificates("test", &text).unwrap();
        assert_eq!(back, vec![der]);
    }

    #[test]
    fn no_certificate_is_an_error() {
        let err = certificates("/tmp/x.pem", "hello").unwrap_err();
        assert!(err.to_string().contains("/tmp/x.pem"), "{err}");
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400 + 61)),
            "1970-01-02T00:01:01Z"
        );
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
