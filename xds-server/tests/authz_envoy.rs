//! Envoy accepts the generated authorization and JWT config: every inbound listener of
//! every workload in `fixtures/authz/` (mTLS and plaintext chains, HTTP and TCP), with
//! every cluster of its view (inbound, outbound over EDS, remote JWKS), goes through `envoy --mode validate` (Envoy 1.40, installed by
//! `scripts/install-envoy.sh`). Skips without Envoy on a developer machine, fails under
//! `CI=true`.
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::Value;
use std::path::PathBuf;
use translated::{ads_bootstrap, open_store};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::dump::resource_json;
use xds_server::translate::ProxyScope;

fn fixture() -> PathBuf {
    translated::fixture("authz")
}

/// A static bootstrap holding a workload's inbound listeners and all its clusters (the
/// JWKS clusters with their TLS settings among them), with an ADS config so that the SDS
/// secrets of the mTLS chains and the EDS of outbound clusters resolve (nothing connects
/// in validate mode, and Envoy does not check that a JWKS provider's cluster exists:
/// the golden files do).
fn bootstrap(snap: &Snapshot, workload: &str) -> Value {
    let w = &snap.mesh.workloads[workload];
    let view = snap.view(&ProxyScope::Workload(workload.into()));
    let prefix = format!("{}_", w.address);
    let listeners: Vec<Value> = view
        .iter(TypeKind::Listener)
        .filter(|l| l.name.starts_with(&prefix))
        .map(|l| resource_json(l)["resource"].clone())
        .collect();
    assert!(!listeners.is_empty(), "{workload} has no inbound listener");
    let clusters: Vec<Value> = view
        .iter(TypeKind::Cluster)
        .map(|c| resource_json(c)["resource"].clone())
        .collect();
    let node = format!(
        "sidecar~{}~{workload}~{}.svc.cluster.local",
        w.address, w.namespace
    );
    ads_bootstrap(&node, "authz-validate", listeners, clusters)
}

#[test]
fn envoy_accepts_every_generated_inbound_listener() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Envoy reads a file JWKS when it loads the listener: give it a real one.
    let jwks = dir.path().join("files.json");
    std::fs::write(
        &jwks,
        r#"{"keys": [{"kty": "oct", "alg": "HS256", "kid": "f1", "k": "ZmlsZS1zZWNyZXQta2V5LWZvci10aGUtdGVzdHMtMDE"}]}"#,
    )
    .unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let text = text.replace("/etc/trellis/jwks/files.json", jwks.to_str().unwrap());
        std::fs::write(config.join(e.file_name()), text).unwrap();
    }
    let snap = Snapshot::build(1, open_store(&config).mesh());
    let workloads: Vec<String> = snap.mesh.workloads.keys().cloned().collect();
    assert!(workloads.len() >= 10, "{workloads:?}");
    let jwks_clusters = snap
        .view(&ProxyScope::Workload("open.default".into()))
        .iter(TypeKind::Cluster)
        .filter(|c| c.name.starts_with("jwks|"))
        .count();
    assert_eq!(
        jwks_clusters, 2,
        "the remote JWKS clusters are validated too"
    );
    let mut failures = Vec::new();
    for workload in &workloads {
        let name = workload.replace('.', "-");
        let yaml = serde_json::to_string_pretty(&bootstrap(&snap, workload)).unwrap();
        if let Err(e) = trellis_tests::envoy_validate(&envoy, dir.path(), &name, &yaml) {
            failures.push(format!("{workload}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
