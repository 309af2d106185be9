//! End to end: multi-cluster. One mesh control plane (MCPC) and two member clusters `a`
//! and `b`, each with a relay that joined with a one-time token and reports its cluster's
//! registry folder; real Envoy sidecars connect to their cluster's relay.
//!
//! - a sidecar in `a` calls a service whose only workload runs in `b`;
//! - EDS priorities: a sidecar prefers its own cluster's endpoints (priority 0) and fails
//!   over to the other cluster's (priority 1) when its own are removed from the registry
//!   or ejected by outlier detection;
//! - the MCPC killed: not one failed request, a new sidecar is served by its relay from
//!   the cache, and the relays resync after the MCPC returns without pushing anything
//!   downstream;
//! - a relay restarted from its state dir (no token): its sidecars reconnect; a join token
//!   works only once.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;
mod multicluster;

use std::time::Duration;

use common::{SidecarMesh, Traffic};
use multicluster::{
    switch_to, MultiMesh, Switch, WorkloadDef, CLUSTERS, CLUSTER_A, CLUSTER_B, CONVERGE_TIMEOUT,
    RECONNECT_TIMEOUT, SWITCH_TIMEOUT,
};
use trellis_tests::{require_envoy, Signal};

/// Sends only; SotW.
const CLIENT_A: WorkloadDef = WorkloadDef::client("client-a", CLUSTER_A, 10);
/// reviews has a workload in each cluster; Delta xDS in `a`, SotW in `b`.
const REVIEWS_A: WorkloadDef = WorkloadDef::service("reviews-a", "reviews", CLUSTER_A, 11).delta();
const REVIEWS_B: WorkloadDef = WorkloadDef::service("reviews-b", "reviews", CLUSTER_B, 20);
/// ratings runs only in `b`; Delta xDS.
const RATINGS_B: WorkloadDef = WorkloadDef::service("ratings-b", "ratings", CLUSTER_B, 21).delta();
/// details runs only in `a`: registered from the start, its echo and sidecar started by
/// a test while the MCPC is down.
const DETAILS_A: WorkloadDef =
    WorkloadDef::service("details-a", "details", CLUSTER_A, 12).deferred();

/// Requests per steady-state check.
const N: usize = 30;
/// Requests in a row that must be answered by the new workload for a failover to count
/// as done: enough that an ejected or removed endpoint is no longer picked.
const IN_A_ROW: u64 = 20;
/// Requests that must complete in each phase of the continuous-traffic tests.
const REQUESTS_PER_PHASE: u64 = 100;

fn base_workloads() -> Vec<WorkloadDef> {
    vec![CLIENT_A, REVIEWS_A, REVIEWS_B, RATINGS_B]
}

fn start(test: &str, workloads: Vec<WorkloadDef>) -> Option<MultiMesh> {
    let envoy_bin = require_envoy()?;
    Some(MultiMesh::start(&envoy_bin, test, workloads).expect("multi-cluster mesh"))
}

fn relay_identity(cluster: &str) -> String {
    format!("spiffe://cluster.local/ns/trellis-system/sa/relay-{cluster}")
}

/// reviews-a is priority 0 and reviews-b priority 1 in client-a's Envoy.
#[track_caller]
fn assert_reviews_priorities(mesh: &MultiMesh) {
    let local = mesh
        .host_of("client-a", "reviews", "reviews-a")
        .expect("reviews-a endpoint");
    let remote = mesh
        .host_of("client-a", "reviews", "reviews-b")
        .expect("reviews-b endpoint");
    assert_eq!(
        (local.priority, remote.priority),
        (0, 1),
        "client-a (cluster a) must see reviews-a at priority 0 and reviews-b at priority 1: \
         {local:?} {remote:?}"
    );
}

#[test]
fn a_service_in_cluster_b_is_called_from_cluster_a() {
    let Some(mesh) = start("e2e-mc-remote", base_workloads()) else {
        return;
    };
    // Both clusters joined with their token's claims.
    for def in CLUSTERS {
        let c = mesh.member_cluster(def.name).expect("/debug/clusters");
        assert_eq!(c["region"], def.region, "{c}");
        assert_eq!(c["zone"], def.zone, "{c}");
        assert_eq!(
            c["network"], def.name,
            "the network defaults to the name: {c}"
        );
        assert_eq!(
            c["relay_identity"],
            relay_identity(def.name).as_str(),
            "{c}"
        );
        let status = mesh.relay_status(def.name).expect("/debug/relay");
        assert_eq!(status["cluster"], def.name, "{status}");
        assert_eq!(
            status["identity"],
            relay_identity(def.name).as_str(),
            "{status}"
        );
        assert!(
            status["upstream_streams"].as_u64() > Some(0),
            "relay {} has no upstream stream: {status}",
            def.name
        );
        for w in mesh.workloads.iter().filter(|w| w.cluster == def) {
            assert!(
                status["classes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["workload"] == w.workload_id().as_str()),
                "relay {} has no class for {}: {status}",
                def.name,
                w.name
            );
        }
        let streams = mesh.mcpc_relay_streams(def.name).expect("MCPC syncz");
        assert!(
            !streams.is_empty(),
            "the MCPC's /debug/syncz lists no stream of relay {}",
            def.name
        );
    }

    // client-a's Envoy has ratings-b's endpoint with b's locality (cluster as subzone),
    // at priority 0: cluster a has no ratings endpoint, and priorities have no gaps
    // (xds-server/src/translate/endpoints.rs), so the other cluster's are the first.
    let host = mesh
        .host_of("client-a", "ratings", "ratings-b")
        .expect("ratings-b endpoint");
    eprintln!("ratings-b as client-a sees it: {host:?}");
    assert_eq!(host.priority, 0, "{host:?}");
    assert_eq!(
        host.locality,
        serde_json::json!({"region": CLUSTER_B.region, "zone": CLUSTER_B.zone, "sub_zone": "b"}),
        "{host:?}"
    );

    // a -> b: 200, answered by b's echo.
    mesh.assert_all_answered_by("client-a", "ratings", "ratings-b", N);
}

/// Sends client-a's requests to reviews until reviews-b answers [`IN_A_ROW`] in a row
/// (after `what` took reviews-a away), and prints what they saw.
#[track_caller]
fn switch_reviews_to_b(mesh: &MultiMesh, what: &str) -> Switch {
    let switch = switch_to(
        mesh.outbound("client-a"),
        "reviews",
        "reviews-b",
        IN_A_ROW,
        SWITCH_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.control_plane_logs(30)));
    eprintln!(
        "{what}: {}; failures: {:?}",
        switch.summary(),
        switch.failures
    );
    switch
}

/// Failed requests tolerated while client-a's traffic moves from reviews-a (removed from
/// a's registry) to reviews-b. The removal reaches client-a's Envoy as an EDS update
/// (relay a reports the registry, the MCPC recomputes, relay a forwards); reviews-a's
/// sidecar keeps running meanwhile, so requests still succeed there. What can fail is a
/// request caught between two updates: reviews-a's sidecar may lose its inbound listener
/// (its WorkloadEntry is gone) a moment before client-a's EDS drops reviews-a, and the
/// route's two retries may land on the same (only) priority-0 endpoint. That window is
/// tens of milliseconds, a few requests at the traffic's pace.
const MAX_FAILED_ON_REMOVAL: u64 = 5;

#[test]
fn own_cluster_preferred_then_failover_when_endpoints_go() {
    let Some(mut mesh) = start("e2e-mc-remove", base_workloads()) else {
        return;
    };
    assert_reviews_priorities(&mesh);
    mesh.assert_all_answered_by("client-a", "reviews", "reviews-a", N);

    mesh.remove_from_registry("reviews-a")
        .expect("remove reviews-a");
    let switch = switch_reviews_to_b(&mesh, "reviews-a removed from a's registry");
    assert!(
        switch.failed <= MAX_FAILED_ON_REMOVAL,
        "{} requests failed while traffic moved to reviews-b (at most {MAX_FAILED_ON_REMOVAL}): {:?}",
        switch.failed,
        switch.failures
    );

    // The endpoint is gone from client-a's EDS (not merely unhealthy), the registry change
    // was accepted, and reviews-b serves everything.
    let reviews_a = mesh.inbound_ip("reviews-a");
    mesh.wait(
        "reviews-a gone from client-a's EDS",
        CONVERGE_TIMEOUT,
        |m| {
            let hosts = m.hosts("client-a", "reviews")?;
            anyhow::ensure!(
                hosts.iter().all(|h| h.ip != reviews_a),
                "still listed: {hosts:?}"
            );
            Ok(())
        },
    )
    .expect("EDS update");
    mesh.wait_registries_acked(CONVERGE_TIMEOUT)
        .expect("registry acked");
    mesh.assert_all_answered_by("client-a", "reviews", "reviews-b", N);
    mesh.assert_sidecars_running();
}

/// Failed requests tolerated beyond the outlier-detection threshold while reviews-a is
/// ejected: the ejection is decided on Envoy's main thread after the threshold-th failure
/// and reaches the worker a moment later, so a request or two more may still go there.
const EJECTION_MARGIN: u64 = 2;

#[test]
fn failover_when_local_endpoints_are_ejected() {
    let Some(mut mesh) = start("e2e-mc-eject", base_workloads()) else {
        return;
    };
    assert_reviews_priorities(&mesh);
    mesh.assert_all_answered_by("client-a", "reviews", "reviews-a", N);

    let outlier = mesh
        .outlier_detection("client-a", "reviews")
        .expect("client-a's reviews cluster");
    eprintln!("client-a's reviews cluster: outlier_detection {outlier}");
    assert!(
        outlier.is_object(),
        "client-a's reviews cluster has no outlier detection"
    );
    assert!(
        outlier["enforcing_consecutive_gateway_failure"].as_u64() > Some(0),
        "consecutive gateway failures are not enforced (Envoy's default is 0%): {outlier}"
    );
    // Envoy's default threshold when the field is unset.
    let threshold = outlier["consecutive_gateway_failure"].as_u64().unwrap_or(5);

    // reviews-a's app dies; its sidecar lives on and answers 503 (upstream connect error):
    // the endpoint stays in EDS but fails.
    let echo = mesh.echo_mut("reviews-a").expect("echo");
    echo.signal(Signal::SIGKILL).expect("kill reviews-a's app");
    assert!(
        echo.wait_timeout(Duration::from_secs(30))
            .expect("wait")
            .is_some(),
        "reviews-a's app still runs after SIGKILL"
    );
    let switch = switch_reviews_to_b(
        &mesh,
        &format!("reviews-a's app killed (outlier threshold {threshold})"),
    );
    assert!(
        switch.failed <= threshold + EJECTION_MARGIN,
        "{} requests failed before reviews-a was ejected (threshold {threshold} consecutive \
         gateway failures, margin {EJECTION_MARGIN}): {:?}",
        switch.failed,
        switch.failures
    );
    // Failed over by ejection: reviews-a is still in EDS, flagged by outlier detection.
    let host = mesh
        .host_of("client-a", "reviews", "reviews-a")
        .expect("reviews-a still in client-a's EDS");
    assert!(
        host.ejected(),
        "reviews-a is not ejected by outlier detection: {host:?}"
    );
    mesh.assert_all_answered_by("client-a", "reviews", "reviews-b", N);
    mesh.assert_sidecars_running();
}

#[test]
fn mcpc_down_no_failed_requests_and_new_sidecar_served_by_relay() {
    let mut workloads = base_workloads();
    workloads.push(DETAILS_A);
    let Some(mut mesh) = start("e2e-mc-mcpc-down", workloads) else {
        return;
    };
    // details-a has no sidecar yet, but its WorkloadEntry is in a's registry: relay a
    // prefetched its class.
    mesh.wait_prefetched("details-a").expect("prefetch");

    let targets = [
        mesh.target("client-a", "ratings"),
        mesh.target("client-a", "reviews"),
    ];
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    mesh.begin_mcpc_outage(&traffic, REQUESTS_PER_PHASE);

    // A new sidecar in a, served by relay a from its cache alone.
    traffic.set_phase("MCPC down, details-a starting");
    mesh.start_sidecar("details-a")
        .expect("details-a's sidecar while the MCPC is down");
    mesh.assert_all_answered_by("details-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("client-a", "details", "details-a", N);
    traffic.set_phase("MCPC down, details-a serving");
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    let report = mesh.end_mcpc_outage(traffic, REQUESTS_PER_PHASE, "MCPC killed, down, restarted");
    report.assert_answered_only_by("client-a -> ratings", "ratings-b");
    report.assert_answered_only_by("client-a -> reviews", "reviews-a");
    for def in CLUSTERS {
        mesh.member_cluster(def.name)
            .expect("joined clusters survive the MCPC restart");
    }
    mesh.assert_all_answered_by("client-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("details-a", "ratings", "ratings-b", N);
    mesh.assert_sidecars_running();
}

#[test]
fn relay_restart_sidecars_reconnect() {
    let Some(mut mesh) = start("e2e-mc-relay-restart", base_workloads()) else {
        return;
    };
    let joined_at = mesh.member_cluster("a").expect("cluster a")["joined_at"].clone();
    mesh.wait_control_plane_state("a", 1, CONVERGE_TIMEOUT)
        .expect("a's sidecars connected");

    let targets = [
        mesh.target("client-a", "ratings"),
        mesh.target("client-a", "reviews"),
    ];
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    traffic.set_phase("relay a stopping (SIGTERM)");
    mesh.stop_relay("a").expect("stop relay a");
    mesh.wait_control_plane_state("a", 0, CONVERGE_TIMEOUT)
        .expect("a's sidecars notice relay a is gone");
    traffic.set_phase("relay a down");
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    traffic.set_phase("relay a restarting (state dir, no token)");
    mesh.start_relay("a", false)
        .expect("relay a restarts from its state dir");
    mesh.wait_converged(RECONNECT_TIMEOUT)
        .expect("a's sidecars reconnect and converge");
    mesh.wait_control_plane_state("a", 1, CONVERGE_TIMEOUT)
        .expect("a's sidecars connected again");
    traffic.set_phase("relay a back");
    traffic.wait_for_more(REQUESTS_PER_PHASE);
    let report = traffic.finish();
    report.assert_no_failures("relay a restarted");

    let status = mesh.relay_status("a").expect("/debug/relay");
    assert_eq!(status["identity"], relay_identity("a").as_str(), "{status}");
    assert!(
        status["upstream_streams"].as_u64() > Some(0),
        "relay a has no upstream stream after its restart: {status}"
    );
    mesh.wait_registries_acked(CONVERGE_TIMEOUT)
        .expect("registry reported again");
    assert_eq!(
        mesh.member_cluster("a").expect("cluster a")["joined_at"],
        joined_at,
        "a restart from the state dir must not join again"
    );
    mesh.assert_all_answered_by("client-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("client-a", "reviews", "reviews-a", N);
    mesh.assert_sidecars_running();

    // The join token of a's first run is spent: with an empty state dir it is refused.
    let output = mesh
        .run_relay_again_with_token("a")
        .expect("relay run with a used token");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "relay run with a used join token: {} / {stderr}",
        output.status
    );
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("relay: ") && lines[0].contains("already used"),
        "expected one line `relay: ... already used ...` on stderr, got:\n{stderr}"
    );
}
