//! End to end: editing the config folder while real sidecars carry traffic.
//!
//! - a valid edit changes routing within seconds, without restarting any Envoy;
//! - an invalid edit (broken YAML, a mistyped field) changes nothing in the data plane and
//!   is reported by `/debug/configz` until the file is fixed;
//! - a config the server accepts but Envoy rejects shows up as a NACK in `/debug/syncz`,
//!   and the sidecars keep serving their last good config.
//!
//! Each scenario runs in SotW and in Delta mode.

mod common;

use std::time::Duration;

use common::{
    assert_all_served_by, assert_default_mixed, count_versions, replace_once,
    virtual_service_all_to, virtual_service_yaml, Mesh, Mode, SidecarMesh, BETA_MATCH,
    EDIT_TIMEOUT, POLL, V1_WEIGHT, VIRTUAL_SERVICE_FILE,
};
use serde_json::Value;
use trellis_tests::{eventually, require_envoy};

/// Requests per check that a route always picks one version (see e2e_routing.rs).
const ALWAYS: usize = 50;

/// Envoy's stat of route config updates it accepted (resp. rejected) for the outbound
/// port's RDS subscription.
const RDS_UPDATES: &str = "http.outbound_9080.rds.9080.update_success";
const RDS_REJECTED: &str = "http.outbound_9080.rds.9080.update_rejected";

fn start(scenario: &str, mode: Mode) -> Option<Mesh> {
    let envoy_bin = require_envoy()?;
    let name = format!("e2e-{scenario}-{}", mode.as_str());
    Some(Mesh::start(&envoy_bin, &name, mode).expect("mesh"))
}

/// The unchanged initial routing: jason and /beta to v2, the rest split over v1 and v2
/// (the ratio itself is measured only where a test changes the weights).
#[track_caller]
fn assert_initial_routing(mesh: &Mesh) {
    let client = mesh.client();
    assert_all_served_by(client, ALWAYS, "/", &[("end-user", "jason")], "v2");
    assert_all_served_by(client, ALWAYS, "/beta/1", &[], "v2");
    assert_default_mixed(client, 100);
}

fn generation(mesh: &Mesh) -> u64 {
    mesh.syncz().expect("syncz")["generation"]
        .as_u64()
        .expect("generation is a number")
}

/// The `/debug/configz` errors about `file`.
fn config_errors_for(mesh: &Mesh, file: &str) -> anyhow::Result<Vec<Value>> {
    let configz = mesh.configz()?;
    let errors = configz["errors"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("configz.errors is not an array: {configz}"))?;
    Ok(errors
        .iter()
        .filter(|e| e["file"].as_str().is_some_and(|f| f.ends_with(file)))
        .cloned()
        .collect())
}

// ---------------------------------------------------------------------------------------

fn edit_changes_routing_without_restart(mode: Mode) {
    let Some(mut mesh) = start("edit", mode) else {
        return;
    };
    let client = mesh.client();
    assert_all_served_by(client, ALWAYS, "/", &[("end-user", "jason")], "v2");

    let pids = mesh.envoy_pids();
    let uptime_before = mesh.envoy_uptime("client").expect("uptime");
    let rds_updates_before = mesh.envoy_stat("client", RDS_UPDATES).expect("stats");
    assert!(
        rds_updates_before > 0,
        "no RDS update counted at {RDS_UPDATES}"
    );
    let generation_before = generation(&mesh);
    let reloads_before = mesh.configz().expect("configz")["reloads"].clone();

    mesh.write_config(VIRTUAL_SERVICE_FILE, &virtual_service_all_to("v1"));

    // Every kind of request ends up on v1, within seconds.
    eventually(EDIT_TIMEOUT, POLL, || {
        let mut seen = Vec::new();
        for (path, headers) in [
            ("/", &[("end-user", "jason")][..]),
            ("/beta", &[][..]),
            ("/", &[][..]),
        ] {
            seen.push(count_versions(client, 10, path, headers)?);
        }
        if seen.iter().all(|c| c.len() == 1 && c.contains_key("v1")) {
            Ok(())
        } else {
            Err(anyhow::anyhow!("not all on v1 yet: {seen:?}"))
        }
    });
    assert_all_served_by(client, ALWAYS, "/", &[("end-user", "jason")], "v1");
    assert_all_served_by(client, ALWAYS, "/beta", &[], "v1");
    assert_all_served_by(client, 100, "/", &[], "v1");

    // The server saw one more generation, every sidecar ACKed it, nothing is in error.
    assert!(
        generation(&mesh) > generation_before,
        "generation did not advance"
    );
    eventually(EDIT_TIMEOUT, POLL, || mesh.check_converged(true));
    let configz = mesh.configz().expect("configz");
    assert_ne!(configz["reloads"], reloads_before, "{configz}");
    assert_eq!(configz["errors"], serde_json::json!([]), "{configz}");

    // Same Envoy processes, still up, config applied in place.
    mesh.assert_sidecars_not_restarted(&pids);
    let uptime_after = mesh.envoy_uptime("client").expect("uptime");
    assert!(
        uptime_after >= uptime_before,
        "client Envoy uptime went from {uptime_before}s to {uptime_after}s: it restarted"
    );
    let rds_updates_after = mesh.envoy_stat("client", RDS_UPDATES).expect("stats");
    assert!(
        rds_updates_after > rds_updates_before,
        "{RDS_UPDATES}: {rds_updates_before} -> {rds_updates_after}"
    );

    // And back: routing is live in both directions.
    mesh.write_config(VIRTUAL_SERVICE_FILE, &virtual_service_yaml());
    eventually(EDIT_TIMEOUT, POLL, || {
        let version = common::reviews_version(client, "/beta", &[])?;
        anyhow::ensure!(version == "v2", "/beta still on {version}");
        anyhow::Ok(())
    });
    assert_initial_routing(&mesh);
    mesh.assert_sidecars_not_restarted(&pids);
}

#[test]
fn edit_changes_routing_without_restart_sotw() {
    edit_changes_routing_without_restart(Mode::Sotw);
}

#[test]
fn edit_changes_routing_without_restart_delta() {
    edit_changes_routing_without_restart(Mode::Delta);
}

// ---------------------------------------------------------------------------------------

fn invalid_edit_keeps_last_good_config(mode: Mode) {
    let Some(mut mesh) = start("invalid-edit", mode) else {
        return;
    };
    let pids = mesh.envoy_pids();
    assert_eq!(
        mesh.configz().expect("configz")["errors"],
        serde_json::json!([])
    );
    let good = virtual_service_yaml();

    // 1. Broken YAML: an unterminated flow sequence.
    mesh.write_config(
        VIRTUAL_SERVICE_FILE,
        &replace_once(&good, "hosts: [reviews]", "hosts: [reviews"),
    );
    let errors = eventually(EDIT_TIMEOUT, POLL, || {
        let errors = config_errors_for(&mesh, VIRTUAL_SERVICE_FILE)?;
        anyhow::ensure!(
            !errors.is_empty(),
            "no error for {VIRTUAL_SERVICE_FILE} yet"
        );
        anyhow::Ok(errors)
    });
    eprintln!("broken YAML reported as: {errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| e["message"].as_str().is_some_and(|m| !m.is_empty())),
        "{errors:?}"
    );
    assert!(
        mesh.syncz().expect("syncz")["config_errors"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "syncz must count the config error"
    );
    assert_initial_routing(&mesh);

    // 2. A field of the wrong type: a weight of "eighty".
    mesh.write_config(
        VIRTUAL_SERVICE_FILE,
        &replace_once(&good, V1_WEIGHT, "weight: eighty"),
    );
    let errors = eventually(EDIT_TIMEOUT, POLL, || {
        let errors = config_errors_for(&mesh, VIRTUAL_SERVICE_FILE)?;
        anyhow::ensure!(
            errors.iter().any(|e| e.to_string().contains("weight")),
            "no error about the weight yet: {errors:?}"
        );
        anyhow::Ok(errors)
    });
    eprintln!("bad weight reported as: {errors:?}");
    // The weights in effect are still the good file's 80/20.
    mesh.assert_default_split(400);
    let error = &errors[0];
    assert_eq!(error["field"], "spec.http[2].route[0].weight", "{error}");
    assert_eq!(error["object"], "VirtualService default/reviews", "{error}");
    assert!(
        error["document"].as_u64() == Some(1) && error["line"].as_u64().is_some(),
        "the error must point at the document: {error}"
    );
    assert_initial_routing(&mesh);
    // The other files are fine and say so.
    let configz = mesh.configz().expect("configz");
    assert_eq!(
        configz["errors"].as_array().map(Vec::len),
        Some(errors.len()),
        "only {VIRTUAL_SERVICE_FILE} is in error: {configz}"
    );

    // 3. Fixed (by an atomic replace this time): the error clears, routing is as before.
    mesh.replace_config(VIRTUAL_SERVICE_FILE, &good);
    eventually(EDIT_TIMEOUT, POLL, || {
        let configz = mesh.configz()?;
        anyhow::ensure!(
            configz["errors"] == serde_json::json!([]),
            "errors remain: {configz}"
        );
        let syncz = mesh.syncz()?;
        anyhow::ensure!(
            syncz["config_errors"] == 0,
            "syncz still counts errors: {}",
            syncz["config_errors"]
        );
        anyhow::Ok(())
    });
    mesh.check_converged(true).expect("converged");
    assert_initial_routing(&mesh);

    // A valid edit after the errors still takes effect: the file is watched as before.
    mesh.replace_config(VIRTUAL_SERVICE_FILE, &virtual_service_all_to("v2"));
    eventually(EDIT_TIMEOUT, POLL, || {
        let counts = count_versions(mesh.client(), 20, "/", &[])?;
        anyhow::ensure!(counts.keys().eq(["v2"]), "not all on v2 yet: {counts:?}");
        anyhow::Ok(())
    });
    mesh.assert_sidecars_not_restarted(&pids);
}

#[test]
fn invalid_edit_keeps_last_good_config_sotw() {
    invalid_edit_keeps_last_good_config(Mode::Sotw);
}

#[test]
fn invalid_edit_keeps_last_good_config_delta() {
    invalid_edit_keeps_last_good_config(Mode::Delta);
}

// ---------------------------------------------------------------------------------------

/// Valid for the server's regex check, but Envoy's RE2 refuses it: its program size is far
/// beyond Envoy's default limit of 100.
const HUGE_REGEX: &str = "/(a+|b+|c+|d+|e+|f+|g+|h+|i+|j+|k+|l+|m+){20}";

fn envoy_rejection_is_a_nack(mode: Mode) {
    let Some(mut mesh) = start("nack", mode) else {
        return;
    };
    let pids = mesh.envoy_pids();
    let rejected_before = mesh.envoy_stat("client", RDS_REJECTED).expect("stats");

    let good = virtual_service_yaml();
    mesh.write_config(
        VIRTUAL_SERVICE_FILE,
        &replace_once(
            &good,
            BETA_MATCH,
            &format!("uri: {{regex: \"{HUGE_REGEX}\"}}"),
        ),
    );

    let rds = eventually(EDIT_TIMEOUT, POLL, || {
        let proxy = mesh.proxy_status("client.default")?;
        let rds = proxy["types"]["rds"].clone();
        let error = rds["nack_error"].as_str().unwrap_or_default();
        anyhow::ensure!(error.contains("program size"), "no RDS NACK yet: {proxy}");
        anyhow::Ok(rds)
    });
    eprintln!("client RDS status after the rejected edit: {rds}");
    // What Envoy rejected is the latest version sent, and it has not ACKed that one.
    assert_eq!(rds["nacked_version"], rds["sent_version"], "{rds}");
    assert_ne!(rds["acked_version"], rds["sent_version"], "{rds}");
    assert!(rds["nacks"].as_u64().is_some_and(|n| n >= 1), "{rds}");
    let client_status = mesh.proxy_status("client.default").expect("status");
    assert_eq!(client_status["synced"], false, "{client_status}");
    // The server itself found nothing wrong with the file.
    assert_eq!(
        mesh.configz().expect("configz")["errors"],
        serde_json::json!([])
    );
    // Envoy agrees that it rejected an update.
    let rejected = mesh.envoy_stat("client", RDS_REJECTED).expect("stats");
    assert!(
        rejected > rejected_before,
        "{RDS_REJECTED}: {rejected_before} -> {rejected}"
    );

    // The sidecar keeps the last good route config: the old /beta prefix route still
    // sends /beta to v2 (under the rejected regex it would not match), jason too.
    assert_initial_routing(&mesh);
    mesh.assert_sidecars_not_restarted(&pids);

    // Restoring the file lets every sidecar ACK again.
    mesh.write_config(VIRTUAL_SERVICE_FILE, &good);
    eventually(Duration::from_secs(30), POLL, || mesh.check_converged(true));
    let rds = &mesh.proxy_status("client.default").expect("status")["types"]["rds"];
    assert_eq!(rds["acked_version"], rds["sent_version"], "{rds}");
    assert_initial_routing(&mesh);
    mesh.assert_sidecars_not_restarted(&pids);
}

#[test]
fn envoy_rejection_is_a_nack_and_last_good_config_stays_sotw() {
    envoy_rejection_is_a_nack(Mode::Sotw);
}

#[test]
fn envoy_rejection_is_a_nack_and_last_good_config_stays_delta() {
    envoy_rejection_is_a_nack(Mode::Delta);
}
