//! Starting and stopping the processes of a multi-cluster mesh: the MCPC, the relays
//! (joined with one-time tokens), echo apps and Envoy sidecars bootstrapped for a relay.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use trellis_tests::{
    cargo_bin, free_port, http_get, run_to_completion, start_echo, start_envoy_with,
    wait_envoy_live, ChildGuard, EnvoyOptions, Signal, ENVOY_START_TIMEOUT, TERMINATE_GRACE,
};

use super::{addrs, ClusterDef, MultiMesh, Sidecar, WorkloadDef, CONVERGE_TIMEOUT};

/// Bound on the short-lived CLI commands (join token, bootstrap, a relay that must fail).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the MCPC's start (initial load, CA, three listeners).
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a relay's start: joining (a CSR signed upstream) and binding its listeners.
const RELAY_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a stopped process exiting. Normally milliseconds; the kernel tearing down an
/// inotify watch on exit was seen to take seconds on a loaded machine.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How the sidecars' Envoys drain, as Istio's agent runs them (see the security fixture).
const SIDECAR_DRAIN_ARGS: [&str; 4] = ["--drain-strategy", "immediate", "--drain-time-s", "45"];

impl MultiMesh {
    /// Starts an MCPC on [`Self::xds_addr`], [`Self::secure_addr`], [`Self::admin_addr`]
    /// with the test's config and CA dirs, and waits until it is ready and its trust
    /// bundle is written.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        ensure!(self.server.is_none(), "an MCPC is already running");
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
            .arg("--secure-addr")
            .arg(self.secure_addr.to_string())
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .env("RUST_LOG", "info");
        let name = format!("xds-server-{}", self.servers_started);
        let mut server = ChildGuard::spawn(&name, command, self.dir.path())?;
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

    /// SIGKILLs the MCPC (no chance to close streams) and waits until it is gone.
    pub fn kill_server(&mut self) -> anyhow::Result<()> {
        let mut server = self.server.take().context("no MCPC running")?;
        server.signal(Signal::SIGKILL)?;
        let Some(_status) = server.wait_timeout(STOP_TIMEOUT)? else {
            server.terminate(TERMINATE_GRACE)?;
            bail!("the MCPC still runs {STOP_TIMEOUT:?} after SIGKILL");
        };
        ensure!(
            http_get(self.admin_addr, "/healthz/ready", &[]).is_err(),
            "the MCPC's admin port still answers after SIGKILL"
        );
        Ok(())
    }

    /// Where the MCPC writes the PEM roots that relays trust.
    pub fn trust_bundle_path(&self) -> std::path::PathBuf {
        self.ca_dir.join("trust-bundle.pem")
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
        let output = run_to_completion(command, CLI_TIMEOUT)?;
        ensure!(
            output.status.success(),
            "xds-server cluster join-token --cluster {} failed ({}): {}",
            def.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).context("join token is not UTF-8")?;
        let token = token.trim();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "xds-server cluster join-token printed no single token: {token:?}"
        );
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
        let admin = addrs[2];
        let mut command = self.relay_command(cluster, with_token, addrs, &state_dir);
        command.env("RUST_LOG", "info");
        let dir = self.dir.path().to_path_buf();
        let relay = self.relay_mut(cluster);
        relay.starts += 1;
        let mut process =
            ChildGuard::spawn(&format!("relay-{cluster}-{}", relay.starts), command, &dir)?;
        process.wait_until(RELAY_START_TIMEOUT, Duration::from_millis(50), || {
            let response = http_get(admin, "/healthz/ready", &[])?;
            ensure!(
                response.status == 200,
                "/healthz/ready: {}",
                response.status
            );
            anyhow::Ok(())
        })?;
        relay.process = Some(process);
        Ok(())
    }

    /// Stops a cluster's relay with SIGTERM; it must exit cleanly.
    pub fn stop_relay(&mut self, cluster: &str) -> anyhow::Result<()> {
        let relay = self.relay_mut(cluster);
        let mut process = relay.process.take().context("relay not running")?;
        process.signal(Signal::SIGTERM)?;
        let Some(status) = process.wait_timeout(STOP_TIMEOUT)? else {
            process.terminate(TERMINATE_GRACE)?;
            bail!("relay {cluster} still runs {STOP_TIMEOUT:?} after SIGTERM");
        };
        ensure!(
            status.success(),
            "relay {cluster} did not exit cleanly on SIGTERM ({status}); log tail:\n{}",
            process.log_tail(20)
        );
        Ok(())
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
        let a = addrs(&self.net, w);
        // The echo reports the workload name as its version: which instance answered.
        let echo = start_echo(
            self.dir.path(),
            SocketAddr::new(a.app, super::PORT),
            w.app,
            w.name,
        )?;
        ensure!(
            self.echos.insert(w.name, echo).is_none(),
            "{} already has an echo app",
            w.name
        );
        Ok(())
    }

    /// `xds-server bootstrap` for a workload's sidecar, pointing at its cluster's relay:
    /// its plaintext xDS port, or for an [`WorkloadDef::mtls`] workload its secure port,
    /// with a workload token for the workload's service account, trusting the relay's
    /// identity through the files in the relay's state dir.
    fn bootstrap(&self, w: &WorkloadDef, admin_port: u16) -> anyhow::Result<String> {
        let relay = self.relay(w.cluster.name);
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .arg("bootstrap")
            .arg("--workload")
            .arg(w.workload_id())
            .arg("--config-dir")
            .arg(&relay.registry_dir)
            .arg("--cluster")
            .arg(w.cluster.name)
            .arg("--admin-port")
            .arg(admin_port.to_string());
        let port = if w.mtls {
            let token_file = self.workload_token(w)?;
            command
                .arg("--token-file")
                .arg(&token_file)
                .arg("--secure-addr")
                .arg(relay.secure_addr.to_string())
                .arg("--ca-dir")
                .arg(&relay.state_dir)
                .args(["--via-relay", w.cluster.name])
                .args(["--trust-domain", super::TRUST_DOMAIN]);
            relay.secure_addr
        } else {
            command.arg("--xds-addr").arg(relay.xds_addr.to_string());
            relay.xds_addr
        };
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
            yaml.contains(&port.port().to_string()),
            "bootstrap for {} does not point at relay {} ({port}):\n{yaml}",
            w.name,
            w.cluster.name,
        );
        Ok(yaml)
    }

    /// `xds-server token create` for a workload's identity (`NAMESPACE/SERVICE_ACCOUNT`),
    /// made with the MCPC's config and CA dirs (which works while the MCPC is down: it
    /// only needs the token key), written to `tokens/W.token`.
    pub fn workload_token(&self, w: &WorkloadDef) -> anyhow::Result<std::path::PathBuf> {
        let mut command = Command::new(cargo_bin("xds-server"));
        command
            .args(["token", "create", "--identity"])
            .arg(format!("{}/{}", super::NAMESPACE, w.service_account))
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .args(["--ttl", "1h"]);
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

    pub(crate) fn spawn_sidecar(&mut self, w: &WorkloadDef) -> anyhow::Result<()> {
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
            for def in super::CLUSTERS {
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
