//! The scenarios. Each one: a server with the generated mesh, N clients synced, one
//! measured event, then the floor for the same bytes and the same number of streams.

use crate::client::{Kind, Mode};
use crate::envoy::{self, AddressBlock, AdminClient, Sidecar, SidecarSpec};
use crate::fleet::{now_ns, ClientStats, Fleet, FleetConfig, GRPC_HEADER};
use crate::floor::{self, Shape};
use crate::mesh::{Mesh, MeshSpec, ROUTE_MARKER};
use crate::report::{ChurnFigures, EnvoyFigures, Latencies, ScenarioResult};
use crate::server::{
    free_port, histogram_sum_count, http_get, proc_stats, ProcStats, ServerProcess,
};
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tracing::info;

mod real_envoy;
mod relay;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Storm,
    EndpointChange,
    PolicyChange,
    Churn,
    Reconnect,
    /// Real Envoy sidecars and a policy change (not part of `ALL`).
    EnvoyConvergence,
    /// Clients through relay processes: storm, endpoint change, and the same change
    /// with the clients connected directly (not part of `ALL`).
    Relay,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Storm,
        Scenario::EndpointChange,
        Scenario::PolicyChange,
        Scenario::Churn,
        Scenario::Reconnect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Storm => "storm",
            Scenario::EndpointChange => "endpoint-change",
            Scenario::PolicyChange => "policy-change",
            Scenario::Churn => "churn",
            Scenario::Reconnect => "reconnect",
            Scenario::EnvoyConvergence => "envoy-convergence",
            Scenario::Relay => "relay",
        }
    }
}

/// Where the server under test comes from.
#[derive(Debug, Clone)]
pub enum ServerTarget {
    /// Start `xds-server` (this binary) on a generated mesh.
    Spawn { bin: PathBuf },
    /// An ADS server already running; the mesh is written into `config_dir` if given.
    External {
        addr: SocketAddr,
        config_dir: Option<PathBuf>,
        pid: Option<u32>,
        admin: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub clients: usize,
    pub mesh: MeshSpec,
    pub target: ServerTarget,
    /// Second client count for RSS per proxy (default: half).
    pub rss_at: Option<usize>,
    pub churn_rate: f64,
    pub churn_duration: Duration,
    pub nack: Option<Kind>,
    pub nack_fraction: f64,
    pub timeout: Duration,
    pub floor: bool,
    pub backoff_base: Duration,
    /// envoy-convergence: real Envoys, the binary, `xds-server` (for `bootstrap`), and
    /// how often their admin API is polled.
    pub envoys: usize,
    pub envoy_bin: Option<PathBuf>,
    pub bootstrap_bin: Option<PathBuf>,
    pub envoy_poll: Duration,
    /// relay: relay processes, and the binary (`relay run`).
    pub relays: usize,
    pub relay_bin: Option<PathBuf>,
    /// The clients' nodes: 0, sidecars of the control plane's cluster; `k > 0`,
    /// outbound-only proxies of member clusters `r0` .. (see [`FleetConfig::clusters`]).
    pub clusters: usize,
    /// The open-file limit of this process (and of the processes it starts).
    pub nofile: u64,
}

/// The server and mesh of one scenario run.
struct Target {
    process: Option<ServerProcess>,
    xds: SocketAddr,
    pid: Option<u32>,
    admin: Option<SocketAddr>,
    mesh: Option<Mesh>,
    label: String,
    /// Sidecar addresses reserved for real Envoys (envoy-convergence).
    block: Option<AddressBlock>,
    _tmp: Option<tempfile::TempDir>,
}

impl Target {
    /// The server and its mesh; with `sidecars > 0`, WorkloadEntries for that many real
    /// Envoys on an address block reserved for this run.
    async fn prepare(s: &Settings, sidecars: usize) -> Result<Target> {
        let block = if sidecars > 0 {
            Some(AddressBlock::reserve()?)
        } else {
            None
        };
        let new_mesh = |dir: &std::path::Path| -> Result<Mesh> {
            let mut m = Mesh::new(dir, s.mesh)?;
            if let Some(b) = &block {
                m = m.with_sidecars(sidecars, b.block)?;
            }
            m.write_all()?;
            Ok(m)
        };
        match &s.target {
            ServerTarget::Spawn { bin } => {
                let tmp = tempfile::Builder::new().prefix("xds-bench-").tempdir()?;
                let dir = tmp.path().join("config");
                let mesh = new_mesh(&dir)?;
                let log = tmp.path().join("server.log");
                let p = ServerProcess::start(bin, &dir, &log, None, None, s.timeout).await?;
                Ok(Target {
                    xds: p.xds_addr,
                    pid: Some(p.pid()),
                    admin: Some(p.admin_addr),
                    process: Some(p),
                    mesh: Some(mesh),
                    label: "xds-server (self-started)".into(),
                    block,
                    _tmp: Some(tmp),
                })
            }
            ServerTarget::External {
                addr,
                config_dir,
                pid,
                admin,
            } => {
                let mesh = match config_dir {
                    Some(d) => Some(new_mesh(d)?),
                    None => None,
                };
                Ok(Target {
                    process: None,
                    xds: *addr,
                    pid: *pid,
                    admin: *admin,
                    mesh,
                    label: format!("external {addr}"),
                    block,
                    _tmp: None,
                })
            }
        }
    }

    fn stats(&self) -> Option<ProcStats> {
        self.pid.and_then(|p| proc_stats(p).ok())
    }

    async fn metrics(&self) -> Option<String> {
        let (200, body) = http_get(self.admin?, "/metrics", Duration::from_secs(5))
            .await
            .ok()?
        else {
            return None;
        };
        Some(body)
    }

    /// Stops a self-started server (its figures have been read).
    fn stop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.kill();
        }
    }
}

fn fleet_config(s: &Settings, addr: SocketAddr) -> FleetConfig {
    FleetConfig {
        addrs: vec![addr],
        clusters: s.clusters,
        mode: s.mode,
        nack: s.nack,
        nack_clients: (s.clients as f64 * s.nack_fraction).round() as usize,
        backoff_base: s.backoff_base,
        backoff_max: Duration::from_secs(30),
        max_streams: 10_000,
        connect_timeout: Duration::from_secs(10),
    }
}

fn client_cpu() -> f64 {
    proc_stats(std::process::id())
        .map(|p| p.cpu_s)
        .unwrap_or(0.0)
}

fn new_result(s: &Settings, scenario: Scenario, t: &Target) -> ScenarioResult {
    ScenarioResult {
        scenario: scenario.name().into(),
        mode: s.mode.name(),
        clients: s.clients,
        services: s.mesh.services,
        endpoints: s.mesh.endpoints,
        server: t.label.clone(),
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        all_ms: 0.0,
        first_ms: 0.0,
        fanout_ms: 0.0,
        connect_p50_ms: None,
        connect_max_ms: None,
        server_cpu_s: None,
        pushes: 0,
        server_cpu_per_push_s: None,
        client_cpu_s: 0.0,
        server_rss_bytes: None,
        server_peak_rss_bytes: None,
        rss_per_proxy_bytes: None,
        rss_at_clients: None,
        bytes_per_client: 0.0,
        server_push_latency_mean_ms: None,
        floor_ms: None,
        floor_p50_ms: None,
        floor_ratio: None,
        floor_fanout_ratio: None,
        floor_server_cpu_s: None,
        floor_bytes_per_client: None,
        nacks: 0,
        stream_failures: 0,
        churn: None,
        envoy: None,
        relay: None,
        notes: Vec::new(),
    }
}

/// Waits until one extra client sees the whole generated mesh: the server loaded it.
async fn wait_mesh_loaded(s: &Settings, t: &Target) -> Result<()> {
    let Some(mesh) = &t.mesh else {
        return Ok(());
    };
    let want = mesh.spec.clusters() as u64;
    let mut cfg = fleet_config(s, t.xds);
    cfg.nack = None;
    // An index no scenario client uses.
    let probe = Fleet::spawn(&cfg, s.clients + 1..s.clients + 2)?;
    let r = probe
        .wait_all("mesh loaded", s.timeout, |c| {
            c.synced.load(Relaxed) && c.clusters.load(Relaxed) >= want
        })
        .await
        .with_context(|| {
            format!("the server does not serve the generated mesh ({want} clusters expected)")
        });
    probe.shutdown().await;
    r.map(|_| ())
}

/// Server CPU and memory for a scenario measuring one push, from `/proc` before and after.
fn set_one_push_figures(
    r: &mut ScenarioResult,
    before: Option<ProcStats>,
    after: Option<ProcStats>,
) {
    if let (Some(a), Some(b)) = (before, after) {
        r.server_cpu_s = Some(b.cpu_s - a.cpu_s);
        r.server_cpu_per_push_s = r.server_cpu_s;
        r.server_rss_bytes = Some(b.rss_bytes);
        r.server_peak_rss_bytes = Some(b.peak_rss_bytes);
    }
    r.pushes = 1;
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

/// Per-kind message sizes of the median client (by total bytes) in a window, for the floor.
fn median_message_sizes(fleet: &Fleet, base: &[[u64; 4]]) -> Vec<u64> {
    let mut per: Vec<(u64, [u64; 4])> = fleet
        .clients
        .iter()
        .zip(base)
        .map(|(c, b)| {
            let mut d = [0u64; 4];
            for k in Kind::ALL {
                d[k.idx()] = c.bytes_of(k).saturating_sub(b[k.idx()]);
            }
            (d.iter().sum(), d)
        })
        .collect();
    per.sort_by_key(|(t, _)| *t);
    let Some((_, d)) = per.get(per.len() / 2) else {
        return Vec::new();
    };
    d.iter()
        .filter(|b| **b > GRPC_HEADER)
        .map(|b| b - GRPC_HEADER)
        .collect()
}

fn bytes_snapshot(fleet: &Fleet) -> Vec<[u64; 4]> {
    fleet
        .clients
        .iter()
        .map(|c| Kind::ALL.map(|k| c.bytes_of(k)))
        .collect()
}

fn mean_bytes_since(fleet: &Fleet, base: &[[u64; 4]], kinds: &[Kind]) -> f64 {
    if fleet.clients.is_empty() {
        return 0.0;
    }
    let total: u64 = fleet
        .clients
        .iter()
        .zip(base)
        .map(|(c, b)| {
            kinds
                .iter()
                .map(|k| c.bytes_of(*k).saturating_sub(b[k.idx()]))
                .sum::<u64>()
        })
        .sum();
    total as f64 / fleet.clients.len() as f64
}

async fn run_floor(
    s: &Settings,
    r: &mut ScenarioResult,
    sizes: Vec<u64>,
    shape: Shape,
) -> Result<()> {
    if !s.floor || sizes.is_empty() {
        return Ok(());
    }
    let f = floor::measure(s.clients, &sizes, shape, s.timeout).await?;
    r.set_floor(f.all_ms, f.p50_ms, f.server_cpu_s, f.bytes_per_client);
    Ok(())
}

/// Runs a scenario; its figures (none if skipped). `envoy-convergence` gives two rows:
/// the real Envoys, then `policy-change` with as many simulated clients.
pub async fn run(s: &Settings, scenario: Scenario) -> Result<Vec<ScenarioResult>> {
    if scenario == Scenario::Relay {
        return relay::run(s).await;
    }
    let mut out: Vec<ScenarioResult> = run_one(s, scenario).await?.into_iter().collect();
    if scenario == Scenario::EnvoyConvergence && !out.is_empty() {
        let mut sim = s.clone();
        sim.clients = s.envoys;
        let r = run_one(&sim, Scenario::PolicyChange)
            .await
            .context("policy-change with simulated clients, for comparison")?;
        out.extend(r);
    }
    Ok(out)
}

async fn run_one(s: &Settings, scenario: Scenario) -> Result<Option<ScenarioResult>> {
    let sidecars = if scenario == Scenario::EnvoyConvergence {
        s.envoys
    } else {
        0
    };
    let mut t = Target::prepare(s, sidecars).await?;
    let needs_mesh = matches!(
        scenario,
        Scenario::EndpointChange
            | Scenario::PolicyChange
            | Scenario::Churn
            | Scenario::EnvoyConvergence
    );
    if needs_mesh && t.mesh.is_none() {
        println!(
            "{}: skipped: it edits the mesh, so it needs --config-dir (the folder the external server watches)",
            scenario.name()
        );
        return Ok(None);
    }
    if scenario == Scenario::Reconnect && t.process.is_none() {
        println!("reconnect: skipped: it restarts the server, so it needs a self-started server");
        return Ok(None);
    }
    wait_mesh_loaded(s, &t).await?;
    info!(
        scenario = scenario.name(),
        clients = if sidecars > 0 { sidecars } else { s.clients },
        mode = s.mode.name(),
        "running"
    );
    let mut r = new_result(s, scenario, &t);
    match scenario {
        Scenario::Storm => storm(s, &mut t, &mut r).await?,
        Scenario::EndpointChange | Scenario::PolicyChange => {
            change(s, &mut t, &mut r, scenario).await?
        }
        Scenario::Churn => churn(s, &mut t, &mut r).await?,
        Scenario::Reconnect => reconnect(s, &mut t, &mut r).await?,
        Scenario::EnvoyConvergence => real_envoy::envoy_convergence(s, &mut t, &mut r).await?,
        Scenario::Relay => bail!("relay runs through relay::run"),
    }
    Ok(Some(r))
}

fn failures(fleet: &Fleet) -> u64 {
    fleet
        .clients
        .iter()
        .map(|c| c.stream_failures.load(Relaxed))
        .sum()
}

/// Stream failures since `base` (the start of the measured window), with an example error.
fn note_failures(fleet: &Fleet, r: &mut ScenarioResult, base: u64) {
    r.stream_failures = failures(fleet).saturating_sub(base);
    if r.stream_failures > 0 {
        let example = fleet
            .clients
            .iter()
            .find_map(|c| c.last_error.lock().ok().and_then(|e| e.clone()))
            .unwrap_or_default();
        r.notes.push(format!(
            "{} ADS streams failed and were retried (e.g. {example})",
            r.stream_failures
        ));
    }
}

fn nack_count(fleet: &Fleet) -> u64 {
    fleet.clients.iter().map(|c| c.nacks.load(Relaxed)).sum()
}

async fn storm(s: &Settings, t: &mut Target, r: &mut ScenarioResult) -> Result<()> {
    let cfg = fleet_config(s, t.xds);
    // RSS at a second client count, on a fresh server when we own it.
    let rss_at = s.rss_at.unwrap_or(s.clients / 2).min(s.clients);
    let mut rss_a: Option<(usize, u64)> = None;
    if rss_at > 0 && rss_at < s.clients && t.pid.is_some() {
        if t.process.is_some() {
            let fleet = Fleet::spawn(&cfg, 0..rss_at)?;
            fleet.wait_synced(s.timeout).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss_a = t.stats().map(|st| (rss_at, st.rss_bytes));
            fleet.shutdown().await;
            if let Some(p) = t.process.as_mut() {
                p.restart(s.timeout).await?;
                t.pid = Some(p.pid());
            }
            wait_mesh_loaded(s, t).await?;
        } else {
            r.notes.push(
                "external server: RSS per proxy is (RSS with N - RSS before) / N, a single-point estimate"
                    .into(),
            );
            rss_a = t.stats().map(|st| (0, st.rss_bytes));
        }
    }
    let srv0 = t.stats();
    let cli0 = client_cpu();
    let t0 = now_ns();
    let fleet = Fleet::spawn(&cfg, 0..s.clients)?;
    fleet.wait_synced(s.timeout).await?;
    let srv1 = t.stats();
    r.client_cpu_s = client_cpu() - cli0;
    let per_client: Vec<f64> = fleet
        .clients
        .iter()
        .map(|c| ms_between(c.started_ns.load(Relaxed), c.synced_ns.load(Relaxed)))
        .collect();
    let last = fleet
        .clients
        .iter()
        .map(|c| c.synced_ns.load(Relaxed))
        .max()
        .unwrap_or(t0);
    let first = fleet
        .clients
        .iter()
        .map(|c| c.synced_ns.load(Relaxed))
        .min()
        .unwrap_or(t0);
    let l = Latencies::from_ms(per_client);
    r.set_latencies(&l, ms_between(t0, last), ms_between(t0, first));
    let connect = Latencies::from_ms(
        fleet
            .clients
            .iter()
            .map(|c| ms_between(c.started_ns.load(Relaxed), c.stream_ns.load(Relaxed)))
            .collect(),
    );
    r.connect_p50_ms = Some(connect.p(50.0));
    r.connect_max_ms = Some(connect.max());
    if let (Some(a), Some(b)) = (srv0, srv1) {
        r.server_cpu_s = Some(b.cpu_s - a.cpu_s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(st) = t.stats() {
        r.server_rss_bytes = Some(st.rss_bytes);
        r.server_peak_rss_bytes = Some(st.peak_rss_bytes);
        if let Some((n_a, rss)) = rss_a {
            let dn = (s.clients - n_a) as f64;
            r.rss_per_proxy_bytes = Some((st.rss_bytes as f64 - rss as f64) / dn);
            r.rss_at_clients = Some(n_a);
        }
    }
    let zero = vec![[0u64; 4]; fleet.len()];
    r.bytes_per_client = mean_bytes_since(&fleet, &zero, &Kind::ALL);
    r.pushes = 1;
    r.server_cpu_per_push_s = r.server_cpu_s;
    r.nacks = nack_count(&fleet);
    note_failures(&fleet, r, 0);
    let sizes = median_message_sizes(&fleet, &zero);
    fleet.shutdown().await;
    t.stop();
    run_floor(s, r, sizes, Shape::Storm).await
}

/// Endpoint change (EDS) or policy change (RDS): one edit, time until every client has it.
async fn change(
    s: &Settings,
    t: &mut Target,
    r: &mut ScenarioResult,
    scenario: Scenario,
) -> Result<()> {
    let (kind, slot) = match scenario {
        Scenario::PolicyChange => (Kind::Rds, 1),
        _ => (Kind::Eds, 0),
    };
    let fleet = Fleet::spawn(&fleet_config(s, t.xds), 0..s.clients)?;
    fleet.wait_synced(s.timeout).await?;
    // Let the server finish with the connection storm before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    match kind {
        Kind::Rds => fleet.probes.rds.store(true, Relaxed),
        _ => fleet.probes.eds.store(true, Relaxed),
    }
    let base = bytes_snapshot(&fleet);
    let metrics0 = t.metrics().await;
    let srv0 = t.stats();
    let cli0 = client_cpu();
    let fail0 = failures(&fleet);
    let Some(mesh) = t.mesh.as_mut() else {
        bail!("no mesh to edit");
    };
    let seq = match kind {
        Kind::Rds => mesh.change_policy()?,
        _ => mesh.change_endpoint(mesh.spec.services / 2)?,
    };
    let t0 = now_ns();
    fleet
        .wait_all("change received", s.timeout, |c| {
            c.markers[slot].max.load(Relaxed) >= seq
        })
        .await?;
    let srv1 = t.stats();
    r.client_cpu_s = client_cpu() - cli0;
    let times: Vec<u64> = fleet
        .clients
        .iter()
        .map(|c| c.markers[slot].first_at_least(seq).unwrap_or(t0))
        .collect();
    let l = Latencies::from_ms(times.iter().map(|at| ms_between(t0, *at)).collect());
    r.set_latencies(&l, l.max(), l.min());
    set_one_push_figures(r, srv0, srv1);
    r.bytes_per_client = mean_bytes_since(&fleet, &base, &[kind]);
    r.nacks = nack_count(&fleet);
    note_failures(&fleet, r, fail0);
    r.server_push_latency_mean_ms = push_latency_ms(metrics0, t.metrics().await, kind);
    r.notes.push(
        "times run from the file write: they include the server's config debounce and reload; fanout_ms is all - first"
            .into(),
    );
    let sizes = median_message_sizes(&fleet, &base);
    fleet.shutdown().await;
    t.stop();
    run_floor(s, r, sizes, Shape::Push).await
}

/// Mean `trellis_xds_push_latency_seconds` of `kind` between two `/metrics` texts.
fn push_latency_ms(before: Option<String>, after: Option<String>, kind: Kind) -> Option<f64> {
    let label = format!("type=\"{}\"", if kind == Kind::Rds { "rds" } else { "eds" });
    let (m0, m1) = (before?, after?);
    let name = "trellis_xds_push_latency_seconds";
    // The series appears with the first push of a change.
    let (s0, c0) = histogram_sum_count(&m0, name, &label).unwrap_or((0.0, 0.0));
    let (s1, c1) = histogram_sum_count(&m1, name, &label)?;
    (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1e3)
}

async fn churn(s: &Settings, t: &mut Target, r: &mut ScenarioResult) -> Result<()> {
    if s.churn_rate <= 0.0 || s.churn_duration.is_zero() {
        bail!("churn needs --rate > 0 and --duration > 0");
    }
    let fleet = Fleet::spawn(&fleet_config(s, t.xds), 0..s.clients)?;
    fleet.wait_synced(s.timeout).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.probes.eds.store(true, Relaxed);
    let base = bytes_snapshot(&fleet);
    let responses0: Vec<u64> = fleet
        .clients
        .iter()
        .map(|c| c.responses[Kind::Eds.idx()].load(Relaxed))
        .collect();
    let srv0 = t.stats();
    let cli0 = client_cpu();
    let fail0 = failures(&fleet);
    let rss_start = srv0.map(|p| p.rss_bytes).unwrap_or(0);
    let mut rss_max = rss_start;
    let interval = Duration::from_secs_f64(1.0 / s.churn_rate);
    let count = (s.churn_rate * s.churn_duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let mut changes: Vec<(u64, u64)> = Vec::with_capacity(count as usize);
    let start = Instant::now();
    let Some(mesh) = t.mesh.as_mut() else {
        bail!("no mesh to edit");
    };
    for i in 0..count {
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        let seq = mesh.change_endpoint(i as usize)?;
        changes.push((seq, now_ns()));
        if let Some(p) = t.pid.and_then(|p| proc_stats(p).ok()) {
            rss_max = rss_max.max(p.rss_bytes);
        }
    }
    let Some(&(last_seq, _)) = changes.last() else {
        bail!("no changes made");
    };
    fleet
        .wait_all("churn converged", s.timeout, |c| {
            c.markers[0].max.load(Relaxed) >= last_seq
        })
        .await?;
    let srv1 = t.stats();
    r.client_cpu_s = client_cpu() - cli0;
    // Per (client, change): from the write to the first response carrying it (or later).
    let mut all = Vec::with_capacity(changes.len() * fleet.len());
    let mut worst: f64 = 0.0;
    let mut first: f64 = f64::MAX;
    for (seq, at) in &changes {
        let mut change_last = *at;
        for c in &fleet.clients {
            let got = c.markers[0].first_at_least(*seq).unwrap_or(*at);
            all.push(ms_between(*at, got));
            change_last = change_last.max(got);
            first = first.min(ms_between(*at, got));
        }
        worst = worst.max(ms_between(*at, change_last));
    }
    let l = Latencies::from_ms(all);
    r.set_latencies(&l, worst, if first == f64::MAX { 0.0 } else { first });
    // Let the server settle, then see whether memory came back down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = t.stats();
    let pushes: u64 = fleet
        .clients
        .iter()
        .zip(&responses0)
        .map(|(c, b)| c.responses[Kind::Eds.idx()].load(Relaxed) - b)
        .sum();
    let pushes_per_client = pushes as f64 / fleet.len().max(1) as f64;
    if let (Some(a), Some(b)) = (srv0, srv1) {
        r.server_cpu_s = Some(b.cpu_s - a.cpu_s);
        r.server_cpu_per_push_s = Some((b.cpu_s - a.cpu_s) / pushes_per_client.max(1.0));
    }
    if let Some(e) = end {
        r.server_rss_bytes = Some(e.rss_bytes);
        r.server_peak_rss_bytes = Some(e.peak_rss_bytes);
        rss_max = rss_max.max(e.rss_bytes);
    }
    r.pushes = pushes_per_client.round() as u64;
    r.bytes_per_client = mean_bytes_since(&fleet, &base, &[Kind::Eds]) / pushes_per_client.max(1.0);
    r.nacks = nack_count(&fleet);
    note_failures(&fleet, r, fail0);
    let rss_end = end.map(|e| e.rss_bytes).unwrap_or(0);
    r.churn = Some(ChurnFigures {
        rate_per_s: s.churn_rate,
        duration_s: s.churn_duration.as_secs_f64(),
        changes: count,
        pushes_per_client,
        server_rss_start_bytes: rss_start,
        server_rss_end_bytes: rss_end,
        server_rss_max_bytes: rss_max,
        server_rss_growth_bytes: rss_end as i64 - rss_start as i64,
    });
    r.notes.push(
        "latencies per (client, change) from the write to the first response carrying it or a later change; all_ms is the worst change; bytes_per_client is per EDS push"
            .into(),
    );
    let per_push = r.bytes_per_client.round() as u64;
    fleet.shutdown().await;
    t.stop();
    let sizes = if per_push > GRPC_HEADER {
        vec![per_push - GRPC_HEADER]
    } else {
        Vec::new()
    };
    run_floor(s, r, sizes, Shape::Push).await
}

async fn reconnect(s: &Settings, t: &mut Target, r: &mut ScenarioResult) -> Result<()> {
    let fleet = Fleet::spawn(&fleet_config(s, t.xds), 0..s.clients)?;
    fleet.wait_synced(s.timeout).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let streams0: Vec<u64> = fleet
        .clients
        .iter()
        .map(|c| c.streams.load(Relaxed))
        .collect();
    let base = bytes_snapshot(&fleet);
    let cli0 = client_cpu();
    let fail0 = failures(&fleet);
    let Some(p) = t.process.as_mut() else {
        bail!("reconnect needs a self-started server");
    };
    let t0 = now_ns();
    p.restart(s.timeout).await?;
    let ready = now_ns();
    t.pid = Some(p.pid());
    let fresh = |c: &ClientStats| -> bool {
        let i = c.index;
        c.streams.load(Relaxed) > streams0.get(i).copied().unwrap_or(0) && c.synced.load(Relaxed)
    };
    fleet.wait_all("resynced", s.timeout, fresh).await?;
    let srv = t.stats();
    r.client_cpu_s = client_cpu() - cli0;
    let times: Vec<u64> = fleet
        .clients
        .iter()
        .map(|c| c.synced_ns.load(Relaxed))
        .collect();
    let l = Latencies::from_ms(times.iter().map(|at| ms_between(t0, *at)).collect());
    r.set_latencies(&l, l.max(), l.min());
    let connect = Latencies::from_ms(
        fleet
            .clients
            .iter()
            .map(|c| ms_between(t0, c.stream_ns.load(Relaxed)))
            .collect(),
    );
    r.connect_p50_ms = Some(connect.p(50.0));
    r.connect_max_ms = Some(connect.max());
    if let Some(st) = srv {
        // A new process: its whole life (start, mesh load, resync).
        r.server_cpu_s = Some(st.cpu_s);
        r.server_cpu_per_push_s = Some(st.cpu_s);
        r.server_rss_bytes = Some(st.rss_bytes);
        r.server_peak_rss_bytes = Some(st.peak_rss_bytes);
    }
    r.pushes = 1;
    r.bytes_per_client = mean_bytes_since(&fleet, &base, &Kind::ALL);
    r.nacks = nack_count(&fleet);
    note_failures(&fleet, r, fail0);
    r.notes.push(format!(
        "server killed (SIGKILL) and restarted; ready after {:.0} ms; clients retry with Envoy's jittered backoff ({} ms base); server_cpu_s is the new process's whole life",
        ms_between(t0, ready),
        s.backoff_base.as_millis()
    ));
    let sizes = median_message_sizes(&fleet, &base);
    fleet.shutdown().await;
    t.stop();
    run_floor(s, r, sizes, Shape::Storm).await
}
