//! DestinationRule traffic policies (`fixtures/traffic-policy/`): the generated clusters
//! and routes as golden files, and every one of them through `envoy --mode validate`
//! (skips without Envoy on a developer machine, fails under `CI=true`).
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use translated::{
    ads_bootstrap, check_dump, edit_and_reload, editable_copy, fixture, inline_endpoints,
    open_store, resources, snapshot_of, static_mesh_secrets, static_secret_refs,
};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::translate::ProxyScope;

fn dir() -> PathBuf {
    fixture("traffic-policy")
}

/// A sidecar with an identity (mTLS variants) and a proxy without one.
fn scopes() -> [(&'static str, ProxyScope); 2] {
    [
        ("sticky-v1", ProxyScope::Workload("sticky-v1.shop".into())),
        ("shop", ProxyScope::namespace("shop", "primary")),
    ]
}

#[test]
fn clusters_and_routes() {
    let snap = snapshot_of(&dir());
    for (name, scope) in scopes() {
        check_dump(
            &format!("traffic-policy/{name}.clusters"),
            &snap,
            &scope,
            TypeKind::Cluster,
        );
    }
    let scope = ProxyScope::namespace("shop", "primary");
    check_dump("traffic-policy/shop.routes", &snap, &scope, TypeKind::Route);
    check_dump(
        "traffic-policy/shop.endpoints",
        &snap,
        &scope,
        TypeKind::Endpoint,
    );
}

/// The fixture with its placeholder certificate paths pointing at real files, which
/// Envoy reads when it loads a cluster.
fn config_with_files(to: &Path) -> PathBuf {
    let certs = fixture("mtls").join("certs");
    let config = to.join("config");
    std::fs::create_dir(&config).unwrap();
    for e in std::fs::read_dir(dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path())
            .unwrap()
            .replace(
                "/etc/trellis-test/ca.pem",
                certs.join("root-cert.pem").to_str().unwrap(),
            )
            .replace(
                "/etc/trellis-test/client.pem",
                certs.join("cert-chain.pem").to_str().unwrap(),
            )
            .replace(
                "/etc/trellis-test/client-key.pem",
                certs.join("key.pem").to_str().unwrap(),
            );
        std::fs::write(config.join(e.file_name()), text).unwrap();
    }
    config
}

/// An outbound listener serving `route` inline, so Envoy checks the hash policies.
fn route_listener(route: Value) -> Value {
    let port = route["name"].as_str().unwrap().parse::<u16>().unwrap();
    json!({
        "name": format!("route-{port}"),
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
        "filterChains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": format!("route_{port}"),
                "routeConfig": route,
                "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                }}]
            }
        }]}]
    })
}

#[test]
fn envoy_accepts_every_traffic_policy() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let snap = Snapshot::build(1, open_store(&config_with_files(tmp.path())).mesh());
    let mut failures = Vec::new();
    for (name, scope) in scopes() {
        let mut clusters: Vec<Value> = resources(&snap, &scope, TypeKind::Cluster)
            .into_iter()
            .filter(|c| c["name"].as_str().unwrap().starts_with("outbound|"))
            .collect();
        let endpoints = resources(&snap, &scope, TypeKind::Endpoint);
        inline_endpoints(&mut clusters, &endpoints);
        let listeners = resources(&snap, &scope, TypeKind::Route)
            .into_iter()
            .map(route_listener)
            .collect();
        let node = format!("sidecar~127.0.4.1~{name}.shop~shop.svc.cluster.local");
        // Inline endpoints and static secrets: Envoy checks the endpoints' socket matches
        // and the secret kinds too (and validate mode does not cope with SDS over ADS
        // on static clusters).
        let mut bootstrap = ads_bootstrap(&node, "traffic-policy", listeners, clusters);
        static_secret_refs(&mut bootstrap);
        bootstrap["staticResources"]["secrets"] = static_mesh_secrets();
        let yaml = serde_json::to_string_pretty(&bootstrap).unwrap();
        if let Err(e) = trellis_tests::envoy_validate(&envoy, tmp.path(), name, &yaml) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A policy edit re-translates the rule's clusters (and, for a hash key, the routes);
/// an edit that leaves the hash keys alone keeps the routes.
#[test]
fn a_policy_change_retranslates_clusters() {
    let (dir, mut store) = editable_copy(&dir());
    let a = Snapshot::build(1, store.mesh());
    let scope = ProxyScope::namespace("shop", "primary");
    let va = a.view(&scope);
    let pool = "outbound|8081||pool.shop.svc.cluster.local";
    let sticky = "outbound|8080||sticky.shop.svc.cluster.local";

    edit_and_reload(&mut store, dir.path(), "pool-rule.yaml", |t| {
        t.replace("maxRetries: 4", "maxRetries: 5")
    });
    let b = Snapshot::build_from(2, store.mesh(), Some(&a));
    let vb = b.view(&scope);
    assert_ne!(
        va.get(TypeKind::Cluster, pool).unwrap().version,
        vb.get(TypeKind::Cluster, pool).unwrap().version
    );
    assert!(std::sync::Arc::ptr_eq(
        va.get(TypeKind::Cluster, sticky).unwrap(),
        vb.get(TypeKind::Cluster, sticky).unwrap()
    ));
    assert_eq!(va.version(TypeKind::Route), vb.version(TypeKind::Route));

    edit_and_reload(&mut store, dir.path(), "sticky-rule.yaml", |t| {
        t.replace("httpHeaderName: x-user", "httpHeaderName: x-account")
    });
    let c = Snapshot::build_from(3, store.mesh(), Some(&b));
    let vc = c.view(&scope);
    assert_ne!(vb.version(TypeKind::Route), vc.version(TypeKind::Route));
    let routes = serde_json::to_string(&resources(&c, &scope, TypeKind::Route)).unwrap();
    assert!(routes.contains("x-account"), "{routes}");
}
