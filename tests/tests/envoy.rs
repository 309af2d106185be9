//! The helpers against a real Envoy: bootstrap written and accepted, traffic proxied to the
//! echo app, several Envoys side by side, validation of a bad config.

use std::path::Path;
use std::time::Duration;

use trellis_tests::{
    envoy_admin_get, envoy_validate, eventually, free_addr, http_get, require_envoy,
    start_echo_bin, start_envoy, static_proxy_bootstrap, test_dir, wait_envoy_admin,
    wait_envoy_live, AdsBootstrap, ENVOY_START_TIMEOUT, LOCALHOST,
};

fn echo_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_echo"))
}

#[test]
fn two_envoys_proxy_to_echo_side_by_side() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let dir = test_dir("envoy-proxy").expect("temp dir");
    let echo_addr = free_addr(LOCALHOST).expect("free addr");
    let _echo =
        start_echo_bin(echo_bin(), dir.path(), echo_addr, "productpage", "v1").expect("echo");

    let mut proxies = Vec::new();
    for i in 0..2 {
        let admin = free_addr(LOCALHOST).expect("free addr");
        let listener = free_addr(LOCALHOST).expect("free addr");
        let bootstrap = static_proxy_bootstrap(admin, listener, "productpage", echo_addr);
        let mut envoy = start_envoy(&envoy_bin, dir.path(), &format!("envoy-{i}"), &bootstrap)
            .expect("start envoy");
        wait_envoy_live(&mut envoy, admin, ENVOY_START_TIMEOUT).expect("envoy live");
        proxies.push((envoy, admin, listener));
    }

    for (envoy, admin, listener) in &proxies {
        let response = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            http_get(*listener, "/reviews/1", &[("host", "productpage")])
        });
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("x-echo-workload"), Some("productpage"));
        let body = response.json().expect("json");
        assert_eq!(body["path"], "/reviews/1");
        // Proof that the request went through Envoy rather than straight to echo.
        assert!(
            body["headers"]["x-request-id"].is_string(),
            "{body}\n{}",
            envoy.log_tail(20)
        );

        let stats = envoy_admin_get(
            *admin,
            "/stats?filter=cluster.productpage.upstream_rq_total",
        )
        .expect("stats");
        assert!(
            stats.text().contains("upstream_rq_total: 1"),
            "{}",
            stats.text()
        );
    }
}

#[test]
fn validate_accepts_generated_bootstraps_and_rejects_bad_ones() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let dir = test_dir("envoy-validate").expect("temp dir");
    let admin = free_addr(LOCALHOST).expect("free addr");
    let other = free_addr(LOCALHOST).expect("free addr");

    let mut ads = AdsBootstrap::new(
        "sidecar~127.0.0.1~reviews-v1.default",
        "reviews",
        admin,
        other,
    );
    ads.node_metadata = serde_json::json!({"NAMESPACE": "default"});
    envoy_validate(&envoy_bin, dir.path(), "ads", &ads.to_yaml()).expect("ADS bootstrap");
    envoy_validate(
        &envoy_bin,
        dir.path(),
        "static",
        &static_proxy_bootstrap(admin, other, "svc", other),
    )
    .expect("static bootstrap");

    let err = envoy_validate(&envoy_bin, dir.path(), "bad", "admin: {bogus: 1}\n")
        .expect_err("must be rejected");
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn ads_bootstrap_starts_and_waits_for_its_control_plane() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let dir = test_dir("envoy-ads").expect("temp dir");
    let admin = free_addr(LOCALHOST).expect("free addr");
    // Nothing listens at the xDS address: Envoy must still start and serve admin.
    let xds = free_addr(LOCALHOST).expect("free addr");
    let bootstrap = AdsBootstrap::new("node-1", "test", admin, xds).to_yaml();
    let mut envoy = start_envoy(&envoy_bin, dir.path(), "envoy", &bootstrap).expect("start");
    wait_envoy_admin(&mut envoy, admin, ENVOY_START_TIMEOUT).expect("admin up");

    let info = envoy_admin_get(admin, "/server_info").expect("server_info");
    let info = info.json().expect("json");
    assert_eq!(info["node"]["id"], "node-1");
    assert_eq!(info["command_line_options"]["disable_hot_restart"], true);
}

#[test]
fn early_exit_fails_fast_with_the_log() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let dir = test_dir("envoy-bad").expect("temp dir");
    let admin = free_addr(LOCALHOST).expect("free addr");
    let mut envoy = start_envoy(
        &envoy_bin,
        dir.path(),
        "envoy",
        "static_resources: {nope: 1}\n",
    )
    .expect("spawn");
    let started = std::time::Instant::now();
    let err = wait_envoy_admin(&mut envoy, admin, ENVOY_START_TIMEOUT).expect_err("bad config");
    assert!(started.elapsed() < ENVOY_START_TIMEOUT);
    assert!(err.to_string().contains("nope"), "{err}");
}
