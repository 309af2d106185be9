//! The fixture of the mesh-security end-to-end tests: a real `xds-server` with its secure
//! port (ADS + CA over TLS) and CA, real Envoy sidecars bootstrapped with signed tokens (so
//! they get their workload certificate and the trust bundle over SDS), echo apps behind
//! them, and helpers to check mutual TLS, authorization and certificate state.
//!
//! Every workload is labelled `security.istio.io/tlsMode: istio` (see
//! [`WorkloadDef::mtls`]): its inbound listeners speak mutual TLS (as PeerAuthentication
//! says) and other sidecars call them with mutual TLS. Topology (addresses as in
//! `common`):
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
pub mod jwt;
mod state;

// Each test binary uses some of these; the others would be unused imports there.
#[allow(unused_imports)]
pub use self::{checks::*, state::*};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use trellis_tests::{
    free_port, start_echo, test_dir, wait_envoy_live, ChildGuard, HttpResponse, LoopbackNet,
    ENVOY_START_TIMEOUT,
};

use crate::common::{
    bootstrap_command, mesh_yaml, run_bootstrap, services_yaml, sidecar_mesh_fields,
    start_xds_server, workload_token, workloads_yaml, Serve, Sidecar, SidecarMesh, WorkloadDef,
    CONVERGE_TIMEOUT, MESH_FILE, NAMESPACE, PORT, SERVICES_FILE, WORKLOADS_FILE,
};

/// Bound on a policy edit taking effect in traffic (reload, push, listener update).
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in a row that must show a policy change before a test checks the steady
/// state: connections opened before the change serve at most one more request each
/// (the sidecars drain immediately, see [`SidecarMesh::envoy_options`]).
pub const IN_A_ROW: usize = 5;

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
        let workloads: Vec<WorkloadDef> = options.workloads.iter().map(|w| w.mtls()).collect();
        let mut files = vec![
            (MESH_FILE.to_owned(), mesh_yaml()),
            (SERVICES_FILE.to_owned(), services_yaml(&workloads)),
            (WORKLOADS_FILE.to_owned(), workloads_yaml(&net, &workloads)),
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
            workloads,
            envoy_bin: envoy_bin.to_path_buf(),
            xds_addr,
            admin_addr,
            secure_addr,
            config_dir,
            ca_dir,
            net,
            dir,
        };
        let serve = Serve {
            config_dir: &mesh.config_dir,
            xds_addr,
            admin_addr,
            secure: Some((secure_addr, &mesh.ca_dir)),
            extra_args: &options.server_args,
        };
        mesh.server = Some(start_xds_server("xds-server", mesh.dir.path(), serve)?);
        for w in mesh.workloads.iter().filter(|w| w.has_app) {
            let app = w.addrs(&mesh.net).app;
            // The echo reports the workload name as its version: which instance answered.
            mesh.echos.push(start_echo(
                mesh.dir.path(),
                SocketAddr::new(app, PORT),
                w.app,
                w.name,
            )?);
            if let Some(port) = w.tcp_port {
                mesh.echos.push(start_echo(
                    mesh.dir.path(),
                    SocketAddr::new(app, port),
                    w.app,
                    &format!("{}-tcp", w.name),
                )?);
            }
        }
        let to_start: Vec<WorkloadDef> =
            mesh.workloads.iter().filter(|w| w.start).copied().collect();
        for w in &to_start {
            mesh.spawn_sidecar(w)?;
        }
        for sidecar in &mut mesh.sidecars {
            wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        }
        mesh.wait_converged(CONVERGE_TIMEOUT)?;
        for client in to_start.iter().filter(|w| !w.has_app) {
            mesh.wait_mtls_routing(client.name)?;
        }
        Ok(mesh)
    }

    /// Starts the sidecar of a workload defined with [`WorkloadDef::deferred`] and waits
    /// until it is live, synced with secrets, and (for a client) reaches every service.
    pub fn start_sidecar(&mut self, name: &str) -> anyhow::Result<()> {
        let w = self.def(name);
        self.spawn_sidecar(&w)?;
        let sidecar = self.sidecars.last_mut().context("sidecar just pushed")?;
        wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        self.wait_converged(CONVERGE_TIMEOUT)?;
        if !w.has_app {
            self.wait_mtls_routing(name)?;
        }
        Ok(())
    }

    /// A workload's inbound listener (what other sidecars connect to).
    pub fn inbound(&self, name: &str) -> SocketAddr {
        SocketAddr::new(self.sidecar(name).addrs.inbound, PORT)
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
        self.workloads_of(app)
            .iter()
            .find_map(|w| w.tcp_port)
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

    /// [`wait_statuses`] for a policy change, naming the server's config errors if it
    /// does not take effect.
    #[track_caller]
    pub fn wait_statuses(
        &self,
        what: &str,
        expected: Result<u16, ()>,
        send: impl FnMut() -> anyhow::Result<HttpResponse>,
    ) {
        wait_statuses(what, expected, send, || self.config_errors());
    }
}

impl SidecarMesh for SecureMesh {
    type Cluster = ();

    sidecar_mesh_fields!();

    /// `xds-server bootstrap` on the secure port, with a token for the workload's identity.
    fn bootstrap(&self, w: &WorkloadDef, admin_port: u16) -> anyhow::Result<String> {
        let tokens = self.dir.path().join("tokens");
        let token_file = workload_token(w, &self.config_dir, &self.ca_dir, &tokens)?;
        let mut command = bootstrap_command(w, &self.config_dir, admin_port);
        command
            .arg("--token-file")
            .arg(&token_file)
            .arg("--secure-addr")
            .arg(self.secure_addr.to_string())
            .arg("--ca-dir")
            .arg(&self.ca_dir);
        run_bootstrap(command, w, self.secure_addr.port())
    }
}

/// PeerAuthentication for the whole namespace.
pub fn peer_authentication_yaml(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: {mode}
"
    )
}
