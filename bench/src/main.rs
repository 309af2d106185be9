//! `xds-bench`: N simulated Envoy ADS clients against an ADS server, fan-out scenarios,
//! and the HTTP/2 floor each scenario is compared to. See `bench/README.md`.

mod ca;
mod client;
mod envoy;
mod fleet;
mod floor;
mod mesh;
mod report;
mod scenarios;
mod server;
mod shard;
mod wire;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use client::{Kind, Mode};
use mesh::MeshSpec;
use report::ScenarioResult;
use scenarios::{Scenario, ServerTarget, Settings};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Command {
    /// N clients connect at once: time until all are fully synced; RSS per proxy.
    Storm,
    /// One endpoint of one service changes: time until every client has it.
    EndpointChange,
    /// A VirtualService changes: time until every client has the new routes.
    PolicyChange,
    /// Endpoint changes at --rate per second for --duration seconds.
    Churn,
    /// The server restarts under N clients: time until all are synced again.
    Reconnect,
    /// --envoys real Envoy sidecars and a policy change: time until every Envoy's admin
    /// /config_dump shows the new routes; then policy-change with as many simulated clients.
    EnvoyConvergence,
    /// The five simulated-client scenarios above with the given flags.
    All,
    /// N clients spread over --relays `relay` processes joined to the server: storm and
    /// an endpoint change through the relays; then the same change with the clients
    /// connected directly, on a fresh server.
    Relay,
    /// Every scenario in both modes with tiny numbers (20 clients, 10x3 mesh, 2 relays;
    /// 3 Envoys for envoy-convergence, run only if Envoy is found): a smoke test.
    Quick,
    /// Only the floor: --frames message sizes to --clients streams (storm shape with --on-accept).
    #[value(hide = true)]
    Floor,
    #[value(hide = true)]
    FloorServe,
    /// A range of clients in a child process, driven over stdin/stdout (see shard.rs).
    #[value(hide = true)]
    FleetShard,
    /// The built-in CA's cost per operation (--clients operations of each kind).
    Ca,
}

#[derive(Debug, Parser)]
#[command(
    name = "xds-bench",
    version,
    about = "Load generator for ADS servers: simulated Envoy sidecars, fan-out scenarios, and an HTTP/2 floor"
)]
struct Cli {
    #[arg(value_enum)]
    scenario: Command,
    /// Simulated Envoy clients (one HTTP/2 connection and ADS stream each).
    #[arg(long, env = "XDS_BENCH_CLIENTS", default_value_t = 1000)]
    clients: usize,
    /// Services in the generated mesh.
    #[arg(long, env = "XDS_BENCH_SERVICES", default_value_t = 100)]
    services: usize,
    /// Endpoints (WorkloadEntries) per service.
    #[arg(long, env = "XDS_BENCH_ENDPOINTS", default_value_t = 10)]
    endpoints: usize,
    /// xDS protocol variant.
    #[arg(long, value_enum, env = "XDS_BENCH_MODE", default_value = "sotw")]
    mode: Mode,
    /// An ADS server already running (instead of starting xds-server).
    #[arg(long, env = "XDS_BENCH_SERVER")]
    server: Option<SocketAddr>,
    /// With --server: the config folder that server watches; the bench writes its mesh
    /// there. Without it the mesh-editing scenarios are skipped.
    #[arg(long, env = "XDS_BENCH_CONFIG_DIR", requires = "server")]
    config_dir: Option<PathBuf>,
    /// With --server: its process id, for CPU and memory figures.
    #[arg(long, env = "XDS_BENCH_SERVER_PID", requires = "server")]
    server_pid: Option<u32>,
    /// With --server: its Trellis admin address, for push latency from /metrics.
    #[arg(long, env = "XDS_BENCH_ADMIN_ADDR", requires = "server")]
    admin_addr: Option<SocketAddr>,
    /// The xds-server binary to start (default: next to this binary).
    #[arg(long, env = "XDS_BENCH_SERVER_BIN")]
    server_bin: Option<PathBuf>,
    /// Write the figures as JSON (an object for one scenario, an array for several).
    #[arg(long, env = "XDS_BENCH_JSON")]
    json: Option<PathBuf>,
    /// Second client count for RSS per proxy (storm; default: half of --clients).
    #[arg(long, env = "XDS_BENCH_RSS_AT")]
    rss_at: Option<usize>,
    /// Churn: endpoint changes per second.
    #[arg(long, default_value_t = 10.0, env = "XDS_BENCH_RATE")]
    rate: f64,
    /// Churn: seconds of changes.
    #[arg(long, default_value_t = 10.0, env = "XDS_BENCH_DURATION")]
    duration: f64,
    /// NACK every response of this type (on a fraction of the clients).
    #[arg(long, value_enum, env = "XDS_BENCH_NACK")]
    nack: Option<Kind>,
    /// Fraction of clients that NACK (with --nack).
    #[arg(long, default_value_t = 0.1, env = "XDS_BENCH_NACK_FRACTION")]
    nack_fraction: f64,
    /// Longest wait for any one step, in seconds.
    #[arg(long, env = "XDS_BENCH_TIMEOUT", default_value_t = 120)]
    timeout: u64,
    /// Skip the floor measurement.
    #[arg(long, env = "XDS_BENCH_NO_FLOOR")]
    no_floor: bool,
    /// Base of the clients' jittered exponential reconnect backoff (Envoy: 500 ms).
    #[arg(long, default_value_t = 500, env = "XDS_BENCH_BACKOFF_BASE_MS")]
    backoff_base_ms: u64,
    /// envoy-convergence: real Envoy sidecars.
    #[arg(long, env = "XDS_BENCH_ENVOYS", default_value_t = 20)]
    envoys: usize,
    /// The Envoy binary (default: <repo>/.venv/lib/python3*/site-packages/envoy/_bin/envoy,
    /// installed with scripts/install-envoy.sh if missing).
    #[arg(long, env = "ENVOY_BIN")]
    envoy_bin: Option<PathBuf>,
    /// envoy-convergence: how often each Envoy's /config_dump is polled, in ms.
    #[arg(long, env = "XDS_BENCH_ENVOY_POLL_MS", default_value_t = 5)]
    envoy_poll_ms: u64,
    /// relay: relay processes (the clients are spread over them).
    #[arg(long, env = "XDS_BENCH_RELAYS", default_value_t = 10)]
    relays: usize,
    /// The relay binary (default: next to this binary).
    #[arg(long, env = "XDS_BENCH_RELAY_BIN")]
    relay_bin: Option<PathBuf>,
    #[arg(long, hide = true, value_delimiter = ',')]
    frames: Vec<u64>,
    #[arg(long, hide = true, value_delimiter = ',')]
    shard_addrs: Vec<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    shard_clusters: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    shard_start: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    shard_end: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    shard_nack_clients: usize,
    #[arg(long, hide = true)]
    on_accept: bool,
}

/// Ten thousand clients need ten thousand sockets: raise the soft limit to the hard one,
/// and (as root, up to `fs.nr_open`) the hard one to what the clients need. The servers,
/// relays and floor the bench starts inherit the limit.
fn raise_nofile(clients: usize) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    let want = clients as u64 + 4096;
    if hard < want {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(hard);
        let target = want.min(nr_open).max(hard);
        // Fails without CAP_SYS_RESOURCE: then the hard limit stays.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, target, target);
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((soft, hard));
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s)
}

fn warn_nofile(clients: usize, limit: u64) {
    if (clients as u64) + 256 > limit {
        tracing::warn!(
            clients,
            limit,
            "open-file limit below the client count; raise it (ulimit -n 65536)"
        );
    }
}

/// CI must not skip what it cannot run.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn server_bin(cli: &Cli) -> Result<PathBuf> {
    if let Some(b) = &cli.server_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().context("cannot find the xds-bench executable")?;
    let bin = exe.with_file_name("xds-server");
    if !bin.exists() {
        bail!(
            "no xds-server next to {} (build it: cargo build --release -p xds-server -p xds-bench), or pass --server-bin / --server",
            exe.display()
        );
    }
    Ok(bin)
}

fn relay_bin(cli: &Cli) -> Result<PathBuf> {
    if let Some(b) = &cli.relay_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().context("cannot find the xds-bench executable")?;
    let bin = exe.with_file_name("relay");
    if !bin.exists() {
        bail!(
            "no relay next to {} (build it: cargo build --release -p relay), or pass --relay-bin",
            exe.display()
        );
    }
    Ok(bin)
}

fn settings(cli: &Cli) -> Result<Settings> {
    let target = match cli.server {
        Some(addr) => ServerTarget::External {
            addr,
            config_dir: cli.config_dir.clone(),
            pid: cli.server_pid,
            admin: cli.admin_addr,
        },
        None => ServerTarget::Spawn {
            bin: server_bin(cli)?,
        },
    };
    if !(0.0..=1.0).contains(&cli.nack_fraction) {
        bail!("--nack-fraction must be between 0 and 1");
    }
    if cli.clients == 0 {
        bail!("--clients must be at least 1");
    }
    Ok(Settings {
        mode: cli.mode,
        clients: cli.clients,
        mesh: MeshSpec {
            services: cli.services,
            endpoints: cli.endpoints,
        },
        target,
        rss_at: cli.rss_at,
        churn_rate: cli.rate,
        churn_duration: Duration::from_secs_f64(cli.duration.max(0.0)),
        nack: cli.nack,
        nack_fraction: if cli.nack.is_some() {
            cli.nack_fraction
        } else {
            0.0
        },
        timeout: Duration::from_secs(cli.timeout),
        floor: !cli.no_floor,
        backoff_base: Duration::from_millis(cli.backoff_base_ms),
        envoys: cli.envoys,
        envoy_bin: None,
        bootstrap_bin: None,
        envoy_poll: Duration::from_millis(cli.envoy_poll_ms.max(1)),
        relays: cli.relays,
        relay_bin: None,
        clusters: 0,
        nofile: u64::MAX,
    })
}

async fn run(cli: Cli) -> Result<()> {
    if cli.scenario == Command::Ca {
        let v = ca::run(cli.clients.clamp(1, 100_000))?;
        ca::print(&v);
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    if cli.scenario == Command::FloorServe {
        return floor::serve_main(&cli.frames, cli.on_accept).await;
    }
    if cli.scenario == Command::FleetShard {
        let cfg = shard::ShardConfig {
            addrs: cli.shard_addrs.clone(),
            clusters: cli.shard_clusters,
            mode: cli.mode,
            nack: cli.nack,
            nack_clients: cli.shard_nack_clients,
            backoff_base: Duration::from_millis(cli.backoff_base_ms),
            timeout: Duration::from_secs(cli.timeout),
        };
        return shard::shard_main(cfg, cli.shard_start..cli.shard_end).await;
    }
    if cli.scenario == Command::Floor {
        warn_nofile(cli.clients, raise_nofile(cli.clients));
        let shape = if cli.on_accept {
            floor::Shape::Storm
        } else {
            floor::Shape::Push
        };
        let f = floor::measure(
            cli.clients,
            &cli.frames,
            shape,
            Duration::from_secs(cli.timeout),
        )
        .await?;
        println!("{f:?}");
        return Ok(());
    }
    let mut s = settings(&cli)?;
    s.mesh.validate()?;
    if matches!(cli.scenario, Command::EnvoyConvergence | Command::Quick) {
        if cli.scenario == Command::EnvoyConvergence && cli.envoys == 0 {
            bail!("--envoys must be at least 1");
        }
        // Found, or (asked for by name) installed; `quick` runs it only if found. And
        // `xds-server bootstrap` writes the sidecars' bootstraps.
        if cli.scenario == Command::EnvoyConvergence {
            s.envoy_bin = Some(envoy::find_or_install(cli.envoy_bin.as_deref())?);
            s.bootstrap_bin = Some(server_bin(&cli)?);
        } else {
            s.bootstrap_bin = server_bin(&cli).ok();
            s.envoy_bin =
                envoy::find(cli.envoy_bin.as_deref()).filter(|_| s.bootstrap_bin.is_some());
        }
    }
    if cli.scenario == Command::Relay {
        if cli.relays == 0 {
            bail!("--relays must be at least 1");
        }
        s.relay_bin = Some(relay_bin(&cli)?);
    }
    if cli.scenario == Command::Quick {
        s.relay_bin = relay_bin(&cli).ok();
    }
    let mut plan: Vec<(Mode, Scenario)> = Vec::new();
    match cli.scenario {
        Command::Storm => plan.push((s.mode, Scenario::Storm)),
        Command::EndpointChange => plan.push((s.mode, Scenario::EndpointChange)),
        Command::PolicyChange => plan.push((s.mode, Scenario::PolicyChange)),
        Command::Churn => plan.push((s.mode, Scenario::Churn)),
        Command::Reconnect => plan.push((s.mode, Scenario::Reconnect)),
        Command::EnvoyConvergence => plan.push((s.mode, Scenario::EnvoyConvergence)),
        Command::Relay => plan.push((s.mode, Scenario::Relay)),
        Command::All => plan.extend(Scenario::ALL.map(|sc| (s.mode, sc))),
        Command::Quick => {
            s.clients = 20;
            s.mesh = MeshSpec {
                services: 10,
                endpoints: 3,
            };
            s.churn_rate = 5.0;
            s.churn_duration = Duration::from_secs(1);
            s.backoff_base = Duration::from_millis(100);
            s.timeout = Duration::from_secs(30);
            s.envoys = 3;
            s.relays = 2;
            if s.relay_bin.is_none() {
                if in_ci() {
                    bail!("quick: no relay binary next to xds-bench (CI=true: not skipping relay); build it: cargo build -p relay");
                }
                println!(
                    "relay: skipped: no relay binary next to xds-bench (cargo build -p relay)"
                );
            }
            if s.envoy_bin.is_none() {
                if in_ci() {
                    bail!("quick: no Envoy found (CI=true: not skipping envoy-convergence); set ENVOY_BIN or run scripts/install-envoy.sh");
                }
                println!("envoy-convergence: skipped: no Envoy found (set ENVOY_BIN or run scripts/install-envoy.sh)");
            }
            for mode in [Mode::Sotw, Mode::Delta] {
                plan.extend(Scenario::ALL.map(|sc| (mode, sc)));
                if s.relay_bin.is_some() {
                    plan.push((mode, Scenario::Relay));
                }
                if s.envoy_bin.is_some() {
                    plan.push((mode, Scenario::EnvoyConvergence));
                }
            }
        }
        Command::Floor | Command::FloorServe | Command::FleetShard | Command::Ca => {}
    }
    s.nofile = raise_nofile(s.clients);
    if cli.scenario != Command::Relay {
        // relay spreads its clients over processes, and checks its own budget.
        warn_nofile(s.clients, s.nofile);
    }
    let mut results: Vec<ScenarioResult> = Vec::new();
    for (mode, scenario) in plan {
        let mut run_settings = s.clone();
        run_settings.mode = mode;
        let rs = scenarios::run(&run_settings, scenario)
            .await
            .with_context(|| format!("{} ({})", scenario.name(), mode.name()))?;
        if !rs.is_empty() {
            // Print as we go: long runs show progress.
            println!("{}", report::table(&rs));
            results.extend(rs);
        }
    }
    if results.len() > 1 {
        println!("summary\n{}", report::table(&results));
    }
    if let Some(path) = &cli.json {
        report::write_json(path, &results)?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| {
            // Ctrl-C drops the run: its guards kill the servers it started.
            let r = rt.block_on(async {
                tokio::select! {
                    r = run(cli) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                }
            });
            // Client tasks may still be winding down; do not wait for them.
            rt.shutdown_timeout(Duration::from_secs(1));
            r
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xds-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
