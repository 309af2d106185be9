//! DestinationRule `localityLbSetting` in EDS (`fixtures/locality`): `failover` ranks
//! endpoints by how much of the proxy's locality they share and then by the failover
//! target region, `failoverPriority` by the leading labels they share with the proxy
//! (combined with `failover` as Istio combines them), `distribute` weighs localities; the
//! sets are shared by every proxy of one class (locality, compared labels) and follow
//! edits incrementally. Golden files `tests/golden/locality.*.json` (regenerate with
//! `UPDATE_GOLDEN=1`, review the diff); Envoy checks the result in validate mode (skips
//! without Envoy on a developer machine, fails under `CI=true`).
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use translated::{
    ads_bootstrap, check_dump, edit_and_reload, editable_copy, inline_endpoints, resource,
    resources, snapshot_of,
};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::translate::ProxyScope;

fn dir() -> PathBuf {
    translated::fixture("locality")
}

fn client(name: &str) -> ProxyScope {
    ProxyScope::Workload(format!("{name}.default"))
}

fn cluster(svc: &str, subset: &str) -> String {
    format!("outbound|9080|{subset}|{svc}.default.svc.cluster.local")
}

/// The backends by address, as the groups name them.
fn backend(ip: &str) -> &'static str {
    match ip {
        "127.0.2.1" => "a1",
        "127.0.2.2" => "a1r",
        "127.0.2.3" => "a2",
        "127.0.2.4" => "b",
        "127.0.2.5" => "c",
        _ => panic!("unknown backend {ip}"),
    }
}

/// (priority, locality weight, backends) per locality group of an assignment.
fn groups(snap: &Snapshot, scope: &ProxyScope, name: &str) -> Vec<(u64, Option<u64>, String)> {
    let cla = resource(snap, scope, TypeKind::Endpoint, name);
    cla["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let eps: Vec<&str> = g["lbEndpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    backend(
                        e["endpoint"]["address"]["socketAddress"]["address"]
                            .as_str()
                            .unwrap(),
                    )
                })
                .collect();
            (
                g["priority"].as_u64().unwrap_or(0),
                g["loadBalancingWeight"].as_u64(),
                eps.join(","),
            )
        })
        .collect()
}

/// Backends by priority: `["a1", "a2,c"]` is a1 at 0, a2 and c at 1.
fn by_priority(snap: &Snapshot, scope: &ProxyScope, name: &str) -> Vec<String> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for (p, _, eps) in groups(snap, scope, name) {
        let p = usize::try_from(p).unwrap();
        if out.len() <= p {
            out.resize(p + 1, Vec::new());
        }
        out[p].push(eps);
    }
    out.into_iter().map(|v| v.join(",")).collect()
}

/// Backend -> locality weight.
fn weights(snap: &Snapshot, scope: &ProxyScope, name: &str) -> Vec<(String, u64)> {
    groups(snap, scope, name)
        .into_iter()
        .map(|(p, w, eps)| {
            assert_eq!(p, 0, "distribute keeps every locality at priority 0");
            (
                eps,
                w.expect("every locality of a weighted cluster has a weight"),
            )
        })
        .collect()
}

fn owned(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(s, w)| (s.to_string(), *w)).collect()
}

#[test]
fn golden_eds_per_locality() {
    let snap = snapshot_of(&dir());
    for name in ["client-a", "client-b", "client-none"] {
        check_dump(
            &format!("locality.{name}.endpoints"),
            &snap,
            &client(name),
            TypeKind::Endpoint,
        );
    }
}

#[test]
fn failover_ranks_by_locality_then_the_target_region() {
    let snap = snapshot_of(&dir());
    let failover = cluster("failover", "");
    // Same subzone, same zone, same region, the failover target, the rest.
    assert_eq!(
        by_priority(&snap, &client("client-a"), &failover),
        ["a1", "a1r", "a2", "b", "c"]
    );
    // Ranks nobody holds are skipped: no gaps.
    assert_eq!(
        by_priority(&snap, &client("client-a"), &cluster("failover", "v1")),
        ["a1", "a2", "b"]
    );
    // region-b has no failover entry: every other region alike.
    assert_eq!(
        by_priority(&snap, &client("client-b"), &failover),
        ["b", "a1,a1r,a2,c"]
    );
    // A proxy without a locality shares a region with nobody.
    assert_eq!(
        by_priority(&snap, &client("client-none"), &failover),
        ["a1,a1r,a2,b,c"]
    );
    // `enabled: false` on a subset: everything at priority 0.
    assert_eq!(
        by_priority(&snap, &client("client-a"), &cluster("failover", "flat")),
        ["a1,a1r,a2,b,c"]
    );
    // No rule and one cluster: as before, all at priority 0, no weights.
    let plain = groups(&snap, &client("client-a"), &cluster("plain", ""));
    assert!(
        plain.iter().all(|(p, w, _)| *p == 0 && w.is_none()),
        "{plain:?}"
    );
}

#[test]
fn failover_priority_ranks_by_the_leading_labels() {
    let snap = snapshot_of(&dir());
    let priority = cluster("priority", "");
    // [network, version] from net-primary/v1: both match, network only, neither.
    assert_eq!(
        by_priority(&snap, &client("client-a"), &priority),
        ["a1,a2", "a1r,c", "b"]
    );
    // client-b is v2: the v1 endpoints of its network come second.
    assert_eq!(
        by_priority(&snap, &client("client-b"), &priority),
        ["a1r,c", "a1,a2", "b"]
    );
    // `version=v1` compares with v1 whoever asks; `failover` ranks within each label
    // rank: v1 by locality (b is not region-a's failover target, c is), then v2.
    let stable = cluster("priority", "stable");
    assert_eq!(
        by_priority(&snap, &client("client-a"), &stable),
        ["a1", "a2", "b", "a1r", "c"]
    );
    assert_eq!(
        by_priority(&snap, &client("client-b"), &stable),
        ["b", "a1,a2", "a1r,c"]
    );
}

#[test]
fn distribute_weighs_localities() {
    let snap = snapshot_of(&dir());
    let weighted = cluster("weighted", "");
    // region-a/zone-1/* (two localities, one endpoint each) shares 70; region-b 30; the
    // localities no pattern names get nothing.
    assert_eq!(
        weights(&snap, &client("client-a"), &weighted),
        owned(&[("a1", 35), ("a1r", 35), ("b", 30)])
    );
    assert_eq!(
        weights(&snap, &client("client-c"), &weighted),
        owned(&[("a2", 50), ("c", 50)])
    );
    // No `from` matches region-b: each locality weighs what its endpoints weigh.
    assert_eq!(
        weights(&snap, &client("client-b"), &weighted),
        owned(&[("a1", 1), ("a1r", 1), ("a2", 1), ("b", 1), ("c", 1)])
    );
    // Only the weighted cluster is locality-weighted.
    for (svc, weighted) in [("weighted", true), ("failover", false), ("plain", false)] {
        let c = resource(
            &snap,
            &client("client-a"),
            TypeKind::Cluster,
            &cluster(svc, ""),
        );
        assert_eq!(
            c["commonLbConfig"]["localityWeightedLbConfig"].is_object(),
            weighted,
            "{svc}: {c}"
        );
    }
}

#[test]
fn proxies_of_one_class_share_their_eds_set() {
    let snap = snapshot_of(&dir());
    let (a, a2, b) = (
        snap.view(&client("client-a")),
        snap.view(&client("client-a2")),
        snap.view(&client("client-b")),
    );
    assert_eq!(
        a.version(TypeKind::Endpoint),
        a2.version(TypeKind::Endpoint)
    );
    for r in a.iter(TypeKind::Endpoint) {
        let same = a2.get(TypeKind::Endpoint, &r.name).unwrap();
        assert!(Arc::ptr_eq(r, same), "{}: encoded once per class", r.name);
    }
    // A service without locality settings keeps the one shared set for everyone, and an
    // assignment that comes out the same for two classes is one resource.
    for name in [cluster("plain", ""), cluster("failover", "flat")] {
        assert!(
            Arc::ptr_eq(
                a.get(TypeKind::Endpoint, &name).unwrap(),
                b.get(TypeKind::Endpoint, &name).unwrap()
            ),
            "{name}"
        );
    }
    assert_ne!(a.version(TypeKind::Endpoint), b.version(TypeKind::Endpoint));
}

/// A proxy that moves to another locality gets that locality's set; what other classes
/// computed carries over to the next snapshot, and every view equals a fresh build.
#[test]
fn a_locality_change_follows_incrementally() {
    let (dir, mut store) = editable_copy(&dir());
    let first = Snapshot::build(1, store.mesh());
    let failover = cluster("failover", "");
    let kept = first.view(&client("client-b"));

    edit_and_reload(&mut store, dir.path(), "workloads.yaml", |t| {
        t.replacen(
            "address: 127.0.1.1\n  labels: {role: client, version: v1}\n  locality: region-a/zone-1",
            "address: 127.0.1.1\n  labels: {role: client, version: v1}\n  locality: region-b/zone-1",
            1,
        )
    });
    let next = Snapshot::build_from(2, store.mesh(), Some(&first));
    let fresh = Snapshot::build(2, store.mesh());
    assert_eq!(
        by_priority(&next, &client("client-a"), &failover),
        ["b", "a1,a1r,a2,c"]
    );
    for name in [
        "client-a",
        "client-a2",
        "client-b",
        "client-c",
        "client-none",
    ] {
        assert_eq!(
            next.view(&client(name)).version(TypeKind::Endpoint),
            fresh.view(&client(name)).version(TypeKind::Endpoint),
            "{name}"
        );
    }
    // client-b's class of the (unchanged) failover service was computed before: reused.
    assert!(Arc::ptr_eq(
        kept.get(TypeKind::Endpoint, &failover).unwrap(),
        next.view(&client("client-b"))
            .get(TypeKind::Endpoint, &failover)
            .unwrap()
    ));
}

/// A rule edit changes the classes: a proxy whose labels no longer matter joins the
/// shared set.
#[test]
fn a_rule_change_regroups_proxies() {
    let (dir, mut store) = editable_copy(&dir());
    let first = Snapshot::build(1, store.mesh());
    let priority = cluster("priority", "");
    assert_ne!(
        by_priority(&first, &client("client-a"), &priority),
        by_priority(&first, &client("client-b"), &priority)
    );
    edit_and_reload(&mut store, dir.path(), "rules.yaml", |t| {
        t.replace(
            "failoverPriority: [topology.istio.io/network, version]",
            "failoverPriority: [topology.istio.io/network, version=v1]",
        )
    });
    let next = Snapshot::build_from(2, store.mesh(), Some(&first));
    let (a, b) = (
        next.view(&client("client-a")),
        next.view(&client("client-b")),
    );
    assert!(Arc::ptr_eq(
        a.get(TypeKind::Endpoint, &priority).unwrap(),
        b.get(TypeKind::Endpoint, &priority).unwrap()
    ));
    assert_eq!(
        by_priority(&next, &client("client-b"), &priority),
        ["a1,a2", "a1r,c", "b"]
    );
}

#[test]
fn envoy_accepts_ranked_and_weighted_endpoints() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let snap = snapshot_of(&dir());
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, ip) in [("client-a", "127.0.1.1"), ("client-c", "127.0.1.4")] {
        let scope = client(name);
        let mut clusters: Vec<Value> = resources(&snap, &scope, TypeKind::Cluster);
        inline_endpoints(&mut clusters, &resources(&snap, &scope, TypeKind::Endpoint));
        let listeners = resources(&snap, &scope, TypeKind::Listener);
        let node = format!("sidecar~{ip}~{name}.default~default.svc.cluster.local");
        let bootstrap = ads_bootstrap(&node, "locality-validate", listeners, clusters);
        let yaml = serde_json::to_string_pretty(&bootstrap).unwrap();
        if name == "client-a" {
            assert!(yaml.contains("\"priority\": 4"), "{name}: ranks reach 4");
        }
        assert!(yaml.contains("localityWeightedLbConfig"), "{name}");
        if let Err(e) = trellis_tests::envoy_validate(&envoy, tmp.path(), name, &yaml) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
