//! Shared by the tests of generated config (golden files, `envoy --mode validate`): a
//! mesh loaded from a fixture folder, its resources as proto3 JSON (as in a config dump),
//! golden-file comparison, and static bootstraps around the resources a proxy is served.
// Each test binary uses its own part of these helpers.
#![allow(dead_code, clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::dump::resource_json;
use xds_server::mesh::MeshStore;
use xds_server::translate::ProxyScope;

/// The crate's folder: fixtures and golden files are below it.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The config folder `dir`, which must load without errors.
pub fn open_store(dir: &Path) -> MeshStore {
    let (store, outcome) = MeshStore::open(dir).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    store
}

pub fn snapshot_of(dir: &Path) -> Snapshot {
    Snapshot::build(1, open_store(dir).mesh())
}

/// Copies the config files (`*.yaml`) of `from` into `to`, for tests that edit config.
pub fn copy_config(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A temp copy of the config folder `from`, loaded, for tests that edit config.
pub fn editable_copy(from: &Path) -> (tempfile::TempDir, MeshStore) {
    let dir = tempfile::tempdir().unwrap();
    copy_config(from, dir.path());
    let (store, _) = MeshStore::open(dir.path()).unwrap();
    (dir, store)
}

/// Rewrites `file` of `dir` with `change` and reloads; the store must take a change.
pub fn edit_and_reload(
    store: &mut MeshStore,
    dir: &Path,
    file: &str,
    change: impl FnOnce(String) -> String,
) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, change(text)).unwrap();
    assert!(store.reload().unwrap().changed);
}

/// The resources of `kind` for `scope` as in a config dump (with name and version).
pub fn dump(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind) -> Value {
    let view = snap.view(scope);
    Value::Array(view.iter(kind).map(|r| resource_json(r)).collect())
}

/// The resources of `kind` for `scope`, bare, as a bootstrap holds them.
pub fn resources(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind) -> Vec<Value> {
    snap.view(scope)
        .iter(kind)
        .map(|r| resource_json(r)["resource"].clone())
        .collect()
}

/// One resource, bare; it must exist.
pub fn resource(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind, name: &str) -> Value {
    let view = snap.view(scope);
    let r = view
        .get(kind, name)
        .unwrap_or_else(|| panic!("{scope:?} has no {kind:?} {name}"));
    resource_json(r)["resource"].clone()
}

/// Compares `value` with `tests/golden/{name}.json`; `UPDATE_GOLDEN=1` rewrites the file
/// instead, so that every change to generated config shows up in review as a diff.
pub fn check_golden(name: &str, value: &Value) {
    let path = root().join("tests/golden").join(format!("{name}.json"));
    let rendered = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if expected != rendered {
        let got = path.with_extension("json.actual");
        std::fs::write(&got, &rendered).unwrap();
        panic!(
            "generated config differs from {} (actual written to {}; diff them, and rerun with UPDATE_GOLDEN=1 if the change is intended)",
            path.display(),
            got.display()
        );
    }
}

/// [`check_golden`] of the [`dump`] of `kind` for `scope`.
pub fn check_dump(name: &str, snap: &Snapshot, scope: &ProxyScope, kind: TypeKind) {
    check_golden(name, &dump(snap, scope, kind));
}

/// Turns an EDS cluster into a static one carrying `assignment`, so that Envoy checks the
/// endpoints too (validate mode fetches nothing).
pub fn inline_assignment(cluster: &mut Value, assignment: Value) {
    let map = cluster.as_object_mut().unwrap();
    map.remove("edsClusterConfig");
    map.insert("type".into(), json!("STATIC"));
    map.insert("loadAssignment".into(), assignment);
}

/// [`inline_assignment`] for every EDS cluster, from the assignments in `endpoints`.
pub fn inline_endpoints(clusters: &mut [Value], endpoints: &[Value]) {
    for c in clusters.iter_mut().filter(|c| c["type"] == "EDS") {
        let name = c["name"].clone();
        let cla = endpoints
            .iter()
            .find(|e| e["clusterName"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no endpoints for {name}"));
        inline_assignment(c, cla);
    }
}

/// A static bootstrap of `listeners` and `clusters`, plus the ADS cluster and
/// `adsConfig` that the EDS clusters, RDS listeners and SDS secrets point at (never
/// connected to in validate mode).
pub fn ads_bootstrap(
    node: &str,
    node_cluster: &str,
    listeners: Vec<Value>,
    mut clusters: Vec<Value>,
) -> Value {
    clusters.push(json!({
        "name": "xds-grpc",
        "type": "STATIC",
        "connectTimeout": "1s",
        "typedExtensionProtocolOptions": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {}}
            }
        },
        "loadAssignment": {"clusterName": "xds-grpc", "endpoints": [{"lbEndpoints": [
            {"endpoint": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 15010}}}}
        ]}]}
    }));
    json!({
        "node": {"id": node, "cluster": node_cluster},
        "dynamicResources": {"adsConfig": {
            "apiType": "GRPC",
            "transportApiVersion": "V3",
            "grpcServices": [{"envoyGrpc": {"clusterName": "xds-grpc"}}]
        }},
        "staticResources": {"listeners": listeners, "clusters": clusters}
    })
}

/// Drops `sdsConfig` from every secret reference, so it names a static secret.
pub fn static_secret_refs(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let is_secret_ref = map.contains_key("name") && map.contains_key("sdsConfig");
            if is_secret_ref {
                map.remove("sdsConfig");
            }
            map.values_mut().for_each(static_secret_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(static_secret_refs),
        _ => {}
    }
}

/// Static `default` and `ROOTCA` secrets (the test certificates in
/// `fixtures/mtls/certs`) for a bootstrap whose references [`static_secret_refs`] made
/// static: validate mode then checks the secret kinds too.
pub fn static_mesh_secrets() -> Value {
    let pem = |name: &str| std::fs::read_to_string(fixture("mtls/certs").join(name)).unwrap();
    json!([
        {"name": "default", "tlsCertificate": {
            "certificateChain": {"inlineString": pem("cert-chain.pem")},
            "privateKey": {"inlineString": pem("key.pem")}
        }},
        {"name": "ROOTCA", "validationContext": {
            "trustedCa": {"inlineString": pem("root-cert.pem")}
        }}
    ])
}
