//! What answers through the sidecars must show (the app that answered, the caller's
//! identity, a status or no HTTP response at all), and where continuous traffic goes.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::ensure;
use trellis_tests::HttpResponse;

use super::{IN_A_ROW, POLICY_TIMEOUT};
use crate::common::{call, served_version, xfcc_uris, Probe, POLL};

/// The response came from app `app` (200) and the app saw the caller's identity
/// `client_id` in `x-forwarded-client-cert`: the hop between the sidecars was mutual TLS.
/// Returns the workload that answered.
pub fn check_mtls(response: &HttpResponse, app: &str, client_id: &str) -> anyhow::Result<String> {
    let workload = served_version(response, app)?;
    let body = response.json()?;
    let uris = xfcc_uris(&body);
    ensure!(
        uris.iter().any(|u| u == client_id),
        "the app did not see {client_id} in x-forwarded-client-cert (URIs {uris:?}); headers: {}",
        body["headers"]
    );
    Ok(workload)
}

/// Where one traffic thread sends: through `client`'s outbound listener to service `app`;
/// the app must see `client_id` in `x-forwarded-client-cert`.
#[derive(Debug, Clone)]
pub struct Target {
    pub client: String,
    pub outbound: SocketAddr,
    pub app: &'static str,
    pub client_id: String,
    /// A TCP port (tcp_proxy, a new upstream connection per request): the app answers,
    /// but no `x-forwarded-client-cert` can be added.
    pub tcp: bool,
}

impl Probe for Target {
    fn label(&self) -> String {
        if self.tcp {
            format!(
                "{} -> {} (tcp {})",
                self.client,
                self.app,
                self.outbound.port()
            )
        } else {
            format!("{} -> {}", self.client, self.app)
        }
    }

    fn request(&self) -> anyhow::Result<String> {
        let response = call(self.outbound, self.app, "GET", "/", &[])?;
        if self.tcp {
            served_version(&response, self.app)
        } else {
            check_mtls(&response, self.app, &self.client_id)
        }
    }
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
