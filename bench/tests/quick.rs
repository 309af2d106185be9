//! `xds-bench quick` end to end: every scenario in both modes with tiny numbers against
//! a self-started xds-server. Checks that it runs and reports, never how fast.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEYS: &[&str] = &[
    "scenario",
    "clients",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "all_ms",
    "server_cpu_s",
    "server_rss_bytes",
    "rss_per_proxy_bytes",
    "bytes_per_client",
    "floor_ratio",
];

fn xds_server() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_xds-bench"));
    let server = bench.with_file_name("xds-server");
    assert!(
        server.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        server.display()
    );
    server
}

fn relay() -> PathBuf {
    let relay = xds_server().with_file_name("relay");
    assert!(
        relay.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        relay.display()
    );
    relay
}

#[test]
fn quick_runs_every_scenario_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("quick.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xds-bench"))
        .arg("quick")
        .arg("--server-bin")
        .arg(xds_server())
        .arg("--relay-bin")
        .arg(relay())
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so the child never blocks on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("xds-bench quick did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    println!("{out}");
    assert!(status.success(), "xds-bench quick failed: {status}\n{err}");
    assert!(out.contains("summary"), "no summary table:\n{out}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = v.as_array().expect("an array of scenario results");
    // envoy-convergence runs (once per mode, with a simulated policy-change row after it)
    // when Envoy is found; under CI it must be.
    let envoy_rows = results
        .iter()
        .filter(|r| r["scenario"] == "envoy-convergence")
        .count();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert_eq!(
            envoy_rows, 2,
            "CI=true: envoy-convergence must run in both modes"
        );
    }
    assert!(envoy_rows == 0 || envoy_rows == 2, "{envoy_rows}");
    assert_eq!(
        results.len(),
        16 + 2 * envoy_rows,
        "5 scenarios x 2 modes, relay's 3 rows x 2 modes, plus envoy-convergence and its comparison row"
    );
    for (i, r) in results.iter().enumerate() {
        for k in KEYS {
            assert!(r.get(*k).is_some(), "key {k} missing in {r}");
        }
        // envoy-convergence and the policy-change row right after it: 3 clients.
        let envoy = r["scenario"] == "envoy-convergence"
            || (i > 0 && results[i - 1]["scenario"] == "envoy-convergence");
        assert_eq!(r["clients"], if envoy { 3 } else { 20 }, "{r}");
        assert!(r["all_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bytes_per_client"].as_f64().unwrap() > 0.0, "{r}");
    }
    let scenarios: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    for s in [
        "storm",
        "endpoint-change",
        "policy-change",
        "churn",
        "reconnect",
        "relay-storm",
        "relay-endpoint-change",
        "direct-endpoint-change",
    ] {
        let extra = if s == "policy-change" { envoy_rows } else { 0 };
        assert_eq!(
            scenarios.iter().filter(|x| **x == s).count(),
            2 + extra,
            "{s}"
        );
    }
    for r in results
        .iter()
        .filter(|r| r["scenario"] == "envoy-convergence")
    {
        assert_eq!(r["clients"], 3, "{r}");
        assert_eq!(r["envoy"]["envoys"], 3, "{r}");
        assert!(r["envoy"]["polls"].as_u64().unwrap() > 0, "{r}");
    }
    // Through 2 relays: one upstream stream each (the clients are one proxy class per
    // relay), every client connected to a relay.
    for r in results
        .iter()
        .filter(|r| r["scenario"] == "relay-storm" || r["scenario"] == "relay-endpoint-change")
    {
        let relay = &r["relay"];
        assert_eq!(relay["relays"], 2, "{r}");
        assert_eq!(relay["upstream_streams"], 2, "{r}");
        assert_eq!(relay["relay_proxies"], 20, "{r}");
        assert!(relay["relay_rss_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    let direct = results
        .iter()
        .find(|r| r["scenario"] == "relay-endpoint-change")
        .unwrap();
    assert!(
        direct["relay"]["direct_all_ms"].as_f64().unwrap() > 0.0,
        "{direct}"
    );
    let storm = results.iter().find(|r| r["scenario"] == "storm").unwrap();
    assert!(storm["rss_per_proxy_bytes"].is_number(), "{storm}");
    assert!(storm["floor_ratio"].is_number(), "{storm}");
}

#[test]
fn ca_reports_every_operation() {
    let out = Command::new(env!("CARGO_BIN_EXE_xds-bench"))
        .args(["ca", "--clients", "20"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for key in [
        "issue_with_new_key_us",
        "sign_csr_us",
        "token_verify_us",
        "rotation_phases_ms",
    ] {
        assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {json}");
    }
}
