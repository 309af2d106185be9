//! The fixture of the mesh-security end-to-end tests: a real `xds-server` with its secure
//! port (ADS + CA over TLS) and CA, real Envoy sidecars bootstrapped with signed tokens (so
//! they get their workload certificate and the trust bundle over SDS), echo apps behind
//! them, and helpers to check mutual TLS, authorization and certificate state.
//!
//! Every workload is labelled `security.istio.io/tlsMode: istio`: its inbound listeners
//! speak mutual TLS (as PeerAuthentication says) and other sidecars call them with mutual
//! TLS. Topology (explicit interception, per-test block `127.0.X.0/24`, see
//! [`LoopbackNet`]), laid out as in `common`:
//!
//! ```text
//! test --HTTP Host: reviews--> client sidecar (outbound 127.0.X.N+100:9080)
//!      --mTLS--> reviews sidecar (inbound 127.0.X.M:9080) --> echo (127.0.X.M+50:9080)
//! test --HTTP--> client sidecar TCP listener (outbound 127.0.X.N+100:TCP_PORT)
//!      --a new mTLS connection per request--> reviews sidecar (inbound 127.0.X.M:TCP_PORT)
//!      --> a second echo (127.0.X.M+50:TCP_PORT)
//! ```
//!
//! HTTP through the sidecars rides pooled connections (and the app sees the caller in
//! `x-forwarded-client-cert`); the TCP port makes a TLS handshake per request, which is
//! what certificate renewal and root rotation must not break.
//!
//! The server listens on `127.0.X.1` (plaintext xDS, admin and secure ports picked free),
//! its CA lives in `<test dir>/ca`, tokens in `<test dir>/tokens`; every process logs to
//! the test dir and the log tails are printed when a test fails.
// Each test uses a different part of this module.
#![allow(dead_code)]

mod checks;
mod config;
pub mod jwt;
mod state;
mod traffic;

pub use checks::*;
pub use config::*;
pub use traffic::*;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{
    cargo_bin, envoy_admin_get, free_port, http_get, run_to_completion, start_echo,
    start_envoy_with, test_dir, wait_envoy_live, ChildGuard, EnvoyOptions, LoopbackNet,
    ENVOY_START_TIMEOUT,
};

use crate::common::{mesh_yaml, CONVERGE_TIMEOUT, NAMESPACE, POLL, PORT};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The label that marks a workload as an mTLS-capable sidecar (as Istio's injector sets it).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Bound on a policy edit taking effect in traffic (reload, push, listener update).
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request deadline of checks and traffic loops: requests take milliseconds, a request
/// still open after this counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How the sidecars' Envoys drain connections when a listener changes, as Istio's agent
/// runs them: with Envoy's default (`gradual` over 600 s) a connection opened before a
/// policy change may go on serving requests under the old policy for minutes; with
/// `immediate`, every such connection is closed after its next response.
const SIDECAR_DRAIN_ARGS: [&str; 4] = ["--drain-strategy", "immediate", "--drain-time-s", "45"];
/// Requests in a row that must show a policy change before a test checks the steady
/// state: connections opened before the change serve at most one more request each.
pub const IN_A_ROW: usize = 5;
/// Bound on the short-lived CLI commands (token, bootstrap).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the server's start (initial load, CA, three listeners).
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// One WorkloadEntry of a test mesh and how its sidecar is run.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadDef {
    pub name: &'static str,
    /// Label `app`; workloads with an app are selected by a ServiceEntry of that name.
    pub app: &'static str,
    pub service_account: &'static str,
    /// Host part base: inbound `.N`, app `.N+50`, outbound `.N+100`.
    pub host: u8,
    /// Whether an echo app runs behind the sidecar (a client only sends).
    pub has_app: bool,
    /// A TCP port of the service besides HTTP [`PORT`] (its own echo app listens there):
    /// the client sidecar's TCP proxy opens a new mTLS connection for every connection
    /// it accepts, so traffic there makes a TLS handshake per request.
    pub tcp_port: Option<u16>,
    /// Delta xDS instead of state of the world.
    pub delta: bool,
    /// Started with the mesh; `false`: the test starts it later ([`SecureMesh::start_sidecar`]).
    pub start: bool,
}

impl WorkloadDef {
    /// A workload that only sends (service account = name).
    pub const fn client(name: &'static str, host: u8) -> Self {
        WorkloadDef {
            name,
            app: name,
            service_account: name,
            host,
            has_app: false,
            tcp_port: None,
            delta: false,
            start: true,
        }
    }

    /// A workload serving service `app` with an echo app (service account = app).
    pub const fn service(name: &'static str, app: &'static str, host: u8) -> Self {
        WorkloadDef {
            name,
            app,
            service_account: app,
            host,
            has_app: true,
            tcp_port: None,
            delta: false,
            start: true,
        }
    }

    pub const fn with_tcp_port(mut self, port: u16) -> Self {
        self.tcp_port = Some(port);
        self
    }

    pub const fn delta(mut self) -> Self {
        self.delta = true;
        self
    }

    pub const fn deferred(mut self) -> Self {
        self.start = false;
        self
    }

    pub const fn with_service_account(mut self, sa: &'static str) -> Self {
        self.service_account = sa;
        self
    }

    /// `name.namespace`, as `/debug/syncz` names the workload.
    pub fn workload_id(&self) -> String {
        format!("{}.{NAMESPACE}", self.name)
    }

    /// The SPIFFE id of its certificate.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}", self.principal())
    }

    /// As AuthorizationPolicy `principals` name it.
    pub fn principal(&self) -> String {
        format!("{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", self.service_account)
    }

    pub fn mode(&self) -> &'static str {
        if self.delta {
            "delta"
        } else {
            "sotw"
        }
    }
}

/// The addresses of one workload inside a test's loopback block.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub inbound: IpAddr,
    pub app: IpAddr,
    pub outbound: IpAddr,
}

pub(crate) fn addrs(net: &LoopbackNet, w: &WorkloadDef) -> Addrs {
    Addrs {
        inbound: net.ip(w.host),
        app: net.ip(w.host + 50),
        outbound: net.ip(w.host + 100),
    }
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    pub def: WorkloadDef,
    pub addrs: Addrs,
    pub admin: SocketAddr,
    pub envoy: ChildGuard,
}

/// What a test mesh consists of.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    pub workloads: Vec<WorkloadDef>,
    /// Extra config files (name, contents) present from the start.
    pub files: Vec<(String, String)>,
    /// Extra `xds-server serve` arguments, e.g. `--workload-cert-ttl 20s`.
    pub server_args: Vec<String>,
}

/// Everything a test runs. Field order is drop order: processes stop before the address
/// block is released and before the directory (with their logs) is removed.
#[derive(Debug)]
pub struct SecureMesh {
    pub sidecars: Vec<Sidecar>,
    pub echos: Vec<ChildGuard>,
    pub server: Option<ChildGuard>,
    pub workloads: Vec<WorkloadDef>,
    pub envoy_bin: PathBuf,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub secure_addr: SocketAddr,
    pub config_dir: PathBuf,
    pub ca_dir: PathBuf,
    pub net: LoopbackNet,
    pub dir: tempfile::TempDir,
}

impl SecureMesh {
    /// Writes the config, starts the server, the echo apps and the sidecars of every
    /// workload with `start`, and waits until every sidecar is connected, synced, holds
    /// ACKed secrets, and every client reaches every service over mutual TLS.
    pub fn start(
        envoy_bin: &Path,
        test_name: &str,
        options: MeshOptions,
    ) -> anyhow::Result<SecureMesh> {
        let net = LoopbackNet::reserve(test_name).context("reserving a loopback block")?;
        let dir = test_dir(test_name)?;
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir)?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        let ca_dir = dir.path().join("ca");
        let mut files = vec![
            ("mesh.yaml".to_owned(), mesh_yaml()),
            (
                "services.yaml".to_owned(),
                services_yaml(&options.workloads),
            ),
            (
                "workloads.yaml".to_owned(),
                workloads_yaml(&net, &options.workloads),
            ),
        ];
        files.extend(options.files.iter().cloned());
        for (file, text) in &files {
            std::fs::write(config_dir.join(file), text)?;
        }
        let server_ip = net.ip(1);
        let xds_addr = SocketAddr::new(server_ip, free_port(server_ip)?);
        let admin_addr = SocketAddr::new(server_ip, free_port(server_ip)?);
        let secure_addr = SocketAddr::new(server_ip, free_port(server_ip)?);
        eprintln!(
            "secure mesh for {test_name}: 127.0.{}.0/24, xds {xds_addr}, secure {secure_addr}, \
             admin {admin_addr}, dir {}",
            net.octet(),
            dir.path().display()
        );
        let mut mesh = SecureMesh {
            sidecars: Vec::new(),
            echos: Vec::new(),
            server: None,
            workloads: options.workloads.clone(),
            envoy_bin: envoy_bin.to_path_buf(),
            xds_addr,
            admin_addr,
            secure_addr,
            config_dir,
            ca_dir,
            net,
            dir,
        };
        mesh.start_server(&options.server_args)?;
        for w in options.workloads.iter().filter(|w| w.has_app) {
            let a = addrs(&mesh.net, w);
            // The echo reports the workload name as its version: which instance answered.
            mesh.echos.push(start_echo(
                mesh.dir.path(),
                SocketAddr::new(a.app, PORT),
                w.app,
                w.name,
            )?);
            if let Some(port) = w.tcp_port {
                mesh.echos.push(start_echo(
                    mesh.dir.path(),
                    SocketAddr::new(a.app, port),
                    w.app,
                    &format!("{}-tcp", w.name),
                )?);
            }
        }
        for w in options.workloads.iter().filter(|w| w.start) {
            mesh.spawn_sidecar(w)?;
        }
        for sidecar in &mut mesh.sidecars {
            wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        }
        mesh.wait_converged(CONVERGE_TIMEOUT)?;
        let clients: Vec<WorkloadDef> = mesh
            .sidecars
            .iter()
            .map(|s| s.def)
            .filter(|w| !w.has_app)
            .collect();
        for client in clients {
            mesh.wait_mtls_routing(client.name)?;
        }
        Ok(mesh)
    }

    fn start_server(&mut self, extra_args: &[String]) -> anyhow::Result<()> {
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("serve")
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--xds-addr")
            .arg(self.xds_addr.to_string())
            .arg("--admin-addr")
            .arg(self.admin_addr.to_string())
            .arg("--secure-addr")
            .arg(self.secure_addr.to_string())
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .args(extra_args)
            .env("RUST_LOG", "info");
        let mut server = ChildGuard::spawn("xds-server", command, self.dir.path())?;
        let admin = self.admin_addr;
        let bundle = self.trust_bundle_path();
        server.wait_until(SERVER_START_TIMEOUT, Duration::from_millis(50), || {
            let response = http_get(admin, "/healthz/ready", &[])?;
            ensure!(
                response.status == 200,
                "/healthz/ready: {}",
                response.status
            );
            ensure!(bundle.is_file(), "no trust bundle at {}", bundle.display());
            anyhow::Ok(())
        })?;
        self.server = Some(server);
        Ok(())
    }

    /// Where the server writes the PEM roots that bootstraps trust.
    pub fn trust_bundle_path(&self) -> PathBuf {
        self.ca_dir.join("trust-bundle.pem")
    }

    /// `xds-server token create` for a workload's identity, written to a file.
    fn token_file(&self, w: &WorkloadDef) -> anyhow::Result<PathBuf> {
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("token")
            .arg("create")
            .arg("--identity")
            .arg(format!("{NAMESPACE}/{}", w.service_account))
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--ttl")
            .arg("1h");
        let output = run_to_completion(command, CLI_TIMEOUT)?;
        ensure!(
            output.status.success(),
            "xds-server token create for {} failed ({}): {}",
            w.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).context("token is not UTF-8")?;
        let token = token.trim();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "xds-server token create printed no single token: {token:?}"
        );
        let path = self
            .dir
            .path()
            .join("tokens")
            .join(format!("{}.token", w.name));
        std::fs::write(&path, token)?;
        Ok(path)
    }

    /// `xds-server bootstrap` for a workload's sidecar on the secure port, with a token.
    fn bootstrap(&self, w: &WorkloadDef, admin_port: u16) -> anyhow::Result<String> {
        let token_file = self.token_file(w)?;
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("bootstrap")
            .arg("--workload")
            .arg(w.workload_id())
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--secure-addr")
            .arg(self.secure_addr.to_string())
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--admin-port")
            .arg(admin_port.to_string());
        if w.delta {
            command.arg("--delta");
        }
        let output = run_to_completion(command, CLI_TIMEOUT)?;
        ensure!(
            output.status.success(),
            "xds-server bootstrap for {} failed ({}): {}",
            w.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let yaml = String::from_utf8(output.stdout).context("bootstrap is not UTF-8")?;
        ensure!(
            yaml.contains(&self.secure_addr.port().to_string()),
            "bootstrap for {} does not point at the secure port {}:\n{yaml}",
            w.name,
            self.secure_addr
        );
        Ok(yaml)
    }

    fn spawn_sidecar(&mut self, w: &WorkloadDef) -> anyhow::Result<()> {
        ensure!(
            self.sidecars.iter().all(|s| s.def.name != w.name),
            "{} already has a sidecar",
            w.name
        );
        let a = addrs(&self.net, w);
        let admin = SocketAddr::new(a.outbound, free_port(a.outbound)?);
        let bootstrap = self.bootstrap(w, admin.port())?;
        let options = EnvoyOptions {
            extra_args: SIDECAR_DRAIN_ARGS.iter().map(|a| a.to_string()).collect(),
            ..EnvoyOptions::default()
        };
        let envoy = start_envoy_with(
            &self.envoy_bin,
            self.dir.path(),
            &format!("envoy-{}", w.name),
            &bootstrap,
            &options,
        )?;
        self.sidecars.push(Sidecar {
            def: *w,
            addrs: a,
            admin,
            envoy,
        });
        Ok(())
    }

    /// Starts the sidecar of a workload defined with [`WorkloadDef::deferred`] and waits
    /// until it is live, synced with secrets, and (for a client) reaches every service.
    pub fn start_sidecar(&mut self, name: &str) -> anyhow::Result<()> {
        let w = *self
            .workloads
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("no workload {name}"))?;
        self.spawn_sidecar(&w)?;
        let sidecar = self.sidecars.last_mut().context("sidecar just pushed")?;
        wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        self.wait_converged(CONVERGE_TIMEOUT)?;
        if !w.has_app {
            self.wait_mtls_routing(name)?;
        }
        Ok(())
    }

    pub fn sidecar(&self, name: &str) -> &Sidecar {
        self.sidecars
            .iter()
            .find(|s| s.def.name == name)
            .unwrap_or_else(|| panic!("no sidecar {name}"))
    }

    pub fn def(&self, name: &str) -> WorkloadDef {
        *self
            .workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// Where the app of a workload sends mesh traffic: its sidecar's outbound listener.
    pub fn outbound(&self, name: &str) -> SocketAddr {
        SocketAddr::new(self.sidecar(name).addrs.outbound, PORT)
    }

    /// A workload's inbound listener (what other sidecars connect to).
    pub fn inbound(&self, name: &str) -> SocketAddr {
        SocketAddr::new(self.sidecar(name).addrs.inbound, PORT)
    }

    /// The apps (services) of the mesh.
    pub fn services(&self) -> Vec<&'static str> {
        let mut apps: Vec<&'static str> = self
            .workloads
            .iter()
            .filter(|w| w.has_app)
            .map(|w| w.app)
            .collect();
        apps.sort_unstable();
        apps.dedup();
        apps
    }

    /// A [`Target`] for continuous HTTP traffic from `client` to service `app`.
    pub fn target(&self, client: &str, app: &'static str) -> Target {
        Target {
            client: client.to_owned(),
            outbound: self.outbound(client),
            app,
            client_id: self.def(client).spiffe_id(),
            tcp: false,
        }
    }

    /// The TCP port of service `app`.
    pub fn tcp_port(&self, app: &str) -> u16 {
        self.workloads
            .iter()
            .find(|w| w.has_app && w.app == app)
            .and_then(|w| w.tcp_port)
            .unwrap_or_else(|| panic!("service {app} has no TCP port"))
    }

    /// A [`Target`] for continuous traffic from `client` to the TCP port of `app`: a new
    /// sidecar-to-sidecar mTLS connection per request.
    pub fn tcp_target(&self, client: &str, app: &'static str) -> Target {
        Target {
            client: client.to_owned(),
            outbound: SocketAddr::new(self.sidecar(client).addrs.outbound, self.tcp_port(app)),
            app,
            client_id: self.def(client).spiffe_id(),
            tcp: true,
        }
    }

    pub fn config_path(&self, file: &str) -> PathBuf {
        self.config_dir.join(file)
    }

    /// Writes a config file atomically (temp file renamed into place), as `kubectl`-style
    /// tools do; the server hot-reloads it.
    pub fn apply(&self, file: &str, text: &str) {
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, self.config_path(file))
            .unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
    }

    fn admin_json(&self, path: &str) -> anyhow::Result<Value> {
        let response = http_get(self.admin_addr, path, &[])?;
        ensure!(
            response.status == 200,
            "{path}: status {}: {}",
            response.status,
            response.text()
        );
        response.json()
    }
}
