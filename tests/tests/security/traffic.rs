//! Continuous mTLS traffic while something changes underneath (certificates renewed, the
//! root rotated, a policy applied): one thread per target sends requests one after the
//! other, each with a short deadline, and records every failure with the phase it
//! happened in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trellis_tests::eventually;

use super::{call, check_app, check_mtls};

/// Pause between two requests of one thread: enough traffic to hit every moment of a
/// change (tens of requests per second per target) without starving the processes under
/// test of CPU on a 2-core machine.
const PACE: Duration = Duration::from_millis(10);
/// Hard bounds on one traffic thread, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(600);
const MAX_REQUESTS: u64 = 1_000_000;
/// Failures kept verbatim per thread (all are counted).
const KEPT_FAILURES: usize = 50;

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

impl Target {
    pub fn label(&self) -> String {
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

    /// One request; an error says what was wrong.
    pub fn request(&self) -> anyhow::Result<()> {
        let response = call(self.outbound, self.app, "GET", "/", &[])?;
        if self.tcp {
            check_app(&response, self.app)
        } else {
            check_mtls(&response, self.app, &self.client_id)
        }
    }
}

/// What one thread saw.
#[derive(Debug, Default, Clone)]
pub struct TargetReport {
    pub ok: u64,
    pub failed: u64,
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

    /// One line per target, e.g. `client -> reviews: 1234 ok, 0 failed`.
    pub fn summary(&self) -> String {
        self.targets
            .iter()
            .map(|(label, t)| format!("{label}: {} ok, {} failed", t.ok, t.failed))
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
        let failures: Vec<&String> = self
            .targets
            .values()
            .flat_map(|t| t.failures.iter())
            .collect();
        assert!(
            self.failed() == 0,
            "{what}: {} of {} requests failed ({}); first failures:\n{}",
            self.failed(),
            self.ok() + self.failed(),
            self.summary(),
            failures
                .iter()
                .take(20)
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        for (label, t) in &self.targets {
            assert!(t.ok > 0, "{what}: no request {label} was sent");
        }
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
                let label = target.label();
                let (stop, done, phase, target) =
                    (stop.clone(), done.clone(), phase.clone(), target.clone());
                let handle = std::thread::spawn(move || {
                    let mut report = TargetReport::default();
                    let deadline = started + MAX_DURATION;
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && report.ok + report.failed < MAX_REQUESTS
                    {
                        match target.request() {
                            Ok(()) => report.ok += 1,
                            Err(err) => {
                                report.failed += 1;
                                if report.failures.len() < KEPT_FAILURES {
                                    report.failures.push(format!(
                                        "{} request {} at +{:.1?} during {}: {err:#}",
                                        target.label(),
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
        eprintln!("traffic phase: {phase}");
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
        eventually(Duration::from_secs(60), Duration::from_millis(20), || {
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
