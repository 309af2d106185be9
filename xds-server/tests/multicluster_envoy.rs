//! Envoy accepts the multi-cluster config: the outbound clusters (with outlier detection)
//! and the endpoints of a sidecar in the primary cluster and of one in member cluster b
//! (priorities 0 and 1, localities with the cluster as subzone) go through
//! `envoy --mode validate` (Envoy 1.40, `scripts/install-envoy.sh`), once as served (EDS
//! over ADS) and once with each cluster's assignment inline, so Envoy checks the
//! endpoints too. Skips without Envoy on a developer machine, fails under `CI=true`.
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::Value;
use std::path::PathBuf;
use translated::{ads_bootstrap, inline_endpoints, open_store, resources};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::mesh::ClusterMeta;
use xds_server::translate::ProxyScope;

fn fixture() -> PathBuf {
    translated::fixture("multicluster")
}

fn snapshot() -> Snapshot {
    let mut store = open_store(&fixture().join("primary"));
    let files = ["reviews.yaml", "ratings.yaml"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(fixture().join("registry-b").join(f)).unwrap();
            (f.to_string(), text)
        })
        .collect();
    let meta = ClusterMeta {
        network: "net-b".into(),
        region: Some("eu-west".into()),
        zone: Some("eu-west-1".into()),
    };
    let outcome = store.set_cluster_registry("b", meta, files).unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    Snapshot::build(1, store.mesh())
}

/// Listeners and clusters as served, plus the ADS cluster they point at (never
/// connected to in validate mode). `inline`: EDS clusters carry their assignment.
fn bootstrap(snap: &Snapshot, scope: &ProxyScope, node: &str, inline: bool) -> Value {
    let mut clusters = resources(snap, scope, TypeKind::Cluster);
    if inline {
        inline_endpoints(&mut clusters, &resources(snap, scope, TypeKind::Endpoint));
    }
    let listeners = resources(snap, scope, TypeKind::Listener);
    ads_bootstrap(node, "multicluster-validate", listeners, clusters)
}

#[test]
fn envoy_accepts_clusters_and_ranked_endpoints() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let snap = snapshot();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (key, ip) in [
        ("productpage-v1.default", "127.0.1.1"),
        ("reviews-v1.default@b", "127.0.11.3"),
    ] {
        let scope = ProxyScope::Workload(key.into());
        let id = key.split('@').next().unwrap();
        let node = format!("sidecar~{ip}~{id}~default.svc.cluster.local");
        // The inline variant must really hold ranked endpoints, or it proves nothing.
        let inline = bootstrap(&snap, &scope, &node, true);
        let ranked = serde_json::to_string(&inline).unwrap();
        assert!(ranked.contains(r#""priority":1"#), "{key}: no priority 1");
        for (variant, b) in [
            ("ads", bootstrap(&snap, &scope, &node, false)),
            ("inline", inline),
        ] {
            let name = format!("{}-{variant}", key.replace(['.', '@'], "-"));
            let yaml = serde_json::to_string_pretty(&b).unwrap();
            if let Err(e) = trellis_tests::envoy_validate(&envoy, dir.path(), &name, &yaml) {
                failures.push(format!("{key} ({variant}): {e:#}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
