//! `relay`: N simulated clients spread over K `relay` processes, each a member cluster
//! joined to one self-started `xds-server` (with its CA and secure port). Measures the
//! storm through the relays, then an endpoint change reaching every client through them,
//! the upstream streams the server sees, the server's and the relays' CPU and memory;
//! then the same change with the same clients connected to a fresh server directly.
//!
//! Client `i` connects to relay `i % K` (cluster `r{i % K}`) as an outbound-only proxy of
//! namespace `bench` with node metadata `CLUSTER_ID`: one proxy class per relay, so one
//! upstream stream per relay. The clients run in fleet shards (child processes, see
//! [`crate::shard`]): N clients need N sockets, more than one process may open here.

use super::*;
use crate::fleet::member_cluster;
use crate::report::RelayFigures;
use crate::server::{ChildGuard, SecurePort};
use crate::shard::{ShardConfig, ShardReport, Shards};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// One `relay run` child process.
struct RelayProcess {
    cluster: String,
    guard: ChildGuard,
    xds: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl RelayProcess {
    fn stats(&self) -> Option<ProcStats> {
        proc_stats(self.guard.pid).ok()
    }

    /// Fails with the end of the relay's log if it has exited.
    fn check(&mut self) -> Result<()> {
        self.guard.check_running().map_err(|e| {
            anyhow!(
                "relay {}: {e:#}; its log ends:\n{}",
                self.cluster,
                tail(&self.log, 20)
            )
        })
    }
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where relay `k` listens: its own loopback address `127.0.(10 + k / 250).(k % 250 + 1)`.
fn relay_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 10 + (k / 250) as u8, (k % 250) as u8 + 1)
}

/// Binds `ip:0` and releases it.
fn free_port_on(ip: Ipv4Addr) -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("cannot bind a free port on {ip}"))?;
    Ok(l.local_addr()?)
}

/// `xds-server cluster join-token --cluster NAME`: a one-time token for that relay.
fn join_token(
    server_bin: &Path,
    cluster: &str,
    config_dir: &Path,
    ca_dir: &Path,
) -> Result<String> {
    let out = Command::new(server_bin)
        .args([
            "cluster",
            "join-token",
            "--cluster",
            cluster,
            "--config-dir",
        ])
        .arg(config_dir)
        .arg("--ca-dir")
        .arg(ca_dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run xds-server cluster join-token")?;
    if !out.status.success() {
        bail!(
            "xds-server cluster join-token --cluster {cluster} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if token.is_empty() {
        bail!("xds-server cluster join-token printed no token");
    }
    Ok(token)
}

/// Starts K relays joined to the server and waits until each serves.
async fn start_relays(
    s: &Settings,
    server_bin: &Path,
    relay_bin: &Path,
    server: &ServerProcess,
    dir: &Path,
) -> Result<Vec<RelayProcess>> {
    let Some(secure) = &server.secure else {
        bail!("the server has no secure port for relays to join");
    };
    let bundle = secure.ca_dir.join("trust-bundle.pem");
    let mut relays = Vec::with_capacity(s.relays);
    for k in 0..s.relays {
        let cluster = member_cluster(k);
        let home = dir.join(format!("relay-{cluster}"));
        std::fs::create_dir_all(&home)?;
        let token_file = home.join("join-token");
        std::fs::write(
            &token_file,
            join_token(server_bin, &cluster, &server.config_dir, &secure.ca_dir)?,
        )?;
        let xds = free_port_on(relay_address(k))?;
        let admin = free_port_on(relay_address(k))?;
        let log = dir.join(format!("relay-{cluster}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(relay_bin);
        cmd.arg("run")
            .args(["--cluster", &cluster])
            .arg("--upstream")
            .arg(secure.addr.to_string())
            .arg("--join-token")
            .arg(&token_file)
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--listen")
            .arg(xds.to_string())
            // Plaintext ADS only, as the clients speak: no secure port (no sidecar
            // certificates).
            .args(["--secure-listen", "off"])
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--state-dir")
            .arg(home.join("state"))
            .env(
                "RUST_LOG",
                std::env::var("XDS_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let guard = ChildGuard::spawn(cmd, &format!("relay {cluster}"))?;
        relays.push(RelayProcess {
            cluster,
            guard,
            xds,
            admin,
            log,
        });
    }
    // They join (CreateCertificate on the secure port) in parallel; ready once serving.
    let deadline = Instant::now() + s.timeout;
    for r in &mut relays {
        loop {
            r.check()?;
            if let Ok((200, _)) = http_get(r.admin, "/healthz/ready", Duration::from_secs(1)).await
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "relay {} not ready after {:?}; its log ends:\n{}",
                    r.cluster,
                    s.timeout,
                    tail(&r.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(relays)
}

/// CPU, RSS and peak RSS of all relays together.
fn relay_totals(relays: &[RelayProcess]) -> (f64, u64, u64) {
    relays
        .iter()
        .filter_map(RelayProcess::stats)
        .fold((0.0, 0, 0), |(c, r, p), st| {
            (c + st.cpu_s, r + st.rss_bytes, p + st.peak_rss_bytes)
        })
}

/// The `connected` count and the proxies' ids of a `/debug/syncz`.
async fn syncz(admin: SocketAddr, timeout: Duration) -> Result<(usize, Vec<String>)> {
    let (status, body) = http_get(admin, "/debug/syncz", timeout).await?;
    if status != 200 {
        bail!("GET http://{admin}/debug/syncz: HTTP {status}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("/debug/syncz is not JSON")?;
    let ids = v["proxies"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((v["connected"].as_u64().unwrap_or(0) as usize, ids))
}

/// Mean EDS push latency over every relay's `/metrics`, between two readings.
async fn relay_metrics(relays: &[RelayProcess]) -> Vec<Option<String>> {
    let mut out = Vec::with_capacity(relays.len());
    for r in relays {
        out.push(
            match http_get(r.admin, "/metrics", Duration::from_secs(5)).await {
                Ok((200, body)) => Some(body),
                _ => None,
            },
        );
    }
    out
}

fn relay_push_latency_ms(before: &[Option<String>], after: &[Option<String>]) -> Option<f64> {
    let name = "trellis_xds_push_latency_seconds";
    let label = "type=\"eds\"";
    let (mut sum, mut count) = (0.0, 0.0);
    for (b, a) in before.iter().zip(after) {
        let (s0, c0) = b
            .as_deref()
            .and_then(|m| histogram_sum_count(m, name, label))
            .unwrap_or((0.0, 0.0));
        let Some((s1, c1)) = a
            .as_deref()
            .and_then(|m| histogram_sum_count(m, name, label))
        else {
            continue;
        };
        sum += s1 - s0;
        count += c1 - c0;
    }
    (count > 0.0).then(|| sum / count * 1e3)
}

/// The three rows: `relay-storm`, `relay-endpoint-change`, `direct-endpoint-change`.
pub async fn run(s: &Settings) -> Result<Vec<ScenarioResult>> {
    let ServerTarget::Spawn { bin } = &s.target else {
        println!(
            "relay: skipped: it joins relays to the server's CA, so it needs a self-started server"
        );
        return Ok(Vec::new());
    };
    let Some(relay_bin) = &s.relay_bin else {
        bail!("relay: no relay binary (--relay-bin)");
    };
    if s.relays == 0 {
        bail!("--relays must be at least 1");
    }
    let per_relay = s.clients.div_ceil(s.relays) as u64;
    if per_relay + 1024 > s.nofile {
        bail!(
            "each relay would hold {per_relay} client connections, too many for the open-file limit ({}): use more --relays",
            s.nofile
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("xds-bench-relay-")
        .tempdir()?;
    let config = tmp.path().join("config");
    let mesh = Mesh::new(&config, s.mesh)?;
    mesh.write_all()?;
    let secure = SecurePort {
        addr: free_port()?,
        ca_dir: tmp.path().join("ca"),
    };
    let p = ServerProcess::start(
        bin,
        &config,
        &tmp.path().join("server.log"),
        None,
        Some(secure),
        s.timeout,
    )
    .await?;
    let mut relays = start_relays(s, bin, relay_bin, &p, tmp.path()).await?;
    let mut t = Target {
        xds: p.xds_addr,
        pid: Some(p.pid()),
        admin: Some(p.admin_addr),
        process: Some(p),
        mesh: Some(mesh),
        label: format!("xds-server (self-started) via {} relays", s.relays),
        block: None,
        _tmp: None,
    };
    wait_mesh_loaded(s, &t).await?;
    info!(
        clients = s.clients,
        relays = s.relays,
        mode = s.mode.name(),
        "running relay"
    );
    let measured = through_relays(s, &mut t, &mut relays).await;
    let logs: String = relays
        .iter_mut()
        .filter_map(|r| r.check().err())
        .map(|e| format!("\n{e:#}"))
        .collect();
    drop(relays);
    t.stop();
    let (storm, mut change) = measured.map_err(|e| anyhow!("{e:#}{logs}"))?;

    // The same change, the same clients (same nodes), connected to a fresh server: one
    // process holding every client's socket, so only within the open-file limit.
    if s.clients as u64 + 1024 > s.nofile {
        let why = format!(
            "direct comparison skipped: {} clients connected directly need as many sockets in one server process, above the open-file limit ({})",
            s.clients, s.nofile
        );
        println!("relay: {why}");
        change.notes.push(why);
        return Ok(vec![storm, change]);
    }
    let mut direct = s.clone();
    direct.clusters = s.relays;
    let mut d = run_one(&direct, Scenario::EndpointChange)
        .await
        .context("endpoint-change with the clients connected directly, for comparison")?
        .ok_or_else(|| anyhow!("the direct endpoint-change was skipped"))?;
    d.scenario = "direct-endpoint-change".into();
    d.server = "xds-server (self-started), clients connected directly".into();
    if let Some(rl) = change.relay.as_mut() {
        rl.direct_all_ms = Some(d.all_ms);
        rl.direct_server_cpu_s = d.server_cpu_s;
        rl.direct_server_rss_bytes = d.server_rss_bytes;
    }
    if let (Some(a), Some(b)) = (change.server_cpu_s, d.server_cpu_s) {
        change.notes.push(format!(
            "server CPU for the change: {a:.3} s through {} relays, {b:.3} s with the {} clients connected directly; server RSS {:.1} MiB vs {:.1} MiB",
            s.relays,
            s.clients,
            change.server_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
            d.server_rss_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
        ));
    }
    Ok(vec![storm, change, d])
}

/// The storm and the change through the relays, with the clients in fleet shards.
async fn through_relays(
    s: &Settings,
    t: &mut Target,
    relays: &mut [RelayProcess],
) -> Result<(ScenarioResult, ScenarioResult)> {
    let cfg = ShardConfig {
        addrs: relays.iter().map(|r| r.xds).collect(),
        clusters: relays.len(),
        mode: s.mode,
        nack: s.nack,
        nack_clients: fleet_config(s, t.xds).nack_clients,
        backoff_base: s.backoff_base,
        timeout: s.timeout,
    };
    let mut shards = Shards::spawn(&cfg, s.clients).await?;
    let r = measure(s, t, relays, &mut shards).await;
    shards.stop().await;
    r
}

/// The bench's CPU: this process and its shards.
fn bench_cpu(shards: &Shards) -> f64 {
    client_cpu() + shards.cpu_s()
}

fn failures_of(r: &ShardReport) -> u64 {
    r.clients.iter().map(|c| c.stream_failures).sum()
}

fn set_counts(r: &mut ScenarioResult, rep: &ShardReport, fail0: u64) {
    r.nacks = rep.clients.iter().map(|c| c.nacks).sum();
    r.stream_failures = failures_of(rep).saturating_sub(fail0);
    if r.stream_failures > 0 {
        r.notes.push(format!(
            "{} ADS streams failed and were retried (e.g. {})",
            r.stream_failures,
            rep.last_error.clone().unwrap_or_default()
        ));
    }
}

/// Mean bytes per client of `kinds` since `base` (same client order).
fn mean_bytes(rep: &ShardReport, base: Option<&ShardReport>, kinds: &[Kind]) -> f64 {
    if rep.clients.is_empty() {
        return 0.0;
    }
    let total: u64 = rep
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            kinds
                .iter()
                .map(|k| {
                    let b0 = base
                        .and_then(|b| b.clients.get(i))
                        .map_or(0, |b| b.bytes[k.idx()]);
                    c.bytes[k.idx()].saturating_sub(b0)
                })
                .sum::<u64>()
        })
        .sum();
    total as f64 / rep.clients.len() as f64
}

/// Connected proxies at the server whose id starts with `relay~`, and all of them.
async fn upstream_streams(t: &Target, timeout: Duration) -> Result<(usize, usize)> {
    let (connected, ids) = syncz(t.admin.context("no admin address")?, timeout).await?;
    Ok((
        ids.iter().filter(|i| i.starts_with("relay~")).count(),
        connected,
    ))
}

async fn measure(
    s: &Settings,
    t: &mut Target,
    relays: &mut [RelayProcess],
    shards: &mut Shards,
) -> Result<(ScenarioResult, ScenarioResult)> {
    let figures = RelayFigures {
        relays: relays.len(),
        ..Default::default()
    };

    // Storm: every client connects to its relay at once.
    let mut st = new_result(s, Scenario::Relay, t);
    st.scenario = "relay-storm".into();
    let srv0 = t.stats();
    let rel0 = relay_totals(relays);
    let cli0 = bench_cpu(shards);
    let t0 = now_ns();
    shards.all("start").await?;
    if let Err(e) = shards.all("wait_synced").await {
        let streams = upstream_streams(t, s.timeout).await;
        return Err(e.context(format!(
            "through {} relays (upstream streams at the server, all proxies there: {streams:?})",
            relays.len()
        )));
    }
    let srv1 = t.stats();
    let rel1 = relay_totals(relays);
    st.client_cpu_s = bench_cpu(shards) - cli0;
    let rep = shards.report(u64::MAX).await?;
    let l = Latencies::from_ms(
        rep.clients
            .iter()
            .map(|c| ms_between(c.started_ns, c.synced_ns))
            .collect(),
    );
    let last = rep.clients.iter().map(|c| c.synced_ns).max().unwrap_or(t0);
    let first = rep.clients.iter().map(|c| c.synced_ns).min().unwrap_or(t0);
    st.set_latencies(&l, ms_between(t0, last), ms_between(t0, first));
    let connect = Latencies::from_ms(
        rep.clients
            .iter()
            .map(|c| ms_between(c.started_ns, c.stream_ns))
            .collect(),
    );
    st.connect_p50_ms = Some(connect.p(50.0));
    st.connect_max_ms = Some(connect.max());
    if let (Some(a), Some(b)) = (srv0, srv1) {
        st.server_cpu_s = Some(b.cpu_s - a.cpu_s);
        st.server_cpu_per_push_s = st.server_cpu_s;
        st.server_rss_bytes = Some(b.rss_bytes);
        st.server_peak_rss_bytes = Some(b.peak_rss_bytes);
    }
    st.pushes = 1;
    st.bytes_per_client = mean_bytes(&rep, None, &Kind::ALL);
    set_counts(&mut st, &rep, 0);
    // Outside the measured window: who is connected where.
    let (upstream, server_proxies) = upstream_streams(t, s.timeout).await?;
    let mut relay_proxies = 0;
    for r in relays.iter() {
        relay_proxies += syncz(r.admin, s.timeout).await?.0;
    }
    st.relay = Some(RelayFigures {
        upstream_streams: upstream,
        server_proxies,
        relay_proxies,
        relay_cpu_s: rel1.0 - rel0.0,
        relay_rss_bytes: rel1.1,
        relay_peak_rss_bytes: rel1.2,
        ..figures.clone()
    });
    st.notes.push(format!(
        "per client from its start to fully synced through its relay (the relay fetches the class upstream on the first client); clients in {} fleet shard processes (bench CPU is theirs); no floor: two hops",
        shards.len()
    ));

    // The change: one endpoint moves; until every client has ACKed it via its relay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ch = new_result(s, Scenario::Relay, t);
    ch.scenario = "relay-endpoint-change".into();
    shards.all("probe_eds").await?;
    let base = shards.report(u64::MAX).await?;
    let fail0 = failures_of(&base);
    let metrics0 = t.metrics().await;
    let relay_metrics0 = relay_metrics(relays).await;
    let srv0 = t.stats();
    let rel0 = relay_totals(relays);
    let cli0 = bench_cpu(shards);
    let Some(mesh) = t.mesh.as_mut() else {
        bail!("no mesh to edit");
    };
    let seq = mesh.change_endpoint(mesh.spec.services / 2)?;
    let t0 = now_ns();
    shards
        .all(&format!("wait_marker {seq}"))
        .await
        .context("the change through the relays")?;
    let srv1 = t.stats();
    let rel1 = relay_totals(relays);
    ch.client_cpu_s = bench_cpu(shards) - cli0;
    let rep = shards.report(seq).await?;
    let l = Latencies::from_ms(
        rep.clients
            .iter()
            .map(|c| ms_between(t0, c.marker_ns.max(t0)))
            .collect(),
    );
    ch.set_latencies(&l, l.max(), l.min());
    set_one_push_figures(&mut ch, srv0, srv1);
    ch.bytes_per_client = mean_bytes(&rep, Some(&base), &[Kind::Eds]);
    set_counts(&mut ch, &rep, fail0);
    ch.server_push_latency_mean_ms = push_latency_ms(metrics0, t.metrics().await, Kind::Eds);
    let relay_push = relay_push_latency_ms(&relay_metrics0, &relay_metrics(relays).await);
    let (upstream, server_proxies) = upstream_streams(t, s.timeout).await?;
    ch.relay = Some(RelayFigures {
        upstream_streams: upstream,
        server_proxies,
        relay_proxies,
        relay_cpu_s: rel1.0 - rel0.0,
        relay_rss_bytes: rel1.1,
        relay_peak_rss_bytes: rel1.2,
        relay_push_latency_mean_ms: relay_push,
        ..figures
    });
    ch.notes.push(
        "times run from the file write: server debounce and reload, the push to the relays, their push to the clients; server_push_latency is the server's push to the relays"
            .into(),
    );
    Ok((st, ch))
}
