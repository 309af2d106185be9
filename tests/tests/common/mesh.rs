//! The plaintext mesh of the routing, config-change and restart tests: a real `xds-server`
//! (plaintext xDS only), one real Envoy sidecar per workload (bootstrapped by `xds-server
//! bootstrap`), echo apps behind the sidecars, and the server's admin API.
//!
//! ```text
//! test --HTTP Host: reviews--> client sidecar (outbound 127.0.X.110:9080)
//!      --> reviews-vN sidecar (inbound 127.0.X.1N:9080) --> echo reviews vN (127.0.X.6N:9080)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{
    envoy_admin_get, eventually, free_port, http_get_json, start_echo, test_dir, wait_envoy_live,
    ChildGuard, EnvoyOptions, LoopbackNet, Signal, ENVOY_START_TIMEOUT,
};

use super::{
    bootstrap_command, check_default_split, initial_files, proxies_by_workload, reviews_version,
    run_cli, sidecar_mesh_fields, start_xds_server, stop_process, Serve, Sidecar, SidecarMesh,
    WorkloadDef, CONVERGE_TIMEOUT, POLL, PORT, SIDECAR_DRAIN_ARGS,
};

/// Bound on a config edit taking effect in traffic or in the admin API.
pub const EDIT_TIMEOUT: Duration = Duration::from_secs(15);

/// How the sidecars' Envoys drain a connection whose listener changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Envoy's default (gradual over 600 s): enough for tests that change routes only.
    EnvoyDefault,
    /// As Istio's agent runs Envoy (see [`SidecarMesh::envoy_options`]): needed when a
    /// test changes an inbound listener (a policy, an EnvoyFilter) and expects traffic on
    /// kept-alive connections to see the change.
    LikeIstio,
}

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

/// The workloads of the plaintext mesh; their sidecars use the mesh's [`Mode`]. (Named
/// `WorkloadDef::<()>` since the multi-cluster fixture has constructors of its own.)
pub const WORKLOADS: [WorkloadDef; 4] = [
    WorkloadDef::<()>::client("client", 10),
    WorkloadDef::<()>::service("reviews-v1", "reviews", 11),
    WorkloadDef::<()>::service("reviews-v2", "reviews", 12).with_version("v2"),
    WorkloadDef::<()>::service("ratings-v1", "ratings", 13),
];

/// Everything a test runs. Field order is drop order: processes stop before the lock on
/// the address block is released and before the directory (with their logs) is removed.
#[derive(Debug)]
pub struct Mesh {
    pub mode: Mode,
    pub drain: Drain,
    pub sidecars: Vec<Sidecar>,
    pub echos: Vec<ChildGuard>,
    pub server: Option<ChildGuard>,
    /// How many servers were started (names the log of each: `xds-server-N.log`).
    servers_started: usize,
    pub workloads: Vec<WorkloadDef>,
    pub envoy_bin: PathBuf,
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
        Self::start_with(envoy_bin, test_name, mode, Drain::EnvoyDefault)
    }

    /// [`Self::start`], the sidecars draining as `drain` says.
    pub fn start_with(
        envoy_bin: &Path,
        test_name: &str,
        mode: Mode,
        drain: Drain,
    ) -> anyhow::Result<Mesh> {
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
        let workloads = WORKLOADS
            .iter()
            .map(|w| if mode == Mode::Delta { w.delta() } else { *w })
            .collect();
        let mut mesh = Mesh {
            mode,
            drain,
            sidecars: Vec::new(),
            echos: Vec::new(),
            server: None,
            servers_started: 0,
            workloads,
            envoy_bin: envoy_bin.to_path_buf(),
            xds_addr,
            admin_addr,
            config_dir,
            net,
            dir,
        };
        mesh.start_server()?;

        for w in WORKLOADS.iter().filter(|w| w.has_app) {
            let app = SocketAddr::new(w.addrs(&mesh.net).app, PORT);
            mesh.echos
                .push(start_echo(mesh.dir.path(), app, w.app, w.version)?);
        }
        for w in mesh.workloads.clone() {
            mesh.spawn_sidecar(&w)?;
        }
        for sidecar in &mut mesh.sidecars {
            wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        }
        mesh.wait_converged(CONVERGE_TIMEOUT)?;
        mesh.wait_routing()?;
        Ok(mesh)
    }

    /// Starts an xds-server on [`Self::xds_addr`] / [`Self::admin_addr`] and waits until
    /// its admin API answers.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        ensure!(self.server.is_none(), "a server is already running");
        self.servers_started += 1;
        let serve = Serve {
            config_dir: &self.config_dir,
            xds_addr: self.xds_addr,
            admin_addr: self.admin_addr,
            secure: None,
            extra_args: &[],
        };
        let name = format!("xds-server-{}", self.servers_started);
        self.server = Some(start_xds_server(&name, self.dir.path(), serve)?);
        Ok(())
    }

    /// Stops the server: SIGTERM, after which it must exit cleanly (status 0), or straight
    /// SIGKILL with `crash`, which gives it no chance to close streams.
    pub fn stop_server(&mut self, crash: bool) -> anyhow::Result<()> {
        let server = self.server.take().context("no server running")?;
        stop_process(
            server,
            if crash {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            },
        )
    }

    /// Where the test sends traffic: the client sidecar's outbound listener.
    pub fn client(&self) -> SocketAddr {
        self.outbound("client")
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

    pub fn syncz(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr, "/debug/syncz")
    }

    /// The generation of the server's current snapshot.
    pub fn generation(&self) -> u64 {
        self.syncz().expect("syncz")["generation"]
            .as_u64()
            .expect("generation")
    }

    /// Replaces a config file and waits until the server published a new generation and
    /// every sidecar ACKed everything it was sent; the config must then hold no errors.
    pub fn apply(&self, file: &str, text: &str) {
        let before = self.generation();
        self.replace_config(file, text);
        eventually(EDIT_TIMEOUT, POLL, || {
            let now = self.generation();
            ensure!(now > before, "generation still {now}");
            self.check_converged(true)
        });
        let configz = self.configz().expect("configz");
        assert_eq!(configz["errors"], serde_json::json!([]), "{configz}");
    }

    pub fn configz(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr, "/debug/configz")
    }

    /// The `/debug/syncz` entry of a workload's proxy (`name.namespace`).
    pub fn proxy_status(&self, workload: &str) -> anyhow::Result<Value> {
        let syncz = self.syncz()?;
        proxies_by_workload(&syncz, "the xds-server")?
            .remove(workload)
            .ok_or_else(|| anyhow!("{workload} is not connected; syncz: {syncz}"))
    }

    /// Every sidecar connected once, in the test's mode, and synced; `require_sent` also
    /// demands that CDS, LDS and RDS were sent and ACKed (not merely "nothing pending").
    pub fn check_converged(&self, require_sent: bool) -> anyhow::Result<()> {
        let proxies = proxies_by_workload(&self.syncz()?, "the xds-server")?;
        let sent: &[&str] = if require_sent {
            &["cds", "lds", "rds"]
        } else {
            &[]
        };
        self.check_synced("the xds-server", &proxies, sent, |_| true, |_, _| Ok(()))
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

    /// Asserts that no sidecar restarted: each still runs, with the pid of [`Self::envoy_pids`].
    #[track_caller]
    pub fn assert_sidecars_not_restarted(&mut self, pids: &BTreeMap<String, u32>) {
        self.assert_sidecars_running();
        for sidecar in &self.sidecars {
            assert_eq!(
                Some(pids[sidecar.def.name]),
                sidecar.envoy.pid(),
                "envoy of {} was replaced",
                sidecar.def.name
            );
        }
    }

    pub fn envoy_pids(&self) -> BTreeMap<String, u32> {
        self.sidecars
            .iter()
            .map(|s| (s.def.name.to_owned(), s.envoy.pid().expect("pid")))
            .collect()
    }
}

impl SidecarMesh for Mesh {
    type Cluster = ();

    sidecar_mesh_fields!();

    /// `xds-server bootstrap` against the plaintext xDS port, checked to use the mesh's
    /// xDS variant.
    fn bootstrap(&self, w: &WorkloadDef, admin_port: u16) -> anyhow::Result<String> {
        let mut command = bootstrap_command(w, &self.config_dir, admin_port);
        command.arg("--xds-addr").arg(self.xds_addr.to_string());
        let yaml = run_cli(command, &format!("xds-server bootstrap for {}", w.name))?;
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

    /// Envoy's defaults unless the test asked for Istio's draining: most of these tests
    /// change routes, not listeners, so how a listener drains does not matter to them.
    fn envoy_options(&self) -> EnvoyOptions {
        match self.drain {
            Drain::EnvoyDefault => EnvoyOptions::default(),
            Drain::LikeIstio => EnvoyOptions {
                extra_args: SIDECAR_DRAIN_ARGS.iter().map(|a| a.to_string()).collect(),
                ..EnvoyOptions::default()
            },
        }
    }
}
