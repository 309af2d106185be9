//! End to end: mesh security with real Envoy sidecars that get their certificates from
//! the server's CA over SDS (bootstrapped with signed tokens on the secure port).
//!
//! - PeerAuthentication: PERMISSIVE serves plaintext and mutual TLS on one port, STRICT
//!   refuses plaintext while sidecar-to-sidecar traffic (auto mTLS) keeps flowing;
//! - AuthorizationPolicy: ALLOW by principal and method, DENY by path and header;
//! - RequestAuthentication: JWTs checked against an inline JWKS, and against a remote
//!   `jwksUri` that the sidecar fetches from a key server of the test (its name resolved
//!   through the test's DNS server, `MeshConfig.dnsResolvers`);
//! - certificate renewal and root rotation under continuous mTLS traffic: not one failed
//!   request.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;
mod security;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    call, mesh_yaml, xfcc_uris, Probe, SidecarMesh, Traffic, TrafficReport, WorkloadDef, MESH_FILE,
    NAMESPACE, PORT,
};
use security::jwt::{claims, jwks, now, JwtKey};
use security::{
    assert_statuses, check_mtls, peer_authentication_yaml, MeshOptions, SecureMesh, Target,
};
use trellis_tests::{
    free_port, http_get, http_request, require_envoy, start_dns, start_file_server,
};

const CLIENT: WorkloadDef = WorkloadDef::client("client", 10);
const CLIENT_B: WorkloadDef = WorkloadDef::client("client-b", 11);
/// A client whose sidecar a test starts late, to open fresh connections.
const CLIENT_LATE: WorkloadDef = WorkloadDef::client("client-late", 12).deferred();
const REVIEWS: WorkloadDef = WorkloadDef::service("reviews", "reviews", 20).with_tcp_port(9091);
/// On Delta xDS, so that secrets are checked over both protocol variants.
const RATINGS: WorkloadDef = WorkloadDef::service("ratings", "ratings", 21)
    .with_tcp_port(9092)
    .delta();

/// Requests per steady-state check.
const N: usize = 10;

fn start(test: &str, workloads: Vec<WorkloadDef>) -> Option<SecureMesh> {
    start_with(test, workloads, Vec::new(), Vec::new())
}

fn start_with(
    test: &str,
    workloads: Vec<WorkloadDef>,
    files: Vec<(String, String)>,
    server_args: Vec<String>,
) -> Option<SecureMesh> {
    let envoy_bin = require_envoy()?;
    let options = MeshOptions {
        workloads,
        files,
        server_args,
    };
    Some(SecureMesh::start(&envoy_bin, test, options).expect("secure mesh"))
}

/// Asserts `n` requests from `client` to `app` are answered by the app over mTLS.
#[track_caller]
fn assert_mtls_ok(mesh: &SecureMesh, client: &str, app: &str, path: &str, n: usize) {
    let outbound = mesh.outbound(client);
    let id = mesh.def(client).spiffe_id();
    let started = Instant::now();
    for i in 0..n {
        let response = call(outbound, app, "GET", path, &[])
            .unwrap_or_else(|e| panic!("{client} -> {app} {path}, request {i}: {e:#}"));
        check_mtls(&response, app, &id)
            .unwrap_or_else(|e| panic!("{client} -> {app} {path}, request {i}: {e:#}"));
    }
    eprintln!(
        "{client} -> {app} {path}: {n} x 200 over mTLS ({:.1?})",
        started.elapsed()
    );
}

/// HTTP and TCP traffic from `client` to reviews and ratings.
fn traffic_targets(mesh: &SecureMesh, client: &str) -> Vec<Target> {
    ["reviews", "ratings"]
        .into_iter()
        .flat_map(|app| [mesh.target(client, app), mesh.tcp_target(client, app)])
        .collect()
}

/// The serials of the certificates each sidecar's Envoy holds now.
fn envoy_cert_serials(mesh: &SecureMesh) -> BTreeMap<&'static str, BTreeSet<String>> {
    mesh.sidecars
        .iter()
        .map(|s| {
            let name = s.def.name;
            (name, mesh.envoy_cert_serials(name).expect("envoy certs"))
        })
        .collect()
}

/// No sidecar's Envoy holds any of the certificates it held `before` (`when`): the data
/// plane holds the new ones, not merely the control plane's books.
#[track_caller]
fn assert_envoy_certs_replaced(
    mesh: &SecureMesh,
    before: &BTreeMap<&'static str, BTreeSet<String>>,
    when: &str,
) {
    for (name, after) in envoy_cert_serials(mesh) {
        let before = before.get(name).cloned().unwrap_or_default();
        assert!(
            after.is_disjoint(&before),
            "{name}'s Envoy still holds a certificate {when}: before {before:?}, now {after:?}"
        );
    }
}

/// TLS handshakes of `client`'s sidecar per TCP target so far.
fn tcp_handshakes(mesh: &SecureMesh, targets: &[Target]) -> BTreeMap<String, u64> {
    targets
        .iter()
        .filter(|t| t.tcp)
        .map(|t| {
            let port = t.outbound.port();
            let n = mesh.tls_handshakes(&t.client, port, t.app).expect("stats");
            (t.label(), n)
        })
        .collect()
}

/// Every TCP request opened a new mTLS connection: the client's sidecar made at least as
/// many TLS handshakes with that port's cluster as requests went through.
#[track_caller]
fn assert_handshake_per_tcp_request(
    mesh: &SecureMesh,
    targets: &[Target],
    before: &BTreeMap<String, u64>,
    report: &TrafficReport,
) {
    let after = tcp_handshakes(mesh, targets);
    for (label, n) in &after {
        let made = n - before.get(label).copied().unwrap_or(0);
        let requests = report.targets.get(label).map_or(0, |t| t.ok);
        eprintln!("{label}: {made} TLS handshakes for {requests} requests");
        assert!(
            made >= requests,
            "{label}: {made} TLS handshakes for {requests} requests: not a fresh mTLS \
             connection per request"
        );
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn strict_refuses_plaintext_permissive_accepts_both() {
    let Some(mut mesh) = start("e2e-sec-strict", vec![CLIENT, REVIEWS]) else {
        return;
    };
    let inbound = mesh.inbound("reviews");
    let plaintext = || http_get(inbound, "/", &[("host", "reviews")]);
    let inbound_tcp = SocketAddr::new(inbound.ip(), REVIEWS.tcp_port.expect("tcp port"));
    let plaintext_tcp = || http_get(inbound_tcp, "/", &[("host", "reviews")]);

    // PERMISSIVE (the default): plaintext straight to the inbound listener is served, and
    // the app sees no client identity...
    let direct = plaintext().expect("plaintext request under PERMISSIVE");
    assert_eq!(direct.status, 200, "plaintext: {}", direct.text());
    assert_eq!(direct.header("x-echo-workload"), Some("reviews"));
    let uris = xfcc_uris(&direct.json().expect("json"));
    assert!(
        uris.is_empty(),
        "plaintext request carried identities {uris:?}"
    );
    // ...and the client sidecar calls the same port with mutual TLS: the app sees who.
    assert_mtls_ok(&mesh, "client", "reviews", "/", N);
    let handshakes = mesh
        .tls_handshakes("client", PORT, "reviews")
        .expect("stats");
    assert!(handshakes > 0, "the client's sidecar made no TLS handshake");
    // The same on the TCP port.
    assert_statuses("plaintext TCP under PERMISSIVE", N, Ok(200), plaintext_tcp);

    // STRICT for the namespace, applied while the client sends (HTTP and TCP).
    let targets = [
        mesh.target("client", "reviews"),
        mesh.tcp_target("client", "reviews"),
    ];
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(20);
    traffic.set_phase("applying STRICT");
    mesh.apply(
        "peer-authentication.yaml",
        &peer_authentication_yaml("STRICT"),
    );
    mesh.wait_statuses("plaintext under STRICT", Err(()), plaintext);
    eprintln!(
        "plaintext under STRICT: {:#}",
        plaintext().expect_err("refused")
    );
    traffic.set_phase("STRICT in effect");
    traffic.wait_for_more(100);
    traffic
        .finish()
        .assert_no_failures("client -> reviews while switching to STRICT");

    // Plaintext gets no HTTP response at all; mTLS from the sidecar keeps working.
    assert_statuses("plaintext under STRICT", N, Err(()), plaintext);
    assert_statuses("plaintext TCP under STRICT", N, Err(()), plaintext_tcp);
    assert_mtls_ok(&mesh, "client", "reviews", "/", 2 * N);
    let tcp = mesh.tcp_target("client", "reviews");
    assert_statuses("client -> reviews TCP under STRICT", N, Ok(200), || {
        call(tcp.outbound, "reviews", "GET", "/", &[])
    });

    // Back to PERMISSIVE: plaintext is served again.
    mesh.apply(
        "peer-authentication.yaml",
        &peer_authentication_yaml("PERMISSIVE"),
    );
    mesh.wait_statuses("plaintext under PERMISSIVE", Ok(200), plaintext);
    assert_statuses("plaintext TCP under PERMISSIVE", N, Ok(200), plaintext_tcp);
    assert_mtls_ok(&mesh, "client", "reviews", "/", N);

    mesh.check_converged()
        .expect("still converged, nothing NACKed");
    mesh.assert_sidecars_running();
}

// ---------------------------------------------------------------------------------------

/// An AuthorizationPolicy `name` for the reviews workloads: `action` on `rules` (the items
/// of `spec.rules`).
fn reviews_policy_yaml(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels: {{app: reviews}}
  action: {action}
  rules:
{rules}"
    )
}

/// reviews: ALLOW `GET` from `allowed` only; DENY `/admin/*` and requests with `x-deny: yes`.
fn reviews_authorization_yaml(allowed: &WorkloadDef) -> String {
    let allow = reviews_policy_yaml(
        "reviews-allow",
        "ALLOW",
        &format!(
            "  - from:
    - source:
        principals: [\"{}\"]
    to:
    - operation:
        methods: [GET]
",
            allowed.principal()
        ),
    );
    let deny = reviews_policy_yaml(
        "reviews-deny",
        "DENY",
        "  - to:
    - operation:
        paths: [\"/admin/*\"]
  - when:
    - key: request.headers[x-deny]
      values: [\"yes\"]
",
    );
    format!("{allow}---\n{deny}")
}

#[test]
fn authorization_allows_one_principal_and_denies_another() {
    let Some(mut mesh) = start("e2e-sec-authz", vec![CLIENT, CLIENT_B, REVIEWS]) else {
        return;
    };
    let (a, b) = (mesh.outbound("client"), mesh.outbound("client-b"));

    // Without a policy both clients get through (so a 403 later is the policy's doing).
    assert_mtls_ok(&mesh, "client", "reviews", "/", N);
    assert_mtls_ok(&mesh, "client-b", "reviews", "/", N);

    mesh.apply("reviews-authz.yaml", &reviews_authorization_yaml(&CLIENT));
    // Every connection opened before the policy is gone once each client sees it.
    mesh.wait_statuses("client-b GET / with the policy", Ok(403), || {
        call(b, "reviews", "GET", "/", &[])
    });
    mesh.wait_statuses("client POST / with the policy", Ok(403), || {
        call(a, "reviews", "POST", "/", &[])
    });

    // The allowed principal gets through, the other one is refused by reviews' sidecar.
    assert_mtls_ok(&mesh, "client", "reviews", "/", N);
    assert_statuses("client-b GET /", N, Ok(403), || {
        call(b, "reviews", "GET", "/", &[])
    });
    // ALLOW is for GET only.
    assert_statuses("client POST /", N, Ok(403), || {
        call(a, "reviews", "POST", "/", &[])
    });
    // DENY by path (a prefix: /adminx is another path) and by header.
    assert_statuses("client GET /admin/users", N, Ok(403), || {
        call(a, "reviews", "GET", "/admin/users", &[])
    });
    assert_mtls_ok(&mesh, "client", "reviews", "/adminx", N);
    assert_statuses("client GET / x-deny: yes", N, Ok(403), || {
        call(a, "reviews", "GET", "/", &[("x-deny", "yes")])
    });
    assert_mtls_ok(&mesh, "client", "reviews", "/", N);
    // Plaintext (PERMISSIVE lets it in) has no principal: not allowed.
    let inbound = mesh.inbound("reviews");
    assert_statuses("plaintext GET / (no principal)", N, Ok(403), || {
        http_get(inbound, "/", &[("host", "reviews")])
    });

    // Removing the policies lets client-b in again.
    std::fs::remove_file(mesh.config_path("reviews-authz.yaml")).expect("remove policy");
    mesh.wait_statuses("client-b GET / without the policy", Ok(200), || {
        call(b, "reviews", "GET", "/", &[])
    });
    assert_mtls_ok(&mesh, "client-b", "reviews", "/", N);

    mesh.check_converged()
        .expect("still converged, nothing NACKed");
    mesh.assert_sidecars_running();
}

// ---------------------------------------------------------------------------------------

const ISSUER: &str = "https://issuer.trellis.test";

/// The reviews RequestAuthentication of [`ISSUER`] with its keys given by `keys`: the
/// rule's `jwks: ...` or `jwksUri: ...` lines.
fn request_authentication_with(keys: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: reviews-jwt
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels: {{app: reviews}}
  jwtRules:
  - issuer: \"{ISSUER}\"
    {keys}
"
    )
}

fn request_authentication_yaml(jwks: &str) -> String {
    // The JWKS is JSON without single quotes: a single-quoted YAML scalar holds it as is.
    request_authentication_with(&format!("jwks: '{jwks}'"))
}

fn remote_request_authentication_yaml(uri: &str) -> String {
    request_authentication_with(&format!("jwksUri: {uri}\n    timeout: 2s"))
}

fn require_jwt_yaml() -> String {
    reviews_policy_yaml(
        "reviews-require-jwt",
        "ALLOW",
        &format!(
            "  - from:
    - source:
        requestPrincipals: [\"{ISSUER}/*\"]
"
        ),
    )
}

#[test]
fn jwt_rule_accepts_valid_rejects_bad_and_missing() {
    let key = JwtKey::generate("test-key");
    // Same key id, another key: a signature the JWKS cannot verify.
    let impostor = JwtKey::generate("test-key");
    let t = now();
    let valid = key.sign(&claims(ISSUER, "alice", t - 10, t + 3600));
    let bad_signature = impostor.sign(&claims(ISSUER, "alice", t - 10, t + 3600));
    // Well beyond Envoy's default clock skew allowance (60 s).
    let expired = key.sign(&claims(ISSUER, "alice", t - 1200, t - 600));

    let files = vec![(
        "reviews-jwt.yaml".to_owned(),
        request_authentication_yaml(&jwks(&[&key])),
    )];
    let Some(mut mesh) = start_with("e2e-sec-jwt", vec![CLIENT, REVIEWS], files, Vec::new()) else {
        return;
    };
    let client = mesh.outbound("client");
    let bearer = |token: &str| format!("Bearer {token}");
    let (valid_h, bad_h, expired_h) = (bearer(&valid), bearer(&bad_signature), bearer(&expired));
    let with = |auth: &str| call(client, "reviews", "GET", "/", &[("authorization", auth)]);
    let without = || call(client, "reviews", "GET", "/", &[]);

    // RequestAuthentication alone: a token must be valid if present; none is fine.
    mesh.wait_statuses("bad signature", Ok(401), || with(&bad_h));
    let check_valid = |what: &str| {
        for i in 0..N {
            let response = with(&valid_h).unwrap_or_else(|e| panic!("{what} {i}: {e:#}"));
            check_mtls(&response, "reviews", &CLIENT.spiffe_id())
                .unwrap_or_else(|e| panic!("{what} {i}: {e:#}"));
        }
    };
    check_valid("valid token");
    assert_statuses("bad signature", N, Ok(401), || with(&bad_h));
    assert_statuses("expired token", N, Ok(401), || with(&expired_h));
    assert_statuses("no token, no policy", N, Ok(200), without);

    // A policy requiring a request principal of the issuer: no token is now 403.
    mesh.apply("reviews-require-jwt.yaml", &require_jwt_yaml());
    mesh.wait_statuses("no token with the policy", Ok(403), without);
    check_valid("valid token with the policy");
    assert_statuses("bad signature with the policy", N, Ok(401), || with(&bad_h));
    assert_statuses("expired token with the policy", N, Ok(401), || {
        with(&expired_h)
    });
    assert_statuses("no token with the policy", N, Ok(403), without);

    mesh.check_converged()
        .expect("still converged, nothing NACKed");
    mesh.assert_sidecars_running();
}

// ---------------------------------------------------------------------------------------

/// The key server's host part: no workload of the tests uses it.
const JWKS_HOST: u8 = 240;
const JWKS_NAME: &str = "jwks.test";

#[test]
fn jwt_rule_with_remote_jwks_fetched_by_the_sidecar() {
    let key = JwtKey::generate("remote-key");
    let other = JwtKey::generate("other-key");
    let t = now();
    let valid = format!(
        "Bearer {}",
        key.sign(&claims(ISSUER, "alice", t - 10, t + 3600))
    );
    let foreign = format!(
        "Bearer {}",
        other.sign(&claims(ISSUER, "alice", t - 10, t + 3600))
    );
    let Some(mut mesh) = start("e2e-sec-jwks", vec![CLIENT, REVIEWS]) else {
        return;
    };
    // The key server: the echo app serving a JWKS file, on its own loopback address.
    let jwks_file = mesh.dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).expect("writing the JWKS");
    let jwks_ip = mesh.net.ip(JWKS_HOST);
    let jwks_addr = SocketAddr::new(jwks_ip, free_port(jwks_ip).expect("a free port"));
    let server = start_file_server(
        mesh.dir.path(),
        jwks_addr,
        "jwks",
        &[("/jwks.json", jwks_file.as_path())],
    )
    .expect("key server");
    mesh.echos.push(server);
    let (dns, dns_addr) =
        start_dns(mesh.dir.path(), mesh.net.ip(1), &[(JWKS_NAME, jwks_ip)]).expect("dns server");

    mesh.apply(
        MESH_FILE,
        &format!("{}  dnsResolvers: [\"{dns_addr}\"]\n", mesh_yaml()),
    );
    let uri = format!("http://{JWKS_NAME}:{}/jwks.json", jwks_addr.port());
    mesh.apply(
        "reviews-jwt.yaml",
        &remote_request_authentication_yaml(&uri),
    );

    let client = mesh.outbound("client");
    let with = |auth: &str| call(client, "reviews", "GET", "/", &[("authorization", auth)]);
    // Refused until the listener with the provider is in place; accepted once the
    // sidecar has the keys.
    mesh.wait_statuses("token of another key", Ok(401), || with(&foreign));
    mesh.wait_statuses("token of the served key", Ok(200), || with(&valid));
    for i in 0..N {
        let response = with(&valid).unwrap_or_else(|e| panic!("valid token {i}: {e:#}"));
        check_mtls(&response, "reviews", &CLIENT.spiffe_id())
            .unwrap_or_else(|e| panic!("valid token {i}: {e:#}"));
    }
    assert_statuses("token of another key", N, Ok(401), || with(&foreign));
    assert_statuses("no token", N, Ok(200), || {
        call(client, "reviews", "GET", "/", &[])
    });

    // The reviews sidecar resolved the name through the mesh's resolver and fetched the
    // keys itself; the control plane fetched nothing.
    let dns_log = dns.log();
    assert!(
        dns_log.contains(&format!("asked {JWKS_NAME} type 1")),
        "{dns_log}"
    );
    let served = mesh.echos.last().map(|s| s.log()).unwrap_or_default();
    assert!(served.contains("served file"), "{served}");
    mesh.check_converged()
        .expect("still converged, nothing NACKed");
    mesh.assert_sidecars_running();
}

// ---------------------------------------------------------------------------------------

/// Workload certificate lifetime in the renewal test: renewed about every 10 s.
const SHORT_CERT_TTL: &str = "20s";
/// Traffic runs at least this long, and until every proxy's certificate changed twice
/// (bounded by [`RENEWAL_MAX_RUN`]).
const RENEWAL_RUN: Duration = Duration::from_secs(35);
const RENEWAL_MAX_RUN: Duration = Duration::from_secs(90);
const SERIALS_WANTED: usize = 3;

#[test]
fn zero_failed_requests_through_cert_renewal() {
    let Some(mut mesh) = start_with(
        "e2e-sec-renewal",
        vec![CLIENT, REVIEWS, RATINGS],
        Vec::new(),
        vec!["--workload-cert-ttl".to_owned(), SHORT_CERT_TTL.to_owned()],
    ) else {
        return;
    };
    let names: Vec<&str> = mesh.sidecars.iter().map(|s| s.def.name).collect();
    let envoy_before = envoy_cert_serials(&mesh);

    let targets = traffic_targets(&mesh, "client");
    let handshakes_before = tcp_handshakes(&mesh, &targets);
    let traffic = Traffic::start(&targets);
    traffic.set_phase("certificates renewing");
    // workload -> serials in the order seen.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut samples = 0;
    let mut sample_errors = Vec::new();
    let started = Instant::now();
    loop {
        match mesh.certs() {
            Ok(certs) => {
                samples += 1;
                let now_s = now();
                for (workload, cert) in certs {
                    if let Some(not_after) = cert.not_after.map(as_unix_seconds) {
                        assert!(
                            not_after + 1 >= now_s,
                            "{workload} holds an expired certificate ({cert:?}, now {now_s})"
                        );
                    }
                    let serials = seen.entry(workload).or_default();
                    if serials.last() != Some(&cert.serial) {
                        serials.push(cert.serial);
                    }
                }
            }
            Err(e) => sample_errors.push(format!("{e:#}")),
        }
        let enough = seen.len() == names.len() && seen.values().all(|s| s.len() >= SERIALS_WANTED);
        if (started.elapsed() >= RENEWAL_RUN && enough) || started.elapsed() >= RENEWAL_MAX_RUN {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let report = traffic.finish();
    let seen_summary: BTreeMap<&String, String> = seen
        .iter()
        .map(|(w, s)| {
            let shown: Vec<&str> = s.iter().take(6).map(String::as_str).collect();
            (w, format!("{} certificates: {shown:?}", s.len()))
        })
        .collect();
    eprintln!(
        "ran {:.1?}: {samples} syncz samples ({} failed); {seen_summary:#?}",
        started.elapsed(),
        sample_errors.len()
    );
    report.assert_no_failures("mTLS traffic through certificate renewal");
    assert_handshake_per_tcp_request(&mesh, &targets, &handshakes_before, &report);
    assert!(
        sample_errors.len() <= samples / 10,
        "/debug/syncz failed {} times: {:?}",
        sample_errors.len(),
        sample_errors.iter().take(5).collect::<Vec<_>>()
    );
    // Renewed at about half the lifetime: at most one renewal per 8 s (with slack) over the
    // run, or the server is re-issuing in a loop.
    let at_most = usize::try_from(started.elapsed().as_secs() / 8).unwrap_or(usize::MAX) + 2;
    for name in &names {
        let workload = format!("{name}.{NAMESPACE}");
        let serials = seen.get(&workload).cloned().unwrap_or_default();
        assert!(
            serials.len() <= at_most,
            "{workload}: {} different certificates seen in {:.1?} with a {SHORT_CERT_TTL} TTL \
             (at most {at_most} expected): renewing far more often than at half-life; \
             server log tail:\n{}",
            serials.len(),
            started.elapsed(),
            mesh.server
                .as_ref()
                .map(|s| s.log_tail(5))
                .unwrap_or_default()
        );
        assert!(
            serials.len() >= SERIALS_WANTED,
            "{workload}: certificate changed {} times in {:.1?} with a {SHORT_CERT_TTL} TTL \
             (expected at least {}): {serials:?}",
            serials.len().saturating_sub(1),
            started.elapsed(),
            SERIALS_WANTED - 1
        );
    }

    assert_envoy_certs_replaced(&mesh, &envoy_before, "from the start");
    // Issued with the short TTL.
    let ttl = xds_ttl_secs(SHORT_CERT_TTL);
    for (workload, cert) in mesh.certs().expect("certs") {
        if let Some(not_after) = cert.not_after.map(as_unix_seconds) {
            assert!(
                not_after <= now() + ttl + 5,
                "{workload}: certificate valid until {not_after}, beyond now + {SHORT_CERT_TTL}"
            );
        }
    }
    mesh.check_converged().expect("still converged");
    mesh.assert_sidecars_running();
}

/// `cert_not_after` as seconds, whether reported in seconds or milliseconds.
fn as_unix_seconds(t: u64) -> u64 {
    if t > 100_000_000_000 {
        t / 1000
    } else {
        t
    }
}

fn xds_ttl_secs(ttl: &str) -> u64 {
    ttl.trim_end_matches('s').parse().expect("ttl in seconds")
}

// ---------------------------------------------------------------------------------------

/// The single root of `/debug/ca`, asserting there is exactly one and no rotation runs.
#[track_caller]
fn single_root(ca: &serde_json::Value) -> String {
    let roots = ca["roots"].as_array().expect("roots is an array");
    assert_eq!(roots.len(), 1, "expected one root: {ca}");
    assert!(ca["rotation"].is_null(), "a rotation is running: {ca}");
    roots[0]["fingerprint"]
        .as_str()
        .expect("root fingerprint")
        .to_owned()
}

#[test]
fn zero_failed_requests_through_root_rotation() {
    let Some(mut mesh) = start(
        "e2e-sec-rotation",
        vec![CLIENT, CLIENT_LATE, REVIEWS, RATINGS],
    ) else {
        return;
    };
    let names: Vec<&str> = mesh.sidecars.iter().map(|s| s.def.name).collect();
    let ca_before = mesh.ca().expect("/debug/ca");
    let old_root = single_root(&ca_before);
    let certs_before = mesh.certs().expect("certs");
    for (workload, cert) in &certs_before {
        assert_eq!(
            cert.root.as_deref(),
            Some(old_root.as_str()),
            "{workload}'s certificate is not from the root {old_root}: {cert:?}"
        );
    }
    let envoy_before = envoy_cert_serials(&mesh);

    let targets = traffic_targets(&mesh, "client");
    let handshakes_before = tcp_handshakes(&mesh, &targets);
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(50);
    traffic.set_phase("xds-server ca rotate-root");
    common::rotate_root(mesh.admin_addr).unwrap_or_else(|e| panic!("{e:#}"));
    traffic.set_phase("after the rotation");
    traffic.wait_for_more(100);
    let report = traffic.finish();
    report.assert_no_failures("mTLS traffic through root rotation");
    assert_handshake_per_tcp_request(&mesh, &targets, &handshakes_before, &report);

    // One root again, a new one, and every proxy's certificate is from it.
    let ca_after = mesh.ca().expect("/debug/ca");
    let new_root = single_root(&ca_after);
    assert_ne!(new_root, old_root, "the root did not change: {ca_after}");
    assert!(
        ca_after["pending"].as_array().is_none_or(Vec::is_empty),
        "proxies still pending after the rotation: {ca_after}"
    );
    let certs_after = mesh.certs().expect("certs");
    assert_eq!(certs_after.len(), names.len(), "{certs_after:?}");
    for (workload, cert) in &certs_after {
        assert_eq!(
            cert.root.as_deref(),
            Some(new_root.as_str()),
            "{workload}'s certificate is not from the new root: {cert:?}"
        );
        assert_ne!(
            Some(&cert.serial),
            certs_before.get(workload).map(|c| &c.serial),
            "{workload}'s certificate was not re-issued"
        );
        assert_eq!(
            cert.epoch_acked,
            ca_after["epoch"].as_u64(),
            "{workload} has not ACKed the current trust epoch: {cert:?}, {ca_after}"
        );
    }
    assert_envoy_certs_replaced(&mesh, &envoy_before, "from the old root");

    // Fresh connections after the rotation: a new sidecar (no pooled connections) gets a
    // certificate from the new root and calls both services, which present theirs.
    mesh.start_sidecar("client-late").expect("late client");
    for app in ["reviews", "ratings"] {
        assert_mtls_ok(&mesh, "client-late", app, "/", N);
        assert_mtls_ok(&mesh, "client", app, "/", N);
        for client in ["client-late", "client"] {
            let tcp = mesh.tcp_target(client, app);
            assert_statuses(&tcp.label(), N, Ok(200), || {
                call(tcp.outbound, app, "GET", "/", &[])
            });
        }
    }
    let certs = mesh.certs().expect("certs");
    let late = &certs["client-late.default"];
    assert_eq!(late.root.as_deref(), Some(new_root.as_str()), "{late:?}");
    let handshakes = mesh
        .tls_handshakes("client-late", PORT, "reviews")
        .expect("stats");
    assert!(
        handshakes > 0,
        "client-late made no TLS handshake to reviews"
    );

    mesh.check_converged().expect("still converged");
    mesh.assert_sidecars_running();
    // The plaintext path is unaffected by the CA (PERMISSIVE).
    let direct = http_request(
        mesh.inbound("reviews"),
        "GET",
        "/",
        &[("host", "reviews")],
        &[],
        Duration::from_secs(3),
    )
    .expect("plaintext");
    assert_eq!(direct.status, 200);
}
