//! End to end: VirtualService HTTP features with real Envoy sidecars and real traffic:
//! fault injection (delay, abort ratio), mirroring to a shadow, rewrites, redirect,
//! direct response, CORS preflights, header changes seen by the app and the client, and
//! rules for callers picked by `sourceLabels`; a root VirtualService delegating to another
//! (VirtualService chaining) as its delegate file comes, goes and comes back; WebSocket
//! upgrades through both sidecars.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    call, reviews_virtual_service, served_version, Mesh, Mode, SidecarMesh, EDIT_TIMEOUT,
    NAMESPACE, POLL, PORT, VIRTUAL_SERVICE_FILE,
};
use trellis_tests::{eventually, require_envoy, HttpResponse};

const DELAY: Duration = Duration::from_millis(300);
const TIMER_GRANULARITY: Duration = Duration::from_millis(2);

/// reviews with one rule per feature; plain requests still split 80/20 (`default`).
fn features_yaml() -> String {
    reviews_virtual_service(&format!(
        r#"  - name: delay
    match: [{{headers: {{x-fault: {{exact: delay}}}}}}]
    fault: {{delay: {{fixedDelay: {delay}ms, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: abort
    match: [{{headers: {{x-fault: {{exact: abort}}}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: mirror
    match: [{{uri: {{prefix: /mirror}}}}]
    mirror: {{host: ratings}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: rewrite
    match: [{{uri: {{prefix: /old}}}}]
    rewrite: {{uri: /new, authority: rewritten.example}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: regex-rewrite
    match: [{{uri: {{regex: "/re/.*"}}}}]
    rewrite: {{uriRegexRewrite: {{match: "^/re/(.*)$", rewrite: '/regex/\1'}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: redirect
    match: [{{uri: {{exact: /redirect}}}}]
    redirect: {{uri: /moved, authority: ratings, redirectCode: 307}}
  - name: direct
    match: [{{uri: {{exact: /direct}}}}]
    directResponse: {{status: 418, body: {{string: teapot}}}}
  - name: cors
    match: [{{uri: {{prefix: /cors}}}}]
    corsPolicy:
      allowOrigins: [{{exact: "https://example.com"}}]
      allowMethods: [GET, POST]
      allowHeaders: [content-type, x-custom]
      exposeHeaders: [x-exposed]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - name: headers
    match: [{{uri: {{prefix: /headers}}}}]
    headers:
      request:
        set: {{x-set: by-route}}
        add: {{x-add: by-route}}
        remove: [x-remove]
      response:
        set: {{x-resp-set: by-route}}
        add: {{x-resp-add: by-route}}
        remove: [x-echo-workload]
    route:
    - destination: {{host: reviews, subset: v2}}
      headers:
        request: {{set: {{x-destination: v2}}}}
  - name: canary
    match:
    - sourceLabels: {{app: client}}
      headers: {{x-canary: {{exact: "1"}}}}
    - sourceLabels: {{app: somebody-else}}
      headers: {{x-canary: {{exact: "2"}}}}
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: default
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: 80
    - destination: {{host: reviews, subset: v2}}
      weight: 20
"#,
        delay = DELAY.as_millis()
    ))
}

fn get(client: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    call(client, "reviews", "GET", path, headers).expect("request")
}

#[track_caller]
fn reviews_version(response: &HttpResponse) -> String {
    served_version(response, "reviews").expect("answered by reviews")
}

/// What the echo app received, from its JSON answer.
fn echoed(response: &HttpResponse) -> serde_json::Value {
    assert_eq!(response.status, 200, "{}", response.text());
    response.json().expect("echo json")
}

fn fault_injection(client: SocketAddr) {
    for _ in 0..3 {
        let started = Instant::now();
        let response = get(client, "/", &[("x-fault", "delay")]);
        let took = started.elapsed();
        assert_eq!(reviews_version(&response), "v1");
        // Envoy's timers tick in whole milliseconds on its own clock: one can fire a
        // hair before the delay as this process measures it.
        assert!(
            took + TIMER_GRANULARITY >= DELAY,
            "delayed request took only {took:?}"
        );
    }

    let n = 200;
    let mut aborted = 0;
    for _ in 0..n {
        match get(client, "/", &[("x-fault", "abort")]).status {
            503 => aborted += 1,
            200 => {}
            other => panic!("abort rule answered {other}"),
        }
    }
    assert!(
        (60..=140).contains(&aborted),
        "{aborted} of {n} requests aborted, expected about half"
    );
}

fn mirroring(mesh: &Mesh, client: SocketAddr) {
    let response = get(client, "/mirror/1", &[]);
    assert_eq!(reviews_version(&response), "v1");
    // The copy's response is dropped; ratings' echo log shows it arrived, with Envoy's
    // `-shadow` suffix on the host.
    let ratings = mesh
        .echos
        .iter()
        .find(|e| e.name().contains("ratings"))
        .expect("ratings echo");
    eventually(EDIT_TIMEOUT, POLL, || {
        let log = ratings.log();
        let seen = log
            .lines()
            .any(|l| l.contains("/mirror/1") && l.contains("reviews-shadow"));
        if seen {
            Ok(())
        } else {
            Err(format!(
                "no mirrored request in ratings' log:\n{}",
                ratings.log_tail(10)
            ))
        }
    });
}

fn rewrites_redirect_and_direct_response(client: SocketAddr) {
    let body = echoed(&get(client, "/old/page", &[]));
    assert_eq!(body["path"], "/new/page", "{body}");
    assert_eq!(body["authority"], "rewritten.example", "{body}");

    let body = echoed(&get(client, "/re/deep/path", &[]));
    assert_eq!(body["path"], "/regex/deep/path", "{body}");

    let response = get(client, "/redirect", &[]);
    assert_eq!(response.status, 307, "{response:?}");
    assert_eq!(
        response.header("location"),
        Some("http://ratings/moved"),
        "{response:?}"
    );

    let response = get(client, "/direct", &[]);
    assert_eq!(response.status, 418);
    assert_eq!(response.text(), "teapot");
}

fn cors(client: SocketAddr) {
    let preflight = call(
        client,
        "reviews",
        "OPTIONS",
        "/cors/items",
        &[
            ("origin", "https://example.com"),
            ("access-control-request-method", "POST"),
        ],
    )
    .expect("preflight");
    assert_eq!(preflight.status, 200, "{preflight:?}");
    let header = |name| preflight.header(name).unwrap_or_default().to_owned();
    assert_eq!(header("access-control-allow-origin"), "https://example.com");
    assert_eq!(header("access-control-allow-methods"), "GET,POST");
    assert_eq!(
        header("access-control-allow-headers"),
        "content-type,x-custom"
    );
    assert_eq!(header("access-control-max-age"), "86400");
    assert_eq!(header("access-control-allow-credentials"), "true");
    assert!(
        preflight.header("x-echo-workload").is_none(),
        "Envoy answers the preflight itself: {preflight:?}"
    );

    let other = call(
        client,
        "reviews",
        "OPTIONS",
        "/cors/items",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .expect("preflight");
    assert!(
        other.header("access-control-allow-origin").is_none(),
        "{other:?}"
    );

    let actual = get(client, "/cors/items", &[("origin", "https://example.com")]);
    assert_eq!(reviews_version(&actual), "v1");
    assert_eq!(
        actual.header("access-control-allow-origin"),
        Some("https://example.com")
    );
    assert_eq!(
        actual.header("access-control-expose-headers"),
        Some("x-exposed")
    );
}

fn headers(client: SocketAddr) {
    let response = get(
        client,
        "/headers",
        &[
            ("x-set", "by-client"),
            ("x-add", "by-client"),
            ("x-remove", "by-client"),
        ],
    );
    assert_eq!(response.header("x-echo-version"), Some("v2"));
    let body = echoed(&response);
    let seen = &body["headers"];
    assert_eq!(seen["x-set"], "by-route", "{body}");
    assert_eq!(seen["x-add"], "by-client, by-route", "{body}");
    assert!(seen.get("x-remove").is_none(), "{body}");
    assert_eq!(seen["x-destination"], "v2", "{body}");
    assert_eq!(response.header("x-resp-set"), Some("by-route"));
    assert_eq!(response.header("x-resp-add"), Some("by-route"));
    assert!(
        response.header("x-echo-workload").is_none(),
        "removed from the response: {response:?}"
    );
}

fn source_labels(client: SocketAddr) {
    // The client workload (app: client) is picked by the first match only.
    for _ in 0..20 {
        let response = get(client, "/", &[("x-canary", "1")]);
        assert_eq!(reviews_version(&response), "v2");
    }
    let mut versions = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let response = get(client, "/", &[("x-canary", "2")]);
        versions.insert(reviews_version(&response));
    }
    assert!(
        versions.contains("v1"),
        "x-canary: 2 is not for this caller: {versions:?}"
    );
}

#[test]
fn virtual_service_http_features() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mesh = Mesh::start(&envoy_bin, "e2e-vs-features", Mode::Sotw).expect("mesh");
    let client = mesh.client();
    mesh.replace_config(VIRTUAL_SERVICE_FILE, &features_yaml());
    eventually(EDIT_TIMEOUT, POLL, || {
        let status = call(client, "reviews", "GET", "/direct", &[])?.status;
        anyhow::ensure!(status == 418, "/direct answered {status}, not yet 418");
        Ok(())
    });
    mesh.check_converged(true).expect("converged");

    fault_injection(client);
    mirroring(&mesh, client);
    rewrites_redirect_and_direct_response(client);
    cors(client);
    headers(client);
    source_labels(client);
    mesh.check_converged(true).expect("still converged");
}

/// The delegate of [`delegating_root_yaml`]'s `/api` rule: `/api/v2...` to v2, the rest
/// of `/api` to v1. It has no hosts, so it routes only through a root.
const DELEGATE_FILE: &str = "reviews-api-delegate.yaml";

fn delegate_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-api
  namespace: {NAMESPACE}
spec:
  http:
  - name: v2
    match: [{{uri: {{prefix: /api/v2}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: rest
    route: [{{destination: {{host: reviews, subset: v1}}}}]
"
    )
}

/// reviews: `/api` handed to the delegate `reviews-api` (with a header of the root's),
/// everything else to v1 (with Istio's deprecated `websocketUpgrade`, accepted).
fn delegating_root_yaml() -> String {
    reviews_virtual_service(
        "  - name: api
    match: [{uri: {prefix: /api}}]
    headers: {request: {set: {x-root: api}}}
    delegate: {name: reviews-api}
  - name: default
    websocketUpgrade: true
    route: [{destination: {host: reviews, subset: v1}}]
",
    )
}

/// The warnings of `/debug/configz` as (object, field).
fn configz_warnings(mesh: &Mesh) -> anyhow::Result<Vec<(String, String)>> {
    let configz = mesh.configz()?;
    let list = configz["warnings"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no warnings list in {configz}"))?;
    Ok(list
        .iter()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
            (s("object"), s("field"))
        })
        .collect())
}

fn version_of(client: SocketAddr, path: &str) -> anyhow::Result<String> {
    served_version(&call(client, "reviews", "GET", path, &[])?, "reviews")
}

/// Waits until `path` is served by reviews `version`.
fn wait_version(client: SocketAddr, path: &str, version: &str) {
    eventually(EDIT_TIMEOUT, POLL, || {
        let got = version_of(client, path)?;
        anyhow::ensure!(got == version, "{path} served by {got}, not yet {version}");
        Ok(())
    });
}

#[test]
fn delegate_virtual_service_chain_and_websocket_upgrade() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mesh = Mesh::start(&envoy_bin, "e2e-vs-delegate", Mode::Sotw).expect("mesh");
    let client = mesh.client();
    mesh.replace_config(DELEGATE_FILE, &delegate_yaml());
    mesh.replace_config(VIRTUAL_SERVICE_FILE, &delegating_root_yaml());
    wait_version(client, "/api/v2/items", "v2");
    mesh.check_converged(true).expect("converged");

    // The chain: the delegate's rules within the root's /api, the root's header on them.
    for _ in 0..20 {
        assert_eq!(version_of(client, "/api/v2/items").unwrap(), "v2");
        assert_eq!(version_of(client, "/api/v1/items").unwrap(), "v1");
        assert_eq!(version_of(client, "/v2/items").unwrap(), "v1");
    }
    let body = echoed(&get(client, "/api/v2/items", &[]));
    assert_eq!(body["headers"]["x-root"], "api", "{body}");
    assert!(configz_warnings(&mesh).unwrap().is_empty());
    websocket_upgrade(&mesh, client);

    // Without its delegate the root's /api rule routes nothing: /api falls through to
    // the root's other rule, which still works, and configz names the missing delegate.
    std::fs::remove_file(mesh.config_path(DELEGATE_FILE)).expect("remove delegate");
    wait_version(client, "/api/v2/items", "v1");
    let body = echoed(&get(client, "/api/v2/items", &[]));
    assert!(body["headers"].get("x-root").is_none(), "{body}");
    let warnings = configz_warnings(&mesh).unwrap();
    assert_eq!(
        warnings,
        [(
            format!("VirtualService {NAMESPACE}/reviews"),
            "spec.http[0].delegate".to_owned()
        )]
    );
    let configz = mesh.configz().unwrap();
    assert!(
        configz["warnings"][0]["message"].as_str().is_some_and(
            |m| m.contains("delegate VirtualService default/reviews-api does not exist")
        ),
        "{configz}"
    );
    assert_eq!(
        configz["errors"].as_array().map(Vec::len),
        Some(0),
        "{configz}"
    );

    // A delegate that appears later takes effect on that reload.
    mesh.replace_config(DELEGATE_FILE, &delegate_yaml());
    wait_version(client, "/api/v2/items", "v2");
    eventually(EDIT_TIMEOUT, POLL, || {
        let w = configz_warnings(&mesh)?;
        anyhow::ensure!(w.is_empty(), "warnings left: {w:?}");
        Ok(())
    });
    mesh.check_converged(true).expect("still converged");
}

/// Like istiod's, every connection manager allows WebSocket upgrades (so Istio's
/// deprecated `websocketUpgrade` is accepted and ignored): an upgrade request passes the
/// client's sidecar (outbound) and reviews' (inbound) as an upgrade, where a connection
/// manager without the upgrade config answers 403 itself. (The echo app answers it as a
/// plain request; the sidecars count the upgrade.)
fn websocket_upgrade(mesh: &Mesh, client: SocketAddr) {
    let upgrades = |sidecar: &str, direction: &str| {
        let stat = format!("http.{direction}_{PORT}.downstream_cx_upgrades_total");
        mesh.envoy_stat(sidecar, &stat).expect("stats")
    };
    let before = (
        upgrades("client", "outbound"),
        upgrades("reviews-v1", "inbound"),
    );
    let response = get(
        client,
        "/socket",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    );
    assert_eq!(reviews_version(&response), "v1", "{response:?}");
    eventually(EDIT_TIMEOUT, POLL, || {
        let now = (
            upgrades("client", "outbound"),
            upgrades("reviews-v1", "inbound"),
        );
        anyhow::ensure!(
            now.0 > before.0 && now.1 > before.1,
            "upgrades (outbound, inbound) went from {before:?} to {now:?}"
        );
        Ok(())
    });
}
