//! End to end: DestinationRule traffic policies on real traffic through real Envoy
//! sidecars configured by a real xds-server (the plaintext mesh of `e2e_routing.rs`:
//! client -> reviews v1 / v2). One mesh, the scenarios one after the other, each
//! applied as a config edit that every sidecar ACKs before traffic checks it:
//!
//! - consistent hashing on a header: the same value always reaches the same endpoint;
//! - consistent hashing on a cookie Envoy generates (`ttl`): a client that sends back the
//!   cookie of its first response stays on one endpoint;
//! - outlier detection: an endpoint whose app answers 5xx is ejected, later requests all
//!   go to the healthy one;
//! - connection pool limits: requests beyond one connection and one pending request are
//!   answered 503 with `x-envoy-overloaded: true`;
//! - TLS origination (`SIMPLE`) to an HTTPS server with a CA made here, and a
//!   `subjectAltNames` the server does not have refused.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    call, count_versions, make_certs, send, Mesh, Mode, SidecarMesh, DESTINATION_RULE_FILE,
    NAMESPACE, PORT, VIRTUAL_SERVICE_FILE,
};
use trellis_tests::{http_request, require_envoy, start_echo_tls, HttpResponse};

/// Requests per check that something always goes one way (see e2e_routing.rs).
const ALWAYS: usize = 50;

/// A VirtualService sending reviews traffic to every reviews endpoint (no subset), with
/// retries off so that a failing endpoint shows in the response.
fn all_reviews_no_retries() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {NAMESPACE}}}
spec:
  hosts: [reviews]
  http:
  - name: all
    route:
    - destination: {{host: reviews}}
    retries: {{attempts: 0}}
"
    )
}

/// The reviews DestinationRule with `policy` as its `trafficPolicy` (indented 4).
fn reviews_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {NAMESPACE}}}
spec:
  host: reviews
  trafficPolicy:
{policy}  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"
    )
}

fn header_stickiness(mesh: &Mesh) {
    mesh.apply(
        DESTINATION_RULE_FILE,
        &reviews_rule("    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n"),
    );
    mesh.apply(VIRTUAL_SERVICE_FILE, &all_reviews_no_retries());
    let client = mesh.client();
    let mut by_user = BTreeMap::new();
    // 16 users: the chance that a working ring puts them all on one endpoint is 2^-15.
    for i in 0..16 {
        let user = format!("user-{i}");
        let counts = count_versions(client, ALWAYS, "/", &[("x-user", &user)]).expect("traffic");
        assert_eq!(
            counts.len(),
            1,
            "{user} moved between endpoints: {counts:?}"
        );
        by_user.insert(user, counts.into_keys().next().expect("a version"));
    }
    let versions: BTreeSet<&String> = by_user.values().collect();
    assert_eq!(versions.len(), 2, "the hash spreads users: {by_user:?}");
    let policy = mesh
        .envoy_stat(
            "client",
            "cluster.outbound|9080||reviews.default.svc.cluster.local.lb_healthy_panic",
        )
        .expect("stats");
    assert_eq!(policy, 0, "the load balancer panicked");
}

fn cookie_stickiness(mesh: &Mesh) {
    mesh.apply(
        DESTINATION_RULE_FILE,
        &reviews_rule(
            "    loadBalancer:\n      consistentHash:\n        httpCookie: {name: trellis-session, path: /, ttl: 3600s}\n",
        ),
    );
    let client = mesh.client();
    let mut seen = BTreeSet::new();
    for i in 0..16 {
        let first = send(client, "/", &[]).expect("first request");
        let first_version = common::served_version(&first, "reviews").expect("served");
        let cookie = first
            .header_all("set-cookie")
            .into_iter()
            .find(|c| c.starts_with("trellis-session="))
            .unwrap_or_else(|| panic!("client {i}: no session cookie set: {:?}", first.headers))
            .split(';')
            .next()
            .expect("cookie pair")
            .to_owned();
        let counts = count_versions(client, ALWAYS, "/", &[("cookie", &cookie)]).expect("traffic");
        assert_eq!(
            counts,
            BTreeMap::from([(first_version.clone(), ALWAYS)]),
            "client {i} with {cookie} must stay on {first_version}"
        );
        seen.insert(first_version);
    }
    assert_eq!(
        seen.len(),
        2,
        "sessions spread over both endpoints: {seen:?}"
    );
}

fn outlier_ejection(mesh: &Mesh) {
    mesh.apply(
        DESTINATION_RULE_FILE,
        &reviews_rule(
            "    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
      maxEjectionPercent: 50
      minHealthPercent: 0
",
        ),
    );
    let client = mesh.client();
    let fail_v2 = [("x-echo-fail-version", "v2")];
    // Round robin reaches v2 within two requests; its 503 ejects it at once.
    let mut failures = 0;
    for _ in 0..4 {
        let r = send(client, "/", &fail_v2).expect("request");
        if r.status == 503 {
            assert_eq!(r.header("x-echo-version"), Some("v2"), "{:?}", r.headers);
            failures += 1;
        }
    }
    assert_eq!(failures, 1, "v2 answered 503 once, then was ejected");
    let counts = count_versions(client, 100, "/", &fail_v2).expect("only healthy answers");
    assert_eq!(counts, BTreeMap::from([("v1".to_owned(), 100)]));
    let ejected = mesh
        .envoy_stat(
            "client",
            "cluster.outbound|9080||reviews.default.svc.cluster.local.outlier_detection.ejections_enforced_consecutive_5xx",
        )
        .expect("stats");
    assert_eq!(ejected, 1);
}

fn overflow(mesh: &Mesh) {
    mesh.apply(
        DESTINATION_RULE_FILE,
        &reviews_rule(
            "    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
",
        ),
    );
    let client = mesh.client();
    // Eight slow requests at once: one connection, one pending, the rest overflow.
    let responses: Vec<HttpResponse> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(move || {
                    http_request(
                        client,
                        "GET",
                        "/",
                        &[("host", "reviews"), ("x-echo-delay-ms", "3000")],
                        &[],
                        Duration::from_secs(20),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("response"))
            .collect()
    });
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let overloaded = responses
        .iter()
        .filter(|r| r.status == 503 && r.header("x-envoy-overloaded") == Some("true"))
        .count();
    assert!(ok >= 1, "some requests are served: {responses:?}");
    assert!(overloaded >= 1, "some overflow: {responses:?}");
    assert_eq!(ok + overloaded, responses.len(), "{responses:?}");
    let overflows = mesh
        .envoy_stat(
            "client",
            "cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_rq_pending_overflow",
        )
        .expect("stats");
    assert!(overflows >= 1, "pending overflow counted: {overflows}");
}

fn bank_config(server: SocketAddr, ca: &Path, san: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bank, namespace: {NAMESPACE}}}
spec:
  hosts: [bank.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  endpoints: [{{address: {}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bank, namespace: {NAMESPACE}}}
spec:
  host: bank.example.com
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {}
      sni: bank.example.com
      subjectAltNames: [{san}]
",
        server.ip(),
        ca.display()
    )
}

fn tls_origination(mesh: &mut Mesh) {
    let certs = mesh.dir.path().join("certs");
    std::fs::create_dir(&certs).expect("certs dir");
    let (ca, cert, key) = make_certs(&certs, "bank.example.com");
    // An address of the block no workload uses.
    let server = SocketAddr::new(mesh.net.ip(40), PORT);
    let echo =
        start_echo_tls(mesh.dir.path(), server, "bank", "v1", (&cert, &key)).expect("https echo");
    mesh.echos.push(echo);

    mesh.apply("bank.yaml", &bank_config(server, &ca, "bank.example.com"));
    let client = mesh.client();
    for _ in 0..5 {
        let r = call(client, "bank.example.com", "GET", "/accounts", &[]).expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-echo-workload"), Some("bank"));
        let body = r.json().expect("json");
        assert_eq!(body["tls"], true, "{body}");
        assert_eq!(body["path"], "/accounts", "{body}");
    }

    // A server that is not who the rule expects is refused.
    mesh.apply("bank.yaml", &bank_config(server, &ca, "other.example.com"));
    let r = call(client, "bank.example.com", "GET", "/", &[]).expect("request");
    assert_eq!(r.status, 503, "{}", r.text());
    let failed = mesh
        .envoy_stat(
            "client",
            "cluster.outbound|9080||bank.example.com.ssl.fail_verify_san",
        )
        .expect("stats");
    assert!(failed >= 1, "SAN check failed in the handshake");
}

#[test]
fn destination_rule_traffic_policies() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh = Mesh::start(&envoy_bin, "e2e-traffic-policy", Mode::Sotw).expect("mesh");
    header_stickiness(&mesh);
    cookie_stickiness(&mesh);
    outlier_ejection(&mesh);
    overflow(&mesh);
    tls_origination(&mut mesh);
    mesh.check_converged(true).expect("converged");
}
