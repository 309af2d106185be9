//! xDS protocol tests, state of the world: subscriptions, ACK/NACK bookkeeping, stale
//! nonces, which types a change pushes, reconnects, make-before-break on removal.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tonic::Code;
use xds_server::cache::TypeKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_wildcard_cds_and_ack() {
    let mesh = Mesh::start().await;
    let mut ads = mesh.sotw(first_request(REVIEWS_V1, CDS, &[])).await;
    let resp = ads.recv().await;
    assert_eq!(resp.type_url, CDS);
    assert!(
        !resp.version_info.is_empty() && !resp.nonce.is_empty(),
        "{resp:?}"
    );
    let mut want = outbound_clusters();
    want.insert("inbound|9080||".into());
    assert_eq!(names(&resp), want);

    let sent = mesh
        .wait_status(REVIEWS_V1, TypeKind::Cluster, |s| s.pushes == 1)
        .await;
    assert_eq!(
        sent.sent_version.as_deref(),
        Some(resp.version_info.as_str())
    );
    assert_eq!(sent.sent_nonce.as_deref(), Some(resp.nonce.as_str()));
    assert_eq!(sent.resources, 7);

    ads.send(ack(&resp, &[])).await;
    let st = mesh
        .wait_status(REVIEWS_V1, TypeKind::Cluster, |s| s.acks == 1)
        .await;
    assert_eq!(st.acked_version, st.sent_version);
    assert_eq!((st.pushes, st.nacks), (1, 0));
    assert!(st.synced());
    ads.expect_silence().await; // an ACK is not answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_eds_follows_resource_names() {
    let mesh = Mesh::start().await;
    let (details, ratings, reviews) = (
        outbound("details"),
        outbound("ratings"),
        outbound("reviews"),
    );
    let first = first_request("proxy-eds", EDS, &[&details, &ratings]);
    let mut ads = mesh.sotw(first).await;
    let r1 = ads.recv().await;
    assert_eq!(r1.type_url, EDS);
    assert_eq!(names(&r1), set(&[&details, &ratings]));
    let eps = endpoints(r1.resources.clone());
    assert_eq!(eps[&details], set(&["127.0.1.2:9080"]));
    assert_eq!(eps[&ratings], set(&["127.0.1.5:9080"]));

    // ACK and change the subscription in one request, as Envoy does.
    ads.send(ack(&r1, &[&details, &reviews])).await;
    let r2 = ads.recv().await;
    assert_eq!(names(&r2), set(&[&details, &reviews]));
    assert_ne!(r2.nonce, r1.nonce);
    assert_ne!(r2.version_info, r1.version_info);
    assert_eq!(
        endpoints(r2.resources.clone())[&reviews],
        set(&["127.0.1.3:9080", "127.0.1.4:9080"])
    );

    // No names on a non-wildcard type: unsubscribed from everything. The server answers
    // with an empty list (the state of the world for an empty subscription).
    ads.send(ack(&r2, &[])).await;
    let r3 = ads.recv().await;
    assert_eq!(r3.type_url, EDS);
    assert!(r3.resources.is_empty(), "{r3:?}");
    assert!(!r3.nonce.is_empty() && !r3.version_info.is_empty());
    ads.send(ack(&r3, &[])).await;
    ads.expect_silence().await;
    let st = mesh
        .wait_status("proxy-eds", TypeKind::Endpoint, |s| s.acks == 3)
        .await;
    assert_eq!(st.acked_version.as_deref(), Some(r3.version_info.as_str()));
    assert_eq!(st.resources, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_nack_is_recorded_and_not_retried() {
    let mesh = Mesh::start().await;
    let id = "proxy-nack";
    let mut ads = mesh.sotw(first_request(id, RDS, &["9080"])).await;
    let r1 = ads.recv().await;
    assert_eq!((r1.type_url.as_str(), names(&r1)), (RDS, set(&["9080"])));
    assert_eq!(route_timeouts(&r1), BTreeSet::from([0, 5]));

    ads.send(nack(&r1, "", &["9080"], "boom")).await;
    let st = mesh
        .wait_status(id, TypeKind::Route, |s| s.nacks == 1)
        .await;
    assert_eq!(st.nacked_version.as_deref(), Some(r1.version_info.as_str()));
    assert_eq!(st.nack_error.as_deref(), Some("boom"));
    assert_eq!((st.acked_version, st.acks), (None, 0));
    assert!(!mesh.server.registry.find(id).unwrap().view().synced);
    // The same version would be rejected again: the server waits for new config.
    ads.expect_silence().await;

    mesh.apply("routing.yaml", &edit(ROUTING, "timeout: 5s", "timeout: 7s"))
        .await;
    let r2 = ads.recv().await;
    assert_eq!(r2.type_url, RDS);
    assert_ne!(r2.version_info, r1.version_info);
    assert_eq!(route_timeouts(&r2), BTreeSet::from([0, 7]));
    ads.send(ack(&r2, &["9080"])).await;
    let st = mesh.wait_status(id, TypeKind::Route, |s| s.acks == 1).await;
    assert_eq!(st.acked_version.as_deref(), Some(r2.version_info.as_str()));
    // The NACK stays on record for the version it was about.
    assert_eq!(st.nacked_version.as_deref(), Some(r1.version_info.as_str()));
    assert!(st.synced());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_stale_nonce_is_ignored() {
    let mesh = Mesh::start().await;
    let id = "proxy-stale";
    let mut ads = mesh.sotw(first_request(id, RDS, &["9080"])).await;
    let r1 = ads.recv().await;
    ads.send(ack(&r1, &["9080"])).await;
    mesh.wait_status(id, TypeKind::Route, |s| s.acks == 1).await;

    mesh.apply("routing.yaml", &edit(ROUTING, "timeout: 5s", "timeout: 9s"))
        .await;
    let r2 = ads.recv().await;
    assert_ne!(r2.nonce, r1.nonce);

    // Late answers to the superseded response r1: neither may count, neither is answered.
    ads.send(nack(&r1, &r1.version_info, &["9080"], "late"))
        .await;
    ads.send(DiscoveryRequest {
        version_info: r2.version_info.clone(),
        ..ack(&r1, &["9080"])
    })
    .await;
    ads.expect_silence().await;
    let st = mesh.status(id, TypeKind::Route);
    assert_eq!(st.acked_version.as_deref(), Some(r1.version_info.as_str()));
    assert_eq!((st.acks, st.nacks, st.nack_error), (1, 0, None));
    assert_eq!(st.sent_version.as_deref(), Some(r2.version_info.as_str()));

    // Requests are handled in order, so once this ACK counts the stale ones were seen.
    ads.send(ack(&r2, &["9080"])).await;
    let st = mesh
        .wait_status(id, TypeKind::Route, |s| {
            s.acked_version.as_deref() == Some(r2.version_info.as_str())
        })
        .await;
    assert_eq!((st.acks, st.nacks), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_change_pushes_only_changed_types() {
    let mesh = Mesh::start().await;
    let (mut ads, before) =
        sotw_subscribe_all(mesh.server.xds_addr, "proxy-push", &HashMap::new()).await;

    mesh.apply("routing.yaml", &edit(ROUTING, "timeout: 5s", "timeout: 6s"))
        .await;
    let r = ads.recv().await;
    assert_eq!(r.type_url, RDS, "a VirtualService edit changes routes only");
    assert_ne!(r.version_info, before[RDS].version_info);
    assert_eq!(route_timeouts(&r), BTreeSet::from([0, 6]));
    ads.send(ack(&r, &["9080"])).await;
    ads.expect_silence().await;

    let moved = edit(WORKLOADS, "address: 127.0.1.4\n", "address: 127.0.1.14\n");
    mesh.apply("workloads.yaml", &moved).await;
    let e = ads.recv().await;
    assert_eq!(
        e.type_url, EDS,
        "a WorkloadEntry address changes endpoints only"
    );
    assert_ne!(e.version_info, before[EDS].version_info);
    assert_eq!(
        names(&e),
        outbound_clusters(),
        "SotW EDS carries the whole subscription"
    );
    let eps = endpoints(e.resources.clone());
    assert_eq!(
        eps[&outbound("reviews")],
        set(&["127.0.1.14:9080", "127.0.1.3:9080"])
    );
    assert_eq!(eps[&reviews_subset("v2")], set(&["127.0.1.14:9080"]));
    assert_eq!(eps[&reviews_subset("v1")], set(&["127.0.1.3:9080"]));
    let subscribed: Vec<String> = names(&e).into_iter().collect();
    ads.send(ack(
        &e,
        &subscribed.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .await;
    ads.expect_silence().await;

    let st = mesh.status("proxy-push", TypeKind::Cluster);
    assert_eq!(st.pushes, 1, "CDS was pushed again: {st:?}");
    assert_eq!(mesh.status("proxy-push", TypeKind::Listener).pushes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_reconnect_gets_same_versions() {
    let mesh = Mesh::start().await;
    let addr = mesh.server.xds_addr;
    let (ads, first) = sotw_subscribe_all(addr, REVIEWS_V1, &HashMap::new()).await;
    drop(ads);
    // Envoy reconnects announcing the versions it holds, with no nonce.
    let held: HashMap<String, String> = first
        .iter()
        .map(|(t, r)| (t.clone(), r.version_info.clone()))
        .collect();
    let (_ads, second) = sotw_subscribe_all(addr, REVIEWS_V1, &held).await;
    for t in [CDS, EDS, LDS, RDS] {
        assert_eq!(
            second[t].version_info, first[t].version_info,
            "{t}: version changed across reconnect"
        );
        assert_eq!(names(&second[t]), names(&first[t]), "{t}");
    }
    assert!(
        names(&second[LDS]).contains("127.0.1.3_9080"),
        "inbound listener missing"
    );
    // One registration per live stream: the dropped one is gone.
    let st = mesh
        .wait_status(REVIEWS_V1, TypeKind::Route, |s| s.acks == 1)
        .await;
    assert_eq!(st.pushes, 1);
    for _ in 0..100 {
        if mesh.server.registry.all().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mesh.server.registry.all().len(), 1);
}

// A nonce on a type this stream never answered is not stale: the proxy reconnected
// carrying what it last saw (Istio treats it so), and the request is an initial one whose
// resource_names count; it must not be answered as a wildcard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_reconnect_with_leftover_nonce_honors_resource_names() {
    let mesh = Mesh::start().await;
    let (details, ratings) = (outbound("details"), outbound("ratings"));
    let id = "proxy-renonce";
    let mut ads = mesh.sotw(first_request(id, EDS, &[&details])).await;
    let r1 = ads.recv().await;
    ads.send(ack(&r1, &[&details])).await;
    drop(ads);

    // A proxy may reconnect (after a control plane restart, say) still carrying the
    // last version and nonce it saw on the old stream.
    let again = DiscoveryRequest {
        node: node(id),
        ..ack(&r1, &[&details, &ratings])
    };
    let mut ads = mesh.sotw(again).await;
    let r2 = ads.recv().await;
    assert_eq!(r2.type_url, EDS);
    assert_eq!(
        names(&r2),
        set(&[&details, &ratings]),
        "subscription ignored"
    );
    ads.send(ack(&r2, &[&details, &ratings])).await;
    ads.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_without_node_is_rejected() {
    let mesh = Mesh::start().await;
    let addr = mesh.server.xds_addr;
    let check = |e: tonic::Status, what: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "unclear message: {e:?}");
    };

    let opened = open_sotw(addr, request(CDS, &[])).await;
    let e = stream_error(opened, "served a stream without node").await;
    check(e, "must carry node");

    let no_id = DiscoveryRequest {
        node: node(""),
        ..request(CDS, &[])
    };
    let e = stream_error(open_sotw(addr, no_id).await, "served a node without id").await;
    check(e, "node.id");

    let opened = open_delta(addr, delta_request(CDS, &[])).await;
    let e = stream_error(opened, "served a delta stream without node").await;
    check(e, "must carry node");
    assert!(mesh.server.registry.all().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_removal_is_make_before_break() {
    let mesh = Mesh::start().await;
    let id = "proxy-mbb";
    let (mut ads, before) = sotw_subscribe_all(mesh.server.xds_addr, id, &HashMap::new()).await;
    let ratings = outbound("ratings");
    let eds_names: Vec<String> = names(&before[EDS]).into_iter().collect();
    let eds_names: Vec<&str> = eds_names.iter().map(String::as_str).collect();

    mesh.apply("services.yaml", &services_without("ratings"))
        .await;
    let mut seen = Vec::new();
    for _ in 0..8 {
        let r = ads.recv().await;
        let subscription: &[&str] = match r.type_url.as_str() {
            EDS => &eds_names,
            RDS => &["9080"],
            _ => &[],
        };
        ads.send(ack(&r, subscription)).await;
        let done = r.type_url == CDS && !names(&r).contains(&ratings);
        seen.push(r);
        if done {
            break;
        }
    }
    ads.expect_silence().await;
    let order: Vec<(&str, bool)> = seen
        .iter()
        .map(|r| {
            (
                r.type_url.as_str(),
                r.type_url == CDS && names(r).contains(&ratings),
            )
        })
        .collect();
    let rds = seen
        .iter()
        .position(|r| r.type_url == RDS)
        .expect("no RDS update");
    let last = seen.len() - 1;
    // The proxy already holds every remaining cluster, so no CDS "union" is resent first;
    // any CDS before the last one must still hold the removed cluster.
    assert!(
        seen[..last]
            .iter()
            .all(|r| r.type_url != CDS || names(r).contains(&ratings)),
        "cluster removed too early: {order:?}"
    );
    assert!(
        rds < last && seen[last].type_url == CDS,
        "CDS removal must follow RDS: {order:?}"
    );
    assert_eq!(names(&seen[last]), &outbound_clusters() - &set(&[&ratings]));
    let routed_hosts: Vec<String> = route_configs(&seen[rds])
        .into_iter()
        .flat_map(|rc| rc.virtual_hosts)
        .map(|vh| vh.name)
        .collect();
    assert!(
        !routed_hosts.iter().any(|h| h.starts_with("ratings.")),
        "{routed_hosts:?}"
    );
    assert_eq!(
        mesh.status(id, TypeKind::Cluster).acked_version.as_deref(),
        Some(seen[last].version_info.as_str())
    );
}

/// Replacing a service (one cluster added, one removed in the same change): the added
/// cluster arrives first while the removed one is kept, routes move, then the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_replacement_adds_before_routes_and_removes_after() {
    let mesh = Mesh::start().await;
    let id = "proxy-replace";
    let (mut ads, _) = sotw_subscribe_all(mesh.server.xds_addr, id, &HashMap::new()).await;
    let (ratings, stars) = (outbound("ratings"), outbound("stars"));
    let renamed = edit(
        SERVICES,
        "hosts: [ratings.default.svc.cluster.local]",
        "hosts: [stars.default.svc.cluster.local]",
    );
    mesh.apply("services.yaml", &renamed).await;
    let mut seen = Vec::new();
    for _ in 0..8 {
        let r = ads.recv().await;
        let done = r.type_url == CDS && !names(&r).contains(&ratings);
        ads.send(ack(&r, &[])).await;
        seen.push((r.type_url.clone(), names(&r)));
        if done {
            break;
        }
    }
    let order: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(seen[0].0, CDS, "{order:?}");
    assert!(
        seen[0].1.contains(&ratings) && seen[0].1.contains(&stars),
        "union first: {:?}",
        seen[0].1
    );
    let rds = seen
        .iter()
        .position(|(t, _)| t == RDS)
        .expect("no RDS update");
    let last = seen.len() - 1;
    assert!(rds < last && seen[last].0 == CDS, "{order:?}");
    assert!(seen[last].1.contains(&stars) && !seen[last].1.contains(&ratings));
}

/// Legacy wildcard ends with the first name sent: after that, an empty list on CDS means
/// no clusters at all (xds_protocol.rst, "How the client specifies what resources to
/// return"), and only an explicit `*` is everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_cds_empty_list_after_names_is_nothing_not_wildcard() {
    let mesh = Mesh::start().await;
    let details = outbound("details");
    let mut ads = mesh
        .sotw(first_request("proxy-cds-names", CDS, &[&details]))
        .await;
    let r1 = ads.recv().await;
    assert_eq!((r1.type_url.as_str(), names(&r1)), (CDS, set(&[&details])));
    ads.send(ack(&r1, &[&details])).await;
    ads.expect_silence().await;

    ads.send(ack(&r1, &[])).await;
    let r2 = ads.recv().await;
    assert_eq!(r2.type_url, CDS);
    assert!(r2.resources.is_empty(), "{:?}", names(&r2));
    ads.send(ack(&r2, &[])).await;
    ads.expect_silence().await;

    ads.send(ack(&r2, &["*"])).await;
    let r3 = ads.recv().await;
    assert_eq!(names(&r3), outbound_clusters());
    ads.send(ack(&r3, &["*"])).await;
    ads.expect_silence().await;
}
