//! Clients in child processes. One process can hold only as many client sockets as its
//! open-file limit allows (without `CAP_SYS_RESOURCE` the hard limit cannot be raised),
//! so a fleet larger than that runs in several `xds-bench fleet-shard` children, each a
//! [`Fleet`] of a range of client indexes, driven over their stdin and stdout: one
//! command per line, one reply line each (`ok`, `err MESSAGE`, or a JSON report). Times
//! are `CLOCK_MONOTONIC` ([`crate::fleet::now_ns`]), the same clock in every process.

use crate::client::{Kind, Mode};
use crate::fleet::{Fleet, FleetConfig};
use crate::server::proc_stats;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::Range;
use std::process::Stdio;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Clients per shard at most: well within a 20,000 open-file limit.
pub const MAX_PER_SHARD: usize = 15_000;

/// One client, as a shard reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub index: usize,
    pub started_ns: u64,
    pub synced: bool,
    pub synced_ns: u64,
    pub stream_ns: u64,
    /// When it first saw EDS change `seq` (of the `report` command) or a later one; 0: not.
    pub marker_ns: u64,
    /// gRPC bytes received, per type (CDS, EDS, LDS, RDS).
    pub bytes: [u64; 4],
    pub stream_failures: u64,
    pub nacks: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ShardReport {
    pub clients: Vec<ClientReport>,
    /// A client's last stream error, if any client had one.
    pub last_error: Option<String>,
}

/// What the parent passes to a shard (besides its range).
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub addrs: Vec<SocketAddr>,
    pub clusters: usize,
    pub mode: Mode,
    pub nack: Option<Kind>,
    pub nack_clients: usize,
    pub backoff_base: Duration,
    pub timeout: Duration,
}

impl ShardConfig {
    pub fn fleet(&self) -> FleetConfig {
        FleetConfig {
            addrs: self.addrs.clone(),
            clusters: self.clusters,
            mode: self.mode,
            nack: self.nack,
            nack_clients: self.nack_clients,
            backoff_base: self.backoff_base,
            backoff_max: Duration::from_secs(30),
            max_streams: 10_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// The child: `xds-bench fleet-shard`. Commands: `start` (connect the clients),
/// `wait_synced`, `probe_eds`, `wait_marker SEQ`, `report SEQ`, `stop`.
pub async fn shard_main(cfg: ShardConfig, range: Range<usize>) -> Result<()> {
    let fleet_cfg = cfg.fleet();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut fleet: Option<Fleet> = None;
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    while let Some(line) = lines.next_line().await? {
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let seq = || arg.trim().parse::<u64>().context("a change number");
        let reply: Result<String> = async {
            if cmd == "start" {
                if fleet.is_none() {
                    fleet = Some(Fleet::spawn(&fleet_cfg, range.clone())?);
                }
                return Ok("ok".into());
            }
            if cmd == "stop" {
                if let Some(f) = fleet.take() {
                    f.shutdown().await;
                }
                return Ok("ok".into());
            }
            let f = fleet.as_ref().ok_or_else(|| anyhow!("not started"))?;
            match cmd {
                "wait_synced" => {
                    f.wait_synced(cfg.timeout).await?;
                }
                "probe_eds" => f.probes.eds.store(true, Relaxed),
                "wait_marker" => {
                    let seq = seq()?;
                    f.wait_all("change received", cfg.timeout, |c| {
                        c.markers[0].max.load(Relaxed) >= seq
                    })
                    .await?;
                }
                "report" => {
                    let seq = seq()?;
                    return Ok(serde_json::to_string(&report(f, seq))?);
                }
                other => bail!("unknown command {other:?}"),
            }
            Ok("ok".into())
        }
        .await;
        let text = match reply {
            Ok(t) => t,
            Err(e) => format!("err {}", one_line(&e)),
        };
        out.write_all(text.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
        if cmd == "stop" {
            break;
        }
    }
    Ok(())
}

fn report(f: &Fleet, seq: u64) -> ShardReport {
    let clients = f
        .clients
        .iter()
        .map(|c| ClientReport {
            index: c.index,
            started_ns: c.started_ns.load(Relaxed),
            synced: c.synced.load(Relaxed),
            synced_ns: c.synced_ns.load(Relaxed),
            stream_ns: c.stream_ns.load(Relaxed),
            marker_ns: c.markers[0].first_at_least(seq).unwrap_or(0),
            bytes: Kind::ALL.map(|k| c.bytes_of(k)),
            stream_failures: c.stream_failures.load(Relaxed),
            nacks: c.nacks.load(Relaxed),
        })
        .collect();
    let last_error = f
        .clients
        .iter()
        .find_map(|c| c.last_error.lock().ok().and_then(|e| e.clone()));
    ShardReport {
        clients,
        last_error,
    }
}

struct Shard {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    range: Range<usize>,
}

impl Shard {
    async fn send(&mut self, cmd: &str) -> Result<()> {
        self.stdin.write_all(cmd.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn reply(&mut self) -> Result<String> {
        match self.lines.next_line().await? {
            Some(l) => match l.strip_prefix("err ") {
                Some(e) => bail!("{e}"),
                None => Ok(l),
            },
            None => {
                let status = self.child.try_wait().ok().flatten();
                bail!("the shard exited ({status:?})")
            }
        }
    }
}

/// The parent's side: N clients in `ceil(N / MAX_PER_SHARD)` child processes.
pub struct Shards {
    shards: Vec<Shard>,
}

impl Shards {
    /// Starts the children (each waits for `start` before connecting anything).
    pub async fn spawn(cfg: &ShardConfig, clients: usize) -> Result<Shards> {
        let exe = std::env::current_exe().context("cannot find the xds-bench executable")?;
        let count = clients.div_ceil(MAX_PER_SHARD).max(1);
        let per = clients.div_ceil(count);
        let mut shards = Vec::with_capacity(count);
        for i in 0..count {
            let range = i * per..((i + 1) * per).min(clients);
            let addrs: Vec<String> = cfg.addrs.iter().map(|a| a.to_string()).collect();
            let mut cmd = Command::new(&exe);
            cmd.arg("fleet-shard")
                .args(["--shard-addrs", &addrs.join(",")])
                .args(["--shard-clusters", &cfg.clusters.to_string()])
                .args(["--shard-start", &range.start.to_string()])
                .args(["--shard-end", &range.end.to_string()])
                .args(["--shard-nack-clients", &cfg.nack_clients.to_string()])
                .args(["--mode", cfg.mode.name()])
                .args([
                    "--backoff-base-ms",
                    &cfg.backoff_base.as_millis().to_string(),
                ])
                .args(["--timeout", &cfg.timeout.as_secs().to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if let Some(k) = cfg.nack {
                cmd.args(["--nack", kind_name(k)]);
            }
            let mut child = cmd
                .spawn()
                .context("cannot start an xds-bench fleet shard")?;
            let pid = child
                .id()
                .ok_or_else(|| anyhow!("a fleet shard exited at once"))?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("no shard stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("no shard stdout"))?;
            shards.push(Shard {
                child,
                pid,
                stdin,
                lines: BufReader::new(stdout).lines(),
                range,
            });
        }
        let mut s = Shards { shards };
        for sh in &mut s.shards {
            let r = sh.reply().await?;
            if r != "ready" {
                bail!("a fleet shard said {r:?}");
            }
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Sends `cmd` to every shard, then collects every reply (the shards work at once).
    pub async fn all(&mut self, cmd: &str) -> Result<Vec<String>> {
        for sh in &mut self.shards {
            sh.send(cmd).await?;
        }
        let mut out = Vec::with_capacity(self.shards.len());
        let mut first_err = None;
        for sh in &mut self.shards {
            match sh.reply().await {
                Ok(r) => out.push(r),
                Err(e) => {
                    let e = e.context(format!(
                        "fleet shard (clients {}..{}): {cmd}",
                        sh.range.start, sh.range.end
                    ));
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every client, in index order.
    pub async fn report(&mut self, seq: u64) -> Result<ShardReport> {
        let mut all = ShardReport::default();
        for r in self.all(&format!("report {seq}")).await? {
            let part: ShardReport =
                serde_json::from_str(&r).context("a fleet shard's report is not JSON")?;
            all.clients.extend(part.clients);
            if all.last_error.is_none() {
                all.last_error = part.last_error;
            }
        }
        Ok(all)
    }

    /// CPU seconds of all shards.
    pub fn cpu_s(&self) -> f64 {
        self.shards
            .iter()
            .filter_map(|s| proc_stats(s.pid).ok())
            .map(|p| p.cpu_s)
            .sum()
    }

    /// Stops the clients and waits for the shards to exit (killed if they do not).
    pub async fn stop(mut self) {
        let _ = self.all("stop").await;
        for sh in &mut self.shards {
            if tokio::time::timeout(Duration::from_secs(30), sh.child.wait())
                .await
                .is_err()
            {
                let _ = sh.child.kill().await;
            }
        }
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Cds => "cds",
        Kind::Eds => "eds",
        Kind::Lds => "lds",
        Kind::Rds => "rds",
    }
}
