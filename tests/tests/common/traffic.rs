//! Sending requests through a sidecar's outbound listener and checking who answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use trellis_tests::{http_get, http_request, HttpResponse};

use super::REQUEST_TIMEOUT;

/// One request through a sidecar's outbound listener to service `app` (`Host: app`),
/// bounded by [`REQUEST_TIMEOUT`].
pub fn call(
    outbound: SocketAddr,
    app: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    let mut all: Vec<(&str, &str)> = vec![("host", app)];
    all.extend_from_slice(headers);
    http_request(outbound, method, path, &all, &[], REQUEST_TIMEOUT)
}

/// The `URI=` elements of the `x-forwarded-client-cert` header the echo app received
/// (several elements are `,`-separated, fields `;`-separated): who called it over mutual
/// TLS, as the sidecar in front of it saw the caller's certificate.
pub fn xfcc_uris(body: &Value) -> Vec<String> {
    body["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default()
        .split([',', ';'])
        .filter_map(|field| field.trim().strip_prefix("URI="))
        .map(|uri| uri.trim_matches('"').to_owned())
        .collect()
}

/// One request through a sidecar's outbound listener, `Host: reviews` unless `headers`
/// name a host.
pub fn send(
    outbound: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpResponse> {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        all.push(("host", "reviews"));
    }
    http_get(outbound, path, &all)
}

/// The version of the `app` workload that answered (200), or an error naming what came
/// back. (The security and multi-cluster fixtures' echo apps report their workload's name
/// as their version.)
pub fn served_version(response: &HttpResponse, app: &str) -> anyhow::Result<String> {
    if response.status != 200 {
        bail!(
            "status {} (expected 200): {}",
            response.status,
            response.text().chars().take(300).collect::<String>()
        );
    }
    let workload = response.header("x-echo-workload");
    if workload != Some(app) {
        bail!("answered by workload {workload:?}, expected {app:?}");
    }
    response
        .header("x-echo-version")
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no x-echo-version header in {:?}", response.headers))
}

/// Which reviews version served one request through the sidecar at `outbound`.
pub fn reviews_version(
    outbound: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<String> {
    served_version(&send(outbound, path, headers)?, "reviews")
}

/// Sends `n` requests and counts the versions that served them; any failure is an error.
pub fn count_versions(
    outbound: SocketAddr,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let version = reviews_version(outbound, path, headers)
            .with_context(|| format!("request {i} of {n} to {path} {headers:?}"))?;
        *counts.entry(version).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Asserts that `n` requests are all served by reviews `version`.
#[track_caller]
pub fn assert_all_served_by(
    outbound: SocketAddr,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
    version: &str,
) {
    let counts = count_versions(outbound, n, path, headers).expect("traffic");
    assert_eq!(
        counts,
        BTreeMap::from([(version.to_owned(), n)]),
        "{path} {headers:?} must always go to {version}"
    );
}

/// Asserts that plain requests are spread over v1 and v2 (as under the 80/20 split) without
/// measuring the ratio: with n = 100 the chance that a version is missing is 0.8^100.
/// Cheaper in flakiness budget than [`check_default_split`] for "routing unchanged" checks.
#[track_caller]
pub fn assert_default_mixed(outbound: SocketAddr, n: usize) {
    let counts = count_versions(outbound, n, "/", &[]).expect("traffic");
    assert!(
        counts.keys().eq(["v1", "v2"]),
        "plain requests must be split over v1 and v2: {counts:?}"
    );
}

/// The default 80/20 split, measured: `Ok(v1 share)` if the v1 share of `n` plain requests
/// is 0.80 ± 0.07 (3.5 standard deviations at n = 400: a correct split fails with
/// probability 4e-4, so tests use this sparingly) and only v1 and v2 answer.
/// See `Mesh::assert_default_split`, which explains a failure.
pub fn check_default_split(outbound: SocketAddr, n: usize) -> anyhow::Result<f64> {
    let counts = count_versions(outbound, n, "/", &[])?;
    let v1 = counts.get("v1").copied().unwrap_or(0);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    anyhow::ensure!(v1 + v2 == n, "only v1 and v2 may answer: {counts:?}");
    // Both counts are at most a few hundred, exactly representable.
    let share = v1 as f64 / n as f64;
    anyhow::ensure!(
        (share - 0.80).abs() <= 0.07,
        "v1 share {share:.3} of {n} requests is outside 0.80 ± 0.07: {counts:?}"
    );
    Ok(share)
}
