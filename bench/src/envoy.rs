//! Real Envoy sidecars for `envoy-convergence`: finding (or installing) the binary, one
//! process per WorkloadEntry of the generated mesh (bootstrap from `xds-server bootstrap`,
//! killed on drop), and a small keep-alive HTTP/1.1 client for their admin API.

use crate::mesh::{sidecar_address, sidecar_block_lock, sidecar_name, SidecarRole};
use crate::mesh::{NAMESPACE, SIDECAR_BLOCKS};
use crate::server::{proc_stats, ChildGuard};
use anyhow::{anyhow, bail, Context, Result};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The route configuration every sidecar of the generated mesh gets (HTTP port 8080).
pub const ROUTE_CONFIG: &str = "8080";

/// The cheapest config dump that shows a route configuration's `version_info`.
pub fn version_path() -> String {
    format!(
        "/config_dump?resource=dynamic_route_configs&mask=version_info&name_regex=^{ROUTE_CONFIG}$"
    )
}

/// The whole route configuration, for checking what a sidecar holds.
pub fn routes_path() -> String {
    format!("/config_dump?resource=dynamic_route_configs&name_regex=^{ROUTE_CONFIG}$")
}

/// Repositories the bench may belong to: the one it was built from, and any ancestor
/// of the executable that has a `.venv` (a copied `target/`).
fn repo_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        roots.push(p.to_path_buf());
    }
    if let Ok(exe) = std::env::current_exe() {
        for a in exe.ancestors().skip(1) {
            if a.join(".venv").is_dir() && !roots.iter().any(|r| r == a) {
                roots.push(a.to_path_buf());
            }
        }
    }
    roots
}

/// `<repo>/.venv/lib/python3*/site-packages/envoy/_bin/envoy` (what
/// `scripts/install-envoy.sh` installs).
fn venv_envoy(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv").join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// The Envoy binary: `explicit` (`--envoy-bin`, or `ENVOY_BIN` through clap) if given,
/// else the repository's `.venv` one. `None` if there is none.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    repo_roots().iter().find_map(|r| venv_envoy(r))
}

/// [`find`], else `scripts/install-envoy.sh` (which prints the binary's path).
pub fn find_or_install(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = find(explicit) {
        return Ok(p);
    }
    if let Some(p) = explicit {
        bail!(
            "no Envoy binary at {} (--envoy-bin / ENVOY_BIN)",
            p.display()
        );
    }
    let script = repo_roots()
        .into_iter()
        .map(|r| r.join("scripts/install-envoy.sh"))
        .find(|s| s.is_file())
        .ok_or_else(|| {
            anyhow!("no Envoy found and no scripts/install-envoy.sh to install it: pass --envoy-bin or set ENVOY_BIN")
        })?;
    eprintln!(
        "xds-bench: no Envoy found; installing it with {}",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| anyhow!("{} printed no path", script.display()))?;
    if !path.is_file() {
        bail!(
            "{} printed {}, which is not a file",
            script.display(),
            path.display()
        );
    }
    Ok(path)
}

/// `envoy --version`, shortened to the version number when it can be found.
pub fn version(bin: &Path) -> String {
    let Ok(out) = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    else {
        return "unknown".into();
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "/path/to/envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    text.split_once("version:")
        .and_then(|(_, v)| v.trim().split('/').nth(1))
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().to_string())
}

/// A block of sidecar addresses reserved for this run: a listening socket on the block's
/// lock address, held while this lives, so concurrent runs pick different blocks.
#[derive(Debug)]
pub struct AddressBlock {
    pub block: u8,
    _lock: TcpListener,
}

const BLOCK_LOCK_PORT: u16 = 15999;

impl AddressBlock {
    pub fn reserve() -> Result<AddressBlock> {
        let mut last = None;
        for block in 0..SIDECAR_BLOCKS {
            match TcpListener::bind(SocketAddr::new(
                sidecar_block_lock(block).into(),
                BLOCK_LOCK_PORT,
            )) {
                Ok(l) => return Ok(AddressBlock { block, _lock: l }),
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow!(
            "every sidecar address block is taken (other bench runs?): {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// One Envoy process (killed on drop).
#[derive(Debug)]
pub struct Sidecar {
    pub workload: String,
    pub admin: SocketAddr,
    pub log: PathBuf,
    guard: ChildGuard,
}

impl Sidecar {
    pub fn pid(&self) -> u32 {
        self.guard.pid
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.guard
            .check_running()
            .with_context(|| format!("{}; its log ends:\n{}", self.workload, log_tail(&self.log)))
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// How to start the sidecars.
#[derive(Debug, Clone)]
pub struct SidecarSpec<'a> {
    pub envoy: &'a Path,
    /// `xds-server`, for `xds-server bootstrap`.
    pub bootstrap_bin: &'a Path,
    /// The mesh's config folder (where the WorkloadEntries are).
    pub config_dir: &'a Path,
    pub xds: SocketAddr,
    pub delta: bool,
    pub block: u8,
    /// Bootstraps and logs go here.
    pub dir: &'a Path,
}

/// Writes sidecar `i`'s bootstrap (from `xds-server bootstrap`) and starts its Envoy.
pub fn start(spec: &SidecarSpec<'_>, i: usize, admin_port: u16) -> Result<Sidecar> {
    let workload = format!("{}.{NAMESPACE}", sidecar_name(i));
    let mut cmd = Command::new(spec.bootstrap_bin);
    cmd.arg("bootstrap")
        .arg("--workload")
        .arg(&workload)
        .arg("--config-dir")
        .arg(spec.config_dir)
        .arg("--xds-addr")
        .arg(spec.xds.to_string())
        .arg("--admin-port")
        .arg(admin_port.to_string())
        .stdin(Stdio::null());
    if spec.delta {
        cmd.arg("--delta");
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {} bootstrap", spec.bootstrap_bin.display()))?;
    if !out.status.success() {
        bail!(
            "xds-server bootstrap --workload {workload} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let config = spec.dir.join(format!("{}.yaml", sidecar_name(i)));
    std::fs::write(&config, &out.stdout)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let log = spec.dir.join(format!("{}.log", sidecar_name(i)));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut envoy = Command::new(spec.envoy);
    envoy
        .arg("-c")
        .arg(&config)
        .arg("--disable-hot-restart")
        .arg("--concurrency")
        .arg("1")
        .arg("--log-level")
        .arg("warning")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let guard = ChildGuard::spawn(envoy, &format!("envoy {workload}"))?;
    Ok(Sidecar {
        admin: SocketAddr::new(
            sidecar_address(spec.block, SidecarRole::Outbound, i).into(),
            admin_port,
        ),
        workload,
        log,
        guard,
    })
}

/// CPU seconds and RSS of every sidecar process.
pub fn cpu_and_rss(sidecars: &[Sidecar]) -> (f64, Vec<u64>) {
    let mut cpu = 0.0;
    let mut rss = Vec::with_capacity(sidecars.len());
    for s in sidecars {
        if let Ok(p) = proc_stats(s.pid()) {
            cpu += p.cpu_s;
            rss.push(p.rss_bytes);
        }
    }
    (cpu, rss)
}

/// The `version_info` of the first dynamic route configuration in a (masked) config
/// dump: `{"configs": [{"@type": ..., "version_info": "..."}]}`. `None` if there is none.
pub fn route_version(dump: &[u8]) -> Result<Option<String>> {
    let v: serde_json::Value =
        serde_json::from_slice(dump).context("the config dump is not JSON")?;
    Ok(v.get("configs")
        .and_then(|c| c.as_array())
        .and_then(|c| c.first())
        .and_then(|c| c.get("version_info"))
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .map(str::to_string))
}

/// A counter or gauge from Envoy's `/stats` text (`name: value` lines).
pub fn stat_value(stats: &str, name: &str) -> Option<u64> {
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// HTTP/1.1 GETs over one kept-alive connection (Envoy's admin API): polling a few
/// thousand times a second must not cost a TCP handshake each.
#[derive(Debug)]
pub struct AdminClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    request_head: String,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> AdminClient {
        AdminClient {
            addr,
            conn: None,
            request_head: String::new(),
        }
    }

    /// `GET path`: (status, body). A kept-alive connection that fails is retried once on
    /// a new one.
    pub async fn get(&mut self, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            match tokio::time::timeout(timeout, self.try_get(path)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    self.conn = None;
                    if !(reused && attempt == 0) {
                        return Err(e.context(format!("GET http://{}{path}", self.addr)));
                    }
                }
                Err(_) => {
                    self.conn = None;
                    bail!("GET http://{}{path} timed out after {timeout:?}", self.addr);
                }
            }
        }
        bail!("GET http://{}{path} failed", self.addr)
    }

    async fn try_get(&mut self, path: &str) -> Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let Some(c) = self.conn.as_mut() else {
            bail!("no connection");
        };
        self.request_head.clear();
        self.request_head.push_str("GET ");
        self.request_head.push_str(path);
        self.request_head
            .push_str(" HTTP/1.1\r\nHost: admin\r\n\r\n");
        c.get_mut().write_all(self.request_head.as_bytes()).await?;
        let (status, body, close) = read_response(c).await?;
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

/// Reads one HTTP/1.1 response: (status, body, connection closes).
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<(u16, Vec<u8>, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        bail!("connection closed");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line {line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = line.starts_with("HTTP/1.0");
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().context("bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                bail!("connection closed in a chunked body");
            }
            let size_text = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text.trim(), 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else {
        r.read_to_end(&mut body).await?;
        close = true;
    }
    Ok((status, body, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_chunked_and_sized_responses() {
        let text: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n\
            HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nnop";
        let mut r = BufReader::new(text);
        let (s, b, close) = read_response(&mut r).await.unwrap();
        assert_eq!((s, b.as_slice(), close), (200, &b"hello world"[..], false));
        let (s, b, close) = read_response(&mut r).await.unwrap();
        assert_eq!((s, b.as_slice(), close), (404, &b"nop"[..], true));
        assert!(read_response(&mut r).await.is_err());
    }

    #[test]
    fn route_versions_and_stats() {
        let dump = br#"{"configs": [{"@type": "x", "version_info": "abc"}]}"#;
        assert_eq!(route_version(dump).unwrap().as_deref(), Some("abc"));
        assert_eq!(route_version(b"{}").unwrap(), None);
        assert!(route_version(b"nope").is_err());
        let stats = "cluster.xds-grpc.upstream_cx_rx_bytes_total: 1234\nother: 5\n";
        assert_eq!(
            stat_value(stats, "cluster.xds-grpc.upstream_cx_rx_bytes_total"),
            Some(1234)
        );
        assert_eq!(stat_value(stats, "missing"), None);
    }
}
