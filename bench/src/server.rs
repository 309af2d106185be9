//! The server under test: a self-started `xds-server` child process (killed on drop), or
//! an external ADS server given by address. Also: CPU time and memory of a process from
//! `/proc`, and a minimal HTTP GET for the admin API.

use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    pub pid: u32,
    what: String,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            pid: child.id(),
            child: Some(child),
            what: what.to_string(),
        })
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Fails if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited early: {status}", self.what);
            }
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time and memory of a process, from `/proc/PID/stat` and `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User + system CPU seconds, all threads (including exited ones).
    pub cpu_s: f64,
    /// VmRSS.
    pub rss_bytes: u64,
    /// VmHWM: peak RSS.
    pub peak_rss_bytes: u64,
}

fn clock_ticks() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))
    };
    // utime is field 14, stime field 15 (1-based) → indexes 11 and 12 here.
    let cpu_s = (ticks(11)? + ticks(12)?) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(ProcStats {
        cpu_s,
        rss_bytes: kb("VmRSS:"),
        peak_rss_bytes: kb("VmHWM:"),
    })
}

/// `GET path` over HTTP/1.0; returns (status, body). Bounded by `timeout`.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(64 << 20).read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    Ok((status, body.to_string()))
}

/// Sum and count of a Prometheus histogram series, e.g.
/// `trellis_xds_push_latency_seconds` with label `type="eds"`.
pub fn histogram_sum_count(metrics: &str, name: &str, label: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| -> Option<f64> {
        metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(suffix)?;
            if !rest.contains(label) {
                return None;
            }
            rest.rsplit(' ').next()?.parse().ok()
        })
    };
    Some((value("_sum")?, value("_count")?))
}

/// Binds 127.0.0.1:0 and releases it: a port that was free a moment ago.
pub fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a free port")?;
    Ok(l.local_addr()?)
}

/// The secure port of a self-started server (`--secure-addr`, `--ca-dir`): relays join
/// and connect there.
#[derive(Debug, Clone)]
pub struct SecurePort {
    pub addr: SocketAddr,
    pub ca_dir: PathBuf,
}

/// A self-started `xds-server serve` on loopback ports.
#[derive(Debug)]
pub struct ServerProcess {
    guard: ChildGuard,
    pub bin: PathBuf,
    pub config_dir: PathBuf,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `None`: started with `--secure-addr off`.
    pub secure: Option<SecurePort>,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts the server and waits for `/healthz/ready`.
    pub async fn start(
        bin: &Path,
        config_dir: &Path,
        log: &Path,
        addrs: Option<(SocketAddr, SocketAddr)>,
        secure: Option<SecurePort>,
        timeout: Duration,
    ) -> Result<ServerProcess> {
        let (xds_addr, admin_addr) = match addrs {
            Some(a) => a,
            None => (free_port()?, free_port()?),
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--xds-addr")
            .arg(xds_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string());
        match &secure {
            Some(sp) => cmd
                .arg("--secure-addr")
                .arg(sp.addr.to_string())
                .arg("--ca-dir")
                .arg(&sp.ca_dir),
            None => cmd.arg("--secure-addr").arg("off"),
        };
        cmd.env(
            "RUST_LOG",
            std::env::var("XDS_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
        let guard = ChildGuard::spawn(cmd, "xds-server")?;
        let mut s = ServerProcess {
            guard,
            bin: bin.to_path_buf(),
            config_dir: config_dir.to_path_buf(),
            xds_addr,
            admin_addr,
            secure,
            log: log.to_path_buf(),
        };
        s.wait_ready(timeout).await?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.guard.check_running().with_context(|| {
                format!("xds-server failed to start; see {}", self.log.display())
            })?;
            if let Ok((200, _)) =
                http_get(self.admin_addr, "/healthz/ready", Duration::from_secs(1)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "xds-server not ready after {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: a crash, as far as the clients can tell).
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// Starts a new server process on the same ports and config folder.
    pub async fn restart(&mut self, timeout: Duration) -> Result<()> {
        self.kill();
        let next = ServerProcess::start(
            &self.bin,
            &self.config_dir,
            &self.log,
            Some((self.xds_addr, self.admin_addr)),
            self.secure.clone(),
            timeout,
        )
        .await?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_stats() {
        let s = proc_stats(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.peak_rss_bytes >= s.rss_bytes);
        assert!(s.cpu_s >= 0.0);
    }

    #[test]
    fn histogram_parsing() {
        let m = "# HELP x\n\
                 trellis_xds_push_latency_seconds_sum{type=\"eds\"} 0.5\n\
                 trellis_xds_push_latency_seconds_count{type=\"eds\"} 10\n\
                 trellis_xds_push_latency_seconds_sum{type=\"rds\"} 0.25\n\
                 trellis_xds_push_latency_seconds_count{type=\"rds\"} 5\n";
        assert_eq!(
            histogram_sum_count(m, "trellis_xds_push_latency_seconds", "type=\"rds\""),
            Some((0.25, 5.0))
        );
        assert_eq!(histogram_sum_count(m, "nope", "type=\"rds\""), None);
    }
}
