//! Golden files for the generated Envoy config: what the examples mesh translates to,
//! rendered as proto3 JSON (as in a config dump). Regenerate with `UPDATE_GOLDEN=1`
//! and review the diff: every change to generated config is visible in review.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::store::ConfigStore;
use xds_server::dump::resource_json;
use xds_server::translate::ProxyScope;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn check(name: &str, value: serde_json::Value) {
    let path = root().join("tests/golden").join(format!("{name}.json"));
    let rendered = serde_json::to_string_pretty(&value).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != rendered {
        let got = path.with_extension("json.actual");
        std::fs::write(&got, &rendered).unwrap();
        panic!(
            "generated config differs from {} (actual written to {}; diff them, and rerun with UPDATE_GOLDEN=1 if the change is intended)",
            path.display(),
            got.display()
        );
    }
}

fn snapshot() -> Snapshot {
    let (store, outcome) = ConfigStore::open(root().join("../examples")).unwrap();
    assert!(outcome.new_errors.is_empty());
    Snapshot::build(1, store.mesh())
}

fn dump(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind) -> serde_json::Value {
    let view = snap.view(scope);
    serde_json::Value::Array(view.iter(kind).map(|r| resource_json(r)).collect())
}

#[test]
fn sidecar_of_a_workload() {
    let snap = snapshot();
    let scope = ProxyScope::Workload("productpage-v1.default".into());
    check(
        "productpage-v1.clusters",
        dump(&snap, &scope, TypeKind::Cluster),
    );
    check(
        "productpage-v1.endpoints",
        dump(&snap, &scope, TypeKind::Endpoint),
    );
    check(
        "productpage-v1.listeners",
        dump(&snap, &scope, TypeKind::Listener),
    );
    check("default.routes", dump(&snap, &scope, TypeKind::Route));
}

#[test]
fn outbound_only_proxy_in_another_namespace() {
    let snap = snapshot();
    let scope = ProxyScope::namespace("other", "primary");
    // Short names of another namespace's services must not appear here.
    check("other.routes", dump(&snap, &scope, TypeKind::Route));
    check("other.listeners", dump(&snap, &scope, TypeKind::Listener));
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
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(root().join("../examples"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let (mut store, _) = ConfigStore::open(dir.path()).unwrap();
    let a = Snapshot::build(1, store.mesh());
    let scope = ProxyScope::namespace("default", "primary");
    let (va, routes_a) = (a.view(&scope), a.view(&scope).version(TypeKind::Route));

    let path = dir.path().join("workloads.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("address: 127.0.1.5", "address: 127.0.1.55"),
    )
    .unwrap();
    assert!(store.reload().unwrap().changed);
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
