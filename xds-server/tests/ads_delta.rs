//! xDS protocol tests, incremental (Delta) ADS: per-resource versions, subscribe and
//! unsubscribe, `initial_resource_versions` on reconnect, `removed_resources`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use xds_server::cache::TypeKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_wildcard_cds_and_ack() {
    let mesh = Mesh::start().await;
    let first = delta_first_request(REVIEWS_V1, CDS, &[]);
    let mut ads = mesh.delta(first).await;
    let r = ads.recv().await;
    assert_eq!(r.type_url, CDS);
    assert!(!r.nonce.is_empty(), "{r:?}");
    assert!(r.removed_resources.is_empty(), "{r:?}");
    let versions = delta_versions(&r);
    let mut want = outbound_clusters();
    want.insert("inbound|9080||".into());
    assert_eq!(versions.keys().cloned().collect::<BTreeSet<_>>(), want);

    ads.send(delta_ack(&r)).await;
    let st = mesh
        .wait_status(REVIEWS_V1, TypeKind::Cluster, |s| s.acks == 1)
        .await;
    assert_eq!(st.acked_version, st.sent_version);
    assert_eq!((st.pushes, st.nacks, st.resources), (1, 0, 7));
    ads.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_eds_unsubscribe() {
    let mesh = Mesh::start().await;
    let (details, ratings) = (outbound("details"), outbound("ratings"));
    let first = delta_first_request("proxy-delta-eds", EDS, &[&details, &ratings]);
    let mut ads = mesh.delta(first).await;
    let r1 = ads.recv().await;
    assert_eq!(
        delta_versions(&r1).keys().cloned().collect::<BTreeSet<_>>(),
        set(&[&details, &ratings])
    );
    ads.send(delta_ack(&r1)).await;

    let unsubscribe = DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec![ratings.clone()],
        ..delta_request(EDS, &[])
    };
    ads.send(unsubscribe).await;
    ads.expect_silence().await;

    // ratings moves: not subscribed any more, nothing to say.
    let ratings_moved = edit(WORKLOADS, "address: 127.0.1.5\n", "address: 127.0.1.15\n");
    mesh.apply("workloads.yaml", &ratings_moved).await;
    ads.expect_silence().await;

    // details moves: exactly its assignment, nothing else.
    mesh.apply(
        "workloads.yaml",
        &edit(
            &ratings_moved,
            "address: 127.0.1.2\n",
            "address: 127.0.1.12\n",
        ),
    )
    .await;
    let r2 = ads.recv().await;
    assert_eq!(r2.type_url, EDS);
    assert_eq!(r2.resources.len(), 1, "{r2:?}");
    assert_eq!(r2.resources[0].name, details);
    assert!(r2.removed_resources.is_empty(), "{r2:?}");
    let eps = endpoints(r2.resources.iter().map(|r| r.resource.clone().unwrap()));
    assert_eq!(eps[&details], set(&["127.0.1.12:9080"]));
    ads.send(delta_ack(&r2)).await;
    ads.expect_silence().await;

    // Subscribing again: the proxy forgot ratings, so it is sent in full (new address).
    ads.send(delta_request(EDS, &[&ratings])).await;
    let r3 = ads.recv().await;
    assert_eq!(r3.resources.len(), 1, "{r3:?}");
    let eps = endpoints(r3.resources.iter().map(|r| r.resource.clone().unwrap()));
    assert_eq!(eps[&ratings], set(&["127.0.1.15:9080"]));
    ads.send(delta_ack(&r3)).await;
    ads.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconnect_with_initial_versions() {
    let mesh = Mesh::start().await;
    let id = "proxy-delta-rc";
    let first = delta_first_request(id, CDS, &[]);
    let mut ads = mesh.delta(first).await;
    let r = ads.recv().await;
    let held = delta_versions(&r);
    assert_eq!(
        held.keys().cloned().collect::<BTreeSet<_>>(),
        outbound_clusters()
    );
    ads.send(delta_ack(&r)).await;
    let cluster_names: Vec<&str> = held.keys().map(String::as_str).collect();
    ads.send(delta_request(EDS, &cluster_names)).await;
    let e = ads.recv().await;
    let held_eds = delta_versions(&e);
    assert_eq!(held_eds.len(), 6);
    ads.send(delta_ack(&e)).await;
    drop(ads);

    // Everything up to date: the (required) answer carries nothing.
    let initial: HashMap<String, String> =
        held.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let first = DeltaDiscoveryRequest {
        initial_resource_versions: initial.clone(),
        ..delta_first_request(id, CDS, &[])
    };
    let mut ads = mesh.delta(first).await;
    let r = ads.recv().await;
    assert_eq!(r.type_url, CDS);
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "{r:?}"
    );
    ads.send(delta_ack(&r)).await;
    ads.expect_silence().await;
    drop(ads);

    // One stale version, one resource that no longer exists.
    let details = outbound("details");
    let gone = outbound("gone");
    let mut initial = initial;
    initial.insert(details.clone(), "0000000000000000".into());
    initial.insert(gone.clone(), "0123456789abcdef".into());
    let first = DeltaDiscoveryRequest {
        initial_resource_versions: initial,
        ..delta_first_request(id, CDS, &[])
    };
    let mut ads = mesh.delta(first).await;
    // The removal may come in a CDS response of its own (cluster removals go last).
    let (mut sent, mut removed) = (BTreeMap::new(), Vec::new());
    for _ in 0..2 {
        let r = ads.recv().await;
        assert_eq!(r.type_url, CDS);
        sent.extend(delta_versions(&r));
        removed.extend(r.removed_resources.iter().cloned());
        ads.send(delta_ack(&r)).await;
        if !removed.is_empty() {
            break;
        }
    }
    assert_eq!(
        sent,
        BTreeMap::from([(details.clone(), held[&details].clone())])
    );
    assert_eq!(removed, vec![gone]);
    let eds_initial: HashMap<String, String> = held_eds
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ads.send(DeltaDiscoveryRequest {
        initial_resource_versions: eds_initial,
        ..delta_request(EDS, &cluster_names)
    })
    .await;
    let e = ads.recv().await;
    assert_eq!(e.type_url, EDS);
    assert!(
        e.resources.is_empty() && e.removed_resources.is_empty(),
        "{e:?}"
    );
    ads.send(delta_ack(&e)).await;
    ads.expect_silence().await;

    // A service goes away: its endpoints and cluster are named as removed, the cluster last.
    mesh.apply("services.yaml", &services_without("ratings"))
        .await;
    let ratings = outbound("ratings");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = ads.recv().await;
        ads.send(delta_ack(&r)).await;
        seen.push(r);
    }
    ads.expect_silence().await;
    let order: Vec<&str> = seen.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(order, [EDS, CDS], "cluster removal must come last");
    for r in &seen {
        assert!(r.resources.is_empty(), "{r:?}");
        assert_eq!(r.removed_resources, vec![ratings.clone()], "{}", r.type_url);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_unknown_name_is_reported_removed() {
    let mesh = Mesh::start().await;
    let (details, nope, nada) = (outbound("details"), outbound("nope"), outbound("nada"));
    let first = delta_first_request("proxy-delta-404", EDS, &[&details, &nope]);
    let mut ads = mesh.delta(first).await;
    let r = ads.recv().await;
    assert_eq!(
        delta_versions(&r).keys().cloned().collect::<Vec<_>>(),
        vec![details.clone()]
    );
    assert_eq!(r.removed_resources, vec![nope.clone()]);
    ads.send(delta_ack(&r)).await;
    ads.expect_silence().await;

    // Later subscriptions too, and only the new name is announced.
    ads.send(delta_request(EDS, &[&nada])).await;
    let r = ads.recv().await;
    assert!(r.resources.is_empty(), "{r:?}");
    assert_eq!(r.removed_resources, vec![nada]);
    ads.send(delta_ack(&r)).await;
    ads.expect_silence().await;
}

/// Envoy drops a cluster's EDS watch when the cluster is updated and adds it again for the
/// new one: an unsubscribe, then a subscribe of the same, unchanged assignment. The proxy
/// forgot it in between, so it must be sent again (or the new cluster waits for its
/// initial fetch timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_resubscribe_to_an_unchanged_resource_sends_it_again() {
    let mesh = Mesh::start().await;
    let (details, ratings) = (outbound("details"), outbound("ratings"));
    let first = delta_first_request("proxy-delta-resub", EDS, &[&details, &ratings]);
    let mut ads = mesh.delta(first).await;
    let r1 = ads.recv().await;
    let v1 = delta_versions(&r1);
    ads.send(delta_ack(&r1)).await;
    ads.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec![ratings.clone()],
        ..delta_request(EDS, &[])
    })
    .await;
    ads.expect_silence().await;
    ads.send(delta_request(EDS, &[&ratings])).await;
    let r2 = ads.recv().await;
    assert_eq!(r2.resources.len(), 1, "{r2:?}");
    assert_eq!(r2.resources[0].name, ratings);
    assert_eq!(Some(&r2.resources[0].version), v1.get(&ratings));
    ads.send(delta_ack(&r2)).await;
    ads.expect_silence().await;
}

/// An updated cluster (here its load balancer) makes Envoy rebuild it and wait for its
/// endpoints again: the unchanged assignment follows the CDS update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_an_updated_cluster_gets_its_unchanged_endpoints_again() {
    let mesh = Mesh::start().await;
    let ratings = outbound("ratings");
    let first = delta_first_request("proxy-delta-cds-update", CDS, &[]);
    let mut ads = mesh.delta(first).await;
    let cds = ads.recv().await;
    ads.send(delta_ack(&cds)).await;
    let names: Vec<String> = delta_versions(&cds).into_keys().collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ads.send(delta_request(EDS, &names)).await;
    let eds = ads.recv().await;
    assert_eq!(eds.type_url, EDS);
    let before = delta_versions(&eds);
    ads.send(delta_ack(&eds)).await;
    ads.expect_silence().await;

    mesh.apply("ratings-dr.yaml", RATINGS_LEAST_REQUEST).await;
    let cds2 = ads.recv().await;
    assert_eq!(cds2.type_url, CDS);
    assert!(delta_versions(&cds2).contains_key(&ratings), "{cds2:?}");
    let eds2 = ads.recv().await;
    assert_eq!(eds2.type_url, EDS, "{eds2:?}");
    let after = delta_versions(&eds2);
    assert_eq!(
        after.get(&ratings),
        before.get(&ratings),
        "same assignment, sent again"
    );
    assert_eq!(after.len(), 1, "only the updated cluster's: {after:?}");
    ads.send(delta_ack(&cds2)).await;
    ads.send(delta_ack(&eds2)).await;
    ads.expect_silence().await;
}

/// Responses to `ads` until `done` holds for everything gathered (name -> version, and
/// removals), ACKing each; CDS removals may come in a response of their own.
async fn delta_gather(
    ads: &mut DeltaStream,
    done: impl Fn(&BTreeMap<String, String>, &[String]) -> bool,
) -> (BTreeMap<String, String>, Vec<String>) {
    let (mut sent, mut removed) = (BTreeMap::new(), Vec::new());
    while !done(&sent, &removed) {
        let r = ads.recv().await;
        assert_eq!(r.type_url, CDS, "{r:?}");
        sent.extend(delta_versions(&r));
        removed.extend(r.removed_resources.iter().cloned());
        ads.send(delta_ack(&r)).await;
    }
    ads.expect_silence().await;
    (sent, removed)
}

/// A proxy subscribed to `*` and to a name that it unsubscribes cannot know whether the
/// wildcard still covers that name: the server resends the resource if it exists and
/// names it removed if not (xds_protocol.rst, "Unsubscribing from Resources").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_unsubscribing_under_wildcard_resends_or_removes() {
    let mesh = Mesh::start().await;
    let (details, ratings, nope) = (outbound("details"), outbound("ratings"), outbound("nope"));
    let mut ads = mesh
        .delta(delta_first_request("proxy-delta-wc-unsub", CDS, &[]))
        .await;
    let r = ads.recv().await;
    let held = delta_versions(&r);
    assert!(held.contains_key(&details), "{r:?}");
    ads.send(delta_ack(&r)).await;
    ads.expect_silence().await;

    // Wildcard stays (legacy wildcard plus names); the missing name is announced removed.
    ads.send(delta_request(CDS, &[&details, &nope])).await;
    let (_, removed) = delta_gather(&mut ads, |_, removed| !removed.is_empty()).await;
    assert_eq!(removed, vec![nope.clone()]);

    ads.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec![details.clone(), nope.clone()],
        ..delta_request(CDS, &[])
    })
    .await;
    let (sent, removed) = delta_gather(&mut ads, |sent, removed| {
        !sent.is_empty() && !removed.is_empty()
    })
    .await;
    assert_eq!(
        sent,
        BTreeMap::from([(details.clone(), held[&details].clone())])
    );
    assert_eq!(removed, vec![nope]);

    // A name the server never saw subscribed is answered all the same.
    ads.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec![ratings.clone()],
        ..delta_request(CDS, &[])
    })
    .await;
    let (sent, _) = delta_gather(&mut ads, |sent, _| !sent.is_empty()).await;
    assert_eq!(
        sent,
        BTreeMap::from([(ratings.clone(), held[&ratings].clone())])
    );
}
