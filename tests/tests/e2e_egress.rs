//! End to end: egress from a sidecar to services outside the mesh, as in Istio's egress
//! task pages. A `resolution: DNS` ServiceEntry makes the client's Envoy resolve the
//! external host through the DNS server named in `MeshConfig.dnsResolvers` (a small server
//! of the test, on loopback), and traffic reaches the external echo app; an endpoint named
//! by host (DNS_ROUND_ROBIN) is resolved the same way.

mod common;

use anyhow::{bail, Context as _};
use common::{call, mesh_yaml, Mesh, Mode, CONVERGE_TIMEOUT, MESH_FILE, POLL, PORT};
use std::net::SocketAddr;
use std::process::Command;
use trellis_tests::{cargo_bin, eventually, free_port, require_envoy, start_echo, ChildGuard};

/// The external service's address: a host part no workload of the fixture uses.
const EXTERNAL_HOST: u8 = 240;

fn start_dns(
    mesh: &Mesh,
    records: &[(&str, SocketAddr)],
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let ip = mesh.net.ip(1);
    let addr = SocketAddr::new(ip, free_port(ip)?);
    let mut command = Command::new(cargo_bin("dns"));
    command.arg("--listen").arg(addr.to_string());
    for (name, target) in records {
        command
            .arg("--record")
            .arg(format!("{name}={}", target.ip()));
    }
    let dns = ChildGuard::spawn("dns", command, mesh.dir.path())?;
    Ok((dns, addr))
}

const EXTERNAL: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-ext, namespace: default}
spec:
  hosts: [httpbin.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: PORT, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api-ext, namespace: default}
spec:
  hosts: [api.test]
  location: MESH_EXTERNAL
  resolution: DNS_ROUND_ROBIN
  ports: [{number: PORT, name: http, protocol: HTTP}]
  endpoints:
  - address: backend.test
";

#[test]
fn dns_resolved_external_http_service() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh = Mesh::start(&envoy_bin, "e2e-egress-dns", Mode::Sotw).expect("mesh");
    let external = SocketAddr::new(mesh.net.ip(EXTERNAL_HOST), PORT);
    let app = start_echo(mesh.dir.path(), external, "httpbin", "external").expect("echo");
    mesh.echos.push(app);
    let (dns, dns_addr) = start_dns(
        &mesh,
        &[("httpbin.test", external), ("backend.test", external)],
    )
    .expect("dns server");

    let config = format!("{}  dnsResolvers: [\"{dns_addr}\"]\n", mesh_yaml());
    mesh.replace_config(MESH_FILE, &config);
    mesh.replace_config(
        "external.yaml",
        &EXTERNAL.replace("PORT", &PORT.to_string()),
    );

    let client = mesh.client();
    for host in ["httpbin.test", "api.test"] {
        let served = eventually(CONVERGE_TIMEOUT, POLL, || {
            let r = call(client, host, "GET", "/status", &[])?;
            if r.status != 200 {
                bail!("status {}: {}", r.status, r.text());
            }
            let body = r.json().context("echo answers JSON")?;
            anyhow::Ok(body["workload"].as_str().unwrap_or_default().to_owned())
        });
        assert_eq!(served, "httpbin", "{host} reached the external echo app");
    }
    // Envoy asked the resolver the mesh names, for both names.
    let log = dns.log();
    assert!(log.contains("asked httpbin.test type 1"), "{log}");
    assert!(log.contains("asked backend.test type 1"), "{log}");
    mesh.wait_converged(CONVERGE_TIMEOUT)
        .expect("every sidecar ACKed");
}
