//! End to end: Istio's local rate limit task (an EnvoyFilter inserting Envoy's
//! `local_ratelimit` before the router of a sidecar's inbound listener) applied to a
//! running mesh returns 429s to real traffic once its token bucket is empty; an
//! EnvoyFilter Envoy rejects (a filter after the router, a typed config Envoy refuses
//! when it builds the filter) is a NACK in `/debug/syncz`, the sidecar keeps serving its
//! last good listeners, and undoing the edit heals.

mod common;

use std::time::Duration;

use common::{send, Drain, Mesh, Mode, SidecarMesh, EDIT_TIMEOUT, POLL};
use trellis_tests::{envoy_admin_get, eventually, require_envoy};

/// The task's EnvoyFilter, unchanged but for the selector (the mesh's ratings app).
const RATE_LIMIT: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-local-ratelimit-svc
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      app: ratings
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket:
                max_tokens: 4
                tokens_per_fill: 4
                fill_interval: 60s
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              response_headers_to_add:
                - append: false
                  header:
                    key: x-local-rate-limit
                    value: 'true'
"#;

/// Accepted by the server (every field is Envoy's), refused by Envoy: a filter after the
/// terminal router.
const AFTER_ROUTER: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: after-router
  namespace: default
spec:
  workloadSelector:
    labels: {app: ratings}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter:
              name: envoy.filters.network.http_connection_manager
      patch:
        operation: ADD
        value:
          name: envoy.filters.http.cors
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
"#;

/// The HTTP filter names of every connection manager of `admin`'s active inbound
/// listeners, one list per filter chain.
fn inbound_http_filters(admin: std::net::SocketAddr) -> anyhow::Result<Vec<Vec<String>>> {
    let dump = envoy_admin_get(admin, "/config_dump?resource=dynamic_listeners")?.json()?;
    let mut out = Vec::new();
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    for listener in configs.iter().map(|c| &c["active_state"]["listener"]) {
        if listener["traffic_direction"] != "INBOUND" {
            continue;
        }
        for chain in listener["filter_chains"].as_array().into_iter().flatten() {
            for filter in chain["filters"].as_array().into_iter().flatten() {
                if let Some(http) = filter["typed_config"]["http_filters"].as_array() {
                    out.push(
                        http.iter()
                            .filter_map(|f| f["name"].as_str().map(str::to_owned))
                            .collect(),
                    );
                }
            }
        }
    }
    Ok(out)
}

fn status(mesh: &Mesh) -> anyhow::Result<(u16, bool)> {
    let r = send(mesh.client(), "/ratings/1", &[("host", "ratings")])?;
    let limited = r.header("x-local-rate-limit") == Some("true");
    Ok((r.status, limited))
}

fn rate_limit_and_nack(mode: Mode) {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let name = format!("e2e-envoy-filter-{}", mode.as_str());
    // The patch replaces the ratings sidecar's inbound filter chain. The client sidecar
    // keeps its connection to that listener alive; with Envoy's default drain (gradual
    // over 600 s) that connection would go on under the old chain, without the rate
    // limit, for minutes. Istio's agent runs Envoy draining immediately: the old chain
    // serves at most one more request per connection.
    let mut mesh = Mesh::start_with(&envoy_bin, &name, mode, Drain::LikeIstio).expect("mesh");
    for _ in 0..10 {
        assert_eq!(status(&mesh).expect("request").0, 200);
    }

    mesh.replace_config("ratelimit.yaml", RATE_LIMIT);
    let admin = mesh.sidecar("ratings-v1").admin;
    eventually(EDIT_TIMEOUT, POLL, || {
        let chains = inbound_http_filters(admin)?;
        anyhow::ensure!(
            !chains.is_empty()
                && chains.iter().all(|c| c.ends_with(&[
                    "envoy.filters.http.local_ratelimit".to_owned(),
                    "envoy.filters.http.router".to_owned(),
                ])),
            "the ratings sidecar's inbound chains have no rate limit before the router yet: {chains:?}"
        );
        anyhow::Ok(())
    });
    mesh.wait_converged(EDIT_TIMEOUT).expect("converged");

    // A burst: the bucket's 4 tokens let the first requests through (one more may be
    // served by a connection of the old listener, closed after it), then 429s.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let s = status(&mesh).expect("request");
        statuses.push(s);
        if s.0 == 429 {
            break;
        }
    }
    let ok = statuses.iter().filter(|s| s.0 == 200).count();
    assert!(
        (1..=5).contains(&ok),
        "200s before the first 429: {statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&(429, true)), "{statuses:?}");
    // The bucket refills only after 60 s: the rest of the burst is limited.
    for _ in 0..10 {
        assert_eq!(status(&mesh).expect("request"), (429, true));
    }
    let limited = mesh
        .envoy_stat(
            "ratings-v1",
            "http_local_rate_limiter.http_local_rate_limit.rate_limited",
        )
        .expect("stats");
    assert!(limited >= 11, "rate_limited: {limited}");

    // An EnvoyFilter Envoy refuses (a filter after the terminal router): a NACK of the
    // ratings sidecar's listeners, which keeps its last good ones.
    mesh.replace_config("after-router.yaml", AFTER_ROUTER);
    expect_lds_nack(&mesh, 1, "must be the last filter");
    std::fs::remove_file(mesh.config_path("after-router.yaml")).expect("remove");
    eventually(Duration::from_secs(30), POLL, || mesh.check_converged(true));
    assert_eq!(status(&mesh).expect("request"), (429, true));

    // A typed config that passes the API's schema but that Envoy refuses when it builds
    // the filter (a token bucket refilled faster than every 50 ms).
    mesh.replace_config(
        "ratelimit.yaml",
        &RATE_LIMIT.replace("fill_interval: 60s", "fill_interval: 0.01s"),
    );
    expect_lds_nack(&mesh, 2, "fill");
    mesh.replace_config("ratelimit.yaml", RATE_LIMIT);
    eventually(Duration::from_secs(30), POLL, || mesh.check_converged(true));
    assert_eq!(status(&mesh).expect("request"), (429, true));
}

/// Waits for the ratings sidecar's `nacks`th LDS NACK, whose error mentions `error`, and
/// checks that the sidecar still runs its last good listeners (rate limited, as before).
fn expect_lds_nack(mesh: &Mesh, nacks: u64, error: &str) {
    let lds = eventually(EDIT_TIMEOUT, POLL, || {
        let proxy = mesh.proxy_status("ratings-v1.default")?;
        let lds = proxy["types"]["lds"].clone();
        anyhow::ensure!(
            lds["nacks"].as_u64() == Some(nacks)
                && lds["nacked_version"] == lds["sent_version"]
                && lds["nack_error"].as_str().is_some_and(|e| !e.is_empty()),
            "no LDS NACK {nacks} yet: {proxy}"
        );
        anyhow::Ok(lds)
    });
    eprintln!("ratings LDS after a rejected EnvoyFilter: {lds}");
    assert!(
        lds["nack_error"]
            .as_str()
            .is_some_and(|e| e.contains(error)),
        "the NACK should mention {error:?}: {lds}"
    );
    assert_ne!(lds["acked_version"], lds["nacked_version"], "{lds}");
    assert_eq!(status(mesh).expect("request"), (429, true));
    let chains = inbound_http_filters(mesh.sidecar("ratings-v1").admin).expect("config dump");
    assert!(
        chains
            .iter()
            .all(|c| !c.iter().any(|f| f == "envoy.filters.http.cors")
                && c.ends_with(&[
                    "envoy.filters.http.local_ratelimit".to_owned(),
                    "envoy.filters.http.router".to_owned(),
                ])),
        "the last good chains should stay: {chains:?}"
    );
}

#[test]
fn local_rate_limit_task_and_nack_sotw() {
    rate_limit_and_nack(Mode::Sotw);
}

#[test]
fn local_rate_limit_task_and_nack_delta() {
    rate_limit_and_nack(Mode::Delta);
}
