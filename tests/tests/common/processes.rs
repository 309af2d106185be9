//! Running the Trellis binaries: `xds-server serve` until it is ready, the short-lived CLI
//! commands (`bootstrap`, `token create`, `cluster join-token`), and stopping a process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use trellis_tests::{cargo_bin, http_get, run_to_completion, ChildGuard, Signal, TERMINATE_GRACE};

use super::{WorkloadDef, NAMESPACE};

/// Bound on the short-lived CLI commands (bootstrap, tokens, a relay that must fail).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a server's or relay's start: initial load, CA, joining, its listeners.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a stopped process exiting. Normally milliseconds, but the kernel tears down a
/// server's inotify watch on exit (fsnotify_destroy_group waits for RCU work), which on a
/// loaded machine was seen to take seconds.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a short-lived command to success and returns its stdout; `what` names it in
/// errors, which carry its stderr.
pub fn run_cli(command: Command, what: &str) -> anyhow::Result<String> {
    let output = run_to_completion(command, CLI_TIMEOUT)?;
    ensure!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).with_context(|| format!("{what} printed no UTF-8"))
}

/// Bound on `xds-server ca rotate-root` (each phase waits for every proxy's ACK, and
/// for relays' reports of the sidecars behind them).
pub const ROTATION_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `xds-server ca rotate-root` against the admin API at `admin` to completion and
/// prints what it said and how long it took; an error if it failed, with `/debug/ca`.
pub fn rotate_root(admin: SocketAddr) -> anyhow::Result<Duration> {
    let mut command = Command::new(cargo_bin("xds-server"));
    command
        .arg("ca")
        .arg("rotate-root")
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--timeout")
        .arg(format!("{}s", ROTATION_TIMEOUT.as_secs()));
    let started = Instant::now();
    let output = run_to_completion(command, ROTATION_TIMEOUT + Duration::from_secs(30))
        .context("xds-server ca rotate-root")?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "rotate-root ({took:.1?}, {}):\n{stdout}{stderr}",
        output.status
    );
    if !output.status.success() {
        let ca = http_get(admin, "/debug/ca", &[])
            .map(|r| r.text())
            .unwrap_or_else(|e| format!("{e:#}"));
        bail!(
            "xds-server ca rotate-root failed ({}):\n{stdout}{stderr}\n/debug/ca: {ca}",
            output.status
        );
    }
    Ok(took)
}

/// [`run_cli`] for a command that prints one token: the token.
pub fn run_cli_token(command: Command, what: &str) -> anyhow::Result<String> {
    let stdout = run_cli(command, what)?;
    let token = stdout.trim();
    ensure!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{what} printed no single token: {token:?}"
    );
    Ok(token.to_owned())
}

/// `xds-server token create` for `w`'s identity (`NAMESPACE/SERVICE_ACCOUNT`), made with a
/// control plane's config and CA dirs (it needs only the token key there, so this works
/// while the server is down), written to `tokens_dir/W.token`.
pub fn workload_token<C>(
    w: &WorkloadDef<C>,
    config_dir: &Path,
    ca_dir: &Path,
    tokens_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let mut command = Command::new(cargo_bin("xds-server"));
    command
        .args(["token", "create", "--identity"])
        .arg(format!("{NAMESPACE}/{}", w.service_account))
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--ca-dir")
        .arg(ca_dir)
        .args(["--ttl", "1h"]);
    let token = run_cli_token(command, &format!("xds-server token create for {}", w.name))?;
    let path = tokens_dir.join(format!("{}.token", w.name));
    std::fs::write(&path, token)?;
    Ok(path)
}

/// `xds-server bootstrap` for `w`'s sidecar: its workload id, the config dir that defines
/// it, its Envoy admin port and xDS variant. The caller adds where it connects, and runs
/// it with [`run_bootstrap`].
pub fn bootstrap_command<C>(w: &WorkloadDef<C>, config_dir: &Path, admin_port: u16) -> Command {
    let mut command = Command::new(cargo_bin("xds-server"));
    command
        .arg("bootstrap")
        .arg("--workload")
        .arg(w.workload_id())
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--admin-port")
        .arg(admin_port.to_string());
    if w.delta {
        command.arg("--delta");
    }
    command
}

/// Runs a [`bootstrap_command`] of `w`: the bootstrap YAML, checked to point at `port` (the
/// xDS port its sidecar must connect to).
pub fn run_bootstrap<C>(command: Command, w: &WorkloadDef<C>, port: u16) -> anyhow::Result<String> {
    let yaml = run_cli(command, &format!("xds-server bootstrap for {}", w.name))?;
    ensure!(
        yaml.contains(&port.to_string()),
        "bootstrap for {} does not point at port {port}:\n{yaml}",
        w.name
    );
    Ok(yaml)
}

/// Where a control plane writes the PEM roots it trusts, in its CA dir (a relay does the
/// same in its state dir).
pub fn trust_bundle_path(ca_dir: &Path) -> PathBuf {
    ca_dir.join("trust-bundle.pem")
}

/// How an `xds-server serve` runs.
#[derive(Debug, Clone, Copy)]
pub struct Serve<'a> {
    pub config_dir: &'a Path,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The secure port (ADS and CA over TLS) and the CA dir; `None`: plaintext xDS only.
    pub secure: Option<(SocketAddr, &'a Path)>,
    pub extra_args: &'a [String],
}

/// Starts `xds-server serve` as process `name`, logging to `log_dir`, and waits until it
/// is ready and, with a secure port, has written its trust bundle.
pub fn start_xds_server(
    name: &str,
    log_dir: &Path,
    serve: Serve<'_>,
) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new(cargo_bin("xds-server"));
    command
        .arg("serve")
        .arg("--config-dir")
        .arg(serve.config_dir)
        .arg("--xds-addr")
        .arg(serve.xds_addr.to_string())
        .arg("--admin-addr")
        .arg(serve.admin_addr.to_string())
        .arg("--secure-addr");
    match serve.secure {
        Some((addr, ca_dir)) => command.arg(addr.to_string()).arg("--ca-dir").arg(ca_dir),
        // The plaintext tests are about plaintext xDS; the secure port has its own tests.
        None => command.arg("off"),
    };
    command.args(serve.extra_args).env("RUST_LOG", "info");
    let mut server = ChildGuard::spawn(name, command, log_dir)?;
    let bundle = serve.secure.map(|(_, ca_dir)| trust_bundle_path(ca_dir));
    wait_ready(&mut server, serve.admin_addr, || match &bundle {
        Some(bundle) => {
            ensure!(bundle.is_file(), "no trust bundle at {}", bundle.display());
            Ok(())
        }
        None => Ok(()),
    })?;
    Ok(server)
}

/// Waits (bounded by [`START_TIMEOUT`]) until the admin API at `admin` says ready and
/// `also` holds; fails at once if `process` exits meanwhile.
pub fn wait_ready(
    process: &mut ChildGuard,
    admin: SocketAddr,
    mut also: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    process.wait_until(START_TIMEOUT, Duration::from_millis(50), || {
        let response = http_get(admin, "/healthz/ready", &[])?;
        ensure!(
            response.status == 200,
            "/healthz/ready: {}",
            response.status
        );
        also()
    })
}

/// Stops a process with `signal` and waits until it is gone: after SIGTERM it must exit
/// cleanly (status 0); SIGKILL gives it no chance to close streams.
pub fn stop_process(mut process: ChildGuard, signal: Signal) -> anyhow::Result<()> {
    let stopping = Instant::now();
    process.signal(signal)?;
    let Some(status) = process.wait_timeout(STOP_TIMEOUT)? else {
        process.terminate(TERMINATE_GRACE)?;
        bail!(
            "{} still runs {STOP_TIMEOUT:?} after {signal}",
            process.name()
        );
    };
    if stopping.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "note: {} took {:.1?} to exit after {signal}",
            process.name(),
            stopping.elapsed()
        );
    }
    ensure!(
        signal == Signal::SIGKILL || status.success(),
        "{} did not exit cleanly on {signal} ({status}); log tail:\n{}",
        process.name(),
        process.log_tail(20)
    );
    Ok(())
}
