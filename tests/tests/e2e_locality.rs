//! End to end: DestinationRule `localityLbSetting` on real traffic through a real Envoy
//! sidecar configured by a real xds-server (the plaintext mesh of `e2e_routing.rs`).
//! The client's WorkloadEntry is in `region-a/zone-1`; service `hello` has one endpoint
//! (an echo app reporting its region as its version) in each of `region-a`, `region-b`
//! and `region-c`. Each scenario is a config edit every sidecar ACKs before traffic
//! checks it:
//!
//! - `distribute` 80/20 from `region-a/*` to `region-a` and `region-b`: the split is
//!   observed within a generous tolerance, and `region-c` (named by no `to`) gets nothing;
//! - `failover` from `region-a` to `region-b`: traffic stays in `region-a`; once that
//!   endpoint fails and outlier detection ejects it, traffic goes to `region-b`, never to
//!   `region-c`.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context as _;

use common::{
    call, replace_once, served_version, workloads_yaml, Mesh, Mode, SidecarMesh, NAMESPACE, PORT,
    WORKLOADS, WORKLOADS_FILE,
};
use trellis_tests::{eventually, require_envoy, start_echo};

const HELLO_FILE: &str = "hello.yaml";
const HELLO_RULE_FILE: &str = "hello-rule.yaml";
/// Requests per check that something always goes one way (see e2e_routing.rs).
const ALWAYS: usize = 50;
/// Requests for the measured split.
const SPLIT: usize = 200;
/// The host parts of the echo apps (addresses of the block no workload uses).
const REGIONS: [(&str, u8); 3] = [("region-a", 41), ("region-b", 42), ("region-c", 43)];

fn hello_service(mesh: &Mesh) -> String {
    let endpoints: String = REGIONS
        .iter()
        .map(|(region, host)| {
            format!(
                "  - {{address: {}, locality: {region}/zone-1}}\n",
                mesh.net.ip(*host)
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: hello, namespace: {NAMESPACE}}}
spec:
  hosts: [hello.{NAMESPACE}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}"
    )
}

/// The hello DestinationRule with `policy` as its `trafficPolicy` (indented 4).
fn hello_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hello, namespace: {NAMESPACE}}}
spec:
  host: hello
  trafficPolicy:
{policy}"
    )
}

/// Counts which region served `n` requests to hello; any failure is an error.
fn count_regions(
    client: SocketAddr,
    n: usize,
    headers: &[(&str, &str)],
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = call(client, "hello", "GET", "/", headers)?;
        let region = served_version(&r, "hello").with_context(|| format!("request {i} of {n}"))?;
        *counts.entry(region).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The client in region-a, and hello's endpoints in three regions.
fn setup(mesh: &mut Mesh) {
    for (region, host) in REGIONS {
        let addr = SocketAddr::new(mesh.net.ip(host), PORT);
        let echo = start_echo(mesh.dir.path(), addr, "hello", region).expect("echo");
        mesh.echos.push(echo);
    }
    let client = WORKLOADS
        .iter()
        .find(|w| w.name == "client")
        .expect("client");
    let address = format!("address: \"{}\"", client.addrs(&mesh.net).inbound);
    let workloads = replace_once(
        &workloads_yaml(&mesh.net, &WORKLOADS),
        &address,
        &format!("{address}\n  locality: region-a/zone-1"),
    );
    mesh.apply(WORKLOADS_FILE, &workloads);
    mesh.apply(HELLO_FILE, &hello_service(mesh));
    // Without a rule every endpoint is at priority 0 (none is in a cluster of the mesh).
    let client = mesh.client();
    eventually(common::EDIT_TIMEOUT, common::POLL, || {
        let counts = count_regions(client, 30, &[])?;
        anyhow::ensure!(
            counts.len() == 3,
            "not every region answers yet: {counts:?}"
        );
        Ok(())
    });
}

fn distribute(mesh: &Mesh) {
    mesh.apply(
        HELLO_RULE_FILE,
        &hello_rule(
            "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: region-a/*
          to: {\"region-a/*\": 80, \"region-b/*\": 20}
",
        ),
    );
    let counts = count_regions(mesh.client(), SPLIT, &[]).expect("traffic");
    let a = counts.get("region-a").copied().unwrap_or(0);
    let b = counts.get("region-b").copied().unwrap_or(0);
    assert_eq!(
        a + b,
        SPLIT,
        "only region-a and region-b answer: {counts:?}"
    );
    // Envoy's locality scheduler is near exact; the tolerance is for what it is not.
    let share = a as f64 / SPLIT as f64;
    eprintln!("distribute 80/20: {counts:?}");
    assert!(
        (share - 0.80).abs() <= 0.10,
        "region-a share {share:.3} is outside 0.80 ± 0.10: {counts:?}"
    );
}

fn failover(mesh: &Mesh) {
    mesh.apply(
        HELLO_RULE_FILE,
        &hello_rule(
            "    loadBalancer:
      localityLbSetting:
        failover: [{from: region-a, to: region-b}]
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
",
        ),
    );
    let client = mesh.client();
    assert_eq!(
        count_regions(client, ALWAYS, &[]).expect("traffic"),
        BTreeMap::from([("region-a".to_owned(), ALWAYS)]),
        "traffic stays in the client's region"
    );
    // region-a answers 503 from now on: its first 503 ejects it.
    let fail_a = [("x-echo-fail-version", "region-a")];
    eventually(common::EDIT_TIMEOUT, common::POLL, || {
        let r = call(client, "hello", "GET", "/", &fail_a)?;
        let region = served_version(&r, "hello")?;
        anyhow::ensure!(region == "region-b", "served by {region}");
        Ok(())
    });
    assert_eq!(
        count_regions(client, ALWAYS, &fail_a).expect("traffic"),
        BTreeMap::from([("region-b".to_owned(), ALWAYS)]),
        "region-a's traffic fails over to region-b, not region-c"
    );
    let ejected = mesh
        .envoy_stat(
            "client",
            "cluster.outbound|9080||hello.default.svc.cluster.local.outlier_detection.ejections_enforced_consecutive_5xx",
        )
        .expect("stats");
    assert!(ejected >= 1, "region-a's endpoint was ejected");
}

#[test]
fn locality_distribute_and_failover() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh = Mesh::start(&envoy_bin, "e2e-locality", Mode::Sotw).expect("mesh");
    setup(&mut mesh);
    distribute(&mesh);
    failover(&mesh);
    mesh.check_converged(true).expect("converged");
}
