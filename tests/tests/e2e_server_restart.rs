//! End to end: the control plane goes away and comes back while traffic flows.
//!
//! Envoy keeps serving its last config while the xds-server is down, so not a single
//! request may fail; a new server on the same ports gets every sidecar connected and
//! synced again, and routing (and later edits) work as before. Checked after a graceful
//! stop (SIGTERM) and after a crash (SIGKILL), in SotW and in Delta mode.
//!
//! Config edited while the server is down (a route changed, a service deleted) reaches the
//! sidecars when it comes back, including the removal of resources that the sidecars still
//! hold from the previous server.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    assert_all_served_by, count_versions, reviews_version, send, served_version, services_yaml_for,
    virtual_service_all_to, Mesh, Mode, SidecarMesh, CONVERGE_TIMEOUT, EDIT_TIMEOUT, POLL, PORT,
    SERVICES_FILE, VIRTUAL_SERVICE_FILE,
};
use trellis_tests::{envoy_admin_get, eventually, http_get, require_envoy};

/// Requests that must complete in each phase (server down, server back) before moving on.
const REQUESTS_PER_PHASE: usize = 100;

/// A kind of request the traffic loop sends: path, headers, the version that must serve it
/// (`None`: any, the 80/20 split).
struct RequestKind {
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    expected: Option<&'static str>,
}

const REQUEST_KINDS: [RequestKind; 3] = [
    RequestKind {
        path: "/",
        headers: &[("end-user", "jason")],
        expected: Some("v2"),
    },
    RequestKind {
        path: "/beta",
        headers: &[],
        expected: Some("v2"),
    },
    RequestKind {
        path: "/",
        headers: &[],
        expected: None,
    },
];

/// Sends requests through the client sidecar in a loop, round robin over the three kinds
/// of routes, and records every failure (a non-200, a wrong version, a transport error).
struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    /// The phase the test is in, stamped on failures.
    phase: Arc<Mutex<String>>,
    handle: Option<JoinHandle<TrafficReport>>,
}

#[derive(Debug, Default)]
struct TrafficReport {
    total: usize,
    versions: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Traffic {
    fn start(client: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let phase = Arc::new(Mutex::new("server up".to_owned()));
        let handle = std::thread::spawn({
            let (stop, done, phase) = (stop.clone(), done.clone(), phase.clone());
            move || {
                let mut report = TrafficReport::default();
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let RequestKind {
                        path,
                        headers,
                        expected,
                    } = &REQUEST_KINDS[report.total % REQUEST_KINDS.len()];
                    let outcome =
                        reviews_version(client, path, headers).and_then(|v| match expected {
                            Some(e) if v != *e => anyhow::bail!("served by {v}, expected {e}"),
                            _ => Ok(v),
                        });
                    match outcome {
                        Ok(version) => *report.versions.entry(version).or_insert(0) += 1,
                        Err(err) => report.failures.push(format!(
                            "request {} ({path} {headers:?}) at {:.1?} while {}: {err:#}",
                            report.total,
                            started.elapsed(),
                            phase.lock().map(|p| p.clone()).unwrap_or_default()
                        )),
                    }
                    report.total += 1;
                    done.store(report.total, Ordering::Relaxed);
                }
                report
            }
        });
        Traffic {
            stop,
            done,
            phase,
            handle: Some(handle),
        }
    }

    fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.to_owned();
        }
    }

    /// Waits until `n` more requests completed (successfully or not).
    #[track_caller]
    fn wait_for_more(&self, n: usize) {
        let target = self.done.load(Ordering::Relaxed) + n;
        eventually(Duration::from_secs(60), Duration::from_millis(20), || {
            let done = self.done.load(Ordering::Relaxed);
            if done >= target {
                Ok(())
            } else {
                Err(format!("{done} of {target} requests done"))
            }
        });
    }

    fn finish(mut self) -> TrafficReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("traffic thread")
            .join()
            .expect("traffic thread panicked")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // On a failed assertion elsewhere, do not leave the thread hammering a dead mesh.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether every sidecar's Envoy reports its ADS stream as `connected` (1) or not (0).
fn wait_control_plane_state(mesh: &Mesh, connected: u64) {
    eventually(CONVERGE_TIMEOUT, POLL, || {
        mesh.check_control_plane_state(connected, |_| true)
    });
}

fn server_restart(mode: Mode) {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh =
        Mesh::start(&envoy_bin, &format!("e2e-restart-{}", mode.as_str()), mode).expect("mesh");
    let pids = mesh.envoy_pids();
    let client = mesh.client();
    wait_control_plane_state(&mesh, 1);

    let traffic = Traffic::start(client);
    traffic.wait_for_more(30);

    for (round, crash) in [(1, false), (2, true)] {
        let how = if crash { "SIGKILL" } else { "SIGTERM" };
        traffic.set_phase(&format!("stopping the server ({how}, round {round})"));
        mesh.stop_server(crash).expect("stop server");
        assert!(
            http_get(mesh.admin_addr, "/healthz/ready", &[]).is_err(),
            "the server still answers after {how}"
        );

        // Every sidecar notices that its control plane is gone, and keeps serving.
        traffic.set_phase(&format!("server down ({how}, round {round})"));
        wait_control_plane_state(&mesh, 0);
        traffic.wait_for_more(REQUESTS_PER_PHASE);

        // A new server on the same ports: every sidecar reconnects, in the same mode,
        // and ACKs what the new server sent.
        traffic.set_phase(&format!("server restarting (round {round})"));
        mesh.start_server().expect("restart server");
        mesh.wait_converged(CONVERGE_TIMEOUT)
            .unwrap_or_else(|e| panic!("not converged after restart round {round}: {e:#}"));
        wait_control_plane_state(&mesh, 1);
        traffic.set_phase(&format!("server back (round {round})"));
        traffic.wait_for_more(REQUESTS_PER_PHASE);
    }

    let report = traffic.finish();
    eprintln!(
        "{} requests during the restarts: {:?}, {} failures",
        report.total,
        report.versions,
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed:\n{}",
        report.failures.len(),
        report.total,
        report.failures.join("\n")
    );
    mesh.assert_sidecars_not_restarted(&pids);

    // Routing is intact...
    assert_all_served_by(client, 50, "/", &[("end-user", "jason")], "v2");
    assert_all_served_by(client, 50, "/beta", &[], "v2");
    mesh.assert_default_split(400);

    // ...and the new server's edits reach the reconnected sidecars.
    mesh.write_config(VIRTUAL_SERVICE_FILE, &virtual_service_all_to("v1"));
    eventually(EDIT_TIMEOUT, POLL, || {
        let counts = count_versions(client, 20, "/beta", &[])?;
        anyhow::ensure!(counts.keys().eq(["v1"]), "not all on v1 yet: {counts:?}");
        anyhow::Ok(())
    });
    eventually(EDIT_TIMEOUT, POLL, || mesh.check_converged(true));
    mesh.assert_sidecars_not_restarted(&pids);
}

#[test]
fn server_restart_keeps_traffic_flowing_and_resyncs_sotw() {
    server_restart(Mode::Sotw);
}

#[test]
fn server_restart_keeps_traffic_flowing_and_resyncs_delta() {
    server_restart(Mode::Delta);
}

// ---------------------------------------------------------------------------------------

/// Whether a sidecar's Envoy has a cluster whose name mentions `host`.
fn has_cluster(mesh: &Mesh, sidecar: &str, host: &str) -> anyhow::Result<bool> {
    let clusters = envoy_admin_get(mesh.sidecar(sidecar).admin, "/clusters")?.text();
    Ok(clusters.lines().any(|l| l.contains(host)))
}

/// Whether a sidecar's Envoy has a listener bound to `addr`.
fn has_listener(mesh: &Mesh, sidecar: &str, addr: SocketAddr) -> anyhow::Result<bool> {
    let listeners = envoy_admin_get(mesh.sidecar(sidecar).admin, "/listeners")?.text();
    Ok(listeners.lines().any(|l| l.ends_with(&format!("::{addr}"))))
}

fn changes_while_down(mode: Mode) {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh = Mesh::start(
        &envoy_bin,
        &format!("e2e-down-edit-{}", mode.as_str()),
        mode,
    )
    .expect("mesh");
    let pids = mesh.envoy_pids();
    let client = mesh.client();
    let ratings = "ratings.default.svc.cluster.local";
    let ratings_inbound = SocketAddr::new(mesh.sidecar("ratings-v1").addrs.inbound, PORT);
    assert!(has_cluster(&mesh, "client", ratings).expect("clusters"));
    assert!(has_listener(&mesh, "ratings-v1", ratings_inbound).expect("listeners"));

    mesh.stop_server(false).expect("stop server");
    wait_control_plane_state(&mesh, 0);

    // While the server is down: reviews all to v1, and the ratings service deleted.
    mesh.write_config(VIRTUAL_SERVICE_FILE, &virtual_service_all_to("v1"));
    mesh.write_config(SERVICES_FILE, &services_yaml_for(&["reviews"]));
    // Nobody pushes it: the sidecars keep serving the old config.
    assert_all_served_by(client, 50, "/", &[("end-user", "jason")], "v2");
    let response = send(client, "/", &[("host", "ratings")]).expect("ratings");
    assert_eq!(served_version(&response, "ratings").expect("ratings"), "v1");

    mesh.start_server().expect("restart server");
    mesh.wait_converged(CONVERGE_TIMEOUT)
        .expect("converged after restart");

    // The new route reaches the sidecars...
    eventually(EDIT_TIMEOUT, POLL, || {
        let counts = count_versions(client, 10, "/", &[("end-user", "jason")])?;
        anyhow::ensure!(counts.keys().eq(["v1"]), "jason not on v1 yet: {counts:?}");
        anyhow::Ok(())
    });
    assert_all_served_by(client, 50, "/beta", &[], "v1");
    assert_all_served_by(client, 50, "/", &[], "v1");

    // ...and so does the deletion: the client loses the ratings cluster and route, the
    // ratings sidecar its inbound listener (no service selects it any more), although
    // they got them from the previous server.
    eventually(EDIT_TIMEOUT, POLL, || {
        anyhow::ensure!(
            !has_cluster(&mesh, "client", ratings)?,
            "the client sidecar still has a {ratings} cluster"
        );
        anyhow::ensure!(
            !has_listener(&mesh, "ratings-v1", ratings_inbound)?,
            "the ratings sidecar still listens on {ratings_inbound}"
        );
        let response = send(client, "/", &[("host", "ratings")])?;
        anyhow::ensure!(
            response.status == 404,
            "Host: ratings must find no route now, got {} {}",
            response.status,
            response.text()
        );
        anyhow::Ok(())
    });
    eventually(EDIT_TIMEOUT, POLL, || mesh.check_converged(true));
    mesh.assert_sidecars_not_restarted(&pids);
}

#[test]
fn config_changed_while_server_down_applies_after_restart_sotw() {
    changes_while_down(Mode::Sotw);
}

#[test]
fn config_changed_while_server_down_applies_after_restart_delta() {
    changes_while_down(Mode::Delta);
}
