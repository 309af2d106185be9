//! Failover in a real Envoy (1.40) with the generated config: the outbound cluster (outlier
//! detection) and the endpoints a sidecar of member cluster b gets for `reviews` (b's
//! endpoint at priority 0, primary's at priority 1), loaded statically behind a plain
//! listener. Requests go to b while its endpoint answers; once it fails (503s), Envoy
//! ejects it after 3 consecutive gateway errors and sends everything to the primary
//! cluster. With two endpoints in b, one of them gone (connection refused), the gone one
//! is ejected the same way and about 70 % of the requests stay in b (1.4 x the healthy
//! half), the rest spill over to primary.
//!
//! The backends are small HTTP servers in this test that answer with their cluster's name
//! (and 503 when told to). Skips without Envoy on a developer machine, fails under `CI=true`.
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use translated::{inline_assignment, open_store};
use trellis_tests::{
    envoy_admin_get, free_port, http_get, start_envoy, wait_envoy_live, ChildGuard, LoopbackNet,
    ENVOY_START_TIMEOUT,
};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::dump::resource_json;
use xds_server::mesh::ClusterMeta;
use xds_server::translate::ProxyScope;

const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";

/// An HTTP server answering `cluster` (or 503 while `failing` is set) on `addr`.
fn backend(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    cluster: &'static str,
) -> Arc<AtomicBool> {
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    let app = axum::Router::new().fallback(move || {
        let flag = flag.clone();
        async move {
            if flag.load(Ordering::SeqCst) {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "failing")
            } else {
                (axum::http::StatusCode::OK, cluster)
            }
        }
    });
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    failing
}

fn workload(name: &str, address: IpAddr, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  address: {address}\n  labels: {{app: reviews}}\n  ports: {{http: {port}}}\n"
    )
}

/// The mesh: reviews-v1 in primary on `primary`, reviews-v1 in b on `local` (and a
/// second b endpoint on `gone`, where nothing listens, when given).
fn snapshot(primary: SocketAddr, local: SocketAddr, gone: Option<SocketAddr>) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\n  namespace: trellis-system\nspec:\n  connectTimeout: 1s\n";
    let service = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: reviews\n  namespace: default\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {number: 9080, name: http, protocol: HTTP}\n  workloadSelector:\n    labels: {app: reviews}\n";
    std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
    std::fs::write(dir.path().join("services.yaml"), service).unwrap();
    std::fs::write(
        dir.path().join("workloads.yaml"),
        workload("reviews-v1", primary.ip(), primary.port()),
    )
    .unwrap();
    let mut store = open_store(dir.path());
    let mut files = vec![(
        "reviews.yaml".to_string(),
        workload("reviews-v1", local.ip(), local.port()),
    )];
    if let Some(gone) = gone {
        files.push((
            "gone.yaml".to_string(),
            workload("reviews-v9", gone.ip(), gone.port()),
        ));
    }
    let outcome = store
        .set_cluster_registry("b", ClusterMeta::default(), files)
        .unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    Snapshot::build(1, store.mesh())
}

/// A listener on `listen` routing everything to the generated `reviews` cluster, which
/// carries its generated assignment inline. No retries: each request is one attempt.
fn bootstrap(snap: &Snapshot, admin: SocketAddr, listen: SocketAddr) -> String {
    let view = snap.view(&ProxyScope::namespace("default", "b"));
    let mut cluster =
        resource_json(view.get(TypeKind::Cluster, REVIEWS).unwrap())["resource"].clone();
    let cla = resource_json(view.get(TypeKind::Endpoint, REVIEWS).unwrap())["resource"].clone();
    let priorities: Vec<&Value> = cla["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["priority"])
        .collect();
    assert!(
        priorities.contains(&&json!(1)),
        "b's proxy ranks primary's endpoint 1: {cla}"
    );
    inline_assignment(&mut cluster, cla);
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "statPrefix": "failover",
        "routeConfig": {"virtualHosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": REVIEWS}}]
        }]},
        "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        }}]
    });
    let b = json!({
        "admin": {"address": {"socketAddress": {"address": admin.ip().to_string(), "portValue": admin.port()}}},
        "staticResources": {
            "listeners": [{
                "name": "failover",
                "address": {"socketAddress": {"address": listen.ip().to_string(), "portValue": listen.port()}},
                "filterChains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typedConfig": hcm
                }]}]
            }],
            "clusters": [cluster]
        }
    });
    serde_json::to_string_pretty(&b).unwrap()
}

/// A live Envoy serving [`bootstrap`] of `snap`.
fn envoy_for(
    envoy_bin: &Path,
    dir: &Path,
    name: &str,
    snap: &Snapshot,
    admin: SocketAddr,
    listen: SocketAddr,
) -> ChildGuard {
    let yaml = bootstrap(snap, admin, listen);
    let mut envoy = start_envoy(envoy_bin, dir, name, &yaml).unwrap();
    wait_envoy_live(&mut envoy, admin, ENVOY_START_TIMEOUT).unwrap();
    envoy
}

/// Bodies (or status codes) of `n` requests.
fn answers(listen: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r = http_get(listen, "/", &[]).unwrap();
            if r.status == 200 {
                r.text()
            } else {
                r.status.to_string()
            }
        })
        .collect()
}

fn stat(admin: SocketAddr, name: &str) -> u64 {
    let stats = envoy_admin_get(admin, "/stats?format=json")
        .unwrap()
        .json()
        .unwrap();
    stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["value"].as_u64())
        .unwrap_or_else(|| panic!("no stat {name}"))
}

/// Sends requests until Envoy has ejected an endpoint (stat `ejections` is 1), which it
/// does on the main thread a moment after the third failure: a few more requests may fail
/// meanwhile. Returns how many failed.
fn until_ejected(admin: SocketAddr, listen: SocketAddr, ejections: &str) -> usize {
    let mut failed = 0;
    for _ in 0..500 {
        if stat(admin, ejections) == 1 {
            return failed;
        }
        failed += answers(listen, 1).iter().filter(|a| *a == "503").count();
    }
    panic!("no ejection after 500 requests ({failed} failed)");
}

#[test]
fn envoy_fails_over_to_the_other_cluster_when_the_local_endpoint_fails() {
    let Some(envoy_bin) = trellis_tests::require_envoy() else {
        return;
    };
    let dir = trellis_tests::test_dir("multicluster-failover").unwrap();
    let net = LoopbackNet::reserve("multicluster-failover").unwrap();
    let addr = |host: u8| {
        let ip = net.ip(host);
        SocketAddr::new(ip, free_port(ip).unwrap())
    };
    let (primary, local, gone) = (addr(1), addr(11), addr(12));
    let (admin, listen) = (addr(100), addr(101));
    let rt = tokio::runtime::Runtime::new().unwrap();
    backend(&rt, primary, "primary");
    let local_failing = backend(&rt, local, "b");

    // b's endpoint answers: every request stays in b.
    let snap = snapshot(primary, local, None);
    let envoy = envoy_for(&envoy_bin, dir.path(), "envoy", &snap, admin, listen);
    assert_eq!(answers(listen, 20), vec!["b"; 20]);

    // It fails: after 3 consecutive 503s it is ejected and primary takes everything.
    local_failing.store(true, Ordering::SeqCst);
    let ejections = format!(
        "cluster.{REVIEWS}.outlier_detection.ejections_enforced_consecutive_gateway_failure"
    );
    let failed = until_ejected(admin, listen, &ejections);
    assert!(failed >= 3, "ejected after 3 gateway errors, not {failed}");
    assert_eq!(answers(listen, 20), vec!["primary"; 20]);
    drop(envoy);

    // An endpoint that is gone (connection refused) is ejected the same way; the healthy
    // local one keeps priority 0 (with one of two local endpoints healthy, 70 % of the
    // load stays local, the rest spills to primary).
    local_failing.store(false, Ordering::SeqCst);
    let snap = snapshot(primary, local, Some(gone));
    let (admin, listen) = (addr(102), addr(103));
    let _envoy = envoy_for(&envoy_bin, dir.path(), "envoy-gone", &snap, admin, listen);
    let refused = until_ejected(admin, listen, &ejections);
    assert!(
        refused >= 3,
        "ejected after 3 connection failures, not {refused}"
    );
    let got = answers(listen, 100);
    let local = got.iter().filter(|a| *a == "b").count();
    let spilled = got.iter().filter(|a| *a == "primary").count();
    assert_eq!(local + spilled, 100, "no failures once ejected: {got:?}");
    // Binomial(100, 0.3) spills: outside 10..=50 with a probability below 1e-5.
    assert!(local >= 50 && spilled >= 10, "about 70 % local: {got:?}");
}
