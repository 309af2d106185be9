//! End to end: multi-cluster over mutual TLS. The fixture of `e2e_multicluster.rs` (an
//! MCPC, member clusters `a` and `b` with a relay each, real Envoy sidecars), with
//! workloads labelled `security.istio.io/tlsMode: istio`: each sidecar proves its
//! identity with a workload token on its relay's secure port and gets its config, its
//! certificate (one per service account at the relay, signed by the MCPC with the
//! sidecar's token forwarded) and the trust bundle from the relay.
//!
//! - a sidecar in `a` calls a service whose only workload runs in `b`, over mutual TLS
//!   with certificates from the relays: the callee sees the caller's SPIFFE id;
//! - the MCPC killed: not one failed request, and a new sidecar whose service account
//!   already has a certificate at its relay gets config and certificate from the relay
//!   alone and serves mutual TLS traffic both ways;
//! - a root rotation of the MCPC's CA under continuous cross-cluster mTLS traffic: not
//!   one failed request; every sidecar behind the relays ends with a certificate from the
//!   new root, the relays' trust files hold only the new root, and a sidecar started
//!   afterwards connects to its relay and serves.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;
mod multicluster;

use common::{SidecarMesh, Traffic, PORT};
use multicluster::{MultiMesh, WorkloadDef, CLUSTERS, CLUSTER_A, CLUSTER_B};
use trellis_tests::require_envoy;

/// The service account of client-a, and of details-a (started during the outage).
const FRONTEND: &str = "frontend";
/// Sends only; SotW.
const CLIENT_A: WorkloadDef = WorkloadDef::client("client-a", CLUSTER_A, 10)
    .with_service_account(FRONTEND)
    .mtls();
/// reviews runs only in `a`; Delta xDS (and so Delta SDS).
const REVIEWS_A: WorkloadDef = WorkloadDef::service("reviews-a", "reviews", CLUSTER_A, 11)
    .delta()
    .mtls();
/// ratings runs only in `b`; Delta xDS.
const RATINGS_B: WorkloadDef = WorkloadDef::service("ratings-b", "ratings", CLUSTER_B, 21)
    .delta()
    .mtls();
/// details runs only in `a`, as client-a's service account: registered from the start,
/// its echo and sidecar started by a test while the MCPC is down.
const DETAILS_A: WorkloadDef = WorkloadDef::service("details-a", "details", CLUSTER_A, 12)
    .with_service_account(FRONTEND)
    .mtls()
    .deferred();

/// Requests per steady-state check.
const N: usize = 30;
/// Requests that must complete in each phase of the continuous-traffic test.
const REQUESTS_PER_PHASE: u64 = 100;

fn start(test: &str, workloads: Vec<WorkloadDef>) -> Option<MultiMesh> {
    let envoy_bin = require_envoy()?;
    Some(MultiMesh::start(&envoy_bin, test, workloads).expect("multi-cluster mTLS mesh"))
}

/// Every started sidecar uses the certificate of its own identity that its relay sent
/// it (and the relay's `/debug/syncz` shows its SDS synced); returns the serials.
#[track_caller]
fn assert_own_certificates(mesh: &MultiMesh) -> Vec<(String, String)> {
    mesh.sidecars
        .iter()
        .map(|s| {
            let serial = mesh
                .check_envoy_cert(s.def.name)
                .unwrap_or_else(|e| panic!("{e:#}"));
            eprintln!(
                "{}: Envoy uses certificate {serial} for {} from relay {}",
                s.def.name,
                s.def.spiffe_id(),
                s.def.cluster.name
            );
            (s.def.name.to_owned(), serial)
        })
        .collect()
}

#[test]
fn cross_cluster_call_over_mtls() {
    let Some(mesh) = start("e2e-mc-mtls", vec![CLIENT_A, RATINGS_B]) else {
        return;
    };
    // a -> b: 200 from b's echo, which saw client-a's identity in x-forwarded-client-cert
    // (set only behind ratings-b's mTLS filter chain): mutual TLS across the clusters.
    assert_eq!(
        mesh.expected_caller("client-a", "ratings"),
        Some(CLIENT_A.spiffe_id())
    );
    let handshakes_before = mesh
        .tls_handshakes("client-a", PORT, "ratings")
        .expect("client-a's stats");
    mesh.assert_all_answered_by("client-a", "ratings", "ratings-b", N);
    let handshakes = mesh
        .tls_handshakes("client-a", PORT, "ratings")
        .expect("client-a's stats");
    eprintln!(
        "client-a's TLS handshakes with ratings: {handshakes_before} before, {handshakes} after"
    );
    assert!(
        handshakes > 0,
        "client-a's Envoy made no TLS handshake with its ratings cluster"
    );

    // Certificates: each sidecar's Envoy holds one, for its own identity, the one its
    // relay's /debug/syncz says it sent (SDS sent and ACKed there).
    let serials = assert_own_certificates(&mesh);
    assert_ne!(
        serials[0].1, serials[1].1,
        "two identities share a certificate: {serials:?}"
    );
    for def in CLUSTERS {
        let proxies = mesh.relay_proxies(def.name).expect("relay syncz");
        for w in mesh.sidecars.iter().filter(|s| s.def.cluster == def) {
            let proxy = &proxies[&w.def.workload_id()];
            eprintln!(
                "relay {}: {} identity {} secrets {} sds {}",
                def.name, w.def.name, proxy["identity"], proxy["secrets"], proxy["types"]["sds"]
            );
            multicluster::check_proxy_secrets(proxy, &w.def).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(proxy["synced"], true, "{proxy}");
        }
    }

    // Signed by the MCPC, each for the identity its sidecar's token proved, at the
    // request of the sidecar's relay; and the sidecars never talked to the MCPC.
    for w in [CLIENT_A, RATINGS_B] {
        mesh.check_signed_via_relay(&w.spiffe_id(), w.cluster.name)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let direct = mesh.mcpc_non_relay_proxies().expect("MCPC syncz");
    assert!(
        direct.is_empty(),
        "sidecars connected to the MCPC directly: {direct:?}"
    );
    // The relays hand out the MCPC's roots.
    let mcpc_bundle = std::fs::read_to_string(mesh.trust_bundle_path()).expect("MCPC bundle");
    for def in CLUSTERS {
        let path = mesh.relay(def.name).state_dir.join("trust-bundle.pem");
        let bundle = std::fs::read_to_string(&path).expect("relay bundle");
        assert_eq!(
            bundle.trim(),
            mcpc_bundle.trim(),
            "relay {}'s trust bundle differs from the MCPC's",
            def.name
        );
    }
}

#[test]
fn mcpc_down_new_sidecar_gets_config_and_certificate_from_its_relay() {
    let Some(mut mesh) = start(
        "e2e-mc-mtls-mcpc-down",
        vec![CLIENT_A, REVIEWS_A, RATINGS_B, DETAILS_A],
    ) else {
        return;
    };
    // details-a has no sidecar yet, but its WorkloadEntry is in a's registry: relay a
    // prefetched its class; and its identity has a certificate at relay a (client-a's).
    mesh.wait_prefetched("details-a").expect("prefetch");
    let frontend_serial = mesh.check_envoy_cert("client-a").expect("client-a's cert");
    assert_own_certificates(&mesh);

    let targets = [
        mesh.target("client-a", "ratings"),
        mesh.target("client-a", "reviews"),
    ];
    for t in &targets {
        assert_eq!(
            t.caller.as_deref(),
            Some(CLIENT_A.spiffe_id().as_str()),
            "{}: traffic must be checked for mutual TLS",
            t.label
        );
    }
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    mesh.begin_mcpc_outage(&traffic, REQUESTS_PER_PHASE);

    // A new labelled sidecar in a (token made from the MCPC's CA dir, no MCPC needed):
    // config and certificate from relay a alone. start_sidecar waits until relay a
    // shows it synced with its secrets ACKed.
    traffic.set_phase("MCPC down, details-a starting");
    mesh.start_sidecar("details-a")
        .expect("details-a's sidecar while the MCPC is down");
    let details_serial = mesh
        .check_envoy_cert("details-a")
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "details-a: certificate {details_serial} from relay a; client-a's is {frontend_serial}"
    );
    assert_eq!(
        details_serial, frontend_serial,
        "relay a keeps one certificate per identity: details-a ({FRONTEND}) must get client-a's"
    );
    // It serves mutual TLS both ways: through it to b (ratings-b sees its identity), and
    // into it from client-a (its inbound presents its certificate, and sees client-a's).
    mesh.assert_all_answered_by("details-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("client-a", "details", "details-a", N);
    traffic.set_phase("MCPC down, details-a serving");
    traffic.wait_for_more(REQUESTS_PER_PHASE);

    // Across the restart the relays pushed nothing to their sidecars, secrets included.
    let report = mesh.end_mcpc_outage(
        traffic,
        REQUESTS_PER_PHASE,
        "MCPC killed, down (details-a started), restarted; over mTLS",
    );
    report.assert_answered_only_by("client-a -> ratings", "ratings-b");
    report.assert_answered_only_by("client-a -> reviews", "reviews-a");
    assert_own_certificates(&mesh);
    mesh.assert_all_answered_by("details-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("client-a", "details", "details-a", N);
    mesh.assert_sidecars_running();
}

#[test]
fn root_rotation_across_member_clusters_with_zero_failed_requests() {
    let Some(mut mesh) = start(
        "e2e-mc-mtls-rotation",
        vec![CLIENT_A, REVIEWS_A, RATINGS_B, DETAILS_A],
    ) else {
        return;
    };
    let ca = mesh.mcpc_json("/debug/ca").expect("/debug/ca");
    let old_root = ca["roots"][0]["fingerprint"].as_str().unwrap().to_owned();
    let before: Vec<(String, String)> = assert_own_certificates(&mesh);

    let targets = [
        mesh.target("client-a", "ratings"),
        mesh.target("client-a", "reviews"),
    ];
    let traffic = Traffic::start(&targets);
    traffic.wait_for_more(REQUESTS_PER_PHASE);
    traffic.set_phase("xds-server ca rotate-root");
    common::rotate_root(mesh.admin_addr).unwrap_or_else(|e| panic!("{e:#}"));
    traffic.set_phase("after the rotation");
    traffic.wait_for_more(REQUESTS_PER_PHASE);
    let report = traffic.finish();
    report.assert_no_failures("cross-cluster mTLS traffic through a root rotation");
    report.assert_answered_only_by("client-a -> ratings", "ratings-b");

    // One new root; nothing pending, no relay left behind.
    let ca = mesh.mcpc_json("/debug/ca").expect("/debug/ca");
    let roots = ca["roots"].as_array().expect("roots");
    assert_eq!(roots.len(), 1, "{ca}");
    let new_root = roots[0]["fingerprint"].as_str().unwrap().to_owned();
    assert_ne!(new_root, old_root, "{ca}");
    assert!(ca["rotation"].is_null(), "{ca}");
    assert_eq!(ca["relays_away"], serde_json::json!([]), "{ca}");
    // Every sidecar behind a relay: a new certificate, from the new root, in its Envoy.
    let after = assert_own_certificates(&mesh);
    for ((name, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new, "{name}'s certificate was not issued again");
    }
    let mcpc_bundle = std::fs::read_to_string(mesh.trust_bundle_path()).expect("MCPC bundle");
    for def in CLUSTERS {
        for w in mesh.sidecars.iter().filter(|s| s.def.cluster == def) {
            let proxies = mesh.relay_proxies(def.name).expect("relay syncz");
            let proxy = &proxies[&w.def.workload_id()];
            assert_eq!(
                proxy["secrets"]["cert_root"],
                new_root.as_str(),
                "{}'s certificate is not from the new root: {proxy}",
                w.def.name
            );
        }
        let relay = mesh.relay_status(def.name).expect("/debug/relay");
        assert_eq!(
            relay["trust_epoch"], ca["epoch"],
            "relay {}: {relay}",
            def.name
        );
        let path = mesh.relay(def.name).state_dir.join("trust-bundle.pem");
        let bundle = std::fs::read_to_string(&path).expect("relay bundle");
        assert_eq!(
            bundle.trim(),
            mcpc_bundle.trim(),
            "relay {}'s trust files are not the new bundle",
            def.name
        );
    }
    // A sidecar started now trusts only the new root: it reaches its relay (serving
    // with a certificate from the new root) and serves mTLS both ways.
    mesh.start_sidecar("details-a")
        .expect("a sidecar started after the rotation");
    mesh.check_envoy_cert("details-a")
        .unwrap_or_else(|e| panic!("{e:#}"));
    mesh.assert_all_answered_by("details-a", "ratings", "ratings-b", N);
    mesh.assert_all_answered_by("client-a", "details", "details-a", N);
    mesh.assert_sidecars_running();
}
