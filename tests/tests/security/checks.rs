//! Requests through the sidecars and what their answers must show: the app that
//! answered, the caller's identity, a status (or no HTTP response at all).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::ensure;
use serde_json::Value;
use trellis_tests::{http_request, HttpResponse};

use super::{IN_A_ROW, POLICY_TIMEOUT, REQUEST_TIMEOUT};
use crate::common::POLL;

/// One request through a sidecar's outbound listener to service `app` (Host: app).
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
/// (several elements are `,`-separated, fields `;`-separated).
pub fn xfcc_uris(body: &Value) -> Vec<String> {
    body["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default()
        .split([',', ';'])
        .filter_map(|field| field.trim().strip_prefix("URI="))
        .map(|uri| uri.trim_matches('"').to_owned())
        .collect()
}

/// The response came from app `app` (200).
pub fn check_app(response: &HttpResponse, app: &str) -> anyhow::Result<()> {
    ensure!(
        response.status == 200,
        "status {} (expected 200): {}",
        response.status,
        response.text().chars().take(300).collect::<String>()
    );
    let workload = response.header("x-echo-workload");
    ensure!(
        workload == Some(app),
        "answered by {workload:?}, expected {app:?}"
    );
    Ok(())
}

/// The response came from app `app` (200) and the app saw the caller's identity
/// `client_id` in `x-forwarded-client-cert`: the hop between the sidecars was mutual TLS.
pub fn check_mtls(response: &HttpResponse, app: &str, client_id: &str) -> anyhow::Result<()> {
    check_app(response, app)?;
    let body = response.json()?;
    let uris = xfcc_uris(&body);
    ensure!(
        uris.iter().any(|u| u == client_id),
        "the app did not see {client_id} in x-forwarded-client-cert (URIs {uris:?}); headers: {}",
        body["headers"]
    );
    Ok(())
}

/// `status` of one request, or the transport error.
pub fn status_of(result: anyhow::Result<HttpResponse>) -> Result<u16, String> {
    result.map(|r| r.status).map_err(|e| format!("{e:#}"))
}

/// Waits (bounded by [`POLICY_TIMEOUT`]) until [`IN_A_ROW`] requests in a row get
/// `expected` (a status, or `Err` for no HTTP response): a policy change has reached the
/// sidecar and every connection opened before it is gone.
#[track_caller]
pub fn wait_statuses(
    what: &str,
    expected: Result<u16, ()>,
    mut send: impl FnMut() -> anyhow::Result<HttpResponse>,
    context: impl Fn() -> String,
) {
    let started = Instant::now();
    let result = trellis_tests::poll_until(POLICY_TIMEOUT, POLL, || {
        for i in 0..IN_A_ROW {
            let got = send();
            let ok = match (&expected, &got) {
                (Ok(status), Ok(r)) => r.status == *status,
                (Err(()), Err(_)) => true,
                _ => false,
            };
            if !ok {
                return Err(format!("request {i} in a row got {}", describe(&got)));
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => eprintln!(
            "{what}: {} in a row after {:.1?}",
            describe_expected(&expected),
            started.elapsed()
        ),
        Err(e) => panic!(
            "{what}: waiting for {}: {e}; {}",
            describe_expected(&expected),
            context()
        ),
    }
}

fn describe(got: &anyhow::Result<HttpResponse>) -> String {
    match got {
        Ok(r) => format!(
            "HTTP {} {}",
            r.status,
            r.text().chars().take(200).collect::<String>()
        ),
        Err(e) => format!("error: {e:#}"),
    }
}

fn describe_expected(expected: &Result<u16, ()>) -> String {
    match expected {
        Ok(s) => format!("HTTP {s}"),
        Err(()) => "no HTTP response".to_owned(),
    }
}

/// Asserts that `n` requests all get `expected` (a status, or `Err` for "no HTTP
/// response at all"), naming what came back otherwise.
#[track_caller]
pub fn assert_statuses(
    what: &str,
    n: usize,
    expected: Result<u16, ()>,
    mut send: impl FnMut() -> anyhow::Result<HttpResponse>,
) {
    let started = Instant::now();
    for i in 0..n {
        let got = send();
        let ok = match (&expected, &got) {
            (Ok(status), Ok(r)) => r.status == *status,
            (Err(()), Err(_)) => true,
            _ => false,
        };
        assert!(
            ok,
            "{what}: request {i} of {n}: expected {}, got {}",
            describe_expected(&expected),
            describe(&got)
        );
    }
    eprintln!(
        "{what}: {n} x {} ({:.1?})",
        describe_expected(&expected),
        started.elapsed()
    );
}
