//! The relay in-process against an in-process control plane: joining (once), serving
//! sidecars from one upstream stream per class, reporting its registry, serving on when
//! the control plane is gone (also after a restart), and bounding its proxy classes.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

#[tokio::test]
async fn a_relay_joins_once_serves_its_sidecars_and_keeps_serving_without_the_control_plane() {
    let mut m = mesh().await;
    let token = m.join_token("b");
    let relay = m.relay(Some(token.clone()), "relay-b").await.unwrap();
    // The control plane recorded the member cluster, and merged its registry.
    assert!(m.server.clusters.as_ref().unwrap().get("b").is_some());
    let controller = m.server.controller.clone();
    until("cluster b's workload in the mesh", || {
        controller
            .snapshot()
            .mesh
            .workload("ratings-b.default", Some("b"))
            .is_some()
    })
    .await;

    // Two proxies of one class through the relay: the same CDS as straight from the
    // control plane (same content, same version), from one upstream stream for the class.
    let direct = cds(m.server.xds_addr, "direct~1").await;
    let a = cds(relay.xds_addr, "sidecar-1").await;
    let b = cds(relay.xds_addr, "sidecar-2").await;
    assert!(!a.resources.is_empty());
    assert_eq!(a.version_info, direct.version_info);
    assert_eq!(b.version_info, direct.version_info);
    // Classes: namespace default (the two sidecars) and ratings-b (prefetched from the
    // registry): two upstream streams, not one per sidecar.
    until("two upstream streams", || {
        relay.upstream.streams.load(Ordering::Relaxed) == 2
    })
    .await;

    // The control plane's admin lists the sidecars behind the relay (one that stays).
    let held = hold(relay.xds_addr, "sidecar-held").await;
    let reported = m.server.relay_proxies.clone().unwrap();
    until("the relay to report its sidecar", || {
        reported
            .get("b")
            .is_some_and(|r| r.connected && r.proxies.iter().any(|p| p["id"] == "sidecar-held"))
    })
    .await;
    drop(held);

    // The token was used up: another relay cannot join with it.
    let err = m.relay(Some(token), "relay-b-again").await.unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");

    // The control plane goes away: the relay serves a new sidecar from its cache.
    m.server.stop();
    let c = cds(relay.xds_addr, "sidecar-3").await;
    assert_eq!(c.version_info, direct.version_info);

    // The control plane comes back on the same CA: a relay restart needs no token (its
    // state dir holds its certificate).
    drop(relay);
    let dir = m.dir.path().to_path_buf();
    m.server = start_server(&dir).await;
    let relay = m.relay(None, "relay-b").await.unwrap();
    let d = cds(relay.xds_addr, "sidecar-4").await;
    assert!(!d.resources.is_empty());
}

#[tokio::test]
async fn a_class_no_sidecar_uses_any_more_is_retired_and_comes_back_when_needed() {
    let m = mesh().await;
    let relay = m
        .relay_with(
            Some(m.join_token("b")),
            "relay-b",
            Duration::from_secs(2),
            100,
        )
        .await
        .unwrap();
    let streams = || relay.upstream.streams.load(Ordering::Relaxed);
    // ratings-b (a workload of the registry folder) is kept ready: one stream.
    until("the registry workload's stream", || streams() == 1).await;
    let held = hold(relay.xds_addr, "sidecar-held").await;
    until("a second stream for namespace default", || streams() == 2).await;
    // While its sidecar is connected the class stays, however long that is.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(streams(), 2, "a class in use was retired");
    drop(held);
    until("the idle class to be retired", || {
        streams() == 1 && relay.cache.classes().len() == 1
    })
    .await;
    // The registry workload's class survived; a new sidecar of the retired class has it
    // fetched again and gets its config.
    let classes = relay.cache.classes();
    assert_eq!(classes[0].0.workload.as_deref(), Some("ratings-b.default"));
    let again = cds(relay.xds_addr, "sidecar-new").await;
    assert!(!again.resources.is_empty());
}

#[tokio::test]
async fn a_relay_restarted_while_the_control_plane_is_away_serves_from_its_state_dir() {
    let mut m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let token = workload_token(&ca, "bookinfo-ratings");
    let before = cds(relay.xds_addr, "sidecar-1").await;
    let sds = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r1")
        .await
        .unwrap();
    let chain = secret_parts(&sds).0.unwrap();
    // The cache goes to disk within a couple of seconds of changing.
    let state = m.dir.path().join("relay-b");
    for _ in 0..100 {
        let kept = std::fs::read(state.join("cache.pb")).unwrap_or_default();
        if relay::persist::decode(&kept).is_ok_and(|k| k.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        relay::persist::decode(&std::fs::read(state.join("cache.pb")).unwrap())
            .unwrap()
            .len(),
        2,
        "namespace default and ratings-b kept"
    );

    // The control plane goes away, then the relay restarts.
    m.server.stop();
    drop(relay);
    let relay = m.relay(None, "relay-b").await.unwrap();
    let after = cds(relay.xds_addr, "sidecar-2").await;
    assert_eq!(after.version_info, before.version_info);
    assert_eq!(after.resources.len(), before.resources.len());
    // A sidecar of a known identity gets the kept certificate (the relay cannot get a
    // new one signed now), and only its own.
    let sds = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(secret_parts(&sds).0.unwrap(), chain);
    assert_eq!(
        cert_identity(&sds),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
    let kept = state
        .join("identities")
        .join("default.bookinfo-ratings.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(kept).unwrap().permissions().mode() & 0o777,
        0o600,
        "a kept key is private"
    );
}

#[tokio::test]
async fn a_relay_refuses_a_proxy_class_beyond_its_limit_with_the_reason() {
    let m = mesh().await;
    let relay = m
        .relay_with(
            Some(m.join_token("b")),
            "relay-b",
            Duration::from_secs(600),
            2,
        )
        .await
        .unwrap();
    // ratings-b (the registry's workload) and namespace default's outbound-only proxies:
    // two classes, the limit.
    let ok = cds(relay.xds_addr, "sidecar-1").await;
    assert!(!ok.resources.is_empty());
    until("both classes' streams", || {
        relay.upstream.streams.load(Ordering::Relaxed) == 2
    })
    .await;
    let other = "sidecar~127.0.9.9~other.default~default.svc.cluster.local";
    let err = try_cds(relay.xds_addr, other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("at most 2 proxy classes"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("other.default"), "{}", err.message());
    assert_eq!(relay.upstream.streams.load(Ordering::Relaxed), 2);
    // Classes it has are still served.
    let again = cds(relay.xds_addr, "sidecar-2").await;
    assert_eq!(again.version_info, ok.version_info);
}
