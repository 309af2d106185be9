//! `relay`: a member cluster's stand-in for a control plane. Thin: flags -> [`relay::Relay`].

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "relay",
    version,
    about = "Trellis relay: xDS and certificates for a member cluster's sidecars"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the mesh (first run) and serve the cluster's sidecars.
    Run {
        /// This member cluster's name (as in the join token).
        #[arg(long, env = "TRELLIS_CLUSTER")]
        cluster: String,
        /// The mesh control plane's secure port.
        #[arg(long, env = "TRELLIS_UPSTREAM")]
        upstream: SocketAddr,
        /// One-time join token (from `xds-server cluster join-token`); only needed
        /// until the state dir holds the relay's certificate.
        #[arg(long, env = "TRELLIS_JOIN_TOKEN_FILE")]
        join_token: Option<PathBuf>,
        /// Roots the control plane's certificate chains to (its CA dir's trust-bundle.pem).
        #[arg(long, env = "TRELLIS_TRUST_BUNDLE")]
        trust_bundle: PathBuf,
        /// Where local sidecars reach the relay's ADS.
        #[arg(long, env = "TRELLIS_RELAY_LISTEN", default_value = "127.0.0.1:15010")]
        listen: SocketAddr,
        /// Where sidecars with identities reach the relay: TLS with the relay's
        /// certificate, bootstrap tokens, certificates over SDS (`off`: config only).
        #[arg(
            long,
            env = "TRELLIS_RELAY_SECURE_LISTEN",
            default_value = "127.0.0.1:15012"
        )]
        secure_listen: String,
        #[arg(
            long,
            env = "TRELLIS_RELAY_ADMIN_ADDR",
            default_value = "127.0.0.1:15014"
        )]
        admin_addr: SocketAddr,
        /// A proxy class (a workload's sidecars, or a namespace's outbound-only proxies)
        /// that no sidecar has used for this long has its upstream stream closed and its
        /// cache dropped; the registry folder's workloads are always kept.
        #[arg(long, env = "TRELLIS_RELAY_IDLE_CLASS_AFTER", default_value = "10m", value_parser = duration)]
        idle_class_after: Duration,
        /// At most this many proxy classes (each an upstream stream and a cached config):
        /// a sidecar of one more is refused with RESOURCE_EXHAUSTED, naming the limit.
        #[arg(long, env = "TRELLIS_RELAY_MAX_CLASSES", default_value_t = 10_000)]
        max_classes: usize,
        /// The cluster's WorkloadEntries (YAML), watched and reported upstream.
        #[arg(long, env = "TRELLIS_REGISTRY_DIR")]
        registry_dir: Option<PathBuf>,
        /// The relay's key (0600) and certificate.
        #[arg(
            long,
            env = "TRELLIS_RELAY_STATE_DIR",
            default_value = ".trellis/relay"
        )]
        state_dir: PathBuf,
        #[command(flatten)]
        net: xds_server::net::NetArgs,
    },
}

async fn run(cli: Cli) -> Result<()> {
    let Command::Run {
        cluster,
        upstream,
        join_token,
        trust_bundle,
        listen,
        secure_listen,
        admin_addr,
        registry_dir,
        state_dir,
        idle_class_after,
        max_classes,
        net,
    } = cli.command;
    let trust_bundle_pem = std::fs::read_to_string(&trust_bundle)
        .with_context(|| format!("cannot read the trust bundle {}", trust_bundle.display()))?;
    let join_token = match join_token {
        Some(f) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read the join token {}", f.display()))?,
        ),
        None => None,
    };
    let bind = |addr: SocketAddr, what: &'static str| {
        xds_server::server::bind_listener(addr)
            .with_context(|| format!("cannot listen on {addr} for {what}"))
    };
    let relay = relay::Relay::start(relay::RelayOptions {
        cluster,
        upstream,
        trust_bundle_pem,
        join_token,
        state_dir,
        registry_dir,
        listen: bind(listen, "xDS")?,
        secure_listen: match secure_listen.as_str() {
            "off" => None,
            addr => {
                let addr: SocketAddr = addr.parse().with_context(|| {
                    format!("--secure-listen {addr}: an address like 127.0.0.1:15012, or off")
                })?;
                Some(bind(addr, "secure xDS")?)
            }
        },
        admin: bind(admin_addr, "the admin API")?,
        idle_class_after,
        max_classes,
        limits: net.into(),
    })
    .await?;
    info!(xds = %relay.xds_addr, admin = %relay.admin_addr, "relay serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    info!("shutting down");
    Ok(())
}

fn duration(s: &str) -> Result<Duration, String> {
    xds_server::config::parse_duration(s)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
