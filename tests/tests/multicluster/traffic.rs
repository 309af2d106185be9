//! Requests through the sidecars: which workload answered, waiting for routing, a
//! failover observed request by request, and continuous traffic while something changes
//! underneath (one thread per target, every failure recorded with the phase it happened in).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use trellis_tests::{eventually, http_request, HttpResponse};

use super::{MultiMesh, CONVERGE_TIMEOUT, POLL, REQUEST_TIMEOUT};

/// Pause between two requests of one sender: tens of requests per second, enough to hit
/// every moment of a change without starving the processes under test on 2 cores.
const PACE: Duration = Duration::from_millis(10);
/// Hard bounds on one traffic thread, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(600);
const MAX_REQUESTS: u64 = 1_000_000;
/// Failures kept verbatim per target (all are counted).
const KEPT_FAILURES: usize = 50;

/// One request through a sidecar's outbound listener to service `app` (Host: app).
pub fn call(outbound: SocketAddr, app: &str) -> anyhow::Result<HttpResponse> {
    http_request(outbound, "GET", "/", &[("host", app)], &[], REQUEST_TIMEOUT)
}

/// The workload whose echo app answered (200 from app `app`).
pub fn answered_by(response: &HttpResponse, app: &str) -> anyhow::Result<String> {
    ensure!(
        response.status == 200,
        "status {} (expected 200): {}",
        response.status,
        response.text().chars().take(300).collect::<String>()
    );
    let workload = response.header("x-echo-workload");
    ensure!(
        workload == Some(app),
        "answered by app {workload:?}, expected {app:?}"
    );
    response
        .header("x-echo-version")
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no x-echo-version in the answer"))
}

/// One request to `app` through `outbound`: the workload that answered.
pub fn request(outbound: SocketAddr, app: &str) -> anyhow::Result<String> {
    answered_by(&call(outbound, app)?, app)
}

/// One request to `app` through `outbound`: the workload that answered; with
/// `caller` also that the app saw that SPIFFE id in `x-forwarded-client-cert`, i.e. the
/// hop between the sidecars was mutual TLS with the caller's certificate.
pub fn request_as(outbound: SocketAddr, app: &str, caller: Option<&str>) -> anyhow::Result<String> {
    let response = call(outbound, app)?;
    let workload = answered_by(&response, app)?;
    if let Some(id) = caller {
        super::check_xfcc(&response, id)
            .map_err(|e| e.context(format!("answered by {workload}")))?;
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

/// What one thread saw.
#[derive(Debug, Default, Clone)]
pub struct TargetReport {
    pub ok: u64,
    pub failed: u64,
    pub answered: BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

/// What every thread saw, by target.
#[derive(Debug, Default)]
pub struct TrafficReport {
    pub targets: BTreeMap<String, TargetReport>,
}

impl TrafficReport {
    pub fn ok(&self) -> u64 {
        self.targets.values().map(|t| t.ok).sum()
    }

    pub fn failed(&self) -> u64 {
        self.targets.values().map(|t| t.failed).sum()
    }

    /// One part per target, e.g. `client-a -> ratings: 1234 ok, 0 failed, {"ratings-b": 1234}`.
    pub fn summary(&self) -> String {
        self.targets
            .iter()
            .map(|(label, t)| {
                format!(
                    "{label}: {} ok, {} failed, answered by {:?}",
                    t.ok, t.failed, t.answered
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Asserts that every target got requests through and none failed; prints the counts.
    #[track_caller]
    pub fn assert_no_failures(&self, what: &str) {
        eprintln!(
            "{what}: {} requests, {} failed ({})",
            self.ok() + self.failed(),
            self.failed(),
            self.summary()
        );
        let failures: Vec<&str> = self
            .targets
            .values()
            .flat_map(|t| t.failures.iter().map(String::as_str))
            .take(20)
            .collect();
        assert!(
            self.failed() == 0,
            "{what}: {} of {} requests failed ({}); first failures:\n{}",
            self.failed(),
            self.ok() + self.failed(),
            self.summary(),
            failures.join("\n")
        );
        for (label, t) in &self.targets {
            assert!(t.ok > 0, "{what}: no request {label} got through");
        }
    }

    /// Asserts that every request of target `label` that got an answer got it from
    /// `workload`.
    #[track_caller]
    pub fn assert_answered_only_by(&self, label: &str, workload: &str) {
        let t = self
            .targets
            .get(label)
            .unwrap_or_else(|| panic!("no traffic {label}"));
        assert!(
            t.answered.keys().all(|w| w == workload),
            "{label}: every request must be answered by {workload}, got {:?}",
            t.answered
        );
    }
}

/// Running traffic threads. Dropping it (e.g. when an assertion fails elsewhere) stops
/// them, so no thread keeps hammering a mesh that is being torn down.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    phase: Arc<Mutex<String>>,
    handles: Vec<(String, JoinHandle<TargetReport>)>,
}

impl Traffic {
    pub fn start(targets: &[Target]) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let phase = Arc::new(Mutex::new("start".to_owned()));
        let started = Instant::now();
        let handles = targets
            .iter()
            .map(|target| {
                let (stop, done, phase, target) =
                    (stop.clone(), done.clone(), phase.clone(), target.clone());
                let label = target.label.clone();
                let handle = std::thread::spawn(move || {
                    let mut report = TargetReport::default();
                    let deadline = started + MAX_DURATION;
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && report.ok + report.failed < MAX_REQUESTS
                    {
                        match request_as(target.outbound, target.app, target.caller.as_deref()) {
                            Ok(workload) => {
                                report.ok += 1;
                                *report.answered.entry(workload).or_insert(0) += 1;
                            }
                            Err(err) => {
                                report.failed += 1;
                                if report.failures.len() < KEPT_FAILURES {
                                    report.failures.push(format!(
                                        "{} request {} at +{:.1?} during {}: {err:#}",
                                        target.label,
                                        report.ok + report.failed,
                                        started.elapsed(),
                                        phase.lock().map(|p| p.clone()).unwrap_or_default()
                                    ));
                                }
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(PACE);
                    }
                    report
                });
                (label, handle)
            })
            .collect();
        Traffic {
            stop,
            done,
            phase,
            handles,
        }
    }

    /// Names what the test is doing now; failures are stamped with it.
    pub fn set_phase(&self, phase: &str) {
        eprintln!("traffic phase: {phase} ({} requests so far)", self.done());
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.to_owned();
        }
    }

    /// Requests completed so far (successful or not), over all threads.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests completed.
    #[track_caller]
    pub fn wait_for_more(&self, n: u64) {
        let target = self.done() + n;
        eventually(Duration::from_secs(120), POLL, || {
            let done = self.done();
            if done >= target {
                Ok(())
            } else {
                Err(format!("{done} of {target} requests done"))
            }
        });
    }

    /// Stops every thread and collects what they saw.
    pub fn finish(mut self) -> TrafficReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = TrafficReport::default();
        for (label, handle) in self.handles.drain(..) {
            let target = handle.join().expect("traffic thread panicked");
            report.targets.insert(label, target);
        }
        report
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
