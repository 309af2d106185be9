//! Starting and stopping the processes of a multi-cluster mesh: the MCPC, the relays
//! (joined with one-time tokens), echo apps and Envoy sidecars bootstrapped for a relay.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{ensure, Context as _};
use trellis_tests::{
    cargo_bin, free_port, http_get, run_to_completion, start_echo, wait_envoy_live, ChildGuard,
    Signal, ENVOY_START_TIMEOUT,
};

use super::{ClusterDef, MultiMesh, WorkloadDef, CLUSTERS, CONVERGE_TIMEOUT, RECONNECT_TIMEOUT};
use crate::common::{
    bootstrap_command, run_bootstrap, run_cli_token, sidecar_mesh_fields, start_xds_server,
    stop_process, trust_bundle_path, wait_ready, workload_token, Serve, SidecarMesh, CLI_TIMEOUT,
    PORT, TRUST_DOMAIN,
};

impl MultiMesh {
    /// Starts an MCPC on [`Self::xds_addr`], [`Self::secure_addr`], [`Self::admin_addr`]
    /// with the test's config and CA dirs, and waits until it is ready and its trust
    /// bundle is written.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        ensure!(self.server.is_none(), "an MCPC is already running");
        self.servers_started += 1;
        let serve = Serve {
            config_dir: &self.config_dir,
            xds_addr: self.xds_addr,
            admin_addr: self.admin_addr,
            secure: Some((self.secure_addr, &self.ca_dir)),
            extra_args: &[],
        };
        let name = format!("xds-server-{}", self.servers_started);
        self.server = Some(start_xds_server(&name, self.dir.path(), serve)?);
        Ok(())
    }

    /// SIGKILLs the MCPC (no chance to close streams), and waits until it is gone and
    /// every relay has noticed (no upstream stream left).
    pub fn kill_server(&mut self) -> anyhow::Result<()> {
        let server = self.server.take().context("no MCPC running")?;
        stop_process(server, Signal::SIGKILL)?;
        ensure!(
            http_get(self.admin_addr, "/healthz/ready", &[]).is_err(),
            "the MCPC's admin port still answers after SIGKILL"
        );
        self.wait("relays notice the MCPC is gone", RECONNECT_TIMEOUT, |m| {
            for def in CLUSTERS {
                let status = m.relay_status(def.name)?;
                ensure!(
                    status["upstream_streams"] == 0,
                    "relay {}: upstream_streams {}",
                    def.name,
                    status["upstream_streams"]
                );
            }
            Ok(())
        })
    }

    /// Starts the MCPC again (after [`Self::kill_server`]) and waits until the relays
    /// reconnected and the mesh converged.
    pub fn restart_server(&mut self) -> anyhow::Result<()> {
        self.start_server().context("restarting the MCPC")?;
        self.wait("relays reconnected", RECONNECT_TIMEOUT, |m| {
            m.check_relays_connected()
        })
        .context("relays reconnecting to the restarted MCPC")?;
        self.wait_converged(CONVERGE_TIMEOUT)
            .context("converging after the MCPC restart")
    }

    /// Where the MCPC writes the PEM roots that relays trust.
    pub fn trust_bundle_path(&self) -> PathBuf {
        trust_bundle_path(&self.ca_dir)
    }

    /// `xds-server cluster join-token` for a member cluster, written to its relay's
    /// token file.
    pub fn join_token(&self, def: ClusterDef) -> anyhow::Result<()> {
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .args(["cluster", "join-token", "--cluster", def.name])
            .args(["--region", def.region, "--zone", def.zone])
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--ca-dir")
            .arg(&self.ca_dir);
        let what = format!("xds-server cluster join-token --cluster {}", def.name);
        let token = run_cli_token(command, &what)?;
        std::fs::write(&self.relay(def.name).token_file, token)?;
        Ok(())
    }

    /// The `relay run` command line of a cluster's relay; `with_token` adds its join token.
    fn relay_command(
        &self,
        cluster: &str,
        with_token: bool,
        [listen, secure, admin]: [SocketAddr; 3],
        state_dir: &Path,
    ) -> Command {
        let relay = self.relay(cluster);
        let mut command = Command::new(cargo_bin("relay"));
        command
            .args(["run", "--cluster", cluster])
            .arg("--upstream")
            .arg(self.secure_addr.to_string())
            .arg("--trust-bundle")
            .arg(self.trust_bundle_path())
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--secure-listen")
            .arg(secure.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--registry-dir")
            .arg(&relay.registry_dir)
            .arg("--state-dir")
            .arg(state_dir);
        if with_token {
            command.arg("--join-token").arg(&relay.token_file);
        }
        command
    }

    /// Starts a cluster's relay (with its join token on the first run, without once its
    /// state dir holds its certificate) and waits until its admin API answers, which it
    /// does only after it has an identity.
    pub fn start_relay(&mut self, cluster: &str, with_token: bool) -> anyhow::Result<()> {
        let (addrs, state_dir) = {
            let r = self.relay(cluster);
            ensure!(r.process.is_none(), "relay {cluster} is already running");
            (
                [r.xds_addr, r.secure_addr, r.admin_addr],
                r.state_dir.clone(),
            )
        };
        let mut command = self.relay_command(cluster, with_token, addrs, &state_dir);
        command.env("RUST_LOG", "info");
        let dir = self.dir.path().to_path_buf();
        let relay = self.relay_mut(cluster);
        relay.starts += 1;
        let mut process =
            ChildGuard::spawn(&format!("relay-{cluster}-{}", relay.starts), command, &dir)?;
        wait_ready(&mut process, relay.admin_addr, || Ok(()))?;
        relay.process = Some(process);
        Ok(())
    }

    /// Stops a cluster's relay with SIGTERM; it must exit cleanly.
    pub fn stop_relay(&mut self, cluster: &str) -> anyhow::Result<()> {
        let process = self
            .relay_mut(cluster)
            .process
            .take()
            .context("relay not running")?;
        stop_process(process, Signal::SIGTERM)
    }

    /// Runs `relay run` for `cluster` once more with its (already used) join token and an
    /// empty state dir, on free ports, and returns how it ended. Logging is off so that
    /// stderr holds only what the relay says about the failure.
    pub fn run_relay_again_with_token(&self, cluster: &str) -> anyhow::Result<Output> {
        let ip = self.net.ip(4);
        let mut addrs = [SocketAddr::new(ip, 0); 3];
        for addr in &mut addrs {
            addr.set_port(free_port(ip)?);
        }
        let state_dir = self.dir.path().join(format!("state-{cluster}-again"));
        std::fs::create_dir(&state_dir)?;
        let mut command = self.relay_command(cluster, true, addrs, &state_dir);
        command.env("RUST_LOG", "off");
        run_to_completion(command, CLI_TIMEOUT)
    }

    /// Starts the echo app of a workload, if it has one.
    pub fn start_echo(&mut self, w: &WorkloadDef) -> anyhow::Result<()> {
        if !w.has_app {
            return Ok(());
        }
        // The echo reports the workload name as its version: which instance answered.
        let app = SocketAddr::new(w.addrs(&self.net).app, PORT);
        let echo = start_echo(self.dir.path(), app, w.app, w.name)?;
        ensure!(
            self.echos.insert(w.name, echo).is_none(),
            "{} already has an echo app",
            w.name
        );
        Ok(())
    }

    /// Starts the echo app and sidecar of a workload defined with
    /// [`WorkloadDef::deferred`], and waits until the sidecar is live and synced through
    /// its relay (which works without the MCPC when the relay prefetched its class).
    pub fn start_sidecar(&mut self, name: &str) -> anyhow::Result<()> {
        let w = self.def(name);
        let started = Instant::now();
        self.start_echo(&w)?;
        self.spawn_sidecar(&w)?;
        let sidecar = self.sidecars.last_mut().context("sidecar just pushed")?;
        wait_envoy_live(&mut sidecar.envoy, sidecar.admin, ENVOY_START_TIMEOUT)?;
        self.wait(
            &format!("{name} synced through relay {}", w.cluster.name),
            CONVERGE_TIMEOUT,
            |m| m.check_relay_converged(w.cluster.name),
        )?;
        eprintln!(
            "{name}: sidecar live and synced through relay {} after {:.1?}",
            w.cluster.name,
            started.elapsed()
        );
        Ok(())
    }

    /// Waits until the MCPC lists both member clusters in `/debug/clusters`.
    pub fn wait_clusters_listed(&mut self) -> anyhow::Result<()> {
        self.wait("member clusters listed", CONVERGE_TIMEOUT, |m| {
            let clusters = m.member_clusters()?;
            for def in CLUSTERS {
                ensure!(
                    clusters.iter().any(|c| c["name"] == def.name),
                    "cluster {} not in /debug/clusters: {clusters:?}",
                    def.name
                );
            }
            Ok(())
        })
        .map_err(|e| e.context("the MCPC does not list the joined clusters"))
    }
}

impl SidecarMesh for MultiMesh {
    type Cluster = ClusterDef;

    sidecar_mesh_fields!();

    /// `xds-server bootstrap` for a workload's sidecar, pointing at its cluster's relay:
    /// its plaintext xDS port, or for an [`WorkloadDef::mtls`] workload its secure port,
    /// with a workload token for the workload's service account, trusting the relay's
    /// identity through the files in the relay's state dir.
    fn bootstrap(&self, w: &WorkloadDef, admin_port: u16) -> anyhow::Result<String> {
        let relay = self.relay(w.cluster.name);
        let mut command = bootstrap_command(w, &relay.registry_dir, admin_port);
        command.arg("--cluster").arg(w.cluster.name);
        let port = if w.mtls {
            let tokens = self.dir.path().join("tokens");
            let token_file = workload_token(w, &self.config_dir, &self.ca_dir, &tokens)?;
            command
                .arg("--token-file")
                .arg(&token_file)
                .arg("--secure-addr")
                .arg(relay.secure_addr.to_string())
                .arg("--ca-dir")
                .arg(&relay.state_dir)
                .args(["--via-relay", w.cluster.name])
                .args(["--trust-domain", TRUST_DOMAIN]);
            relay.secure_addr
        } else {
            command.arg("--xds-addr").arg(relay.xds_addr.to_string());
            relay.xds_addr
        };
        run_bootstrap(command, w, port.port())
            .with_context(|| format!("a sidecar of relay {}", w.cluster.name))
    }
}
