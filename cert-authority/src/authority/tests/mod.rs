//! Tests of the authority: issuance here, rotation and plugged CAs in their own files.

mod plugged;
mod rotation;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::extensions::GeneralName;

use super::*;
use crate::pem;
use crate::token::TokenKind;

pub(super) fn opts(dir: &Path) -> CaOptions {
    CaOptions {
        dir: dir.to_path_buf(),
        ..CaOptions::default()
    }
}

pub(super) fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

/// A CSR with the given SANs, made the way an agent would (fresh key, rcgen).
pub(super) fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

pub(super) fn csr_for(id: &SpiffeId) -> String {
    csr_with(vec![SanType::URI(id.uri().try_into().unwrap())])
}

pub(super) fn ders(text: &str) -> Vec<Vec<u8>> {
    pem::certificates("test", text).unwrap()
}

pub(super) fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    pem::parse_cert("test", der).unwrap()
}

/// Every certificate of the chain is signed by the next, the last by the root, and the root
/// itself is not in the chain.
pub(super) fn assert_chain_verifies(cert: &IssuedCert) {
    let chain = ders(&cert.chain_pem);
    let root = ders(&cert.root_pem).remove(0);
    assert_eq!(pem::fingerprint(&root), cert.root_fingerprint);
    assert!(!chain.contains(&root), "the root must not be in chain_pem");
    let parsed: Vec<_> = chain.iter().map(|d| parse(d)).collect();
    for pair in parsed.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .expect("each certificate is signed by the next");
    }
    let root_cert = parse(&root);
    parsed
        .last()
        .unwrap()
        .verify_signature(Some(root_cert.public_key()))
        .expect("the chain ends in a certificate signed by the root");
}

fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => format!("IP:{}", pem::hex(ip)),
            other => format!("{other:?}"),
        })
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn root_is_created_once_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = Authority::open(opts(&dir)).unwrap();
    let first = ca.current();
    assert_eq!(first.roots.len(), 1);
    assert_eq!(first.signer, first.roots[0].fingerprint);
    assert_eq!(first.bundle_pem, first.roots[0].pem);
    assert!(
        first.roots[0].subject.contains("CN=Trellis Root CA"),
        "{}",
        first.roots[0].subject
    );
    assert!(first.roots[0].subject.contains("O=cluster.local"));
    assert!(first.rotation.is_none());
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("root-key.pem")), 0o600);
        assert_eq!(mode(&dir.join("token-key.pem")), 0o600);
    }
    let root_der = ders(&first.roots[0].pem).remove(0);
    let root = parse(&root_der);
    assert!(root.is_ca());
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    let years = (root.validity().not_after.timestamp() - root.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
    drop(ca);

    let again = Authority::open(opts(&dir)).unwrap();
    let second = again.current();
    assert_eq!(
        second.signer, first.signer,
        "the root is reused after a restart"
    );
    assert_eq!(
        second.epoch, first.epoch,
        "nothing changed, so the epoch stays"
    );
}

#[test]
fn half_a_root_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    Authority::open(opts(tmp.path())).unwrap();
    std::fs::remove_file(tmp.path().join("root-key.pem")).unwrap();
    let err = Authority::open(opts(tmp.path())).unwrap_err();
    assert!(err.to_string().contains("root-key.pem"), "{err}");
    assert!(
        !tmp.path().join("root-key.pem").exists(),
        "no new key was made"
    );
}

#[test]
fn mismatched_root_key_refuses_to_start() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    Authority::open(opts(a.path())).unwrap();
    Authority::open(opts(b.path())).unwrap();
    std::fs::copy(b.path().join("root-key.pem"), a.path().join("root-key.pem")).unwrap();
    let err = Authority::open(opts(a.path())).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
}

#[test]
fn bad_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path());
    o.trust_domain = "Not A Domain".into();
    assert!(matches!(
        Authority::open(o),
        Err(CaError::InvalidOptions(_))
    ));
    let mut o = opts(tmp.path());
    o.default_ttl = Duration::from_secs(10 * 24 * 3600);
    assert!(matches!(
        Authority::open(o),
        Err(CaError::InvalidOptions(_))
    ));
}

#[test]
fn signs_a_csr_for_the_proven_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = id("reviews");
    let before = SystemTime::now();
    let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
    let after = SystemTime::now();
    assert_eq!(cert.identity, who);
    assert_eq!(cert.root_fingerprint, ca.current().signer);
    assert_eq!(cert.root_pem, ca.current().roots[0].pem);
    assert_chain_verifies(&cert);

    let chain = ders(&cert.chain_pem);
    assert_eq!(
        chain.len(),
        1,
        "self-signed root: the chain is the leaf alone"
    );
    let leaf = parse(&chain[0]);
    assert_eq!(uri_sans(&leaf), vec![format!("URI:{}", who.uri())]);
    assert!(
        leaf.subject_alternative_name().unwrap().unwrap().critical,
        "empty subject => critical SAN"
    );
    assert_eq!(leaf.subject().as_raw().len(), 2, "empty subject");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let root_der = ders(&cert.root_pem).remove(0);
    assert_eq!(leaf.issuer(), parse(&root_der).subject());
    assert_eq!(format!("{:x}", leaf.serial), cert.serial);
    assert_eq!(cert.serial.len(), 32, "128-bit serial");

    // Validity: one minute of backdating, then the default 24 h.
    let nb = leaf.validity().not_before.timestamp() as u64;
    let na = leaf.validity().not_after.timestamp() as u64;
    assert_eq!(pem::system_to_unix(cert.not_before), nb);
    assert_eq!(pem::system_to_unix(cert.not_after), na);
    assert!(nb + 60 >= pem::system_to_unix(before) && nb + 60 <= pem::system_to_unix(after));
    assert_eq!(na - nb, 24 * 3600 + 60);
}

#[test]
fn csr_for_another_identity_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let err = ca
        .sign_csr(&csr_for(&id("admin")), &id("reviews"), None, "test")
        .unwrap_err();
    match &err {
        CaError::CsrIdentity { proven, requested } => {
            assert_eq!(proven, &id("reviews").uri());
            assert_eq!(requested, &vec![format!("URI:{}", id("admin").uri())]);
        }
        other => panic!("expected CsrIdentity, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("sa/admin") && msg.contains("sa/reviews"),
        "{msg}"
    );
}

#[test]
fn csr_with_extra_names_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = id("reviews");
    let uri = || SanType::URI(who.uri().try_into().unwrap());
    let cases = vec![
        vec![
            uri(),
            SanType::DnsName("reviews.default.svc".try_into().unwrap()),
        ],
        vec![uri(), SanType::IpAddress("10.0.0.1".parse().unwrap())],
        vec![uri(), SanType::Rfc822Name("a@b.c".try_into().unwrap())],
        vec![uri(), SanType::URI(id("other").uri().try_into().unwrap())],
        vec![uri(), uri()],
        vec![SanType::DnsName("reviews".try_into().unwrap())],
        vec![],
    ];
    for sans in cases {
        let err = ca
            .sign_csr(&csr_with(sans.clone()), &who, None, "test")
            .unwrap_err();
        assert!(
            matches!(err, CaError::CsrIdentity { .. }),
            "{sans:?}: {err}"
        );
    }
}

#[test]
fn tampered_csr_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = id("reviews");
    let csr = csr_for(&who);
    let (_, mut der) = pem::sections("csr", &csr).unwrap().remove(0);
    // The last byte belongs to the signature's s value: still DER, no longer a valid signature.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &who, None, "test").unwrap_err();
    assert!(matches!(err, CaError::CsrSignature), "{err}");

    for garbage in ["", "not pem", &pem::encode("CERTIFICATE REQUEST", b"junk")] {
        let err = ca.sign_csr(garbage, &who, None, "test").unwrap_err();
        assert!(matches!(err, CaError::CsrInvalid(_)), "{garbage:?}: {err}");
    }
}

#[test]
fn ttl_is_capped_and_zero_means_default() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path());
    o.default_ttl = Duration::from_secs(3600);
    o.max_ttl = Duration::from_secs(2 * 3600);
    let ca = Authority::open(o).unwrap();
    let who = id("reviews");
    let life = |ttl: Option<Duration>| {
        let c = ca.sign_csr(&csr_for(&who), &who, ttl, "test").unwrap();
        c.not_after.duration_since(c.not_before).unwrap().as_secs() - 60
    };
    assert_eq!(life(Some(Duration::from_secs(30 * 24 * 3600))), 2 * 3600);
    assert_eq!(life(Some(Duration::from_secs(600))), 600);
    assert_eq!(life(Some(Duration::ZERO)), 3600);
    assert_eq!(life(None), 3600);
}

#[test]
fn issues_with_a_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = id("ratings");
    let (cert, key) = ca.issue_with_new_key(&who, None, "test").unwrap();
    assert_chain_verifies(&cert);
    let pair = crate::keys::load_key_pair("key", key.pem()).unwrap();
    let chain = ders(&cert.chain_pem);
    assert!(crate::keys::key_matches_cert(&pair, &parse(&chain[0])));
    assert_eq!(
        uri_sans(&parse(&chain[0])),
        vec![format!("URI:{}", who.uri())]
    );
    assert_eq!(format!("{key:?}"), "PrivateKey(<redacted>)");
}

#[test]
fn server_certificate_carries_dns_and_ip_names() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = SpiffeId::new("cluster.local", "trellis-system", "trellis");
    let (cert, _key) = ca
        .server_certificate(
            &who,
            &["trellis.trellis-system.svc".to_string()],
            &["127.0.0.1".parse().unwrap()],
            Duration::from_secs(3600),
        )
        .unwrap();
    assert_chain_verifies(&cert);
    let chain = ders(&cert.chain_pem);
    assert_eq!(
        uri_sans(&parse(&chain[0])),
        vec![
            format!("URI:{}", who.uri()),
            "DNS:trellis.trellis-system.svc".to_string(),
            "IP:7f000001".to_string()
        ]
    );
}

#[test]
fn authority_is_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Authority>();
}

#[test]
fn tokens_outlive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let token = ca
        .tokens()
        .create(
            &id("reviews"),
            TokenKind::Workload,
            Duration::from_secs(60),
            Default::default(),
        )
        .unwrap();
    drop(ca);
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let claims = ca.tokens().verify(&token, TokenKind::Workload).unwrap();
    assert_eq!(claims.identity().unwrap(), id("reviews"));
}

/// A `MakeWriter` collecting log output in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn issuance_and_refusal_are_audited_without_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let key_pem = tracing::subscriber::with_default(subscriber, || {
        let ca = Authority::open(opts(tmp.path())).unwrap();
        let (_, key) = ca
            .issue_with_new_key(&id("reviews"), None, "10.0.0.7:4312")
            .unwrap();
        let _ = ca.sign_csr(
            &csr_for(&id("admin")),
            &id("reviews"),
            None,
            "10.0.0.8:5555",
        );
        key.pem().to_string()
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let issued = text
        .lines()
        .find(|l| l.contains("certificate issued"))
        .expect(&text);
    for field in [
        "trellis::audit",
        "identity=spiffe://cluster.local/ns/default/sa/reviews",
        "serial=",
        "not_after=",
        "caller=\"10.0.0.7:4312\"",
        "signer=",
    ] {
        assert!(issued.contains(field), "{field} missing in {issued}");
    }
    let refused = text
        .lines()
        .find(|l| l.contains("certificate refused"))
        .expect(&text);
    assert!(
        refused.contains("WARN")
            && refused.contains("10.0.0.8:5555")
            && refused.contains("sa/admin"),
        "{refused}"
    );
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!text.contains(&body[..40]), "a private key reached the log");
    let root_key = std::fs::read_to_string(tmp.path().join("root-key.pem")).unwrap();
    assert!(!text.contains(root_key.lines().nth(1).unwrap()));
}
