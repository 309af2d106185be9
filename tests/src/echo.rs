//! Launching the `echo` workload binary of this crate.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::net::port_open;
use crate::paths::cargo_bin;
use crate::process::ChildGuard;

/// How long the echo app may take to accept connections; it normally does in milliseconds,
/// the margin is for a loaded 2-core CI machine.
pub const ECHO_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts the echo app (found with [`cargo_bin`]) on `listen` and waits until it accepts
/// connections. Its log is `<dir>/echo-<name>-<version>.log`.
pub fn start_echo(
    dir: &Path,
    listen: SocketAddr,
    name: &str,
    version: &str,
) -> anyhow::Result<ChildGuard> {
    start_echo_bin(&cargo_bin("echo"), dir, listen, name, version)
}

/// [`start_echo`] with an explicit binary, e.g. `env!("CARGO_BIN_EXE_echo")` in this
/// package's own integration tests.
pub fn start_echo_bin(
    echo_bin: &Path,
    dir: &Path,
    listen: SocketAddr,
    name: &str,
    version: &str,
) -> anyhow::Result<ChildGuard> {
    start_echo_with(echo_bin, dir, listen, (name, version), &[])
}

/// [`start_echo`] serving HTTPS with the PEM certificate chain and key at `tls`.
pub fn start_echo_tls(
    dir: &Path,
    listen: SocketAddr,
    name: &str,
    version: &str,
    tls: (&Path, &Path),
) -> anyhow::Result<ChildGuard> {
    let args = [
        "--tls-cert".as_ref(),
        tls.0.as_os_str(),
        "--tls-key".as_ref(),
        tls.1.as_os_str(),
    ];
    start_echo_with(&cargo_bin("echo"), dir, listen, (name, version), &args)
}

/// [`start_echo_tls`] that also requires a client certificate issued by a CA of the PEM
/// file `client_ca` (mutual TLS); responses say `"client_auth": true`.
pub fn start_echo_mtls(
    dir: &Path,
    listen: SocketAddr,
    name: &str,
    tls: (&Path, &Path),
    client_ca: &Path,
) -> anyhow::Result<ChildGuard> {
    let args = [
        "--tls-cert".as_ref(),
        tls.0.as_os_str(),
        "--tls-key".as_ref(),
        tls.1.as_os_str(),
        "--tls-client-ca".as_ref(),
        client_ca.as_os_str(),
    ];
    start_echo_with(&cargo_bin("echo"), dir, listen, (name, "v1"), &args)
}

/// Starts the echo app as a small file server as well: `GET PATH` answers the current
/// contents of `FILE` (read per request, so a test can change them) as JSON, for each
/// `(PATH, FILE)` of `files`; everything else is echoed. A JWKS server, say.
pub fn start_file_server(
    dir: &Path,
    listen: SocketAddr,
    name: &str,
    files: &[(&str, &Path)],
) -> anyhow::Result<ChildGuard> {
    let args: Vec<std::ffi::OsString> = files
        .iter()
        .flat_map(|(path, file)| ["--file".into(), format!("{path}={}", file.display()).into()])
        .collect();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    start_echo_with(&cargo_bin("echo"), dir, listen, (name, "files"), &args)
}

fn start_echo_with(
    echo_bin: &Path,
    dir: &Path,
    listen: SocketAddr,
    (name, version): (&str, &str),
    extra: &[&std::ffi::OsStr],
) -> anyhow::Result<ChildGuard> {
    anyhow::ensure!(
        listen.ip().is_loopback(),
        "echo must listen on a loopback address, not {listen}"
    );
    anyhow::ensure!(
        listen.port() != 0,
        "pass a concrete port (see free_port): the caller needs to know where echo listens"
    );
    anyhow::ensure!(
        echo_bin.is_file(),
        "echo binary not found at {} (build it with `cargo build -p trellis-tests`)",
        echo_bin.display()
    );
    let mut command = Command::new(echo_bin);
    command
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--name")
        .arg(name)
        .arg("--version")
        .arg(version)
        .args(extra)
        // Keep the child's log readable regardless of the developer's RUST_LOG.
        .env("RUST_LOG", "info");
    let mut guard = ChildGuard::spawn(&format!("echo-{name}-{version}"), command, dir)?;
    let log_path = guard.log_path().to_path_buf();
    guard.wait_until(ECHO_START_TIMEOUT, Duration::from_millis(20), || {
        // The startup line proves that this child (not some process that raced for the
        // port) bound the address; the connect proves it is serving.
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !log.contains("echo listening") {
            Err(format!("no startup line in {}", log_path.display()))
        } else if !port_open(listen, Duration::from_millis(200)) {
            Err(format!("{listen} not accepting connections"))
        } else {
            Ok(())
        }
    })?;
    Ok(guard)
}
