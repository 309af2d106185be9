//! Golden files for AuthorizationPolicy and RequestAuthentication translation: the
//! security filters of each inbound chain of the workloads in `fixtures/authz/` (one
//! scenario per workload, see its policies.yaml), as proto3 JSON. Regenerate with
//! `UPDATE_GOLDEN=1` and review the diff.
#![allow(clippy::unwrap_used)]

mod translated;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use translated::{check_golden, copy_config, edit_and_reload, editable_copy, snapshot_of};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::dump::resource_json;
use xds_server::translate::ProxyScope;

fn fixture() -> PathBuf {
    translated::fixture("authz")
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
    "jwt-remote",
    "tcp",
];

#[test]
fn authorization_and_jwt_filters_per_scenario() {
    let snap = snapshot_of(&fixture());
    for name in SCENARIOS {
        check_golden(
            &format!("authz/{name}"),
            &inbound_filters(&snap, &format!("{name}.default")),
        );
    }
}

/// The clusters of remote JWKS servers: the same for every proxy (here `open`, which no
/// RequestAuthentication selects), one per authority.
#[test]
fn remote_jwks_clusters() {
    let snap = snapshot_of(&fixture());
    let view = snap.view(&ProxyScope::Workload("open.default".into()));
    let clusters: Vec<Value> = view
        .iter(TypeKind::Cluster)
        .filter(|c| c.name.starts_with("jwks|"))
        .map(|c| resource_json(c)["resource"].clone())
        .collect();
    check_golden("authz/jwks-clusters", &Value::Array(clusters));
    // The in-mesh server is reached through its service's cluster, which every sidecar has.
    assert!(view
        .get(
            TypeKind::Cluster,
            "outbound|9080||web.default.svc.cluster.local"
        )
        .is_some());
}

/// `MeshConfig.jwksCaCertificates` and `dnsResolvers` reach the JWKS clusters; a
/// relative CA path is an error naming the field.
#[test]
fn mesh_config_shapes_jwks_clusters() {
    let dir = tempfile::tempdir().unwrap();
    copy_config(&fixture(), dir.path());
    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  dnsResolvers: [127.0.0.53]\n  jwksCaCertificates: CA\n";
    write(
        dir.path(),
        "mesh.yaml",
        &mesh.replace("CA", "/etc/trellis/ca.pem"),
    );
    let snap = snapshot_of(dir.path());
    let view = snap.view(&ProxyScope::Workload("open.default".into()));
    let c = resource_json(
        view.get(TypeKind::Cluster, "jwks|raw.githubusercontent.com|443")
            .unwrap(),
    )["resource"]
        .clone();
    let tls = &c["transportSocket"]["typedConfig"]["commonTlsContext"]["validationContext"];
    assert_eq!(tls["trustedCa"]["filename"], "/etc/trellis/ca.pem");
    assert_eq!(
        c["typedDnsResolverConfig"]["typedConfig"]["resolvers"][0]["socketAddress"]["address"],
        "127.0.0.53"
    );

    let errs = xds_server::config::parse::parse_file("mesh.yaml", &mesh.replace("CA", "ca.pem"))
        .expect_err("a relative path is rejected");
    assert_eq!(errs[0].field.as_deref(), Some("spec.jwksCaCertificates"));
}

const EXT_JWKS: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: keys, namespace: default}
spec:
  hosts: [keys.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: open-remote, namespace: default}
spec:
  selector: {matchLabels: {app: none}}
  jwtRules:
  - issuer: https://keys.example
    jwksUri: http://keys.example/jwks.json
"#;

/// The cluster a provider of `open` fetches its keys through.
fn open_provider_cluster(snap: &Snapshot) -> Value {
    let filters = inbound_filters(snap, "open.default");
    filters["127.0.5.1_9080"]["httpFilters"][0]["typedConfig"]["providers"]["origins-0"]
        ["remoteJwks"]["httpUri"]["cluster"]
        .clone()
}

/// A `jwksUri` on a ServiceEntry host goes through the service's cluster, unless that is
/// ORIGINAL_DST; changing only the resolution rebuilds the listener that names it.
#[test]
fn jwks_uri_of_a_service_follows_its_resolution() {
    let src = tempfile::tempdir().unwrap();
    copy_config(&fixture(), src.path());
    write(src.path(), "keys.yaml", EXT_JWKS);
    let (dir, mut store) = editable_copy(src.path());
    let a = Snapshot::build(1, store.mesh());
    assert_eq!(open_provider_cluster(&a), "outbound|80||keys.example");

    edit_and_reload(&mut store, dir.path(), "keys.yaml", |t| {
        t.replace("resolution: DNS", "resolution: NONE")
    });
    let b = Snapshot::build_from(2, store.mesh(), Some(&a));
    assert_eq!(open_provider_cluster(&b), "jwks|keys.example|80");
    let view = b.view(&ProxyScope::Workload("open.default".into()));
    assert!(view
        .get(TypeKind::Cluster, "jwks|keys.example|80")
        .is_some());
}

/// The names of a list of filters, in order.
fn names(filters: &Value) -> Vec<&str> {
    filters
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect()
}

#[test]
fn filter_order_is_jwt_deny_allow_router() {
    let snap = snapshot_of(&fixture());
    let filters = inbound_filters(&snap, "jwt-claims.default");
    assert_eq!(
        names(&filters["127.0.5.9_9080"]["httpFilters"]),
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
    assert_eq!(
        names(&tcp["127.0.5.20_5432"]["filters"]),
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
    copy_config(&fixture(), dir.path());
    write(dir.path(), "root.yaml", ROOT_POLICIES);
    let snap = snapshot_of(dir.path());
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
    let (dir, mut store) = editable_copy(&fixture());
    let a = Snapshot::build(1, store.mesh());
    let scope = ProxyScope::Workload("deny-path.default".into());
    let va = a.view(&scope);

    edit_and_reload(&mut store, dir.path(), "policies.yaml", |t| {
        t.replace("\"*.php\"", "\"*.asp\"")
    });
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
