//! VirtualService HTTP features (`fixtures/vs-features/`): golden files of the generated
//! routes and listeners, and `envoy --mode validate` of a sidecar's listeners with those
//! routes inlined (Envoy 1.40). Regenerate golden files with `UPDATE_GOLDEN=1`.
#![allow(clippy::unwrap_used)]

mod translated;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message as _;
use serde_json::{json, Value};
use std::sync::Arc;
use translated::{ads_bootstrap, check_dump, fixture, inline_endpoints, resources, snapshot_of};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::translate::ProxyScope;

fn snapshot() -> Snapshot {
    snapshot_of(&fixture("vs-features"))
}

const FRONTEND: &str = "frontend-v1.default";

#[test]
fn golden_routes_and_listeners() {
    let snap = snapshot();
    let scope = ProxyScope::Workload(FRONTEND.into());
    check_dump("vs-features.default.routes", &snap, &scope, TypeKind::Route);
    check_dump(
        "vs-features.frontend.listeners",
        &snap,
        &scope,
        TypeKind::Listener,
    );
    // `sourceLabels: {app: frontend}` only applies to frontend's sidecar.
    check_dump(
        "vs-features.default-namespace.routes",
        &snap,
        &ProxyScope::namespace("default", "primary"),
        TypeKind::Route,
    );
    // `sourceNamespace: other` only applies to proxies in `other`.
    check_dump(
        "vs-features.other.routes",
        &snap,
        &ProxyScope::namespace("other", "primary"),
        TypeKind::Route,
    );
}

#[test]
fn routes_with_two_filter_configs_encode_deterministically() {
    // The grpc-abort rule has fault and CORS config: a map of two entries, which prost
    // would encode in random order; the version must not depend on it.
    let versions: Vec<_> = (0..8)
        .map(|_| {
            let snap = snapshot();
            let scope = ProxyScope::namespace("default", "primary");
            snap.view(&scope).version(TypeKind::Route)
        })
        .collect();
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");

    // The hand-ordered encoding decodes to the very message it was made from.
    let snap = snapshot();
    for rc in xds_server::translate::routes(&snap.mesh, "default", &Default::default()) {
        let bytes = xds_server::translate::encode_route_configuration(&rc);
        assert_eq!(RouteConfiguration::decode(bytes.as_slice()).unwrap(), rc);
    }
}

#[test]
fn source_labels_split_route_sharing_only_by_matching_selectors() {
    let snap = snapshot();
    let route = |scope: ProxyScope| {
        snap.view(&scope)
            .get(TypeKind::Route, "9080")
            .unwrap()
            .clone()
    };
    let frontend = route(ProxyScope::Workload(FRONTEND.into()));
    let reviews_v1 = route(ProxyScope::Workload("reviews-v1.default".into()));
    let reviews_v2 = route(ProxyScope::Workload("reviews-v2.default".into()));
    let outsider = route(ProxyScope::namespace("default", "primary"));
    // Workloads no selector picks share the namespace's encoding.
    assert!(Arc::ptr_eq(&reviews_v1, &reviews_v2));
    assert!(Arc::ptr_eq(&reviews_v1, &outsider));
    assert_ne!(frontend.version, outsider.version);
    let names =
        |r: &Arc<xds_server::cache::Resource>| xds_server::dump::resource_json(r).to_string();
    assert!(names(&frontend).contains("canary-callers.frontend"));
    assert!(!names(&outsider).contains("canary-callers"));
}

/// The listener with its RDS reference replaced by the route configuration itself.
fn inline_routes(listener: &mut Value, routes: &[Value]) {
    for chain in listener["filterChains"].as_array_mut().unwrap() {
        for filter in chain["filters"].as_array_mut().unwrap() {
            let config = &mut filter["typedConfig"];
            let Some(name) = config
                .get("rds")
                .map(|r| r["routeConfigName"].as_str().unwrap().to_string())
            else {
                continue;
            };
            let rc = routes
                .iter()
                .find(|r| r["name"] == json!(name))
                .cloned()
                .unwrap_or_else(|| panic!("no route configuration {name}"));
            let map = config.as_object_mut().unwrap();
            map.remove("rds");
            map.insert("routeConfig".into(), rc);
        }
    }
}

fn bootstrap(snap: &Snapshot, scope: &ProxyScope) -> Value {
    let routes = resources(snap, scope, TypeKind::Route);
    let mut listeners = resources(snap, scope, TypeKind::Listener);
    for l in &mut listeners {
        inline_routes(l, &routes);
    }
    let mut clusters = resources(snap, scope, TypeKind::Cluster);
    let endpoints = resources(snap, scope, TypeKind::Endpoint);
    inline_endpoints(&mut clusters, &endpoints);
    ads_bootstrap(
        "sidecar~127.0.41.1~frontend-v1.default~default.svc.cluster.local",
        "vs-features-validate",
        listeners,
        clusters,
    )
}

#[test]
fn envoy_accepts_the_generated_routes() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let snap = Arc::new(snapshot());
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, scope) in [
        ("frontend", ProxyScope::Workload(FRONTEND.into())),
        ("other", ProxyScope::namespace("other", "primary")),
    ] {
        let yaml = serde_json::to_string_pretty(&bootstrap(&snap, &scope)).unwrap();
        if let Err(e) = trellis_tests::envoy_validate(&envoy, dir.path(), name, &yaml) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
