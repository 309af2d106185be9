//! `xds-server`: serve xDS for a config folder, or print a sidecar's Envoy bootstrap.

use anyhow::{bail, Context, Result};
use cert_authority::{Authority, CaOptions, SpiffeId, TokenKind};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};
use xds_server::bootstrap::{bootstrap, BootstrapOptions, SecureBootstrap, XdsTrust};
use xds_server::mesh::MeshStore;
use xds_server::server::{SecureOptions, Server};

mod analyze_cli;
mod ca_cli;
use ca_cli::ca_command;

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
        /// Secure port: ADS with secrets and Istio's CA service over TLS, callers
        /// authenticated by client certificate or token. `off` disables it (and the CA).
        #[arg(long, env = "TRELLIS_SECURE_ADDR", default_value = "127.0.0.1:15012")]
        secure_addr: SecureAddr,
        #[command(flatten)]
        ca: CaArgs,
        /// Lifetime of the workload certificates the server makes for sidecars.
        #[arg(long, env = "TRELLIS_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = duration)]
        workload_cert_ttl: Duration,
        /// Upper bound for any certificate lifetime a caller asks for.
        #[arg(long, env = "TRELLIS_MAX_CERT_TTL", default_value = "168h", value_parser = duration)]
        max_cert_ttl: Duration,
        #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
        #[command(flatten)]
        net: xds_server::net::NetArgs,
    },
    /// Bootstrap tokens: a sidecar proves its identity on the secure port with one.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Member clusters: a relay joins the mesh with a one-time join token.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The running server's CA: status and root rotation.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check a config folder offline exactly as `serve` would load it; print every
    /// error (file, document, line, object, field) and fail if there is one.
    Analyze {
        /// The config folder.
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: analyze_cli::Output,
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
        /// Bootstrap token (from `xds-server token create`): the sidecar then connects
        /// to the secure port with it and gets its certificate over SDS.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where the sidecar reaches the secure port (with --token-file).
        #[arg(long, env = "TRELLIS_SECURE_ADDR", default_value = "127.0.0.1:15012")]
        secure_addr: SocketAddr,
        /// The server's CA dir: the sidecar trusts the secure port through the
        /// file-based SDS secret the server keeps there (xds-trust.json), so it follows
        /// root rotations.
        #[arg(long, env = "TRELLIS_CA_DIR", default_value = ".trellis/ca")]
        ca_dir: PathBuf,
        /// Embed the current trust bundle instead (for a sidecar on another host); such
        /// a bootstrap must be made again after a root rotation.
        #[arg(long)]
        inline_trust: bool,
        /// Behind a member cluster's relay (with --token-file): `--secure-addr` is the
        /// relay's secure port, `--ca-dir` the relay's state dir, and the sidecar checks
        /// the relay's identity instead of the control plane's.
        #[arg(long)]
        via_relay: Option<String>,
        /// The mesh's trust domain, where --config-dir has no MeshConfig (a member
        /// cluster's registry folder).
        #[arg(long)]
        trust_domain: Option<String>,
        /// The mesh cluster the sidecar runs in (node metadata CLUSTER_ID); default: the
        /// folder's MeshConfig.clusterName. For a member cluster's sidecar, point
        /// --config-dir at that cluster's registry folder.
        #[arg(long)]
        cluster: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct CaArgs {
    /// CA state: self-signed root and key (0600), token signing key, rotation state.
    #[arg(long, env = "TRELLIS_CA_DIR", default_value = ".trellis/ca")]
    ca_dir: PathBuf,
    /// Use an existing CA in Istio's layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem) instead of a self-signed root; the folder is watched.
    #[arg(long, env = "TRELLIS_PLUGGED_CA_DIR")]
    plugged_ca_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a signed bootstrap token for a workload identity.
    Create {
        /// The identity, as NAMESPACE/SERVICE_ACCOUNT.
        #[arg(long)]
        identity: String,
        /// How long the token is valid.
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
        /// Trust domain of the identity: taken from the MeshConfig in this folder.
        #[arg(long, env = "TRELLIS_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        ca: CaArgs,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Print a one-time join token for a member cluster's relay (identity
    /// trellis-system/relay-NAME): the relay trades it once for its certificate.
    JoinToken {
        /// The cluster's name: a DNS label.
        #[arg(long)]
        cluster: String,
        /// The cluster's network (default: the cluster name).
        #[arg(long)]
        network: Option<String>,
        /// Locality region of the cluster's workloads.
        #[arg(long)]
        region: Option<String>,
        /// Locality zone of the cluster's workloads.
        #[arg(long)]
        zone: Option<String>,
        /// How long the token can be redeemed.
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: Duration,
        /// Trust domain of the relay identity: taken from the MeshConfig in this folder.
        #[arg(long, env = "TRELLIS_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        ca: CaArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the CA's roots, trust epoch and any rotation in progress.
    Status {
        #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
    },
    /// Rotate the self-signed root with zero downtime: add the new root to every trust
    /// bundle, re-issue every certificate under it, then drop the old root. Each phase
    /// waits for every connected proxy to ACK; progress is printed until done.
    RotateRoot {
        #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
        /// Start the rotation and return without waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (the rotation itself goes on).
        #[arg(long, default_value = "10m", value_parser = duration)]
        timeout: Duration,
    },
}

#[derive(Clone, Copy, Debug)]
struct SecureAddr(Option<SocketAddr>);

impl std::str::FromStr for SecureAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(SecureAddr(None));
        }
        s.parse()
            .map(|a| SecureAddr(Some(a)))
            .map_err(|e| format!("{e} (an address like 127.0.0.1:15012, or off)"))
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    xds_server::config::parse_duration(s)
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

struct ServeArgs {
    config_dir: PathBuf,
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    secure_addr: SecureAddr,
    ca: CaArgs,
    workload_cert_ttl: Duration,
    max_cert_ttl: Duration,
    net: xds_server::net::NetArgs,
}

fn ca_options(ca: CaArgs, max_ttl: Duration) -> CaOptions {
    CaOptions {
        dir: ca.ca_dir,
        plugged: ca.plugged_ca_dir,
        max_ttl,
        ..CaOptions::default()
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        config_dir,
        xds_addr,
        admin_addr,
        ..
    } = args;
    let xds = bind(xds_addr, "xDS").await?;
    let admin = bind(admin_addr, "the admin API").await?;
    if !xds_addr.ip().is_loopback() {
        warn!(addr = %xds_addr, "plaintext xDS is bound off loopback: anyone who reaches it gets the mesh config");
    }
    let secure = match args.secure_addr.0 {
        Some(addr) => Some(SecureOptions {
            listener: bind(addr, "the secure port").await?,
            ca: ca_options(args.ca, args.max_cert_ttl),
            workload_ttl: Some(args.workload_cert_ttl),
        }),
        None => None,
    };
    let server =
        Server::start_limited(config_dir.clone(), xds, admin, secure, args.net.into()).await?;
    info!(xds = %server.xds_addr, secure = ?server.secure_addr, admin = %server.admin_addr, config_dir = %config_dir.display(), "xds-server serving");
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

struct BootstrapArgs {
    workload: String,
    config_dir: PathBuf,
    xds_addr: SocketAddr,
    admin_port: u16,
    delta: bool,
    token_file: Option<PathBuf>,
    secure_addr: SocketAddr,
    ca_dir: PathBuf,
    inline_trust: bool,
    via_relay: Option<String>,
    trust_domain: Option<String>,
    cluster: Option<String>,
}

fn print_bootstrap(args: BootstrapArgs) -> Result<()> {
    let BootstrapArgs {
        workload,
        config_dir,
        xds_addr,
        admin_port,
        delta,
        ..
    } = args;
    let workload = workload.as_str();
    let (store, outcome) = MeshStore::open(&config_dir)?;
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
    let secure = match &args.token_file {
        Some(f) => {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?
                .trim()
                .to_string();
            let file = if args.inline_trust {
                xds_server::identity::TRUST_BUNDLE_FILE
            } else {
                xds_server::identity::XDS_TRUST_FILE
            };
            let path = std::path::absolute(args.ca_dir.join(file))
                .with_context(|| format!("bad --ca-dir {}", args.ca_dir.display()))?;
            let content = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {} (the server writes it on start; is --ca-dir the server's?)",
                    path.display()
                )
            })?;
            let trust = if args.inline_trust {
                XdsTrust::Inline(content)
            } else {
                XdsTrust::File {
                    path: path.display().to_string(),
                    dir: path
                        .parent()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                }
            };
            Some(SecureBootstrap {
                token,
                trust,
                server_id: {
                    let td = args.trust_domain.as_deref().unwrap_or(&mesh.trust_domain);
                    match &args.via_relay {
                        Some(cluster) => xds_server::clusters::relay_identity(td, cluster).uri(),
                        None => xds_server::identity::server_identity(td).uri(),
                    }
                },
            })
        }
        None => None,
    };
    let opts = BootstrapOptions {
        xds_addr: if secure.is_some() {
            args.secure_addr
        } else {
            xds_addr
        },
        admin_port,
        delta,
        cluster_domain: mesh.cluster_domain.clone(),
        cluster: match args.cluster {
            Some(c) => {
                if let Err(e) = xds_server::config::validate::dns_label(&c) {
                    bail!("--cluster: {e}");
                }
                c
            }
            None => mesh.cluster_name.clone(),
        },
        secure,
    };
    print!("{}", bootstrap(w, &opts)?);
    Ok(())
}

/// The trust domain of `config_dir`'s MeshConfig (the default one without a folder).
fn trust_domain_of(config_dir: Option<&Path>) -> Result<String> {
    Ok(match config_dir {
        Some(dir) => MeshStore::open(dir)?.0.mesh().trust_domain.clone(),
        None => CaOptions::default().trust_domain,
    })
}

/// Opens the CA for making tokens.
fn token_authority(trust_domain: String, ca: CaArgs) -> Result<Authority> {
    let opts = CaOptions {
        trust_domain,
        ..ca_options(ca, CaOptions::default().max_ttl)
    };
    let ca_dir = opts.dir.clone();
    let authority = Authority::open(opts)?;
    // Before the server's first start there is no trust file yet: write it, so a sidecar
    // bootstrap can be made right away. A running server keeps it current itself.
    if !ca_dir.join(xds_server::identity::XDS_TRUST_FILE).exists() {
        xds_server::identity::write_trust_bundle(&ca_dir, &authority.current().bundle_pem)?;
    }
    Ok(authority)
}

fn create_token(
    identity: &str,
    ttl: Duration,
    config_dir: Option<PathBuf>,
    ca: CaArgs,
) -> Result<()> {
    let trust_domain = trust_domain_of(config_dir.as_deref())?;
    let id = SpiffeId::from_ns_sa(&trust_domain, identity)?;
    let authority = token_authority(trust_domain, ca)?;
    let token = authority
        .tokens()
        .create(&id, TokenKind::Workload, ttl, Default::default())?;
    println!("{token}");
    Ok(())
}

struct JoinTokenArgs {
    cluster: String,
    network: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    ttl: Duration,
    config_dir: Option<PathBuf>,
    ca: CaArgs,
}

fn create_join_token(args: JoinTokenArgs) -> Result<()> {
    use xds_server::clusters::{self, check_cluster_name, check_label};
    // Checked before the CA is opened: a typo must not create a CA dir as a side effect.
    check_cluster_name(&args.cluster)?;
    let network = args.network.unwrap_or_else(|| args.cluster.clone());
    check_label("network", &network)?;
    let mut claims = std::collections::BTreeMap::from([
        (clusters::CLAIM_CLUSTER.to_string(), args.cluster.clone()),
        (clusters::CLAIM_NETWORK.to_string(), network),
    ]);
    for (what, claim, value) in [
        ("region", clusters::CLAIM_REGION, args.region),
        ("zone", clusters::CLAIM_ZONE, args.zone),
    ] {
        if let Some(v) = value {
            check_label(what, &v)?;
            claims.insert(claim.to_string(), v);
        }
    }
    let trust_domain = trust_domain_of(args.config_dir.as_deref())?;
    let id = clusters::relay_identity(&trust_domain, &args.cluster);
    let authority = token_authority(trust_domain, args.ca)?;
    let token = authority
        .tokens()
        .create(&id, TokenKind::Join, args.ttl, claims)?;
    println!("{token}");
    // On stderr, so the token alone can be piped into a file.
    eprintln!(
        "join token for cluster {} (relay identity {id}): single use, valid for {}",
        args.cluster,
        humanize(args.ttl)
    );
    Ok(())
}

/// `1h`, `90s`, `1h30m`: how the durations were likely typed.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    let mut out = String::new();
    for (v, unit) in [(h, "h"), (m, "m"), (sec, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config_dir,
            xds_addr,
            admin_addr,
            secure_addr,
            ca,
            workload_cert_ttl,
            max_cert_ttl,
            log_format,
            net,
        } => {
            init_tracing(log_format);
            let args = ServeArgs {
                config_dir,
                xds_addr,
                admin_addr,
                secure_addr,
                ca,
                workload_cert_ttl,
                max_cert_ttl,
                net,
            };
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(serve(args)))
        }
        Command::Bootstrap {
            workload,
            config_dir,
            xds_addr,
            admin_port,
            delta,
            token_file,
            secure_addr,
            ca_dir,
            inline_trust,
            via_relay,
            trust_domain,
            cluster,
        } => print_bootstrap(BootstrapArgs {
            workload,
            config_dir,
            xds_addr,
            admin_port,
            delta,
            token_file,
            secure_addr,
            ca_dir,
            inline_trust,
            via_relay,
            trust_domain,
            cluster,
        }),
        Command::Token {
            command:
                TokenCommand::Create {
                    identity,
                    ttl,
                    config_dir,
                    ca,
                },
        } => create_token(&identity, ttl, config_dir, ca),
        Command::Cluster {
            command:
                ClusterCommand::JoinToken {
                    cluster,
                    network,
                    region,
                    zone,
                    ttl,
                    config_dir,
                    ca,
                },
        } => create_join_token(JoinTokenArgs {
            cluster,
            network,
            region,
            zone,
            ttl,
            config_dir,
            ca,
        }),
        Command::Ca { command } => ca_command(command),
        Command::Analyze { dir, output } => analyze_cli::analyze(&dir, output),
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
