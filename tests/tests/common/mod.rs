//! The mesh fixture shared by the end-to-end tests: a real `xds-server`, one real Envoy
//! sidecar per workload (bootstrapped by `xds-server bootstrap`), echo apps behind the
//! sidecars, and helpers to send traffic into the client's sidecar and to read the
//! server's admin API.
//!
//! Topology (explicit interception, all on a per-test block `127.0.X.0/24`, see
//! [`LoopbackNet`]):
//!
//! ```text
//! test --HTTP Host: reviews--> client sidecar (outbound 127.0.X.110:9080)
//!      --> reviews-vN sidecar (inbound 127.0.X.1N:9080) --> echo reviews vN (127.0.X.6N:9080)
//! ```
//!
//! The xds-server listens on `127.0.X.1` (xDS and admin ports picked free).
// Each test binary uses a different part of this module.
#![allow(dead_code)]

mod config;
mod traffic;

pub use config::*;
pub use traffic::*;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{
    cargo_bin, envoy_admin_get, free_port, http_get, run_to_completion, start_echo, start_envoy,
    test_dir, wait_envoy_live, ChildGuard, LoopbackNet, Signal, ENVOY_START_TIMEOUT,
    TERMINATE_GRACE,
};

pub const NAMESPACE: &str = "default";
/// Every service (and so every outbound listener and every inbound port) uses this port.
pub const PORT: u16 = 9080;

/// Bound on waiting for convergence (every sidecar connected and ACKing), for a routing
/// change to reach the data plane, and for reconnection after a server restart. Generous
/// for a loaded 2-core machine; the usual time is well under a second or two.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a config edit taking effect in traffic or in the admin API.
pub const EDIT_TIMEOUT: Duration = Duration::from_secs(15);
pub const POLL: Duration = Duration::from_millis(100);
/// Bound on a stopped server exiting (see [`Mesh::stop_server`]).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which xDS protocol variant the sidecars use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    /// As `/debug/syncz` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// One WorkloadEntry of the test mesh and its sidecar.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    pub name: &'static str,
    pub app: &'static str,
    pub version: &'static str,
    /// Host part base: inbound `.N`, app `.N+50`, outbound `.N+100`.
    host: u8,
    /// Whether an echo app runs behind the sidecar (the client only sends).
    has_app: bool,
}

pub const WORKLOADS: [WorkloadSpec; 4] = [
    WorkloadSpec {
        name: "client",
        app: "client",
        version: "v1",
        host: 10,
        has_app: false,
    },
    WorkloadSpec {
        name: "reviews-v1",
        app: "reviews",
        version: "v1",
        host: 11,
        has_app: true,
    },
    WorkloadSpec {
        name: "reviews-v2",
        app: "reviews",
        version: "v2",
        host: 12,
        has_app: true,
    },
    WorkloadSpec {
        name: "ratings-v1",
        app: "ratings",
        version: "v1",
        host: 13,
        has_app: true,
    },
];

/// The addresses of one workload inside a test's loopback block.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadAddrs {
    pub inbound: IpAddr,
    pub app: IpAddr,
    pub outbound: IpAddr,
}

pub(crate) fn workload_addrs(net: &LoopbackNet, w: &WorkloadSpec) -> WorkloadAddrs {
    WorkloadAddrs {
        inbound: net.ip(w.host),
        app: net.ip(w.host + 50),
        outbound: net.ip(w.host + 100),
    }
}

/// A workload's sidecar.
#[derive(Debug)]
pub struct Sidecar {
    pub spec: WorkloadSpec,
    pub addrs: WorkloadAddrs,
    pub admin: SocketAddr,
    pub envoy: ChildGuard,
}

impl Sidecar {
    /// `name.namespace`, as `/debug/syncz` reports the workload.
    pub fn workload_id(&self) -> String {
        format!("{}.{NAMESPACE}", self.spec.name)
    }
}

/// Everything a test runs. Field order is drop order: processes stop before the lock on
/// the address block is released and before the directory (with their logs) is removed.
#[derive(Debug)]
pub struct Mesh {
    pub mode: Mode,
    pub sidecars: Vec<Sidecar>,
    pub echos: Vec<ChildGuard>,
    pub server: Option<ChildGuard>,
    /// How many servers were started (names the log of each: `xds-server-N.log`).
    servers_started: usize,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config_dir: PathBuf,
    pub net: LoopbackNet,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Writes the config, starts the server, the echo apps and every sidecar, and waits
    /// until every sidecar is connected, has ACKed its config, and reviews answers.
    pub fn start(envoy_bin: &Path, test_name: &str, mode: Mode) -> anyhow::Result<Mesh> {
        let net = LoopbackNet::reserve(test_name).context("reserving a loopback block")?;
        let dir = test_dir(test_name)?;
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir)?;
        for (file, text) in initial_files(&net) {
            std::fs::write(config_dir.join(file), text)?;
        }
        let server_ip = net.ip(1);
        let xds_addr = SocketAddr::new(server_ip, free_port(server_ip)?);
        let admin_addr = SocketAddr::new(server_ip, free_port(server_ip)?);
        eprintln!(
            "mesh for {test_name} ({}): 127.0.{}.0/24, xds {xds_addr}, admin {admin_addr}, dir {}",
            mode.as_str(),
            net.octet(),
            dir.path().display()
        );
        let mut mesh = Mesh {
            mode,
            sidecars: Vec::new(),
            echos: Vec::new(),
            server: None,
            servers_started: 0,
            xds_addr,
            admin_addr,
            config_dir,
            net,
            dir,
        };
        mesh.start_server()?;

        for w in WORKLOADS.iter().filter(|w| w.has_app) {
            let addrs = workload_addrs(&mesh.net, w);
            mesh.echos.push(start_echo(
                mesh.dir.path(),
                SocketAddr::new(addrs.app, PORT),
                w.app,
                w.version,
            )?);
        }
        for w in WORKLOADS {
            let addrs = workload_addrs(&mesh.net, &w);
            let admin = SocketAddr::new(addrs.outbound, free_port(addrs.outbound)?);
            let bootstrap = mesh.bootstrap(&w, admin.port())?;
            let envoy = start_envoy(
                envoy_bin,
                mesh.dir.path(),
                &format!("envoy-{}", w.name),
                &bootstrap,
            )?;
            mesh.sidecars.push(Sidecar {
                spec: w,
                addrs,
                admin,
                envoy,
            });
        }
        for sidecar in &mut mesh.sidecars {
            wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        }
        mesh.wait_converged(CONVERGE_TIMEOUT)?;
        mesh.wait_routing()?;
        Ok(mesh)
    }

    /// `xds-server bootstrap` for one workload, checked to be what we asked for.
    fn bootstrap(&self, w: &WorkloadSpec, admin_port: u16) -> anyhow::Result<String> {
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("bootstrap")
            .arg("--workload")
            .arg(format!("{}.{NAMESPACE}", w.name))
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--xds-addr")
            .arg(self.xds_addr.to_string())
            .arg("--admin-port")
            .arg(admin_port.to_string());
        if self.mode == Mode::Delta {
            command.arg("--delta");
        }
        let output = run_to_completion(command, Duration::from_secs(30))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success(),
            "xds-server bootstrap for {} failed ({}): {stderr}",
            w.name,
            output.status
        );
        let yaml = String::from_utf8(output.stdout).context("bootstrap is not UTF-8")?;
        let api_type = match self.mode {
            Mode::Sotw => "GRPC",
            Mode::Delta => "DELTA_GRPC",
        };
        ensure!(
            yaml.lines()
                .any(|l| l.trim() == format!("api_type: {api_type}")),
            "bootstrap for {} lacks api_type {api_type}:\n{yaml}",
            w.name
        );
        Ok(yaml)
    }

    /// Starts an xds-server on [`Self::xds_addr`] / [`Self::admin_addr`] and waits until
    /// its admin API answers.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        ensure!(self.server.is_none(), "a server is already running");
        self.servers_started += 1;
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("serve")
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--xds-addr")
            .arg(self.xds_addr.to_string())
            .arg("--admin-addr")
            .arg(self.admin_addr.to_string())
            // These tests are about plaintext xDS; the secure port has its own tests.
            .arg("--secure-addr")
            .arg("off")
            .env("RUST_LOG", "info");
        let name = format!("xds-server-{}", self.servers_started);
        let mut server = ChildGuard::spawn(&name, command, self.dir.path())?;
        let admin = self.admin_addr;
        server.wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
            let response = http_get(admin, "/healthz/ready", &[])?;
            ensure!(
                response.status == 200,
                "/healthz/ready: {}",
                response.status
            );
            anyhow::Ok(())
        })?;
        self.server = Some(server);
        Ok(())
    }

    /// Stops the server: SIGTERM, after which it must exit cleanly (status 0), or straight
    /// SIGKILL with `crash`, which gives it no chance to close streams.
    pub fn stop_server(&mut self, crash: bool) -> anyhow::Result<()> {
        let mut server = self.server.take().context("no server running")?;
        let signal = if crash {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        let stopping = std::time::Instant::now();
        server.signal(signal)?;
        // Normally gone in milliseconds, but the kernel tears down the server's inotify
        // watch on exit (fsnotify_destroy_group waits for RCU work), which on a loaded
        // machine was seen to take seconds: hence the generous bound.
        let Some(status) = server.wait_timeout(STOP_TIMEOUT)? else {
            server.terminate(TERMINATE_GRACE)?;
            bail!("xds-server still running {STOP_TIMEOUT:?} after {signal}");
        };
        if stopping.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "note: xds-server took {:.1?} to exit after {signal}",
                stopping.elapsed()
            );
        }
        ensure!(
            crash || status.success(),
            "xds-server did not exit cleanly on SIGTERM ({status}); log tail:\n{}",
            server.log_tail(20)
        );
        Ok(())
    }

    pub fn sidecar(&self, name: &str) -> &Sidecar {
        self.sidecars
            .iter()
            .find(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("no sidecar {name}"))
    }

    /// Where the test sends traffic: the client sidecar's outbound listener.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.sidecar("client").addrs.outbound, PORT)
    }

    pub fn config_path(&self, file: &str) -> PathBuf {
        self.config_dir.join(file)
    }

    /// Rewrites a config file in place (as `echo > file` would).
    pub fn write_config(&self, file: &str, text: &str) {
        let path = self.config_path(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Replaces a config file atomically: a hidden temp file renamed over it (as editors
    /// and `kubectl`-style tools do).
    pub fn replace_config(&self, file: &str, text: &str) {
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

    pub fn syncz(&self) -> anyhow::Result<Value> {
        self.admin_json("/debug/syncz")
    }

    pub fn configz(&self) -> anyhow::Result<Value> {
        self.admin_json("/debug/configz")
    }

    /// The `/debug/syncz` entry of a workload's proxy (`name.namespace`).
    pub fn proxy_status(&self, workload: &str) -> anyhow::Result<Value> {
        let syncz = self.syncz()?;
        let proxies = syncz["proxies"]
            .as_array()
            .context("syncz.proxies is not an array")?;
        let mut matching = proxies.iter().filter(|p| p["workload"] == workload);
        let proxy = matching
            .next()
            .ok_or_else(|| anyhow!("{workload} is not connected; syncz: {syncz}"))?;
        ensure!(
            matching.next().is_none(),
            "{workload} is connected twice: {syncz}"
        );
        Ok(proxy.clone())
    }

    /// Every sidecar connected once, in the test's mode, and synced; `require_sent` also
    /// demands that CDS, LDS and RDS were sent and ACKed (not merely "nothing pending").
    pub fn check_converged(&self, require_sent: bool) -> anyhow::Result<()> {
        let syncz = self.syncz()?;
        let proxies = syncz["proxies"]
            .as_array()
            .context("syncz.proxies is not an array")?;
        ensure!(
            proxies.len() == self.sidecars.len(),
            "{} proxies connected, expected {}: {syncz}",
            proxies.len(),
            self.sidecars.len()
        );
        for sidecar in &self.sidecars {
            let workload = sidecar.workload_id();
            let proxy = proxies
                .iter()
                .find(|p| p["workload"] == workload.as_str())
                .ok_or_else(|| anyhow!("{workload} is not connected: {syncz}"))?;
            ensure!(
                proxy["mode"] == self.mode.as_str(),
                "{workload} uses {} instead of {}",
                proxy["mode"],
                self.mode.as_str()
            );
            ensure!(proxy["synced"] == true, "{workload} not synced: {proxy}");
            let types = proxy["types"]
                .as_object()
                .context("types is not an object")?;
            if require_sent {
                for kind in ["cds", "lds", "rds"] {
                    ensure!(
                        types
                            .get(kind)
                            .is_some_and(|t| !t["sent_version"].is_null()),
                        "{workload}: nothing sent for {kind} yet: {proxy}"
                    );
                }
            }
            for (kind, t) in types {
                ensure!(
                    t["acked_version"] == t["sent_version"],
                    "{workload}: {kind} sent {} but acked {}: {proxy}",
                    t["sent_version"],
                    t["acked_version"]
                );
            }
        }
        Ok(())
    }

    /// Polls [`Self::check_converged`] (with `require_sent`) until it holds.
    /// Fails fast if the server exits meanwhile.
    pub fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut server = self.server.take().context("no server running")?;
        let result = server.wait_until(timeout, POLL, || self.check_converged(true));
        self.server = Some(server);
        result
    }

    /// Waits until a request through the client sidecar reaches reviews (any version).
    pub fn wait_routing(&self) -> anyhow::Result<String> {
        let client = self.client();
        trellis_tests::poll_until(CONVERGE_TIMEOUT, POLL, || reviews_version(client, "/", &[]))
            .map_err(|e| anyhow!("no request through {client} reached reviews: {e}"))
    }

    /// Envoy's `/server_info`: uptime of the current epoch (seconds) and its state.
    pub fn envoy_uptime(&self, name: &str) -> anyhow::Result<u64> {
        let info = envoy_admin_get(self.sidecar(name).admin, "/server_info")?.json()?;
        ensure!(
            info["state"] == "LIVE",
            "{name} not LIVE: {}",
            info["state"]
        );
        let uptime = info["uptime_current_epoch"]
            .as_str()
            .context("no uptime_current_epoch")?;
        uptime
            .strip_suffix('s')
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad uptime {uptime:?}"))
    }

    /// A counter or gauge from a sidecar's Envoy `/stats` (0 when absent).
    pub fn envoy_stat(&self, name: &str, stat: &str) -> anyhow::Result<u64> {
        let stats =
            envoy_admin_get(self.sidecar(name).admin, &format!("/stats?filter=^{stat}$"))?.text();
        Ok(stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Asserts the default 80/20 split ([`check_default_split`]) of `n` requests through the
    /// client sidecar. A failure shows what the client's Envoy did meanwhile: requests and
    /// retries per reviews cluster, and the route config it holds.
    #[track_caller]
    pub fn assert_default_split(&self, n: usize) {
        let before = self.reviews_cluster_stats();
        let result = check_default_split(self.client(), n);
        let after = self.reviews_cluster_stats();
        let delta: BTreeMap<&String, i64> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = i64::try_from(*v).ok()?
                    - i64::try_from(before.get(k).copied().unwrap_or(0)).ok()?;
                (d != 0).then_some((k, d))
            })
            .collect();
        match result {
            Ok(share) => eprintln!("default split: v1 share {share:.3} of {n}; {delta:?}"),
            Err(err) => {
                let routes = envoy_admin_get(
                    self.sidecar("client").admin,
                    "/config_dump?resource=dynamic_route_configs",
                )
                .map(|r| r.text())
                .unwrap_or_else(|e| e.to_string());
                let endpoints = envoy_admin_get(self.sidecar("client").admin, "/clusters")
                    .map(|r| {
                        r.text()
                            .lines()
                            .filter(|l| l.contains("reviews") && l.contains("::rq_total::"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_else(|e| e.to_string());
                panic!(
                    "{err:#}\nclient Envoy reviews cluster counters during the check: \
                     {delta:#?}\nclient Envoy reviews endpoints:\n{endpoints}\n\
                     client Envoy route configs: {routes}"
                );
            }
        }
    }

    /// The client Envoy's request and retry counters of the reviews clusters.
    fn reviews_cluster_stats(&self) -> BTreeMap<String, u64> {
        let Ok(stats) = envoy_admin_get(
            self.sidecar("client").admin,
            "/stats?filter=reviews.*(upstream_rq_total|upstream_rq_retry|upstream_rq_5xx|upstream_cx_total)$",
        ) else {
            return BTreeMap::new();
        };
        stats
            .text()
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Asserts that no sidecar restarted (same pid, still running).
    #[track_caller]
    pub fn assert_sidecars_running(&mut self, pids: &BTreeMap<String, u32>) {
        for sidecar in &mut self.sidecars {
            assert!(
                sidecar.envoy.is_running(),
                "envoy of {} exited:\n{}",
                sidecar.spec.name,
                sidecar.envoy.log_tail(30)
            );
            assert_eq!(
                Some(pids[sidecar.spec.name]),
                sidecar.envoy.pid(),
                "envoy of {} was replaced",
                sidecar.spec.name
            );
        }
    }

    pub fn envoy_pids(&self) -> BTreeMap<String, u32> {
        self.sidecars
            .iter()
            .map(|s| (s.spec.name.to_owned(), s.envoy.pid().expect("pid")))
            .collect()
    }
}
