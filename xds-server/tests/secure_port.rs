//! The secure port: who may stream what (tokens, client certificates, claims on
//! workloads), what secrets a proxy gets, and Istio's CA service.
#![allow(clippy::unwrap_used)]

mod secure;
use secure::*;

#[tokio::test]
async fn without_credentials_the_secure_port_refuses_streams() {
    let s = start(None).await;
    let err = s.sds(None, REVIEWS_V1, &["default"]).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "token");
    s.assert_metric(r#"trellis_secure_refused_total{code="unauthenticated"} 1"#);
}

#[tokio::test]
async fn forged_and_expired_tokens_are_refused() {
    let s = start(None).await;
    // A token from another CA: well-formed, signed, but not by this control plane.
    let forged = foreign_token(
        &id("bookinfo-reviews"),
        TokenKind::Workload,
        Duration::from_secs(600),
        &[],
    );
    let err = s
        .sds(Some(&forged), REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "bearer token refused");

    let short = s.workload_token(&id("bookinfo-reviews"), Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = s
        .sds(Some(&short), REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "expired");

    let err = s
        .sds(Some("not.a.token"), REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn a_proxy_gets_its_own_secrets_and_nothing_else() {
    let s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let others = id("bookinfo-ratings").uri();
    let resp = s
        .sds(
            Some(&token),
            REVIEWS_V1,
            &[
                "default",
                "ROOTCA",
                &others,
                "ratings",
                "kubernetes://bookinfo-ratings",
            ],
        )
        .await
        .unwrap();
    let got = secrets(&resp);
    let names: BTreeSet<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["ROOTCA", "default"]));
    for sec in &got {
        match &sec.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                let chain = inline(&t.certificate_chain);
                assert_eq!(leaf_uri_sans(&chain), vec![id("bookinfo-reviews").uri()]);
                assert!(inline(&t.private_key).contains("PRIVATE KEY"));
            }
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(inline(&v.trusted_ca), s.ca.current().bundle_pem);
            }
            other => panic!("unexpected secret {other:?}"),
        }
    }
    // The admin API shows the proxy's identity and certificate, never its key.
    let p = s.server.registry.find(REVIEWS_V1).unwrap();
    assert_eq!(p.identity(), Some(id("bookinfo-reviews").uri().as_str()));
    let view = serde_json::to_string(&p.view()).unwrap();
    assert!(!view.contains("PRIVATE KEY"), "{view}");
}

#[tokio::test]
async fn claiming_another_identitys_workload_is_permission_denied() {
    let s = start(None).await;
    let token = s.token("bookinfo-ratings");
    let err = s
        .sds(Some(&token), REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Code::PermissionDenied,
        "may not claim workload reviews-v1.default",
    );
    // Another namespace entirely.
    let err = s
        .sds(
            Some(&token),
            "sidecar~127.0.9.9~x.prod~prod.svc.cluster.local",
            &["default"],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn the_plaintext_port_serves_no_secrets() {
    let s = start(None).await;
    let ch = s.plaintext_channel().await;
    let resp = sds(ch, None, REVIEWS_V1, &["default", "ROOTCA"])
        .await
        .unwrap();
    assert!(resp.resources.is_empty(), "{resp:?}");
}

#[tokio::test]
async fn csr_for_someone_else_is_refused_and_own_csr_is_signed() {
    let s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let mut client = IstioCertificateServiceClient::new(s.channel(None).await);
    let ask = |csr: String| with_bearer(certificate_request(&csr), Some(&token));
    let (csr, _) = csr_for("bookinfo-ratings");
    let err = client.create_certificate(ask(csr)).await.unwrap_err();
    assert_refused(&err, Code::PermissionDenied, &id("bookinfo-ratings").uri());

    let (csr, key) = csr_for("bookinfo-reviews");
    let chain = client
        .create_certificate(ask(csr))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert!(chain.len() >= 2, "{chain:?}");
    assert_eq!(leaf_uri_sans(&chain[0]), vec![id("bookinfo-reviews").uri()]);
    assert_eq!(
        chain.last().unwrap().trim(),
        s.ca.current().roots[0].pem.trim()
    );

    s.assert_metric(r#"trellis_ca_certificates_issued_total{how="csr"} 1"#);
    s.assert_metric(r#"trellis_secure_refused_total{code="permission_denied"} 1"#);
    // That certificate is a credential on its own: no token needed with it.
    let leaf_and_intermediates = chain[..chain.len() - 1].concat();
    let ch = s.channel(Some((&leaf_and_intermediates, &key))).await;
    let resp = sds(ch, None, REVIEWS_V1, &["default"]).await.unwrap();
    assert_eq!(secrets(&resp).len(), 1);
}

#[tokio::test]
async fn bootstrap_trust_bundle_file_matches_the_ca() {
    let s = start(None).await;
    let dir = s._dir.path().join("ca");
    let file = std::fs::read_to_string(dir.join(xds_server::identity::TRUST_BUNDLE_FILE)).unwrap();
    assert_eq!(file, s.ca.current().bundle_pem);
    let _ = Path::new(&dir);
}

#[tokio::test]
async fn a_workload_labelled_for_mtls_must_use_the_secure_port() {
    let labelled = WORKLOADS.replace(
        "labels: {app: reviews, version: v1}",
        "labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}",
    );
    let s = start_with(None, &labelled).await;
    let plain = s.plaintext_channel().await;
    let err = sds(plain, None, REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "connect on the secure port");
    // On the secure port it gets its certificate.
    let token = s.token("bookinfo-reviews");
    let resp = s.sds(Some(&token), REVIEWS_V1, &["default"]).await.unwrap();
    assert_eq!(secrets(&resp).len(), 1);
}
