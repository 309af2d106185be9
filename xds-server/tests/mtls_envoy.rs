//! Envoy's own verdict on the mutual TLS config: the listeners and clusters generated for
//! sidecars with identities (tests/fixtures/mtls) go into a static bootstrap that
//! `envoy --mode validate` must accept. Validate mode builds every listener, cluster and
//! TLS context without binding or connecting, so a wrong `typed_config`, a field Envoy
//! 1.40 rejects, or a secret of the wrong kind fails here rather than as a NACK.
//!
//! Two bootstraps per sidecar: the config exactly as served (secrets over ADS), and one
//! where the secret references resolve to static `default` / `ROOTCA` secrets (test
//! certificates in tests/fixtures/mtls/certs) and EDS clusters carry their endpoints
//! inline, so Envoy also checks the secret kinds and the endpoint metadata.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::store::ConfigStore;
use xds_server::dump::resource_json;
use xds_server::translate::ProxyScope;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `ENVOY_BIN` (scripts/test.sh sets it), else the binary scripts/install-envoy.sh puts
/// in the workspace's `.venv`, else `envoy` on `PATH`.
fn envoy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let lib = root().join("../.venv/lib");
    let venv = std::fs::read_dir(lib).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    });
    venv.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    })
}

fn validate(envoy: &Path, dir: &Path, name: &str, bootstrap: &Value) -> Result<(), String> {
    // JSON is YAML; the extension tells Envoy to parse it as such.
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut child = Command::new(envoy)
        .args(["--mode", "validate", "--log-level", "warning"])
        .arg("--disable-hot-restart")
        .arg("-c")
        .arg(&path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{name}: envoy --mode validate did not finish in 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.success() {
        Ok(())
    } else {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        Err(format!(
            "Envoy rejected {} ({status}):\n{log}",
            path.display()
        ))
    }
}

fn resources(snap: &Snapshot, scope: &ProxyScope, kind: TypeKind) -> Vec<Value> {
    snap.view(scope)
        .iter(kind)
        .map(|r| resource_json(r)["resource"].clone())
        .collect()
}

/// The ADS cluster and `ads_config` the EDS clusters and RDS listeners point at; never
/// connected to in validate mode.
fn bootstrap(node: &str, listeners: Vec<Value>, mut clusters: Vec<Value>) -> Value {
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
        "node": {"id": node, "cluster": "mtls-test"},
        "dynamicResources": {"adsConfig": {
            "apiType": "GRPC",
            "transportApiVersion": "V3",
            "grpcServices": [{"envoyGrpc": {"clusterName": "xds-grpc"}}]
        }},
        "staticResources": {"listeners": listeners, "clusters": clusters}
    })
}

/// Drops `sdsConfig` from every secret reference, so it names a static secret.
fn static_secret_refs(v: &mut Value) {
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

fn pem(name: &str) -> String {
    std::fs::read_to_string(root().join("tests/fixtures/mtls/certs").join(name)).unwrap()
}

fn static_variant(snap: &Snapshot, scope: &ProxyScope, node: &str) -> Value {
    let endpoints = resources(snap, scope, TypeKind::Endpoint);
    let mut clusters = resources(snap, scope, TypeKind::Cluster);
    for c in &mut clusters {
        if c["type"] == "EDS" {
            let name = c["name"].clone();
            let cla = endpoints
                .iter()
                .find(|e| e["clusterName"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("no endpoints for {name}"));
            let map = c.as_object_mut().unwrap();
            map.remove("edsClusterConfig");
            map.insert("type".into(), json!("STATIC"));
            map.insert("loadAssignment".into(), cla);
        }
    }
    let mut b = bootstrap(node, resources(snap, scope, TypeKind::Listener), clusters);
    static_secret_refs(&mut b);
    b["staticResources"]["secrets"] = json!([
        {"name": "default", "tlsCertificate": {
            "certificateChain": {"inlineString": pem("cert-chain.pem")},
            "privateKey": {"inlineString": pem("key.pem")}
        }},
        {"name": "ROOTCA", "validationContext": {
            "trustedCa": {"inlineString": pem("root-cert.pem")}
        }}
    ]);
    b
}

#[test]
fn envoy_accepts_the_mtls_config() {
    let Some(envoy) = envoy() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Envoy not found (scripts/install-envoy.sh, or set ENVOY_BIN)"
        );
        eprintln!("SKIPPED: Envoy not found (run scripts/install-envoy.sh or set ENVOY_BIN)");
        return;
    };
    let (store, outcome) = ConfigStore::open(root().join("tests/fixtures/mtls")).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    let snap = Snapshot::build(1, store.mesh());
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    // STRICT + DISABLE ports and every cluster variant; PERMISSIVE; STRICT gRPC; no identity.
    for (id, ip) in [
        ("web-v1.shop", "127.0.3.1"),
        ("cart-v1.shop", "127.0.3.2"),
        ("ledger-v1.bank", "127.0.3.5"),
        ("legacy-v1.shop", "127.0.3.4"),
    ] {
        let scope = ProxyScope::Workload(id.into());
        let ns = id.rsplit('.').next().unwrap();
        let node = format!("sidecar~{ip}~{id}~{ns}.svc.cluster.local");
        let served = bootstrap(
            &node,
            resources(&snap, &scope, TypeKind::Listener),
            resources(&snap, &scope, TypeKind::Cluster),
        );
        for (name, b) in [
            (format!("{id}.ads"), served),
            (format!("{id}.static"), static_variant(&snap, &scope, &node)),
        ] {
            if let Err(e) = validate(&envoy, dir.path(), &name, &b) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
