//! The self-signed rotation state machine, including restarts in every phase.

use super::*;
use crate::rotation::Phase;

/// Fingerprints of the bundle, the signer and the phase: what a restart must reproduce.
fn shape(t: &TrustState) -> (Vec<String>, String, Option<Phase>) {
    (
        t.roots.iter().map(|r| r.fingerprint.clone()).collect(),
        t.signer.clone(),
        t.rotation.as_ref().map(|r| r.phase),
    )
}

#[test]
fn phases_move_bundle_and_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let mut rx = ca.subscribe();
    let old = ca.current().signer.clone();
    let mut epoch = ca.current().epoch;
    let who = id("reviews");

    let status = ca.start_rotation().unwrap();
    assert_eq!(status.phase, Phase::AddNewRoot);
    assert_eq!(status.old_root, old);
    let new = status.new_root.clone();
    assert_ne!(new, old);
    assert!(rx.has_changed().unwrap());
    let t = rx.borrow_and_update().clone();
    assert!(t.epoch > epoch);
    epoch = t.epoch;
    assert_eq!(status.epoch, t.epoch);
    assert_eq!(
        shape(&t),
        (
            vec![old.clone(), new.clone()],
            old.clone(),
            Some(Phase::AddNewRoot)
        )
    );
    assert_eq!(
        t.bundle_pem,
        format!("{}{}", t.roots[0].pem, t.roots[1].pem)
    );
    assert_eq!(ca.rotation(), Some(status.clone()));
    let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
    assert_eq!(
        cert.root_fingerprint, old,
        "AddNewRoot still signs under the old root"
    );
    assert_chain_verifies(&cert);
    #[cfg(unix)]
    assert_eq!(super::mode(&tmp.path().join("next/root-key.pem")), 0o600);

    let status = ca.advance_rotation().unwrap().unwrap();
    assert_eq!(status.phase, Phase::Reissue);
    let t = ca.current();
    assert!(t.epoch > epoch);
    epoch = t.epoch;
    assert_eq!(status.epoch, epoch);
    assert_eq!(
        shape(&t),
        (
            vec![old.clone(), new.clone()],
            new.clone(),
            Some(Phase::Reissue)
        )
    );
    let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
    assert_eq!(
        cert.root_fingerprint, new,
        "Reissue signs under the new root"
    );
    assert_chain_verifies(&cert);

    let status = ca.advance_rotation().unwrap().unwrap();
    assert_eq!(status.phase, Phase::RemoveOldRoot);
    let t = ca.current();
    assert!(t.epoch > epoch);
    epoch = t.epoch;
    assert_eq!(
        shape(&t),
        (vec![new.clone()], new.clone(), Some(Phase::RemoveOldRoot))
    );
    let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
    assert_eq!(cert.root_fingerprint, new);

    assert_eq!(ca.advance_rotation().unwrap(), None);
    let t = ca.current();
    assert!(t.epoch > epoch);
    assert_eq!(shape(&t), (vec![new.clone()], new.clone(), None));
    assert_eq!(ca.rotation(), None);
    assert!(rx.has_changed().unwrap());

    // On disk: the new root is THE root, the old certificate is archived, next/ is gone.
    let on_disk = ders(&std::fs::read_to_string(tmp.path().join("root-cert.pem")).unwrap());
    assert_eq!(pem::fingerprint(&on_disk[0]), new);
    assert!(!tmp.path().join("next").exists());
    assert!(!tmp.path().join("rotation.json").exists());
    let archived: Vec<_> = std::fs::read_dir(tmp.path().join("archive"))
        .unwrap()
        .collect();
    assert_eq!(archived.len(), 1);
    drop(ca);
    let again = Authority::open(opts(tmp.path())).unwrap();
    assert_eq!(shape(&again.current()), (vec![new.clone()], new, None));
    assert_eq!(again.current().epoch, t.epoch);
}

#[test]
fn start_twice_and_advance_without_rotation_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    assert!(matches!(ca.advance_rotation(), Err(CaError::NoRotation)));
    ca.start_rotation().unwrap();
    let epoch = ca.current().epoch;
    let err = ca.start_rotation().unwrap_err();
    assert!(
        matches!(
            err,
            CaError::RotationInProgress {
                phase: Phase::AddNewRoot,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        ca.current().epoch,
        epoch,
        "a refused start publishes nothing"
    );
}

#[test]
fn reopen_resumes_every_phase() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let who = id("reviews");
    ca.start_rotation().unwrap();
    let mut ca = ca;
    for expected in [Phase::AddNewRoot, Phase::Reissue, Phase::RemoveOldRoot] {
        let before = ca.current();
        assert_eq!(before.rotation.as_ref().map(|r| r.phase), Some(expected));
        drop(ca);
        ca = Authority::open(opts(tmp.path())).unwrap();
        let after = ca.current();
        assert_eq!(shape(&after), shape(&before), "restart in {expected:?}");
        assert_eq!(after.epoch, before.epoch);
        assert_eq!(after.rotation, before.rotation);
        let cert = ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap();
        assert_eq!(cert.root_fingerprint, after.signer);
        assert_chain_verifies(&cert);
        ca.advance_rotation().unwrap();
    }
    assert_eq!(ca.rotation(), None);
}

#[test]
fn interrupted_finish_is_completed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let new = ca.start_rotation().unwrap().new_root;
    ca.advance_rotation().unwrap();
    ca.advance_rotation().unwrap();
    drop(ca);
    // As if the process died right after moving the new certificate into place.
    std::fs::rename(
        tmp.path().join("next/root-cert.pem"),
        tmp.path().join("root-cert.pem"),
    )
    .unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let t = ca.current();
    assert_eq!(shape(&t), (vec![new.clone()], new, None));
    assert!(!tmp.path().join("next").exists());
    assert!(!tmp.path().join("rotation.json").exists());
    let who = id("reviews");
    assert_chain_verifies(&ca.sign_csr(&csr_for(&who), &who, None, "test").unwrap());
}

#[test]
fn a_start_that_never_committed_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let root = ca.current().signer.clone();
    ca.start_rotation().unwrap();
    drop(ca);
    // As if the process died before rotation.json was written.
    std::fs::remove_file(tmp.path().join("rotation.json")).unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    assert_eq!(shape(&ca.current()), (vec![root.clone()], root, None));
    assert!(!tmp.path().join("next").exists());
}

#[test]
fn epoch_never_goes_back_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::open(opts(tmp.path())).unwrap();
    let e0 = ca.current().epoch;
    ca.start_rotation().unwrap();
    let e1 = ca.current().epoch;
    drop(ca);
    let ca = Authority::open(opts(tmp.path())).unwrap();
    assert_eq!(ca.current().epoch, e1);
    ca.advance_rotation().unwrap();
    assert!(ca.current().epoch > e1 && e1 > e0);
}
