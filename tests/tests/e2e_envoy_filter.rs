//! End to end: Istio's local rate limit task (an EnvoyFilter inserting Envoy's
//! `local_ratelimit` before the router of a sidecar's inbound listener) applied to a
//! running mesh returns 429s to real traffic once its token bucket is empty; an
//! EnvoyFilter Envoy rejects is a NACK in `/debug/syncz`, and removing it heals.

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
        let dump = envoy_admin_get(admin, "/config_dump?resource=dynamic_listeners")?;
        let text = String::from_utf8_lossy(&dump.body).to_string();
        anyhow::ensure!(
            text.contains("envoy.filters.http.local_ratelimit"),
            "the ratings sidecar has no rate limit filter yet"
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

    // An EnvoyFilter Envoy refuses: a NACK of the ratings sidecar's listeners.
    mesh.replace_config("after-router.yaml", AFTER_ROUTER);
    let lds = eventually(EDIT_TIMEOUT, POLL, || {
        let proxy = mesh.proxy_status("ratings-v1.default")?;
        let lds = proxy["types"]["lds"].clone();
        anyhow::ensure!(
            lds["nack_error"].as_str().is_some_and(|e| !e.is_empty()),
            "no LDS NACK yet: {proxy}"
        );
        anyhow::Ok(lds)
    });
    eprintln!("ratings LDS after the rejected EnvoyFilter: {lds}");
    assert_eq!(lds["nacked_version"], lds["sent_version"], "{lds}");
    // The sidecar keeps its last good listeners: still rate limited.
    assert_eq!(status(&mesh).expect("request"), (429, true));

    std::fs::remove_file(mesh.config_path("after-router.yaml")).expect("remove");
    eventually(Duration::from_secs(30), POLL, || mesh.check_converged(true));
}

#[test]
fn local_rate_limit_task_and_nack_sotw() {
    rate_limit_and_nack(Mode::Sotw);
}

#[test]
fn local_rate_limit_task_and_nack_delta() {
    rate_limit_and_nack(Mode::Delta);
}
