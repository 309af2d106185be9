//! End to end: egress from a sidecar to services outside the mesh, as in Istio's egress
//! and TCP traffic shifting task pages, in one mesh:
//!
//! - a `resolution: DNS` ServiceEntry makes the client's Envoy resolve the external host
//!   through the DNS server named in `MeshConfig.dnsResolvers` (a small server of the test,
//!   on loopback), and traffic reaches the external echo app; an endpoint named by host
//!   (DNS_ROUND_ROBIN) is resolved the same way;
//! - HTTPS the app opens itself passes through the sidecar by SNI, end to end encrypted to
//!   the external server (whose certificate the client checks);
//! - a VirtualService `tcp` route splits connections 80/20 between two versions.

mod common;

use anyhow::{bail, Context as _};
use common::{
    call, make_certs, mesh_yaml, Mesh, Mode, CONVERGE_TIMEOUT, MESH_FILE, POLL, PORT,
    REQUEST_TIMEOUT,
};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use trellis_tests::{eventually, require_envoy, start_dns, start_echo, start_echo_tls};

/// The external services' addresses: host parts no workload of the fixture uses.
const EXTERNAL_HOST: u8 = 240;
const TCP_V1_HOST: u8 = 241;
const TCP_V2_HOST: u8 = 242;
const SECURE_HOST: u8 = 243;
/// The ports of the HTTPS and the TCP service (the app reaches them on its sidecar).
const HTTPS_PORT: u16 = 9443;
const TCP_PORT: u16 = 9300;

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
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure-ext, namespace: default}
spec:
  hosts: [secure.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: HTTPS_PORT, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-echo, namespace: default}
spec:
  hosts: [tcp-echo.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: TCP_PORT, name: tcp, protocol: TCP}]
  endpoints:
  - {address: TCP_V1, ports: {tcp: PORT}, labels: {version: v1}}
  - {address: TCP_V2, ports: {tcp: PORT}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: default}
spec:
  host: tcp-echo.test
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: default}
spec:
  hosts: [tcp-echo.test]
  tcp:
  - match: [{port: TCP_PORT}]
    route:
    - {destination: {host: tcp-echo.test, subset: v1}, weight: 80}
    - {destination: {host: tcp-echo.test, subset: v2}, weight: 20}
";

/// Connections through the TCP route: enough for the 80/20 split to show within bounds
/// that a wrong split (50/50, all to one) misses by far.
const TCP_CONNECTIONS: usize = 200;

/// One HTTPS request through the client sidecar's outbound listener `via`, with SNI and
/// certificate check for `host` against `ca`: the TLS is the app's own, end to end.
fn https_get(via: SocketAddr, host: &str, ca: &Path) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile_certs(&pem)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let sock = std::net::TcpStream::connect_timeout(&via, REQUEST_TIMEOUT)?;
    sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    sock.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "GET /secure HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    // A server that closes without close_notify ends the read with an error after the
    // whole answer: what arrived is what counts.
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!("no 200 over TLS: {text:?}");
    }
    Ok(text)
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("CA PEM: {e:?}"))
}

#[test]
fn egress_by_dns_tls_passthrough_and_tcp_split() {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh = Mesh::start(&envoy_bin, "e2e-egress", Mode::Sotw).expect("mesh");
    let external = SocketAddr::new(mesh.net.ip(EXTERNAL_HOST), PORT);
    let secure = SocketAddr::new(mesh.net.ip(SECURE_HOST), HTTPS_PORT);
    let certs = mesh.dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    let (ca, cert, key) = make_certs(&certs, "secure.test");
    let dir = mesh.dir.path().to_path_buf();
    let apps = [
        start_echo(&dir, external, "httpbin", "external"),
        start_echo(
            &dir,
            SocketAddr::new(mesh.net.ip(TCP_V1_HOST), PORT),
            "tcp-echo",
            "v1",
        ),
        start_echo(
            &dir,
            SocketAddr::new(mesh.net.ip(TCP_V2_HOST), PORT),
            "tcp-echo",
            "v2",
        ),
        start_echo_tls(&dir, secure, "secure", "external", (&cert, &key)),
    ];
    for app in apps {
        mesh.echos.push(app.expect("echo"));
    }
    let (dns, dns_addr) = start_dns(
        mesh.dir.path(),
        mesh.net.ip(1),
        &[
            ("httpbin.test", external.ip()),
            ("backend.test", external.ip()),
            ("secure.test", secure.ip()),
        ],
    )
    .expect("dns server");

    let config = format!("{}  dnsResolvers: [\"{dns_addr}\"]\n", mesh_yaml());
    mesh.replace_config(MESH_FILE, &config);
    let external_yaml = EXTERNAL
        .replace("HTTPS_PORT", &HTTPS_PORT.to_string())
        .replace("TCP_PORT", &TCP_PORT.to_string())
        .replace("TCP_V1", &mesh.net.ip(TCP_V1_HOST).to_string())
        .replace("TCP_V2", &mesh.net.ip(TCP_V2_HOST).to_string())
        .replace("PORT", &PORT.to_string());
    mesh.replace_config("external.yaml", &external_yaml);

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

    // HTTPS by SNI: the answer comes over the app's own TLS, checked against the test CA.
    let via = SocketAddr::new(client.ip(), HTTPS_PORT);
    let answer = eventually(CONVERGE_TIMEOUT, POLL, || {
        https_get(via, "secure.test", &ca)
    });
    assert!(answer.contains("\"tls\":true"), "{answer}");
    assert!(answer.contains("\"workload\":\"secure\""), "{answer}");

    // TCP 80/20, one connection per request.
    let tcp = SocketAddr::new(client.ip(), TCP_PORT);
    eventually(CONVERGE_TIMEOUT, POLL, || {
        call(tcp, "tcp-echo.test", "GET", "/", &[])
    });
    let mut v1 = 0;
    for _ in 0..TCP_CONNECTIONS {
        let r = call(tcp, "tcp-echo.test", "GET", "/", &[]).expect("TCP route answers");
        let body = r.json().expect("echo JSON");
        match body["version"].as_str() {
            Some("v1") => v1 += 1,
            Some("v2") => {}
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    // 80 % of 200 is 160, with a standard deviation of about 6.
    assert!(
        (130..=190).contains(&v1),
        "{v1} of {TCP_CONNECTIONS} connections went to v1 (weights 80/20)"
    );
    mesh.wait_converged(CONVERGE_TIMEOUT)
        .expect("every sidecar ACKed");
}
