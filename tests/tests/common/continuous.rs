//! Continuous traffic while something changes underneath (certificates renewed, the root
//! rotated, a policy applied, a control plane killed): one thread per target sends
//! requests one after the other, each with a short deadline, and records every failure
//! with the phase of the test it happened in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trellis_tests::eventually;

/// Pause between two requests of one thread: enough traffic to hit every moment of a
/// change (tens of requests per second per target) without starving the processes under
/// test of CPU on a 2-core machine.
pub const PACE: Duration = Duration::from_millis(10);
/// Hard bounds on one traffic thread, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(600);
const MAX_REQUESTS: u64 = 1_000_000;
/// Failures kept verbatim per thread or request loop (all are counted).
pub const KEPT_FAILURES: usize = 50;
/// Bound on [`Traffic::wait_for_more`]: even a slow phase completes a request a second.
const WAIT_FOR_MORE_TIMEOUT: Duration = Duration::from_secs(120);

/// Where one traffic thread sends, and what makes a request succeed.
pub trait Probe: Clone + Send + 'static {
    /// Names the target in reports, e.g. `client -> reviews`.
    fn label(&self) -> String;
    /// One request: the workload that answered, or what was wrong.
    fn request(&self) -> anyhow::Result<String>;
}

/// What one thread saw.
#[derive(Debug, Default, Clone)]
pub struct TargetReport {
    pub ok: u64,
    pub failed: u64,
    /// Successful requests by the workload that answered them.
    pub answered: BTreeMap<String, u64>,
    pub failures: Vec<String>,
}

/// What every thread saw, by target label.
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

    /// One part per target, e.g. `client -> reviews: 1234 ok, 0 failed, answered by
    /// {"reviews": 1234}`.
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
    pub fn start<P: Probe>(targets: &[P]) -> Traffic {
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
                            Ok(workload) => {
                                report.ok += 1;
                                *report.answered.entry(workload).or_insert(0) += 1;
                            }
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
        eventually(WAIT_FOR_MORE_TIMEOUT, Duration::from_millis(20), || {
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
