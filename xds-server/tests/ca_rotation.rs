//! Root rotation through the server: phases wait for every proxy's ACK, and a restarted
//! server resumes where it was; and a plugged-in CA that the operator updates.
#![allow(clippy::unwrap_used)]

mod secure;
use secure::*;

#[tokio::test]
async fn rotation_waits_for_every_proxy_and_resumes_after_a_restart() {
    let mut s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let mut proxy = SdsStream::open(&s, &token, REVIEWS_V1, &["default", "ROOTCA"]).await;
    let first = proxy.next().await;
    proxy.ack(&first).await;
    let p = s.server.registry.find(REVIEWS_V1).unwrap();
    let epoch0 = s.ca.current().epoch;
    until("the proxy to ACK its secrets", || {
        p.secrets().epoch_acked == Some(epoch0)
    })
    .await;

    let old_root = s.ca.current().roots[0].fingerprint.clone();
    s.ca.start_rotation().unwrap();
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));
    // The new bundle reaches the proxy; without its ACK the rotation must not move on.
    let added = proxy.next().await;
    let bundle = secrets(&added)
        .into_iter()
        .find(|x| x.name == "ROOTCA")
        .unwrap();
    let Some(secret::Type::ValidationContext(v)) = bundle.r#type else {
        panic!("ROOTCA is not a validation context");
    };
    assert_eq!(
        CertificateDer::pem_slice_iter(inline(&v.trusted_ca).as_bytes()).count(),
        2,
        "both roots in the bundle"
    );
    // Ten checks of the rotation driver (200 ms apart) go by: it must still wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));
    let (pending, _) =
        xds_server::identity::rotation::waiting_for(&s.server.registry, None, s.ca.current().epoch);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].node, REVIEWS_V1);

    // The server restarts mid-rotation: the phase is on disk, the proxy comes back.
    drop(proxy);
    let dir = s._dir.path().to_path_buf();
    s.server.stop();
    let ca = CaOptions {
        dir: dir.join("ca"),
        ..CaOptions::default()
    };
    let server = start_server(dir.join("config"), ca, None).await;
    s.ca = server.authority.clone().unwrap();
    s.server = server;
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));

    // Now the proxy ACKs everything it gets: the rotation runs to the end, but not
    // before the resume grace (others might still be on their way back).
    let mut proxy = SdsStream::open(&s, &token, REVIEWS_V1, &["default", "ROOTCA"]).await;
    let mut last = proxy.next().await;
    proxy.ack(&last).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        phase(&s.ca),
        Some(cert_authority::Phase::AddNewRoot),
        "a resumed rotation moved on within its grace"
    );
    let bound = xds_server::identity::rotation::RESUME_GRACE + Duration::from_secs(20);
    let deadline = std::time::Instant::now() + bound;
    while std::time::Instant::now() < deadline {
        if s.ca.rotation().is_none() {
            break;
        }
        if let Ok(Ok(Some(r))) =
            tokio::time::timeout(Duration::from_millis(500), proxy.stream.message()).await
        {
            proxy.ack(&r).await;
            last = r;
        }
    }
    assert!(s.ca.rotation().is_none(), "rotation did not finish");
    let roots = s.ca.current().roots.clone();
    assert_eq!(roots.len(), 1);
    assert_ne!(roots[0].fingerprint, old_root);
    // What the proxy holds last: a certificate from the new root, and only the new root.
    for sec in secrets(&last) {
        match sec.r#type {
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(inline(&v.trusted_ca).trim(), roots[0].pem.trim())
            }
            Some(secret::Type::TlsCertificate(_)) => {
                let p = s.server.registry.find(REVIEWS_V1).unwrap();
                assert_eq!(
                    p.secrets().cert_root.as_deref(),
                    Some(roots[0].fingerprint.as_str())
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_plugged_ca_signs_and_a_new_intermediate_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    let root = rcgen::CertifiedIssuer::self_signed(
        ca_params("Operator Root"),
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    write_cacerts(&cacerts, &root, "Operator Intermediate A");

    let config = write_config(dir.path(), WORKLOADS);
    let ca = CaOptions {
        dir: dir.path().join("state"),
        plugged: Some(cacerts.clone()),
        ..CaOptions::default()
    };
    let s = Secure::new(dir, start_server(config, ca, None).await);
    assert_eq!(s.ca.current().bundle_pem.trim(), root.pem().trim());
    let token = s.token("bookinfo-reviews");
    let chain = default_chain(&s, &token).await;
    assert_eq!(issuer_cn(&chain), "Operator Intermediate A");
    assert_eq!(
        CertificateDer::pem_slice_iter(chain.as_bytes()).count(),
        2,
        "leaf + intermediate, never the root"
    );

    // The operator swaps in a new intermediate under the same root: the watcher picks it
    // up, and certificates issued from then on come from it.
    write_cacerts(&cacerts, &root, "Operator Intermediate B");
    let mut issuer = String::new();
    for _ in 0..100 {
        issuer = issuer_cn(&default_chain(&s, &token).await);
        if issuer == "Operator Intermediate B" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(issuer, "Operator Intermediate B");
    assert_eq!(s.ca.current().roots.len(), 1, "same root, no rotation");
    assert!(s.ca.rotation().is_none());
}
