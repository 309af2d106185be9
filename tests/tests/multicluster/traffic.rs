//! Requests through the sidecars: which workload answered, waiting for routing, a
//! failover observed request by request, and where continuous traffic ([`Traffic`]) goes.
//!
//! [`Traffic`]: crate::common::Traffic

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{check_xfcc, MultiMesh, CONVERGE_TIMEOUT};
use crate::common::{
    call, served_version, Probe, SidecarMesh, Traffic, TrafficReport, KEPT_FAILURES, PACE,
};

/// One request to `app` through `outbound`: the workload that answered.
pub fn request(outbound: SocketAddr, app: &str) -> anyhow::Result<String> {
    served_version(&call(outbound, app, "GET", "/", &[])?, app)
}

/// One request to `app` through `outbound`: the workload that answered; with
/// `caller` also that the app saw that SPIFFE id in `x-forwarded-client-cert`, i.e. the
/// hop between the sidecars was mutual TLS with the caller's certificate.
pub fn request_as(outbound: SocketAddr, app: &str, caller: Option<&str>) -> anyhow::Result<String> {
    let response = call(outbound, app, "GET", "/", &[])?;
    let workload = served_version(&response, app)?;
    if let Some(id) = caller {
        check_xfcc(&response, id).map_err(|e| e.context(format!("answered by {workload}")))?;
    }
    Ok(workload)
}

/// What a sequence of requests saw while traffic moved to another workload.
#[derive(Debug, Default)]
pub struct Switch {
    pub requests: u64,
    pub failed: u64,
    pub answered: BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

impl Switch {
    pub fn summary(&self) -> String {
        format!(
            "{} requests, {} failed, answered by {:?}",
            self.requests, self.failed, self.answered
        )
    }
}

/// Sends requests to `app` through `outbound`, one after the other, until `in_a_row` in a
/// row were answered by workload `to`, counting every failure on the way. Bounded by
/// `timeout` and a request count; fails with what it saw if `to` never took over.
pub fn switch_to(
    outbound: SocketAddr,
    app: &str,
    to: &str,
    in_a_row: u64,
    timeout: Duration,
) -> anyhow::Result<Switch> {
    let started = Instant::now();
    let max_requests = 100_000;
    let mut switch = Switch::default();
    let mut streak = 0;
    while streak < in_a_row {
        ensure!(
            started.elapsed() < timeout && switch.requests < max_requests,
            "{to} did not take over {app} within {timeout:?}: {}; failures: {:?}",
            switch.summary(),
            switch.failures
        );
        switch.requests += 1;
        match request(outbound, app) {
            Ok(workload) => {
                streak = if workload == to { streak + 1 } else { 0 };
                *switch.answered.entry(workload).or_insert(0) += 1;
            }
            Err(err) => {
                streak = 0;
                switch.failed += 1;
                if switch.failures.len() < KEPT_FAILURES {
                    switch.failures.push(format!(
                        "request {} at +{:.1?}: {err:#}",
                        switch.requests,
                        started.elapsed()
                    ));
                }
            }
        }
        std::thread::sleep(PACE);
    }
    Ok(switch)
}

impl MultiMesh {
    /// Waits until `client` reaches every service that has a started workload.
    /// (Over mutual TLS where [`Self::expected_caller`] says so.)
    pub fn wait_routing(&mut self, client: &str) -> anyhow::Result<()> {
        let outbound = self.outbound(client);
        let apps: Vec<&'static str> = self
            .services()
            .into_iter()
            .filter(|app| self.workloads_of(app).iter().any(|w| w.start))
            .collect();
        for app in apps {
            let caller = self.expected_caller(client, app);
            self.wait(&format!("{client} reaches {app}"), CONVERGE_TIMEOUT, |_| {
                request_as(outbound, app, caller.as_deref())
            })?;
        }
        Ok(())
    }

    /// The identity the workloads of `app` must see in `x-forwarded-client-cert` when
    /// `client` calls them: the client's SPIFFE id when the client and every workload of
    /// `app` are [`super::WorkloadDef::mtls`] (so the hop is mutual TLS); `None` otherwise.
    pub fn expected_caller(&self, client: &str, app: &str) -> Option<String> {
        let client = self.def(client);
        let workloads = self.workloads_of(app);
        (client.mtls && !workloads.is_empty() && workloads.iter().all(|w| w.mtls))
            .then(|| client.spiffe_id())
    }

    /// Asserts that `n` requests from `client` to `app` are all answered by `workload`
    /// (and over mutual TLS with the client's identity where [`Self::expected_caller`]
    /// says so).
    #[track_caller]
    pub fn assert_all_answered_by(&self, client: &str, app: &str, workload: &str, n: usize) {
        let outbound = self.outbound(client);
        let caller = self.expected_caller(client, app);
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..n {
            let who = request_as(outbound, app, caller.as_deref())
                .unwrap_or_else(|e| panic!("{client} -> {app}, request {i} of {n}: {e:#}"));
            *answered.entry(who).or_insert(0) += 1;
        }
        assert!(
            answered.keys().eq([workload]),
            "{client} -> {app}: {n} requests must all be answered by {workload}, got {answered:?}"
        );
        eprintln!(
            "{client} -> {app}: {n} x answered by {workload}{}",
            caller.map_or(String::new(), |id| format!(", which saw the caller {id}"))
        );
    }

    /// Begins an MCPC outage under `traffic`: SIGKILLs the MCPC, waits until the relays
    /// noticed, and lets `requests` requests through while it is down.
    #[track_caller]
    pub fn begin_mcpc_outage(&mut self, traffic: &Traffic, requests: u64) {
        traffic.set_phase("MCPC SIGKILLed");
        self.kill_server().expect("kill the MCPC");
        traffic.set_phase("MCPC down");
        traffic.wait_for_more(requests);
    }

    /// Ends an MCPC outage under `traffic`: restarts the MCPC, waits until the relays
    /// reconnected and the mesh converged, lets `requests` more requests through and stops
    /// the traffic. Asserts that no request failed (`what` names the outage) and that the
    /// relays, which served everything from their caches meanwhile, pushed nothing to
    /// their sidecars across the restart.
    #[track_caller]
    pub fn end_mcpc_outage(
        &mut self,
        traffic: Traffic,
        requests: u64,
        what: &str,
    ) -> TrafficReport {
        let before = self.relays_sent().expect("relay syncz");
        traffic.set_phase("MCPC restarting");
        self.restart_server()
            .expect("the relays reconnect to the restarted MCPC");
        traffic.set_phase("MCPC back");
        traffic.wait_for_more(requests);
        let report = traffic.finish();
        report.assert_no_failures(what);
        self.assert_no_downstream_pushes(before, "an MCPC restart");
        report
    }

    /// A [`Target`] for continuous traffic from `client` to service `app`.
    pub fn target(&self, client: &str, app: &'static str) -> Target {
        Target {
            label: format!("{client} -> {app}"),
            outbound: self.outbound(client),
            app,
            caller: self.expected_caller(client, app),
        }
    }
}

/// Where one traffic thread sends.
#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    pub outbound: SocketAddr,
    pub app: &'static str,
    /// The SPIFFE id the app must see in `x-forwarded-client-cert` (mutual TLS).
    pub caller: Option<String>,
}

impl Probe for Target {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn request(&self) -> anyhow::Result<String> {
        request_as(self.outbound, self.app, self.caller.as_deref())
    }
}
