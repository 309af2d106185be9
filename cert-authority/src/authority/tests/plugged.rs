//! Plugged-in CAs in Istio's layout: loading, checks, reloads and rotation to a new root.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertifiedIssuer, DnType, IsCa, KeyUsagePurpose};

use super::*;
use crate::rotation::Phase;

/// A test root: its issuer (to sign intermediates) and DER.
struct Root {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Root {
    fn new(name: &str) -> Root {
        Root {
            issuer: CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().unwrap())
                .unwrap(),
        }
    }

    fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// An intermediate CA under this root, with its key.
    fn intermediate(&self, name: &str, key: KeyPair) -> (Vec<u8>, KeyPair) {
        let cert = ca_params(name).signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key)
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(365);
    p
}

/// Writes a folder in Istio's `cacerts` layout.
fn write_istio(folder: &Path, ca_cert: &[u8], ca_key: &str, chain: &[&[u8]], roots: &[&[u8]]) {
    std::fs::create_dir_all(folder).unwrap();
    let cat =
        |ders: &[&[u8]]| -> String { ders.iter().map(|d| pem::encode("CERTIFICATE", d)).collect() };
    std::fs::write(
        folder.join("ca-cert.pem"),
        pem::encode("CERTIFICATE", ca_cert),
    )
    .unwrap();
    std::fs::write(folder.join("ca-key.pem"), ca_key).unwrap();
    std::fs::write(folder.join("cert-chain.pem"), cat(chain)).unwrap();
    std::fs::write(folder.join("root-cert.pem"), cat(roots)).unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    folder: PathBuf,
    root: Root,
}

impl Setup {
    /// Root + intermediate, with cert-chain.pem = intermediate + root as Istio's docs make it.
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let folder = tmp.path().join("cacerts");
        let root = Root::new("Test Root");
        let (inter, key) = root.intermediate("Test Intermediate", KeyPair::generate().unwrap());
        write_istio(
            &folder,
            &inter,
            &key.serialize_pem(),
            &[&inter, &root.der()],
            &[&root.der()],
        );
        Setup {
            _tmp: tmp,
            state,
            folder,
            root,
        }
    }

    fn opts(&self) -> CaOptions {
        CaOptions {
            dir: self.state.clone(),
            plugged: Some(self.folder.clone()),
            ..CaOptions::default()
        }
    }
}

fn issue(ca: &Authority) -> IssuedCert {
    let who = id("reviews");
    let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
    assert_chain_verifies(&cert);
    cert
}

#[test]
fn issued_chain_is_leaf_and_intermediate() {
    let s = Setup::new();
    let ca = Authority::open(s.opts()).unwrap();
    let t = ca.current();
    assert_eq!(t.roots.len(), 1);
    assert_eq!(t.signer, pem::fingerprint(&s.root.der()));
    let cert = issue(&ca);
    let chain = ders(&cert.chain_pem);
    assert_eq!(chain.len(), 2, "leaf + intermediate, no root, no duplicate");
    assert_eq!(
        chain[1],
        ders(&std::fs::read_to_string(s.folder.join("ca-cert.pem")).unwrap())[0]
    );
    assert_eq!(cert.root_fingerprint, pem::fingerprint(&s.root.der()));
    assert_eq!(
        parse(&chain[0]).issuer().to_string(),
        "CN=Test Intermediate"
    );
    // The plugged folder is never written to.
    assert_eq!(std::fs::read_dir(&s.folder).unwrap().count(), 4);
}

#[test]
fn two_level_chain_in_any_order() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("cacerts");
    let root = Root::new("Root");
    let mid_key = KeyPair::generate().unwrap();
    let mid_cert = ca_params("Mid").signed_by(&mid_key, &root.issuer).unwrap();
    let mid = rcgen::Issuer::new(ca_params("Mid"), mid_key);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params("Issuing").signed_by(&ca_key, &mid).unwrap();
    write_istio(
        &folder,
        ca_cert.der(),
        &ca_key.serialize_pem(),
        // Root first, then mid, then the issuing certificate again: order and repeats do not matter.
        &[&root.der(), mid_cert.der(), ca_cert.der()],
        &[&root.der()],
    );
    let ca = Authority::open(CaOptions {
        dir: tmp.path().join("state"),
        plugged: Some(folder),
        ..CaOptions::default()
    })
    .unwrap();
    let cert = issue(&ca);
    let chain = ders(&cert.chain_pem);
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1], ca_cert.der().to_vec());
    assert_eq!(chain[2], mid_cert.der().to_vec());
}

#[test]
fn key_not_matching_names_the_file() {
    let s = Setup::new();
    std::fs::write(
        s.folder.join("ca-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let err = Authority::open(s.opts()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("ca-key.pem") && err.to_string().contains("ca-cert.pem"),
        "{err}"
    );
}

#[test]
fn chain_not_reaching_the_root_is_refused() {
    let s = Setup::new();
    let stranger = Root::new("Stranger");
    std::fs::write(
        s.folder.join("root-cert.pem"),
        pem::encode("CERTIFICATE", &stranger.der()),
    )
    .unwrap();
    let err = Authority::open(s.opts()).unwrap_err();
    assert!(matches!(err, CaError::Plugged(_)), "{err}");
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let s = Setup::new();
    std::fs::remove_file(s.folder.join("ca-key.pem")).unwrap();
    let err = Authority::open(s.opts()).unwrap_err();
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
}

#[test]
fn rsa_pkcs1_key_from_openssl_works() {
    // Istio's sample CA and `openssl genrsa -traditional` write PKCS#1 ("RSA PRIVATE KEY").
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("cacerts");
    let key_pem = include_str!("../../testdata/rsa-ca-key.pem");
    let root = Root::new("Root");
    let key = crate::keys::load_key_pair("rsa", key_pem).unwrap();
    let (inter, _) = root.intermediate("RSA Intermediate", key);
    write_istio(&folder, &inter, key_pem, &[&inter], &[&root.der()]);
    let ca = Authority::open(CaOptions {
        dir: tmp.path().join("state"),
        plugged: Some(folder),
        ..CaOptions::default()
    })
    .unwrap();
    assert_eq!(ders(&issue(&ca).chain_pem).len(), 2);
}

#[test]
fn reload_with_new_intermediate_under_the_same_root() {
    let s = Setup::new();
    let ca = Authority::open(s.opts()).unwrap();
    assert!(!ca.reload_plugged().unwrap(), "same files: no change");
    let before = ca.current();
    let old_chain = ders(&issue(&ca).chain_pem);

    let (inter, key) = s
        .root
        .intermediate("Test Intermediate 2", KeyPair::generate().unwrap());
    write_istio(
        &s.folder,
        &inter,
        &key.serialize_pem(),
        &[&inter],
        &[&s.root.der()],
    );
    assert!(ca.reload_plugged().unwrap());
    let after = ca.current();
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(after.signer, before.signer, "same root");
    assert!(after.rotation.is_none());
    let chain = ders(&issue(&ca).chain_pem);
    assert_eq!(chain[1], inter, "the new intermediate signs");
    assert_ne!(chain[1], old_chain[1]);
    assert!(!ca.reload_plugged().unwrap());
}

#[test]
fn invalid_reload_keeps_the_old_ca() {
    let s = Setup::new();
    let ca = Authority::open(s.opts()).unwrap();
    let before = ca.current();
    std::fs::write(
        s.folder.join("ca-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let err = ca.reload_plugged().unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert_eq!(ca.current().epoch, before.epoch);
    assert_eq!(issue(&ca).root_fingerprint, before.signer);
}

#[test]
fn reload_with_a_new_root_rotates() {
    let s = Setup::new();
    let ca = Authority::open(s.opts()).unwrap();
    let old = ca.current().signer.clone();
    let new_root = Root::new("New Root");
    let (inter, key) = new_root.intermediate("New Intermediate", KeyPair::generate().unwrap());
    write_istio(
        &s.folder,
        &inter,
        &key.serialize_pem(),
        &[&inter],
        &[&new_root.der()],
    );
    let new = pem::fingerprint(&new_root.der());

    assert!(ca.reload_plugged().unwrap());
    let status = ca.rotation().unwrap();
    assert_eq!(
        (status.phase, &status.old_root, &status.new_root),
        (Phase::AddNewRoot, &old, &new)
    );
    let t = ca.current();
    assert_eq!(t.roots.len(), 2);
    assert_eq!(t.signer, old, "AddNewRoot: the old CA still signs");
    assert_eq!(issue(&ca).root_fingerprint, old);
    assert!(
        !ca.reload_plugged().unwrap(),
        "reloading the same new files changes nothing"
    );

    // A restart in AddNewRoot still has the old CA (from prev/), though its files are gone.
    drop(ca);
    let ca = Authority::open(s.opts()).unwrap();
    assert_eq!(ca.current().signer, old);
    assert_eq!(ca.current().roots.len(), 2);
    assert_eq!(issue(&ca).root_fingerprint, old);

    // Yet another root while rotating: refused, the rotation goes on.
    let third = Root::new("Third Root");
    let (inter3, key3) = third.intermediate("Third Intermediate", KeyPair::generate().unwrap());
    write_istio(
        &s.folder,
        &inter3,
        &key3.serialize_pem(),
        &[&inter3],
        &[&third.der()],
    );
    assert!(matches!(
        ca.reload_plugged(),
        Err(CaError::RotationInProgress { .. })
    ));
    write_istio(
        &s.folder,
        &inter,
        &key.serialize_pem(),
        &[&inter],
        &[&new_root.der()],
    );

    assert_eq!(
        ca.advance_rotation().unwrap().unwrap().phase,
        Phase::Reissue
    );
    let cert = issue(&ca);
    assert_eq!(cert.root_fingerprint, new);
    assert_eq!(ders(&cert.chain_pem)[1], inter);
    drop(ca);
    let ca = Authority::open(s.opts()).unwrap();
    assert_eq!(ca.rotation().unwrap().phase, Phase::Reissue);
    assert_eq!(
        ca.advance_rotation().unwrap().unwrap().phase,
        Phase::RemoveOldRoot
    );
    assert_eq!(ca.current().roots.len(), 1);
    drop(ca);
    let ca = Authority::open(s.opts()).unwrap();
    assert_eq!(ca.rotation().unwrap().phase, Phase::RemoveOldRoot);
    assert_eq!(ca.advance_rotation().unwrap(), None);
    assert!(!s.state.join("prev").exists());
    drop(ca);
    let ca = Authority::open(s.opts()).unwrap();
    assert!(ca.rotation().is_none());
    assert_eq!(ca.current().signer, new);
}

#[test]
fn plugged_ca_cannot_start_a_rotation_and_self_signed_cannot_reload() {
    let s = Setup::new();
    let ca = Authority::open(s.opts()).unwrap();
    let err = ca.start_rotation().unwrap_err();
    assert!(matches!(err, CaError::Plugged(_)), "{err}");
    assert!(err.to_string().contains("replacing the files"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let own = Authority::open(super::opts(tmp.path())).unwrap();
    assert!(matches!(own.reload_plugged(), Err(CaError::Plugged(_))));
}

#[test]
fn extra_roots_in_root_cert_pem_join_the_bundle() {
    let s = Setup::new();
    let other = Root::new("Other Root");
    let both: String = [s.root.der(), other.der()]
        .iter()
        .map(|d| pem::encode("CERTIFICATE", d))
        .collect();
    std::fs::write(s.folder.join("root-cert.pem"), both).unwrap();
    let ca = Authority::open(s.opts()).unwrap();
    let t = ca.current();
    assert_eq!(t.roots.len(), 2);
    assert_eq!(t.signer, pem::fingerprint(&s.root.der()));
    assert_eq!(issue(&ca).root_fingerprint, t.signer);
}
