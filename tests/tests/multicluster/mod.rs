//! The fixture of the multi-cluster end-to-end tests: a real mesh control plane (MCPC,
//! `xds-server serve` with its CA and secure port), two member clusters `a` and `b`, each
//! with a real `relay` that joined with a one-time join token and watches the cluster's
//! registry folder (WorkloadEntry YAML), real Envoy sidecars connected to their cluster's
//! relay, and echo apps behind them.
//!
//! Topology (explicit interception, per-test block `127.0.X.0/24`, see [`LoopbackNet`]):
//!
//! ```text
//! MCPC 127.0.X.1 (xDS, secure, admin)      config/ : mesh, ServiceEntries
//!   ^ mTLS (secure port)                   ca/     : CA, clusters.json
//! relay a 127.0.X.2 (xDS, secure, admin)   registry-a/ : WorkloadEntries of a, state-a/
//! relay b 127.0.X.3 (xDS, secure, admin)   registry-b/ : WorkloadEntries of b, state-b/
//!   ^ plaintext ADS, or (mTLS workloads) the secure port with a token: ADS + SDS
//! sidecar of workload W: inbound 127.0.X.N:9080, outbound (and Envoy admin) .N+100,
//!   its echo app .N+50:9080 (the echo reports the workload name as its version)
//! ```
//!
//! A workload defined with [`WorkloadDef::mtls`] is labelled `security.istio.io/tlsMode:
//! istio`: its sidecar proves its identity (a workload token made with the MCPC's CA dir)
//! on its relay's secure port instead of plaintext xDS, gets its certificate (signed by
//! the MCPC, one per service account at the relay) and the trust bundle over SDS from the
//! relay, and speaks mutual TLS with other labelled sidecars, in either cluster.
//!
//! Workloads of cluster `a` use host parts 10-19, those of `b` 20-29. The ServiceEntries
//! live on the MCPC and select workloads by label across all clusters; member clusters'
//! WorkloadEntries exist only in their registry folder (one file per workload, so a test
//! can remove one). Every process logs to the test dir; log tails are printed when a test
//! fails (keep the dir with `TRELLIS_KEEP_TEST_DIRS=1`).
// Each test uses a different part of this module.
#![allow(dead_code)]

mod mtls;
mod processes;
mod state;
mod traffic;

// Each test binary uses some of these; the others would be unused imports there.
#[allow(unused_imports)]
pub use self::{mtls::*, state::*, traffic::*};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use trellis_tests::{free_port, test_dir, ChildGuard, LoopbackNet};

use crate::common::{
    self, mesh_yaml, services_yaml, workload_entry_yaml, SidecarMesh, MESH_FILE, POLL,
    SERVICES_FILE,
};

/// Bound on the mesh converging: sidecars synced through their relay, every client's
/// Envoy holding the endpoints of both clusters. Two hops (MCPC -> relay -> sidecar) and
/// a dozen processes on a loaded 2-core machine; the usual time is a few seconds.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on relays coming back to a restarted MCPC: their streams retry with backoff and
/// jitter capped at 30 s (relay/src/upstream.rs), plus the resync itself.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on a registry edit (or an ejection) showing in traffic.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

/// A member cluster: its name (as in its join token) and locality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterDef {
    pub name: &'static str,
    pub region: &'static str,
    pub zone: &'static str,
    /// Host part of the relay's address (xDS and admin ports picked free).
    pub relay_host: u8,
}

pub const CLUSTER_A: ClusterDef = ClusterDef {
    name: "a",
    region: "eu",
    zone: "eu-a",
    relay_host: 2,
};
pub const CLUSTER_B: ClusterDef = ClusterDef {
    name: "b",
    region: "eu",
    zone: "eu-b",
    relay_host: 3,
};
pub const CLUSTERS: [ClusterDef; 2] = [CLUSTER_A, CLUSTER_B];

/// One WorkloadEntry of a member cluster and how its sidecar runs.
pub type WorkloadDef = common::WorkloadDef<ClusterDef>;
/// A running sidecar of a member cluster.
pub type Sidecar = common::Sidecar<ClusterDef>;

impl WorkloadDef {
    /// A workload of `cluster` that only sends.
    pub const fn client(name: &'static str, cluster: ClusterDef, host: u8) -> Self {
        common::WorkloadDef::<()>::client(name, host).in_cluster(cluster)
    }

    /// A workload of `cluster` serving service `app` with an echo app. The ServiceEntry
    /// `app` selects the workloads of every cluster.
    pub const fn service(
        name: &'static str,
        app: &'static str,
        cluster: ClusterDef,
        host: u8,
    ) -> Self {
        common::WorkloadDef::<()>::service(name, app, host).in_cluster(cluster)
    }
}

/// A member cluster's relay, its folders and (while it runs) its process.
#[derive(Debug)]
pub struct Relay {
    pub process: Option<ChildGuard>,
    pub def: ClusterDef,
    pub xds_addr: SocketAddr,
    /// Its secure port (TLS, bootstrap tokens, SDS): where the sidecars of
    /// [`WorkloadDef::mtls`] workloads connect.
    pub secure_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub registry_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The one-time join token its first run used.
    pub token_file: PathBuf,
    /// How many times it was started (names the log of each: `relay-a-N.log`).
    pub starts: usize,
}

/// Everything a test runs. Field order is drop order: sidecars, apps, relays and the
/// MCPC stop before the address block is released and the directory (with the logs) goes.
#[derive(Debug)]
pub struct MultiMesh {
    pub sidecars: Vec<Sidecar>,
    /// Echo apps by workload name.
    pub echos: BTreeMap<&'static str, ChildGuard>,
    pub relays: Vec<Relay>,
    pub server: Option<ChildGuard>,
    servers_started: usize,
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

impl MultiMesh {
    /// Writes the MCPC's config and both registries, starts the MCPC, joins both relays
    /// (each with its own one-time token), starts the echo apps and sidecars of every
    /// workload with `start`, and waits until every sidecar is synced through its relay,
    /// every client's Envoy holds the endpoints of every workload of every cluster, and
    /// every client reaches every service that has a started workload.
    pub fn start(
        envoy_bin: &Path,
        test_name: &str,
        workloads: Vec<WorkloadDef>,
    ) -> anyhow::Result<MultiMesh> {
        let net = LoopbackNet::reserve(test_name).context("reserving a loopback block")?;
        let dir = test_dir(test_name)?;
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir)?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        let ca_dir = dir.path().join("ca");
        std::fs::write(config_dir.join(MESH_FILE), mesh_yaml())?;
        std::fs::write(config_dir.join(SERVICES_FILE), services_yaml(&workloads))?;
        let server_ip = net.ip(1);
        let free =
            |ip: IpAddr| -> anyhow::Result<SocketAddr> { Ok(SocketAddr::new(ip, free_port(ip)?)) };
        let (xds_addr, admin_addr, secure_addr) =
            (free(server_ip)?, free(server_ip)?, free(server_ip)?);
        let mut relays = Vec::new();
        for def in CLUSTERS {
            let ip = net.ip(def.relay_host);
            let registry_dir = dir.path().join(format!("registry-{}", def.name));
            std::fs::create_dir(&registry_dir)?;
            for w in workloads.iter().filter(|w| w.cluster == def) {
                let file = registry_dir.join(registry_file(w));
                std::fs::write(&file, workload_entry_yaml(&net, w))?;
            }
            relays.push(Relay {
                process: None,
                def,
                xds_addr: free(ip)?,
                secure_addr: free(ip)?,
                admin_addr: free(ip)?,
                registry_dir,
                state_dir: dir.path().join(format!("state-{}", def.name)),
                token_file: dir.path().join("tokens").join(format!("join-{}", def.name)),
                starts: 0,
            });
        }
        eprintln!(
            "multi-cluster mesh for {test_name}: 127.0.{}.0/24, MCPC xds {xds_addr} secure \
             {secure_addr} admin {admin_addr}; relays {}; dir {}",
            net.octet(),
            relays
                .iter()
                .map(|r| format!("{} xds {} admin {}", r.def.name, r.xds_addr, r.admin_addr))
                .collect::<Vec<_>>()
                .join(", "),
            dir.path().display()
        );
        let mut mesh = MultiMesh {
            sidecars: Vec::new(),
            echos: BTreeMap::new(),
            relays,
            server: None,
            servers_started: 0,
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
        mesh.start_server()?;
        for def in CLUSTERS {
            mesh.join_token(def)?;
            mesh.start_relay(def.name, true)?;
        }
        mesh.wait_registries_acked(CONVERGE_TIMEOUT)?;
        mesh.wait_clusters_listed()?;
        let to_start: Vec<WorkloadDef> =
            mesh.workloads.iter().filter(|w| w.start).copied().collect();
        for w in &to_start {
            mesh.start_echo(w)?;
        }
        for w in &to_start {
            mesh.spawn_sidecar(w)?;
        }
        for sidecar in &mut mesh.sidecars {
            trellis_tests::wait_envoy_live(
                &mut sidecar.envoy,
                sidecar.admin,
                trellis_tests::ENVOY_START_TIMEOUT,
            )?;
        }
        mesh.wait_converged(CONVERGE_TIMEOUT)?;
        for client in to_start.iter().filter(|w| !w.has_app) {
            mesh.wait_routing(client.name)?;
        }
        Ok(mesh)
    }

    pub fn relay(&self, cluster: &str) -> &Relay {
        self.relays
            .iter()
            .find(|r| r.def.name == cluster)
            .unwrap_or_else(|| panic!("no cluster {cluster}"))
    }

    pub(crate) fn relay_mut(&mut self, cluster: &str) -> &mut Relay {
        self.relays
            .iter_mut()
            .find(|r| r.def.name == cluster)
            .unwrap_or_else(|| panic!("no cluster {cluster}"))
    }

    /// A workload's inbound address (what EDS lists for it).
    pub fn inbound_ip(&self, name: &str) -> IpAddr {
        self.def(name).addrs(&self.net).inbound
    }

    /// Removes a workload's WorkloadEntry file from its cluster's registry folder.
    pub fn remove_from_registry(&self, name: &str) -> anyhow::Result<()> {
        let w = self.def(name);
        let path = self
            .relay(w.cluster.name)
            .registry_dir
            .join(registry_file(&w));
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Fails (with the log tail) if the MCPC, a relay or a sidecar exited.
    pub fn ensure_alive(&mut self) -> anyhow::Result<()> {
        if let Some(server) = &mut self.server {
            server.ensure_running()?;
        }
        for relay in &mut self.relays {
            if let Some(process) = &mut relay.process {
                process.ensure_running()?;
            }
        }
        for sidecar in &mut self.sidecars {
            sidecar.envoy.ensure_running()?;
        }
        Ok(())
    }

    /// Polls `check` every [`POLL`] until it succeeds, for at most `timeout`; fails at
    /// once if a process of the mesh exits meanwhile. The error names `what`, the last
    /// failure and the log tails of the MCPC and the relays.
    pub fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&MultiMesh) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.ensure_alive()?;
            let last = match check(self) {
                Ok(value) => return Ok(value),
                Err(err) => format!("{err:#}"),
            };
            if started.elapsed() >= timeout {
                bail!(
                    "{what}: not after {attempts} attempts in {:.1?}; last error: {last}\n{}",
                    started.elapsed(),
                    self.control_plane_logs(25)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The log tails of the MCPC and of every relay, for failure messages.
    pub fn control_plane_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        if let Some(server) = &self.server {
            out.push_str(&format!(
                "---- {} ----\n{}\n",
                server.name(),
                server.log_tail(lines)
            ));
        }
        for relay in &self.relays {
            if let Some(process) = &relay.process {
                out.push_str(&format!(
                    "---- {} ----\n{}\n",
                    process.name(),
                    process.log_tail(lines)
                ));
            }
        }
        out
    }

    /// The echo app of a workload.
    pub fn echo_mut(&mut self, name: &str) -> anyhow::Result<&mut ChildGuard> {
        self.echos
            .get_mut(name)
            .ok_or_else(|| anyhow!("no echo app for {name}"))
    }
}

/// The file of a workload's WorkloadEntry in its cluster's registry folder.
pub fn registry_file(w: &WorkloadDef) -> String {
    format!("{}.yaml", w.name)
}
