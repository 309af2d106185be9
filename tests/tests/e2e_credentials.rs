//! End to end: a DestinationRule's `credentialName` on real Envoy sidecars with mesh
//! identities (secure port). Mutual TLS origination from a client sidecar to an external
//! HTTPS server that requires a client certificate, with the certificate, key and CA in
//! the config folder's `credentials/NAME/` (Kubernetes TLS secret key names):
//!
//! - named before its folder exists: `/debug/configz` lists the credential as missing and
//!   requests get no cluster (503);
//! - the folder appears: the sidecar gets the secrets over SDS and requests reach the
//!   server with the client certificate;
//! - a broken edit (a key of another certificate) is refused with the folder named, and
//!   the last good credential keeps serving;
//! - the key is in no dump of the control plane and in none of its log lines.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;
mod security;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{call, make_certs, SidecarMesh, WorkloadDef, NAMESPACE, POLL, PORT};
use security::{MeshOptions, SecureMesh};
use trellis_tests::{http_get, http_get_json, poll_until, require_envoy, start_echo_mtls};

const CLIENT: WorkloadDef = WorkloadDef::client("client", 10);
const REVIEWS: WorkloadDef = WorkloadDef::service("reviews", "reviews", 20);
const HOST: &str = "bank.example.com";
const CREDENTIAL: &str = "bank-client";
const CONFIGZ_TIMEOUT: Duration = Duration::from_secs(15);

fn bank_yaml(server: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bank, namespace: {NAMESPACE}}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  endpoints: [{{address: {}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bank, namespace: {NAMESPACE}}}
spec:
  host: {HOST}
  trafficPolicy:
    tls:
      mode: MUTUAL
      credentialName: {CREDENTIAL}
      sni: {HOST}
      subjectAltNames: [{HOST}]
",
        server.ip()
    )
}

/// Writes `credentials/NAME/` as one rename, as a secret sync tool would.
fn write_credential(config_dir: &Path, files: &[(&str, &Path)]) {
    let root = config_dir.join("credentials");
    std::fs::create_dir_all(&root).expect("credentials dir");
    let tmp = root.join(format!(".{CREDENTIAL}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).expect("tmp credential dir");
    for (name, from) in files {
        std::fs::copy(from, tmp.join(name)).expect("copy credential file");
    }
    let dest = root.join(CREDENTIAL);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).expect("rename credential dir");
}

fn configz(mesh: &SecureMesh) -> serde_json::Value {
    http_get_json(mesh.admin_addr, "/debug/configz").expect("configz")
}

fn credential_status(mesh: &SecureMesh) -> Option<String> {
    configz(mesh)["credentials"]
        .as_array()?
        .iter()
        .find(|c| c["credential"] == CREDENTIAL && c["object"] == format!("{NAMESPACE}/bank"))
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

fn wait_credential_status(mesh: &SecureMesh, prefix: &str) {
    poll_until(CONFIGZ_TIMEOUT, POLL, || match credential_status(mesh) {
        Some(s) if s.starts_with(prefix) => Ok(()),
        other => Err(format!("credential status {other:?}, waiting for {prefix}")),
    })
    .unwrap_or_else(|e| panic!("{e}; configz: {}", configz(mesh)));
}

/// Every line of the PEM body of a key: none of them may show up anywhere.
fn key_lines(key: &Path) -> Vec<String> {
    std::fs::read_to_string(key)
        .expect("key")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_string)
        .collect()
}

fn assert_no_key_material(mesh: &SecureMesh, key: &Path) {
    let lines = key_lines(key);
    let dump = http_get(
        mesh.admin_addr,
        &format!("/debug/config_dump?proxy={}.{NAMESPACE}", CLIENT.name),
        &[],
    )
    .expect("config_dump")
    .text();
    let configz = configz(mesh).to_string();
    let mut logs = String::new();
    for e in std::fs::read_dir(mesh.dir.path())
        .expect("test dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("xds-server") && name.ends_with(".log") {
            logs.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for (what, text) in [
        ("config_dump", &dump),
        ("configz", &configz),
        ("server log", &logs),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "{what} shows a private key");
        for l in &lines {
            assert!(!text.contains(l.as_str()), "{what} shows key material");
        }
    }
}

#[test]
fn credential_name_mutual_tls_origination() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let options = MeshOptions {
        workloads: vec![CLIENT, REVIEWS],
        files: Vec::new(),
        server_args: Vec::new(),
    };
    let mut mesh = SecureMesh::start(&envoy_bin, "e2e-credentials", options).expect("mesh");

    let certs = mesh.dir.path().join("certs");
    let (server_dir, client_dir, other_dir) = (
        certs.join("server"),
        certs.join("client"),
        certs.join("other"),
    );
    for d in [&server_dir, &client_dir, &other_dir] {
        std::fs::create_dir_all(d).expect("certs dir");
    }
    let (server_ca, server_cert, server_key) = make_certs(&server_dir, HOST);
    let (client_ca, client_cert, client_key) = make_certs(&client_dir, "client.example.com");
    let (_, _, other_key) = make_certs(&other_dir, "client.example.com");
    let server = SocketAddr::new(mesh.net.ip(40), PORT);
    let echo = start_echo_mtls(
        mesh.dir.path(),
        server,
        "bank",
        (&server_cert, &server_key),
        &client_ca,
    )
    .expect("mTLS echo");
    mesh.echos.push(echo);
    let outbound = mesh.outbound(CLIENT.name);
    let bank = || call(outbound, HOST, "GET", "/accounts", &[]);

    // Named before it exists: listed as missing, no cluster for the client yet.
    mesh.apply("bank.yaml", &bank_yaml(server));
    wait_credential_status(&mesh, "missing");
    mesh.wait_statuses("credential missing", Ok(503), bank);

    // The folder appears: the sidecar gets it over SDS, the server sees its certificate.
    write_credential(
        &mesh.config_dir,
        &[
            ("tls.crt", &client_cert),
            ("tls.key", &client_key),
            ("ca.crt", &server_ca),
        ],
    );
    wait_credential_status(&mesh, "ready");
    mesh.wait_statuses("credential ready", Ok(200), bank);
    let body = bank().expect("request").json().expect("json");
    assert_eq!(body["tls"], true, "{body}");
    assert_eq!(body["client_auth"], true, "{body}");
    assert_eq!(body["workload"], "bank", "{body}");

    // A key of another certificate: refused, naming the folder; the last good one stays.
    write_credential(
        &mesh.config_dir,
        &[
            ("tls.crt", &client_cert),
            ("tls.key", &other_key),
            ("ca.crt", &server_ca),
        ],
    );
    poll_until(CONFIGZ_TIMEOUT, POLL, || {
        let errors = configz(&mesh)["errors"].to_string();
        if errors.contains(&format!("credentials/{CREDENTIAL}"))
            && errors.contains("does not match")
        {
            Ok(())
        } else {
            Err(format!("no error for the broken credential yet: {errors}"))
        }
    })
    .expect("broken credential reported");
    for _ in 0..5 {
        let r = bank().expect("request");
        assert_eq!(
            r.status,
            200,
            "the last good credential keeps serving: {}",
            r.text()
        );
    }

    assert_no_key_material(&mesh, &client_key);
    assert_no_key_material(&mesh, &other_key);
    mesh.check_converged().expect("converged");
}
