//! TLS material for tests that run their own TLS servers (TLS origination, passthrough).

use std::path::{Path, PathBuf};

/// A CA and a certificate for `host` signed by it, as PEM files in `dir`: (ca, cert, key).
pub fn make_certs(dir: &Path, host: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Subjects of their own: a leaf named like its issuer looks self-signed to BoringSSL.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "trellis test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).expect("issuer");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec![host.to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, host);
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join(format!("{host}.pem")),
        dir.join(format!("{host}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).expect("ca.pem");
    std::fs::write(&paths.1, cert.pem()).expect("cert");
    std::fs::write(&paths.2, key.serialize_pem()).expect("key");
    paths
}
