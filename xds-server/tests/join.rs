//! Member clusters joining (docs/multicluster.md): a relay trades a one-time join token for
//! a certificate of its relay identity on the secure port, the cluster is recorded, and the
//! relay then authenticates with that certificate.
#![allow(clippy::unwrap_used)]

mod secure;
use secure::*;
use xds_server::clusters::MemberClusters;
use xds_server::identity::auth::PeerInfo;

const HOUR: Duration = Duration::from_secs(3600);
/// A relay's own ADS node: its namespace is the relay identity's.
const RELAY_A_NODE: &str =
    "sidecar~10.0.0.1~relay-a.trellis-system~trellis-system.svc.cluster.local";

fn claims_a() -> [(&'static str, &'static str); 4] {
    [
        ("cluster", "a"),
        ("network", "net-a"),
        ("region", "eu-west"),
        ("zone", "eu-west-1b"),
    ]
}

/// Joins cluster `a`: the chain (leaf first, root last) and the relay's key.
async fn join_a(s: &Secure) -> (Vec<String>, String) {
    join_with(s, &s.join_token("a", &claims_a(), HOUR)).await
}

/// Joins as relay `a` with `token`.
async fn join_with(s: &Secure, token: &str) -> (Vec<String>, String) {
    let (csr, key) = csr_for_id(&relay_id("a"));
    let chain = s.create_certificate(Some(token), &csr).await.unwrap();
    (chain, key)
}

/// The leaf and intermediates of a `CreateCertificate` answer: a client certificate chain.
fn client_chain(chain: &[String]) -> String {
    chain[..chain.len() - 1].concat()
}

#[tokio::test]
async fn a_join_token_gets_the_relay_certificate_once_and_records_the_cluster() {
    let s = start(None).await;
    let token = s.join_token("a", &claims_a(), HOUR);
    let (chain, _key) = join_with(&s, &token).await;
    assert_eq!(leaf_uri_sans(&chain[0]), vec![relay_id("a").uri()]);
    assert_eq!(
        chain.last().unwrap().trim(),
        s.ca.current().roots[0].pem.trim()
    );

    let clusters = s.server.clusters.clone().unwrap();
    let a = clusters.get("a").unwrap();
    assert_eq!(a.network, "net-a");
    assert_eq!(a.region.as_deref(), Some("eu-west"));
    assert_eq!(a.zone.as_deref(), Some("eu-west-1b"));
    assert_eq!(a.relay_identity, relay_id("a").uri());
    assert!(a.joined_at.starts_with("20"), "{}", a.joined_at);
    // On disk, for the next start.
    let reloaded = MemberClusters::load(&s._dir.path().join("ca")).unwrap();
    assert_eq!(reloaded.get("a"), Some(a.clone()));

    let (code, body) = admin_get(s.server.admin_addr, "/debug/clusters").await;
    assert_eq!(code, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(listed[0]["name"], "a");
    assert_eq!(listed[0]["network"], "net-a");
    assert_eq!(listed[0]["relay_identity"], relay_id("a").uri());

    // Second use, even with a fresh key: refused, saying when it was used.
    let (csr, _) = csr_for_id(&relay_id("a"));
    let err = s.create_certificate(Some(&token), &csr).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "join token already used");
    assert!(
        err.message().contains("redeemed at 20"),
        "{}",
        err.message()
    );

    s.assert_metric(r#"trellis_ca_certificates_issued_total{how="join"} 1"#);
}

#[tokio::test]
async fn the_network_defaults_to_the_cluster_name() {
    let s = start(None).await;
    let token = s.join_token("b", &[("cluster", "b")], HOUR);
    let (csr, _) = csr_for_id(&relay_id("b"));
    s.create_certificate(Some(&token), &csr).await.unwrap();
    let b = s.server.clusters.as_ref().unwrap().get("b").unwrap();
    assert_eq!((b.network.as_str(), b.region, b.zone), ("b", None, None));
}

#[tokio::test]
async fn a_join_token_signs_only_its_relay_identity_and_a_refusal_does_not_use_it_up() {
    let s = start(None).await;
    let token = s.join_token("a", &claims_a(), HOUR);
    let ch = s.channel(None).await;

    // Another cluster's relay.
    let (csr, _) = csr_for_id(&relay_id("b"));
    let err = create_certificate(ch.clone(), Some(&token), &csr)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&relay_id("a").uri())
            && err.message().contains(&relay_id("b").uri()),
        "names both identities: {}",
        err.message()
    );
    // A workload identity.
    let (csr, _) = csr_for("bookinfo-reviews");
    let err = create_certificate(ch.clone(), Some(&token), &csr)
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, &id("bookinfo-reviews").uri());
    // Not a CSR at all.
    let err = create_certificate(ch.clone(), Some(&token), "garbage")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        s.server.clusters.as_ref().unwrap().all().is_empty(),
        "nothing joined"
    );

    // The honest retry still works: the token was not spent by the refusals.
    let (csr, _) = csr_for_id(&relay_id("a"));
    let chain = create_certificate(ch, Some(&token), &csr).await.unwrap();
    assert_eq!(leaf_uri_sans(&chain[0]), vec![relay_id("a").uri()]);
    let names: Vec<_> = s
        .server
        .clusters
        .as_ref()
        .unwrap()
        .all()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["a"]);
}

#[tokio::test]
async fn expired_and_foreign_join_tokens_are_refused() {
    let s = start(None).await;
    let (csr, _) = csr_for_id(&relay_id("a"));
    // A zero lifetime: expired the second it was made.
    let expired = s.join_token("a", &claims_a(), Duration::ZERO);
    let err = s
        .create_certificate(Some(&expired), &csr)
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "expired");

    let foreign = foreign_token(&relay_id("a"), TokenKind::Join, HOUR, &[("cluster", "a")]);
    let err = s
        .create_certificate(Some(&foreign), &csr)
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Code::Unauthenticated,
        "not issued by this control plane",
    );
    assert!(s.server.clusters.as_ref().unwrap().all().is_empty());
}

#[tokio::test]
async fn a_join_token_whose_claims_do_not_match_its_subject_is_refused() {
    let s = start(None).await;
    // Subject relay-a, claim cluster b: not something the CLI makes.
    let token = s.join_token("a", &[("cluster", "b")], HOUR);
    let (csr, _) = csr_for_id(&relay_id("a"));
    let err = s.create_certificate(Some(&token), &csr).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "join token refused");
    let token = s.join_token("a", &[], HOUR);
    let err = s.create_certificate(Some(&token), &csr).await.unwrap_err();
    assert!(
        err.message().contains("\"cluster\" claim"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn concurrent_uses_of_one_join_token_let_exactly_one_through() {
    let s = start(None).await;
    let token = s.join_token("a", &claims_a(), HOUR);
    let ch = s.channel(None).await;
    let attempts = (0..6).map(|_| {
        let (csr, _) = csr_for_id(&relay_id("a"));
        let (ch, token) = (ch.clone(), token.clone());
        tokio::spawn(async move { create_certificate(ch, Some(&token), &csr).await })
    });
    let results = futures::future::join_all(attempts).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    assert_eq!(ok, 1, "{results:?}");
    for r in results {
        if let Err(e) = r.unwrap() {
            assert!(e.message().contains("already used"), "{}", e.message());
        }
    }
}

#[tokio::test]
async fn a_join_token_is_refused_on_ads_streams() {
    let s = start(None).await;
    let token = s.join_token("a", &claims_a(), HOUR);
    let err = s
        .sds(Some(&token), RELAY_A_NODE, &["default"])
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Code::Unauthenticated,
        "a join token only works for CreateCertificate",
    );
    // Still unused: the relay can join with it.
    join_with(&s, &token).await;
}

#[tokio::test]
async fn a_joined_relay_authenticates_with_its_certificate_and_renews_it() {
    let s = start(None).await;
    let (chain, key) = join_a(&s).await;
    let relay = s.channel(Some((&client_chain(&chain), &key))).await;

    // ADS with the relay's certificate and no token: a relay acts for the proxies of its
    // own cluster only (node metadata CLUSTER_ID), and never gets a proxy's secrets.
    let err = sds(relay.clone(), None, RELAY_A_NODE, &["default"])
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Code::PermissionDenied,
        "the relay of cluster a may not act for a proxy of cluster \"primary\"",
    );

    // The certificate makes a relay caller of cluster a (what the TLS layer passes on).
    let der = leaf_der(&chain[0]);
    let peer = PeerInfo {
        remote: None,
        identity: xds_server::identity::tls::spiffe_id_of(&der),
        conn: None,
    };
    let auth = s.server.authenticator.clone().unwrap();
    let caller = auth.caller(None, Some(&peer)).unwrap();
    assert_eq!(caller.identity, relay_id("a"));
    assert_eq!(caller.via, "certificate");
    assert_eq!(caller.relay_of.as_deref(), Some("a"));
    // A workload's certificate is no relay.
    let workload = PeerInfo {
        remote: None,
        identity: Some(id("bookinfo-reviews")),
        conn: None,
    };
    assert_eq!(auth.caller(None, Some(&workload)).unwrap().relay_of, None);

    // Renewal: a CSR for its own identity over its certificate; nobody else's.
    let (csr, _) = csr_for_id(&relay_id("a"));
    let renewed = create_certificate(relay.clone(), None, &csr).await.unwrap();
    assert_eq!(leaf_uri_sans(&renewed[0]), vec![relay_id("a").uri()]);
    let (csr, _) = csr_for_id(&relay_id("b"));
    let err = create_certificate(relay, None, &csr).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_workload_token_cannot_claim_a_relay_identity() {
    let s = start(None).await;
    let token = s.workload_token(&relay_id("a"), HOUR);
    let (csr, _) = csr_for_id(&relay_id("a"));
    let err = s.create_certificate(Some(&token), &csr).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "relay identity");
}

#[tokio::test]
async fn joining_again_replaces_the_cluster_record() {
    let s = start(None).await;
    join_a(&s).await;
    let first = s.server.clusters.as_ref().unwrap().get("a").unwrap();
    // The relay was reinstalled: a new token, another network.
    let token = s.join_token("a", &[("cluster", "a"), ("network", "net-a2")], HOUR);
    join_with(&s, &token).await;
    let clusters = s.server.clusters.as_ref().unwrap().all();
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    assert_eq!(clusters[0].network, "net-a2");
    assert_eq!(
        clusters[0].region, None,
        "the old record is replaced, not merged"
    );
    assert_ne!(clusters[0], first);
}
