//! Member clusters' workloads in the mesh: the registry merge (cluster-qualified workload
//! keys, WorkloadEntries only, per-file last good, errors naming cluster and file,
//! removal) and EDS per proxy cluster (own cluster's endpoints at priority 0, other
//! clusters' at 1, localities with the cluster as subzone, sharing where nothing differs).
//!
//! The mesh is `tests/fixtures/multicluster`: `primary/` is the config folder, `registry-b/`
//! what member cluster b's relay reports. Golden files are
//! `tests/golden/multicluster.*.json` (regenerate with `UPDATE_GOLDEN=1`, review the diff).
#![allow(clippy::unwrap_used)]

mod translated;

use std::path::PathBuf;
use std::sync::Arc;
use translated::{check_dump, copy_config, open_store, resource};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::store::RegistryError;
use xds_server::config::ConfigError;
use xds_server::dump::resource_json;
use xds_server::mesh::ClusterMeta;
use xds_server::mesh::MeshStore;
use xds_server::translate::ProxyScope;

fn fixture() -> PathBuf {
    translated::fixture("multicluster")
}

fn meta_b() -> ClusterMeta {
    ClusterMeta {
        network: "net-b".into(),
        region: Some("eu-west".into()),
        zone: Some("eu-west-1".into()),
    }
}

/// The files of `registry-b/`, named as a relay names them (relative to its folder).
fn registry_b() -> Vec<(String, String)> {
    ["reviews.yaml", "ratings.yaml"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(fixture().join("registry-b").join(f)).unwrap();
            (format!("registry/{f}"), text)
        })
        .collect()
}

fn primary() -> MeshStore {
    open_store(&fixture().join("primary"))
}

/// The primary folder plus cluster b's registry.
fn two_clusters() -> MeshStore {
    let mut store = primary();
    let outcome = store
        .set_cluster_registry("b", meta_b(), registry_b())
        .unwrap();
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert!(outcome.changed);
    assert_eq!(outcome.workloads, 3);
    store
}

/// (priority, locality "region/zone/subzone", endpoint addresses) per group of a CLA.
fn groups(snap: &Snapshot, scope: &ProxyScope, cluster: &str) -> Vec<(u64, String, Vec<String>)> {
    let cla = resource(snap, scope, TypeKind::Endpoint, cluster);
    cla["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let l = &g["locality"];
            let part = |k: &str| l[k].as_str().unwrap_or_default().to_string();
            (
                g["priority"].as_u64().unwrap_or(0),
                format!("{}/{}/{}", part("region"), part("zone"), part("subZone")),
                g["lbEndpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        e["endpoint"]["address"]["socketAddress"]["address"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect(),
            )
        })
        .collect()
}

fn g(priority: u64, locality: &str, addrs: &[&str]) -> (u64, String, Vec<String>) {
    (
        priority,
        locality.to_string(),
        addrs.iter().map(|s| s.to_string()).collect(),
    )
}

const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
const REVIEWS_V1: &str = "outbound|9080|v1|reviews.default.svc.cluster.local";
const REVIEWS_V2: &str = "outbound|9080|v2|reviews.default.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.default.svc.cluster.local";
const PRODUCTPAGE: &str = "outbound|9080||productpage.default.svc.cluster.local";

#[test]
fn golden_eds_per_proxy_cluster() {
    let snap = Snapshot::build(1, two_clusters().mesh());
    let in_primary = ProxyScope::Workload("productpage-v1.default".into());
    let in_b = ProxyScope::Workload("reviews-v1.default@b".into());
    check_dump(
        "multicluster.primary.endpoints",
        &snap,
        &in_primary,
        TypeKind::Endpoint,
    );
    check_dump("multicluster.b.endpoints", &snap, &in_b, TypeKind::Endpoint);
    check_dump("multicluster.b.listeners", &snap, &in_b, TypeKind::Listener);
    // Outbound clusters do not depend on the proxy's cluster.
    assert_eq!(
        snap.view(&ProxyScope::namespace("default", "primary"))
            .version(TypeKind::Cluster),
        snap.view(&ProxyScope::namespace("default", "b"))
            .version(TypeKind::Cluster)
    );
}

#[test]
fn own_cluster_first_others_at_priority_one() {
    let snap = Snapshot::build(1, two_clusters().mesh());
    let in_primary = ProxyScope::namespace("default", "primary");
    let in_b = ProxyScope::namespace("default", "b");
    let (east, b, b2) = (
        "us-east/us-east-1/primary",
        "eu-west/eu-west-1/b",
        "eu-west/eu-west-2/b",
    );
    assert_eq!(
        groups(&snap, &in_primary, REVIEWS),
        [
            g(0, east, &["127.0.1.3"]),
            g(1, b, &["127.0.11.3", "127.0.11.4"])
        ]
    );
    assert_eq!(
        groups(&snap, &in_b, REVIEWS),
        [
            g(0, b, &["127.0.11.3", "127.0.11.4"]),
            g(1, east, &["127.0.1.3"])
        ]
    );
    assert_eq!(
        groups(&snap, &in_b, REVIEWS_V1),
        [g(0, b, &["127.0.11.3"]), g(1, east, &["127.0.1.3"])]
    );
    // The workload's own locality wins over its cluster's.
    assert_eq!(
        groups(&snap, &in_b, RATINGS),
        [g(0, b2, &["127.0.11.5"]), g(1, east, &["127.0.1.5"])]
    );
    // Priorities never skip a level: where a proxy's cluster has none (or all) of the
    // endpoints, they are all priority 0, and the same resource for every cluster.
    assert_eq!(
        groups(&snap, &in_primary, REVIEWS_V2),
        [g(0, b, &["127.0.11.4"])]
    );
    assert_eq!(
        groups(&snap, &in_b, PRODUCTPAGE),
        [g(0, east, &["127.0.1.1"])]
    );
    let (vp, vb) = (snap.view(&in_primary), snap.view(&in_b));
    for shared in [REVIEWS_V2, PRODUCTPAGE] {
        assert!(Arc::ptr_eq(
            vp.get(TypeKind::Endpoint, shared).unwrap(),
            vb.get(TypeKind::Endpoint, shared).unwrap()
        ));
    }
    // A cluster without endpoints of its own (or unknown) gets everything at priority 0.
    let in_c = ProxyScope::namespace("default", "c");
    assert_eq!(
        groups(&snap, &in_c, REVIEWS),
        [
            g(0, b, &["127.0.11.3", "127.0.11.4"]),
            g(0, east, &["127.0.1.3"])
        ]
    );
}

#[test]
fn a_single_cluster_mesh_has_one_eds_set() {
    let snap = Snapshot::build(1, primary().mesh());
    let a = snap.view(&ProxyScope::namespace("default", "primary"));
    let b = snap.view(&ProxyScope::Workload("reviews-v1.default".into()));
    assert_eq!(a.version(TypeKind::Endpoint), b.version(TypeKind::Endpoint));
    for r in a.iter(TypeKind::Endpoint) {
        assert!(Arc::ptr_eq(r, b.get(TypeKind::Endpoint, &r.name).unwrap()));
        let cla = resource_json(r)["resource"].clone();
        for group in cla["endpoints"].as_array().into_iter().flatten() {
            assert_eq!(group.get("priority"), None, "{}", r.name);
        }
    }
}

#[test]
fn workload_keys_are_qualified_by_member_cluster() {
    let store = two_clusters();
    let mesh = store.mesh();
    let own = &mesh.workloads["reviews-v1.default"];
    let member = &mesh.workloads["reviews-v1.default@b"];
    assert_eq!(
        (own.cluster.as_str(), own.network.as_str()),
        ("primary", "net-primary")
    );
    assert_eq!(own.locality.as_deref(), Some("us-east/us-east-1"));
    assert_eq!(
        (member.cluster.as_str(), member.network.as_str()),
        ("b", "net-b")
    );
    assert_eq!(member.locality.as_deref(), Some("eu-west/eu-west-1"));
    assert_eq!(member.id(), "reviews-v1.default");
    let ratings = &mesh.workloads["ratings-v1.default@b"];
    assert_eq!(ratings.network, "net-b2");
    assert_eq!(ratings.locality.as_deref(), Some("eu-west/eu-west-2"));
    // Services select workloads of every cluster.
    assert_eq!(
        mesh.workload_services["reviews-v1.default@b"],
        ["reviews.default.svc.cluster.local"]
    );
    let reviews = &mesh.services["reviews.default.svc.cluster.local"];
    let mut keys: Vec<_> = reviews
        .endpoints
        .iter()
        .map(|e| e.workload.clone().unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "reviews-v1.default",
            "reviews-v1.default@b",
            "reviews-v2.default@b"
        ]
    );
    assert_eq!(
        mesh.workload("reviews-v2.default", Some("b"))
            .map(|w| &w.key),
        Some(&"reviews-v2.default@b".to_string())
    );
    assert!(mesh.workload("reviews-v2.default", None).is_none());
    assert!(mesh
        .workload("reviews-v1.default", Some("primary"))
        .is_some());
    // A snapshot finds a proxy's workload in the cluster its node metadata names.
    let snap = Snapshot::build(1, mesh.clone());
    assert_eq!(
        snap.scope(Some("reviews-v1.default"), "default", Some("b")),
        ProxyScope::Workload("reviews-v1.default@b".into())
    );
    assert_eq!(
        snap.scope(Some("reviews-v1.default"), "default", None),
        ProxyScope::Workload("reviews-v1.default".into())
    );
    assert_eq!(
        snap.scope(Some("productpage-v1.default"), "default", Some("b")),
        ProxyScope::namespace("default", "b")
    );
}

fn we(name: &str, address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  address: {address}\n  labels: {{app: reviews, version: v3}}\n  ports: {{http: 9080}}\n"
    )
}

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

fn messages(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn member_clusters_report_workload_entries_only() {
    let mut store = two_clusters();
    let mut report = registry_b();
    report.push((
        "registry/routing.yaml".into(),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: ratings\n  namespace: default\nspec:\n  host: ratings\n".into(),
    ));
    let outcome = store
        .set_cluster_registry("b", meta_b(), report.clone())
        .unwrap();
    assert!(!outcome.changed);
    assert_eq!(outcome.errors.len(), 1, "{}", messages(&outcome.errors));
    let e = outcome.errors[0].to_string();
    assert!(
        e.starts_with("cluster b: registry/routing.yaml: document 1 (line 1): DestinationRule default/ratings: kind: "),
        "{e}"
    );
    assert!(e.contains("not accepted from cluster b"), "{e}");
    assert_eq!(outcome.new_errors, outcome.errors);
    // The error stays listed (for /debug/configz) while the file is in the reports.
    assert_eq!(store.errors(), outcome.errors);
    let again = store.set_cluster_registry("b", meta_b(), report).unwrap();
    assert!(again.new_errors.is_empty());
    assert_eq!(again.errors.len(), 1);
    let fixed = store
        .set_cluster_registry("b", meta_b(), registry_b())
        .unwrap();
    assert!(fixed.errors.is_empty() && store.errors().is_empty());
}

#[test]
fn a_bad_registry_file_keeps_its_last_good_version() {
    let mut store = primary();
    let good = we("reviews-v3", "127.0.11.6");
    store
        .set_cluster_registry("b", meta_b(), files(&[("registry/v3.yaml", &good)]))
        .unwrap();
    assert!(store.mesh().workloads.contains_key("reviews-v3.default@b"));

    let bad = good.replace("127.0.11.6", "not-an-ip");
    let outcome = store
        .set_cluster_registry("b", meta_b(), files(&[("registry/v3.yaml", &bad)]))
        .unwrap();
    assert!(!outcome.changed);
    assert_eq!(
        messages(&outcome.errors),
        "cluster b: registry/v3.yaml: document 1 (line 1): WorkloadEntry default/reviews-v3: spec.address: \
         `not-an-ip` is not an IP address (a host name needs a ServiceEntry with resolution DNS)"
    );
    let w = &store.mesh().workloads["reviews-v3.default@b"];
    assert_eq!(w.address.to_string(), "127.0.11.6");

    // A cross-file error (two files defining one workload) holds the changed files back.
    let dup = files(&[("registry/v3.yaml", &good), ("registry/v4.yaml", &good)]);
    let outcome = store.set_cluster_registry("b", meta_b(), dup).unwrap();
    assert!(
        messages(&outcome.errors)
            .contains("cluster b: registry/v4.yaml: document 1 (line 1): WorkloadEntry default/reviews-v3: metadata.name: already defined in cluster b: registry/v3.yaml document 1"),
        "{}",
        messages(&outcome.errors)
    );
    assert_eq!(outcome.workloads, 1);
    let w = &store.mesh().workloads["reviews-v3.default@b"];
    assert_eq!(w.address.to_string(), "127.0.11.6");
}

#[test]
fn inbound_addresses_clash_only_within_a_cluster() {
    let mut store = primary();
    // primary's reviews-v1 is on 127.0.1.3: another cluster is another host.
    let same_as_primary = we("reviews-v3", "127.0.1.3");
    let outcome = store
        .set_cluster_registry(
            "b",
            meta_b(),
            files(&[("registry/v3.yaml", &same_as_primary)]),
        )
        .unwrap();
    assert!(outcome.errors.is_empty(), "{}", messages(&outcome.errors));
    let clash = files(&[
        ("registry/v3.yaml", &same_as_primary),
        ("registry/v4.yaml", &we("reviews-v4", "127.0.1.3")),
    ]);
    let outcome = store.set_cluster_registry("b", meta_b(), clash).unwrap();
    let m = messages(&outcome.errors);
    assert!(
        m.contains("cluster b: registry/v4.yaml")
            && m.contains("is already the inbound address of workload reviews-v3.default@b"),
        "{m}"
    );
    assert!(!store.mesh().workloads.contains_key("reviews-v4.default@b"));
}

#[test]
fn reports_replace_the_whole_set_and_removal_drops_the_cluster() {
    let mut store = two_clusters();
    let same = store
        .set_cluster_registry("b", meta_b(), registry_b())
        .unwrap();
    assert!(!same.changed, "an unchanged report is not a change");

    // A file missing from the report is deleted.
    let only_reviews: Vec<_> = registry_b()
        .into_iter()
        .filter(|(n, _)| n.ends_with("reviews.yaml"))
        .collect();
    let outcome = store
        .set_cluster_registry("b", meta_b(), only_reviews.clone())
        .unwrap();
    assert!(outcome.changed);
    assert_eq!(outcome.workloads, 2);
    assert!(!store.mesh().workloads.contains_key("ratings-v1.default@b"));

    // New metadata alone is a change: localities and networks follow it.
    let moved = ClusterMeta {
        network: String::new(),
        region: Some("ap-south".into()),
        zone: None,
    };
    let outcome = store
        .set_cluster_registry("b", moved.clone(), only_reviews)
        .unwrap();
    assert!(outcome.changed);
    let w = &store.mesh().workloads["reviews-v1.default@b"];
    assert_eq!(w.locality.as_deref(), Some("ap-south"));
    assert_eq!(w.network, "b", "the network defaults to the cluster name");
    assert_eq!(store.mesh().members["b"], moved);
    let status = store.cluster_status();
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].files, status[0].workloads), (1, 2));

    let outcome = store.remove_cluster_registry("b");
    assert!(outcome.changed);
    let mesh = store.mesh();
    assert!(mesh.workloads.keys().all(|k| !k.contains('@')));
    assert!(mesh.members.is_empty());
    assert_eq!(
        mesh.services["reviews.default.svc.cluster.local"]
            .endpoints
            .len(),
        1
    );
    assert!(store.cluster_status().is_empty());
    assert!(!store.remove_cluster_registry("b").changed);
}

#[test]
fn reports_that_cannot_be_taken_are_refused() {
    let mut store = primary();
    let refused = |store: &mut MeshStore, cluster: &str, meta: ClusterMeta, f| {
        store.set_cluster_registry(cluster, meta, f).unwrap_err()
    };
    assert_eq!(
        refused(&mut store, "primary", meta_b(), vec![]),
        RegistryError::OwnCluster("primary".into())
    );
    let e = refused(&mut store, "Bad_Name", meta_b(), vec![]);
    assert!(e.to_string().contains("not a DNS label"), "{e}");
    let bad_zone = ClusterMeta {
        zone: Some("eu/west".into()),
        ..meta_b()
    };
    let e = refused(&mut store, "b", bad_zone, vec![]).to_string();
    assert!(e.starts_with("cluster b: invalid zone: `eu/west`"), "{e}");
    let twice = files(&[("a.yaml", ""), ("a.yaml", "")]);
    let e = refused(&mut store, "b", meta_b(), twice).to_string();
    assert!(e.contains("\"a.yaml\": sent twice"), "{e}");
    assert!(store.mesh().members.is_empty());
}

#[test]
fn the_own_cluster_cannot_take_a_member_clusters_name() {
    let dir = tempfile::tempdir().unwrap();
    copy_config(&fixture().join("primary"), dir.path());
    let (mut store, _) = MeshStore::open(dir.path()).unwrap();
    store
        .set_cluster_registry("b", meta_b(), registry_b())
        .unwrap();
    let mesh_yaml = dir.path().join("mesh.yaml");
    let text = std::fs::read_to_string(&mesh_yaml).unwrap();
    std::fs::write(
        &mesh_yaml,
        text.replace("clusterName: primary", "clusterName: b"),
    )
    .unwrap();
    let outcome = store.reload().unwrap();
    let m = messages(&outcome.new_errors);
    assert!(
        m.contains(
            "MeshConfig trellis-system/mesh: spec.clusterName: `b` is the name of a member cluster"
        ),
        "{m}"
    );
    assert_eq!(store.mesh().cluster_name, "primary");

    std::fs::write(
        &mesh_yaml,
        text.replace("clusterName: primary", "clusterName: East_1"),
    )
    .unwrap();
    let m = messages(&store.reload().unwrap().new_errors);
    assert!(
        m.contains("spec.clusterName: `East_1` is not a DNS label"),
        "{m}"
    );
}
