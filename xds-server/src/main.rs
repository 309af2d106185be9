//! `xds-server`: serve xDS for a config folder, or print a sidecar's Envoy bootstrap.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::TcpListener;
use tracing::{info, warn};
use xds_server::bootstrap::{bootstrap, BootstrapOptions};
use xds_server::config::store::ConfigStore;
use xds_server::server::Server;

#[derive(Parser, Debug)]
#[command(
    name = "xds-server",
    version,
    about = "Trellis mesh control plane: xDS for Envoy sidecars from Istio-style YAML"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve ADS (SotW and Delta) and the admin API for a folder of mesh config.
    Serve {
        /// Folder of multi-document YAML files (watched for changes).
        #[arg(long, env = "TRELLIS_CONFIG_DIR")]
        config_dir: PathBuf,
        /// Plaintext ADS address.
        #[arg(long, env = "TRELLIS_XDS_ADDR", default_value = "127.0.0.1:15010")]
        xds_addr: SocketAddr,
        /// Admin HTTP address (/debug/syncz, /metrics, ...).
        #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
        #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Print the Envoy bootstrap (YAML) for a workload's sidecar.
    Bootstrap {
        /// The WorkloadEntry, as NAME.NAMESPACE.
        #[arg(long)]
        workload: String,
        #[arg(long, env = "TRELLIS_CONFIG_DIR")]
        config_dir: PathBuf,
        /// Where the sidecar reaches the server's ADS port.
        #[arg(long, env = "TRELLIS_XDS_ADDR", default_value = "127.0.0.1:15010")]
        xds_addr: SocketAddr,
        /// Envoy admin port (bound on the workload's outbound address).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// Use incremental (Delta) xDS instead of state of the world.
        #[arg(long)]
        delta: bool,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal: logs redirected to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    xds_server::server::bind_listener(addr)
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

async fn serve(config_dir: PathBuf, xds_addr: SocketAddr, admin_addr: SocketAddr) -> Result<()> {
    let xds = bind(xds_addr, "xDS").await?;
    let admin = bind(admin_addr, "the admin API").await?;
    if !xds_addr.ip().is_loopback() {
        warn!(addr = %xds_addr, "plaintext xDS is bound off loopback: anyone who reaches it gets the mesh config");
    }
    let server = Server::start(config_dir.clone(), xds, admin).await?;
    info!(xds = %server.xds_addr, admin = %server.admin_addr, config_dir = %config_dir.display(), "xds-server serving");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
        }
        info!("shutting down");
    };
    server.run_until(shutdown).await.map_err(anyhow::Error::msg)
}

fn print_bootstrap(
    workload: &str,
    config_dir: PathBuf,
    xds_addr: SocketAddr,
    admin_port: u16,
    delta: bool,
) -> Result<()> {
    let (store, outcome) = ConfigStore::open(&config_dir)?;
    for e in &outcome.new_errors {
        eprintln!("warning: {e}");
    }
    let mesh = store.mesh();
    let Some(w) = mesh.workloads.get(workload) else {
        let known: Vec<&str> = mesh.workloads.keys().map(String::as_str).collect();
        bail!(
            "unknown workload `{workload}` in {} (known: {})",
            config_dir.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let opts = BootstrapOptions {
        xds_addr,
        admin_port,
        delta,
        cluster_domain: mesh.cluster_domain.clone(),
    };
    print!("{}", bootstrap(w, &opts)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config_dir,
            xds_addr,
            admin_addr,
            log_format,
        } => {
            init_tracing(log_format);
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(serve(config_dir, xds_addr, admin_addr)))
        }
        Command::Bootstrap {
            workload,
            config_dir,
            xds_addr,
            admin_port,
            delta,
        } => print_bootstrap(&workload, config_dir, xds_addr, admin_port, delta),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            eprintln!("xds-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
