//! Golden files for AuthorizationPolicy and RequestAuthentication translation: the
//! security filters of each inbound chain of the workloads in `fixtures/authz/` (one
//! scenario per workload, see its policies.yaml), as proto3 JSON. Regenerate with
//! `UPDATE_GOLDEN=1` and review the diff.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::store::ConfigStore;
use xds_server::dump::resource_json;
use xds_server::translate::ProxyScope;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn check(name: &str, value: &Value) {
    let dir = root().join("tests/golden/authz");
    let path = dir.join(format!("{name}.json"));
    let rendered = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
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
            "generated config differs from {} (actual in {}; rerun with UPDATE_GOLDEN=1 if intended)",
            path.display(),
            got.display()
        );
    }
}

fn snapshot(dir: &Path) -> Snapshot {
    let (store, outcome) = ConfigStore::open(dir).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    Snapshot::build(1, store.mesh())
}

/// The network filters of a chain, or the HTTP filters of its connection manager.
fn chain_filters(chain: &Value) -> Value {
    let filters = chain["filters"].as_array().unwrap();
    match filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
    {
        Some(hcm) => json!({
            "httpFilters": hcm["typedConfig"]["httpFilters"],
            "normalizePath": hcm["typedConfig"]["normalizePath"],
        }),
        None => json!({ "filters": filters }),
    }
}

/// Per inbound listener of the workload: its security filters, which must be the same on
/// every chain (mTLS and plaintext alike).
fn inbound_filters(snap: &Snapshot, workload: &str) -> Value {
    let w = snap.mesh.workloads[workload].clone();
    let prefix = format!("{}_", w.address);
    let view = snap.view(&ProxyScope::Workload(workload.into()));
    let mut out = serde_json::Map::new();
    for l in view.iter(TypeKind::Listener) {
        if !l.name.starts_with(&prefix) {
            continue;
        }
        let resource = resource_json(l)["resource"].clone();
        let chains = resource["filterChains"].as_array().unwrap();
        let first = chain_filters(&chains[0]);
        for c in chains {
            assert_eq!(chain_filters(c), first, "{}: chains differ", l.name);
        }
        out.insert(l.name.to_string(), first);
    }
    Value::Object(out)
}

const SCENARIOS: &[&str] = &[
    "open",
    "by-principal",
    "deny-path",
    "allow-nothing",
    "namespaces",
    "ip-blocks",
    "operations",
    "when-header",
    "jwt-claims",
    "jwt-file",
    "tcp",
];

#[test]
fn authorization_and_jwt_filters_per_scenario() {
    let snap = snapshot(&root().join("tests/fixtures/authz"));
    for name in SCENARIOS {
        check(name, &inbound_filters(&snap, &format!("{name}.default")));
    }
}

#[test]
fn filter_order_is_jwt_deny_allow_router() {
    let snap = snapshot(&root().join("tests/fixtures/authz"));
    let filters = inbound_filters(&snap, "jwt-claims.default");
    let names: Vec<&str> = filters["127.0.5.9_9080"]["httpFilters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.jwt_authn",
            "envoy.filters.http.rbac",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router"
        ]
    );
    let actions: Vec<&Value> = filters["127.0.5.9_9080"]["httpFilters"].as_array().unwrap()[1..3]
        .iter()
        .map(|f| &f["typedConfig"]["rules"]["action"])
        .collect();
    // proto3 JSON omits the default (ALLOW).
    assert_eq!(actions, [&json!("DENY"), &Value::Null]);
    // A TCP port: network RBAC (DENY, ALLOW) before tcp_proxy.
    let tcp = inbound_filters(&snap, "tcp.default");
    let names: Vec<&str> = tcp["127.0.5.20_5432"]["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.network.rbac",
            "envoy.filters.network.rbac",
            "envoy.filters.network.tcp_proxy"
        ]
    );
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn copy_fixture(to: &Path) {
    for e in std::fs::read_dir(root().join("tests/fixtures/authz"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

const ROOT_POLICIES: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {rootNamespace: mesh-root}
---
# Mesh-wide: every workload of every namespace.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: mesh-root}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/forbidden]}}]}]
---
# Root namespace with a selector: matching workloads of every namespace.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-selected, namespace: mesh-root}
spec:
  selector: {matchLabels: {app: namespaces}}
  rules: [{}]
---
# Another namespace: never the workloads of `default`.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec: {}
"#;

fn policy_names(snap: &Snapshot, workload: &str) -> Vec<String> {
    let filters = inbound_filters(snap, workload);
    let mut names = Vec::new();
    for listener in filters.as_object().unwrap().values() {
        for f in listener["httpFilters"].as_array().into_iter().flatten() {
            if let Some(p) = f["typedConfig"]["rules"]["policies"].as_object() {
                names.extend(p.keys().cloned());
            }
        }
    }
    names
}

#[test]
fn root_namespace_policies_apply_across_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    write(dir.path(), "root.yaml", ROOT_POLICIES);
    let snap = snapshot(dir.path());
    assert_eq!(
        policy_names(&snap, "open.default"),
        ["ns[mesh-root]-policy[mesh-deny]-rule[0]"]
    );
    assert_eq!(
        policy_names(&snap, "namespaces.default"),
        [
            "ns[mesh-root]-policy[mesh-deny]-rule[0]",
            "ns[default]-policy[namespaces]-rule[0]",
            "ns[mesh-root]-policy[root-selected]-rule[0]",
        ]
    );
}

#[test]
fn a_policy_change_rebuilds_only_listeners() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let (mut store, _) = ConfigStore::open(dir.path()).unwrap();
    let a = Snapshot::build(1, store.mesh());
    let scope = ProxyScope::Workload("deny-path.default".into());
    let va = a.view(&scope);

    let path = dir.path().join("policies.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"*.php\"", "\"*.asp\"")).unwrap();
    assert!(store.reload().unwrap().changed);
    let b = Snapshot::build_from(2, store.mesh(), Some(&a));
    let vb = b.view(&scope);
    assert_ne!(
        va.version(TypeKind::Listener),
        vb.version(TypeKind::Listener),
        "listeners carried over a policy change"
    );
    assert_eq!(va.version(TypeKind::Cluster), vb.version(TypeKind::Cluster));
    assert_eq!(va.version(TypeKind::Route), vb.version(TypeKind::Route));
    // A workload no policy names is untouched.
    let open = ProxyScope::Workload("open.default".into());
    let (oa, ob) = (a.view(&open), b.view(&open));
    let name = "127.0.5.1_9080";
    assert_eq!(
        oa.get(TypeKind::Listener, name).unwrap().version,
        ob.get(TypeKind::Listener, name).unwrap().version
    );
    assert!(!Arc::ptr_eq(&va, &vb));
}
