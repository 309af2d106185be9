//! EnvoyFilter patches on generated config (`fixtures/envoyfilter/`): golden files of
//! the patched resources, `envoy --mode validate` on them (Envoy 1.40; skips without
//! Envoy on a developer machine, fails under `CI=true`), and sharing: proxies under
//! the same filters share one patched set, proxies under none keep the plain one.
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::{json, Value};
use std::sync::Arc;
use translated::{
    ads_bootstrap, check_dump, editable_copy, fixture, inline_endpoints, resources, snapshot_of,
};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::translate::ProxyScope;

fn snapshot() -> Snapshot {
    snapshot_of(&fixture("envoyfilter"))
}

fn workload(key: &str) -> ProxyScope {
    ProxyScope::Workload(key.into())
}

#[test]
fn patched_resources_match_the_golden_files() {
    let snap = snapshot();
    let web = workload("web-v1.default");
    check_dump(
        "envoyfilter.web-v1.listeners",
        &snap,
        &web,
        TypeKind::Listener,
    );
    check_dump(
        "envoyfilter.web-v1.clusters",
        &snap,
        &web,
        TypeKind::Cluster,
    );
    check_dump("envoyfilter.default.routes", &snap, &web, TypeKind::Route);
    let db = workload("db-v1.default");
    check_dump(
        "envoyfilter.db-v1.listeners",
        &snap,
        &db,
        TypeKind::Listener,
    );
}

fn names(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind, needle: &str) -> bool {
    resources(snap, scope, kind)
        .iter()
        .any(|r| r.to_string().contains(needle))
}

#[test]
fn filters_apply_by_namespace_selector_and_context() {
    let snap = snapshot();
    let web = workload("web-v1.default");
    let client = workload("client.default");
    let other = workload("client.other");
    let db = workload("db-v1.default");
    let ratelimit = "envoy.filters.http.local_ratelimit";
    // Root namespace + selector: web's inbound only, not its outbound listeners.
    assert!(names(&snap, &web, TypeKind::Listener, ratelimit));
    assert!(!names(&snap, &client, TypeKind::Listener, ratelimit));
    assert!(!names(&snap, &other, TypeKind::Listener, ratelimit));
    let web_listeners = resources(&snap, &web, TypeKind::Listener);
    let outbound = web_listeners
        .iter()
        .find(|l| {
            l["trafficDirection"] == "OUTBOUND" && l["name"].as_str().unwrap().ends_with("_9080")
        })
        .unwrap();
    assert!(!outbound.to_string().contains(ratelimit));
    // Namespace scope: every proxy of `default`, none of `other`.
    for scope in [&web, &client, &db] {
        assert!(names(&snap, scope, TypeKind::Route, "x-envoy-filter"));
        assert!(names(&snap, scope, TypeKind::Cluster, "2.500s"));
    }
    assert!(!names(&snap, &other, TypeKind::Route, "x-envoy-filter"));
    assert!(!names(&snap, &other, TypeKind::Cluster, "2.500s"));
    // The CLUSTER match picks one subset's cluster.
    let clusters = resources(&snap, &client, TypeKind::Cluster);
    let timeout =
        |name: &str| clusters.iter().find(|c| c["name"] == name).unwrap()["connectTimeout"].clone();
    assert_eq!(
        timeout("outbound|9080|v2|web.default.svc.cluster.local"),
        "2.500s"
    );
    assert_ne!(
        timeout("outbound|9080|v1|web.default.svc.cluster.local"),
        "2.500s"
    );
    // INSERT_FIRST put the health route before the generated ones.
    let routes = resources(&snap, &client, TypeKind::Route);
    let vh = routes[0]["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web.default.svc.cluster.local:9080")
        .unwrap();
    assert_eq!(vh["routes"][0]["name"], "health");
    // The rate limit filter sits right before the router, in every inbound chain.
    let inbound = web_listeners
        .iter()
        .find(|l| l["name"] == "127.0.7.1_9080")
        .unwrap();
    for chain in inbound["filterChains"].as_array().unwrap() {
        let filters = chain["filters"][0]["typedConfig"]["httpFilters"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = filters
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names[names.len() - 2..],
            [ratelimit, "envoy.filters.http.router"]
        );
    }
}

#[test]
fn proxies_under_the_same_filters_share_patched_resources() {
    let snap = snapshot();
    let (web, client, other) = (
        snap.view(&workload("web-v1.default")),
        snap.view(&workload("client.default")),
        snap.view(&workload("client.other")),
    );
    let patched = "outbound|9080|v2|web.default.svc.cluster.local";
    // Same namespace filters: one patched cluster, one patched route configuration.
    assert!(Arc::ptr_eq(
        web.get(TypeKind::Cluster, patched).unwrap(),
        client.get(TypeKind::Cluster, patched).unwrap()
    ));
    assert!(Arc::ptr_eq(
        web.get(TypeKind::Route, "9080").unwrap(),
        client.get(TypeKind::Route, "9080").unwrap()
    ));
    // A cluster no patch changes is the very resource every other proxy gets.
    let untouched = "outbound|5432||db.default.svc.cluster.local";
    assert!(Arc::ptr_eq(
        web.get(TypeKind::Cluster, untouched).unwrap(),
        other.get(TypeKind::Cluster, untouched).unwrap()
    ));
    assert_ne!(
        web.get(TypeKind::Cluster, patched).unwrap().version,
        other.get(TypeKind::Cluster, patched).unwrap().version
    );
}

#[test]
fn without_envoy_filters_nothing_changes() {
    let (dir, mut store) = editable_copy(&fixture("envoyfilter"));
    let with = Snapshot::build(1, store.mesh());
    std::fs::remove_file(dir.path().join("filters.yaml")).unwrap();
    assert!(store.reload().unwrap().changed);
    let without = Snapshot::build_from(2, store.mesh(), Some(&with));
    let fresh = Snapshot::build(3, store.mesh());
    for key in [
        "web-v1.default",
        "client.default",
        "client.other",
        "db-v1.default",
    ] {
        let scope = workload(key);
        for kind in [TypeKind::Cluster, TypeKind::Listener, TypeKind::Route] {
            assert_eq!(
                without.view(&scope).version(kind),
                fresh.view(&scope).version(kind),
                "{key} {kind:?}"
            );
        }
    }
    assert!(!names(
        &without,
        &workload("web-v1.default"),
        TypeKind::Listener,
        "local_ratelimit"
    ));
}

/// Routes go through validate mode inside a listener of their own (RDS is not fetched).
fn route_listener(i: usize, rc: Value) -> Value {
    json!({
        "name": format!("routes_{i}"),
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 20000 + i}},
        "filterChains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "routes",
                "routeConfig": rc,
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }
        }]}]
    })
}

#[test]
fn envoy_accepts_the_patched_config() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let snap = snapshot();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for key in ["web-v1.default", "db-v1.default", "client.default"] {
        let scope = workload(key);
        let mut listeners = resources(&snap, &scope, TypeKind::Listener);
        for (i, rc) in resources(&snap, &scope, TypeKind::Route)
            .into_iter()
            .enumerate()
        {
            listeners.push(route_listener(i, rc));
        }
        let mut clusters = resources(&snap, &scope, TypeKind::Cluster);
        let endpoints = resources(&snap, &scope, TypeKind::Endpoint);
        inline_endpoints(&mut clusters, &endpoints);
        let w = &snap.mesh.workloads[key];
        let node = format!(
            "sidecar~{}~{key}~{}.svc.cluster.local",
            w.address, w.namespace
        );
        let yaml =
            serde_json::to_string_pretty(&ads_bootstrap(&node, "ef", listeners, clusters)).unwrap();
        if let Err(e) =
            trellis_tests::envoy_validate(&envoy, dir.path(), &key.replace('.', "-"), &yaml)
        {
            failures.push(format!("{key}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
