//! Golden files for the generated Envoy config: what the examples mesh translates to,
//! rendered as proto3 JSON (as in a config dump). Regenerate with `UPDATE_GOLDEN=1`
//! and review the diff: every change to generated config is visible in review.
#![allow(clippy::unwrap_used)]

mod translated;

use std::sync::Arc;
use translated::{check_dump, edit_and_reload, editable_copy, root, snapshot_of};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::translate::ProxyScope;

fn snapshot() -> Snapshot {
    snapshot_of(&root().join("../examples"))
}

#[test]
fn sidecar_of_a_workload() {
    let snap = snapshot();
    let scope = ProxyScope::Workload("productpage-v1.default".into());
    check_dump("productpage-v1.clusters", &snap, &scope, TypeKind::Cluster);
    check_dump(
        "productpage-v1.endpoints",
        &snap,
        &scope,
        TypeKind::Endpoint,
    );
    check_dump(
        "productpage-v1.listeners",
        &snap,
        &scope,
        TypeKind::Listener,
    );
    check_dump("default.routes", &snap, &scope, TypeKind::Route);
}

#[test]
fn outbound_only_proxy_in_another_namespace() {
    let snap = snapshot();
    let scope = ProxyScope::namespace("other", "primary");
    // Short names of another namespace's services must not appear here.
    check_dump("other.routes", &snap, &scope, TypeKind::Route);
    check_dump("other.listeners", &snap, &scope, TypeKind::Listener);
}

#[test]
fn translation_is_deterministic_and_shared() {
    let a = snapshot();
    let b = snapshot();
    let scope = ProxyScope::Workload("reviews-v1.default".into());
    for kind in [
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Listener,
        TypeKind::Route,
    ] {
        assert_eq!(
            a.view(&scope).version(kind),
            b.view(&scope).version(kind),
            "{kind:?}"
        );
    }
    // Proxies of one class share one encoded view.
    assert!(Arc::ptr_eq(&a.view(&scope), &a.view(&scope)));
    let other = ProxyScope::Workload("reviews-v2.default".into());
    let (v1, v2) = (a.view(&scope), a.view(&other));
    let shared = v1
        .get(
            TypeKind::Endpoint,
            "outbound|9080|v1|reviews.default.svc.cluster.local",
        )
        .unwrap();
    let same = v2
        .get(
            TypeKind::Endpoint,
            "outbound|9080|v1|reviews.default.svc.cluster.local",
        )
        .unwrap();
    assert!(
        Arc::ptr_eq(shared, same),
        "mesh-wide resources are encoded once"
    );
}

#[test]
fn an_endpoint_change_retranslates_only_that_service() {
    let (dir, mut store) = editable_copy(&root().join("../examples"));
    let a = Snapshot::build(1, store.mesh());
    let scope = ProxyScope::namespace("default", "primary");
    let (va, routes_a) = (a.view(&scope), a.view(&scope).version(TypeKind::Route));

    edit_and_reload(&mut store, dir.path(), "workloads.yaml", |t| {
        t.replace("address: 127.0.1.5", "address: 127.0.1.55")
    });
    let b = Snapshot::build_from(2, store.mesh(), Some(&a));
    let vb = b.view(&scope);

    let ratings = "outbound|9080||ratings.default.svc.cluster.local";
    let reviews = "outbound|9080|v1|reviews.default.svc.cluster.local";
    assert_ne!(
        va.get(TypeKind::Endpoint, ratings).unwrap().version,
        vb.get(TypeKind::Endpoint, ratings).unwrap().version
    );
    assert!(Arc::ptr_eq(
        va.get(TypeKind::Endpoint, reviews).unwrap(),
        vb.get(TypeKind::Endpoint, reviews).unwrap()
    ));
    assert!(Arc::ptr_eq(
        va.get(TypeKind::Cluster, reviews).unwrap(),
        vb.get(TypeKind::Cluster, reviews).unwrap()
    ));
    assert_eq!(va.version(TypeKind::Cluster), vb.version(TypeKind::Cluster));
    assert_eq!(routes_a, vb.version(TypeKind::Route));
    assert_eq!(
        va.version(TypeKind::Listener),
        vb.version(TypeKind::Listener)
    );
    assert_ne!(
        va.version(TypeKind::Endpoint),
        vb.version(TypeKind::Endpoint)
    );
}
