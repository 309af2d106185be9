//! Certificates through the relay: each sidecar gets its own identity's certificate,
//! also while the control plane is away, and a root rotation reaches the sidecars behind
//! the relay and waits for them.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

#[tokio::test]
async fn sidecars_get_their_own_certificate_through_the_relay_also_offline() {
    let mut m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let secure = relay.secure_addr.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let token = |sa: &str| workload_token(&ca, sa);
    // The certificate is signed upstream for the identity the sidecar's token proves.
    let resp = relay_sds(secure, &token("bookinfo-ratings"), "sidecar-r1")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
    // Another identity gets its own, never the first one's.
    let resp = relay_sds(secure, &token("bookinfo-details"), "sidecar-d1")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-details"
    );
    // A workload of the registry runs as one service account: another identity may not
    // claim it (the relay learns the accounts from its registry folder).
    let ratings_b = "sidecar~127.0.7.5~ratings-b.default~default.svc.cluster.local";
    let mut refused = None;
    for _ in 0..50 {
        match relay_sds(secure, &token("bookinfo-details"), ratings_b).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let err = refused.expect("claiming ratings-b as bookinfo-details was never refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("runs as service account"),
        "{}",
        err.message()
    );

    // Tokens the control plane did not sign are refused by the relay itself.
    let other = tempfile::tempdir().unwrap();
    let foreign = cert_authority::Authority::open(CaOptions {
        dir: other.path().to_path_buf(),
        ..CaOptions::default()
    })
    .unwrap();
    let foreign = workload_token(&foreign, "bookinfo-ratings");
    let err = relay_sds(secure, &foreign, "sidecar-x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Offline: the control plane is gone; a new sidecar of a known identity is still
    // authenticated (kept token keys) and served the cached certificate.
    m.server.stop();
    let resp = relay_sds(secure, &token("bookinfo-ratings"), "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
}

#[tokio::test]
async fn a_root_rotation_reaches_sidecars_behind_a_relay_and_waits_for_them() {
    let m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let relays = m.server.relay_proxies.clone().unwrap();
    let token = workload_token(&ca, "bookinfo-ratings");
    let (tx, mut stream) = relay_sds_stream(relay.secure_addr.unwrap(), &token, "sidecar-r1")
        .await
        .unwrap();
    let first = next_sds(&mut stream).await;
    ack(&tx, &first).await;
    // The relay hears the trust state and reports itself and its sidecar at it.
    let epoch0 = ca.current().epoch;
    for _ in 0..100 {
        if relays.get("b").is_some_and(|r| r.trust_epoch == epoch0)
            && relays.pending(epoch0).0.is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relays.get("b").map(|r| r.trust_epoch), Some(epoch0));

    let old_root = ca.current().roots[0].fingerprint.clone();
    ca.start_rotation().unwrap();
    // Both roots reach the sidecar; until it ACKs, the rotation waits for it.
    let mut last = next_sds(&mut stream).await;
    let (_, bundle) = secret_parts(&last);
    let roots = <rustls_pki_types::CertificateDer<'static> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        bundle.unwrap().as_bytes(),
    )
    .count();
    assert_eq!(roots, 2, "both roots in the sidecar's bundle");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ca.rotation().map(|r| r.phase),
        Some(cert_authority::Phase::AddNewRoot),
        "the rotation moved on without the sidecar behind the relay"
    );
    let (pending, _) = relays.pending(ca.current().epoch);
    assert!(
        pending.iter().any(|p| p.node == "b/sidecar-r1"),
        "{pending:?}"
    );

    // The sidecar ACKs whatever it gets: the rotation runs to the end.
    ack(&tx, &last).await;
    for _ in 0..120 {
        if ca.rotation().is_none() {
            break;
        }
        if let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .map(Result::transpose)
        {
            ack(&tx, &r).await;
            last = r;
        }
    }
    assert!(ca.rotation().is_none(), "the rotation did not finish");
    let trust = ca.current();
    assert_eq!(trust.roots.len(), 1);
    assert_ne!(trust.roots[0].fingerprint, old_root);
    // Whatever came last: the new root only, and a certificate under it.
    while let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .map(Result::transpose)
    {
        ack(&tx, &r).await;
        last = r;
    }
    let (chain, bundle) = secret_parts(&last);
    assert_eq!(bundle.unwrap().trim(), trust.roots[0].pem.trim());
    let p = relay.registry.find("sidecar-r1").unwrap();
    assert_eq!(
        p.secrets().cert_root.as_deref(),
        Some(trust.signer.as_str()),
        "the sidecar's certificate is not under the new root"
    );
    assert!(chain.is_some());
    // The relay itself: its certificate under the new root, its trust files on the new
    // bundle only (sidecars' bootstraps watch them).
    let id = relay.identity.read().unwrap().clone();
    assert_eq!(id.anchor.as_deref(), Some(trust.signer.as_str()));
    let kept =
        std::fs::read_to_string(m.dir.path().join("relay-b").join("trust-bundle.pem")).unwrap();
    assert_eq!(kept.trim(), trust.roots[0].pem.trim());
    // And it still reaches the control plane (its new certificate, the new root).
    let again = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&again),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
}
