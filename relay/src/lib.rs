//! Trellis relay: runs in a member cluster instead of a control plane.
//!
//! - **Upstream** ([`upstream`]): one HTTP/2 connection (mTLS, the relay's own identity
//!   from a one-time join token, see [`join`]) to the mesh control plane, one Delta ADS
//!   stream per proxy class present locally (not one per sidecar).
//! - **Cache** ([`cache`]): what the control plane sent, per class, as the same shared
//!   views the control plane serves; a state is published only when content changed.
//! - **Downstream**: local sidecars connect exactly as they would to the control plane:
//!   the ADS streams are `xds-server`'s own (SotW and Delta, ACK/NACK bookkeeping,
//!   `/debug/syncz`), reading the relay's cache.
//! - **Offline**: when the control plane is unreachable the cache keeps serving, and the
//!   class streams reconnect with backoff and jitter.
//!
//! See `docs/multicluster.md` for how the pieces fit.

pub mod cache;
pub mod join;
pub mod persist;
pub mod proxies;
pub mod registry;
pub mod secrets;
pub mod tls;
pub mod trust;
pub mod upstream;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use cache::RelayCache;
use join::RelayIdentity;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use upstream::UpstreamStats;
use xds_server::ads::status::ProxyRegistry;
use xds_server::ads::{AdsService, AdsShared};
use xds_server::metrics::Metrics;
use xds_server::net::{self, Gate, NetLimits};
use xds_server::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("bad join token: {0}")]
    JoinToken(String),
    #[error("the control plane refused: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("cannot write the relay state {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no identity in {0}: pass --join-token (a one-time token from `xds-server cluster join-token`)")]
    NoIdentity(String),
    #[error("cannot read the local address of a listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("the upstream stream closed")]
    Closed,
}

pub struct RelayOptions {
    pub cluster: String,
    pub upstream: SocketAddr,
    /// Roots the control plane's serving certificate must chain to (for joining).
    pub trust_bundle_pem: String,
    /// A one-time join token; not needed once the state dir holds a valid identity.
    pub join_token: Option<String>,
    pub state_dir: PathBuf,
    /// The cluster's WorkloadEntries, reported upstream (none: the cluster reports nothing).
    pub registry_dir: Option<PathBuf>,
    pub listen: TcpListener,
    /// Sidecars with identities connect here (TLS with the relay's certificate, bootstrap
    /// tokens) and get their certificates over SDS; `None`: config only.
    pub secure_listen: Option<TcpListener>,
    pub admin: TcpListener,
    /// A proxy class no sidecar has used for this long (and not a workload of the
    /// registry folder) has its upstream stream closed and its cache dropped.
    pub idle_class_after: Duration,
    /// At most this many proxy classes (upstream streams, cached configs); a sidecar of
    /// one more is refused with RESOURCE_EXHAUSTED.
    pub max_classes: usize,
    /// Connection and request limits of the relay's downstream ports (see
    /// `xds_server::net`).
    pub limits: NetLimits,
}

pub struct Relay {
    pub xds_addr: SocketAddr,
    pub secure_addr: Option<SocketAddr>,
    pub secrets: Option<Arc<secrets::RelaySecrets>>,
    pub admin_addr: SocketAddr,
    pub cache: Arc<RelayCache>,
    pub registry: Arc<ProxyRegistry>,
    pub upstream: Arc<UpstreamStats>,
    pub identity: Arc<RwLock<RelayIdentity>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("xds_addr", &self.xds_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone)]
struct AdminState {
    cluster: String,
    cache: Arc<RelayCache>,
    registry: Arc<ProxyRegistry>,
    upstream: Arc<UpstreamStats>,
    metrics: Arc<Metrics>,
    identity: Arc<RwLock<RelayIdentity>>,
    report: Arc<std::sync::Mutex<registry::ReportStatus>>,
    trust_epoch: Arc<AtomicU64>,
}

impl Relay {
    pub async fn start(opts: RelayOptions) -> Result<Relay, RelayError> {
        let identity = match join::load(&opts.state_dir)? {
            Some(id) => {
                info!(identity = %id.id, "relay identity from the state dir");
                id
            }
            None => {
                let token = opts
                    .join_token
                    .as_deref()
                    .ok_or_else(|| RelayError::NoIdentity(opts.state_dir.display().to_string()))?;
                let id = join::join(opts.upstream, &opts.trust_bundle_pem, token).await?;
                join::save(&opts.state_dir, &id)?;
                info!(identity = %id.id, cluster = %opts.cluster, "joined the mesh");
                id
            }
        };
        // Bootstraps of this cluster's sidecars trust the relay through these files.
        xds_server::identity::write_trust_bundle(&opts.state_dir, &identity.bundle_pem)
            .map_err(|e| RelayError::Tls(e.to_string()))?;
        let live = Arc::new(RwLock::new(identity.tls()?));
        let channel = tls::channel(opts.upstream, live.clone());
        let (trust_tx, trust_rx) =
            tokio::sync::watch::channel(Arc::new(trust::Trust::kept(&identity.bundle_pem)));
        let applied = Arc::new(AtomicU64::new(0));
        let moved = Arc::new(tokio::sync::Notify::new());
        let identity = Arc::new(RwLock::new(identity));
        let (cache, wanted) = RelayCache::new(&opts.cluster, opts.max_classes);
        cache.restore(persist::load(&opts.state_dir));
        let stats = Arc::new(UpstreamStats::default());
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(ProxyRegistry::default());
        let mut tasks = vec![tokio::spawn(upstream::run(
            cache.clone(),
            wanted,
            upstream::Upstream {
                channel: channel.clone(),
                cluster: opts.cluster.clone(),
                stats: stats.clone(),
                downstream: registry.clone(),
                idle_after: opts.idle_class_after,
            },
        ))];
        tasks.push(tokio::spawn(trust::watch_loop(channel.clone(), trust_tx)));
        tasks.push(tokio::spawn(persist::save_loop(
            cache.clone(),
            opts.state_dir.clone(),
        )));
        tasks.push(tokio::spawn(proxies::report_loop(
            channel.clone(),
            proxies::Source {
                registry: registry.clone(),
                trust_epoch: applied.clone(),
                trust_moved: moved.clone(),
            },
        )));
        let report = Arc::new(std::sync::Mutex::new(registry::ReportStatus::default()));
        if let Some(dir) = &opts.registry_dir {
            let (files, watch_task) = registry::watch_folder(dir.clone())?;
            tasks.push(watch_task);
            tasks.push(tokio::spawn(registry::report_loop(
                channel.clone(),
                files,
                cache.clone(),
                report.clone(),
            )));
        }
        let secure_addr = opts
            .secure_listen
            .as_ref()
            .map(|l| l.local_addr().map_err(RelayError::Listener))
            .transpose()?;
        let mut secrets = None;
        let mut server_tls = None;
        if let Some(listener) = opts.secure_listen {
            let auth = Arc::new(secrets::RelayAuth::load(channel.clone(), &opts.state_dir).await?);
            let provider = Arc::new(secrets::RelaySecrets::new(
                channel.clone(),
                auth.clone(),
                trust_rx.clone(),
                opts.state_dir.clone(),
            ));
            let current = identity
                .read()
                .map(|i| i.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            let config = xds_server::identity::tls::server_config(
                &current.chain_pem,
                &current.key_pem,
                &current.bundle_pem,
            )
            .map_err(|e| RelayError::Tls(e.to_string()))?;
            let swap = Arc::new(arc_swap::ArcSwap::new(config));
            server_tls = Some(swap.clone());
            let shared = AdsShared {
                snapshots: cache.subscribe(),
                secrets: Some(provider.clone() as Arc<dyn xds_server::ads::secrets::SecretProvider>),
                subscriptions: Default::default(),
                registry: registry.clone(),
                metrics: metrics.clone(),
                limits: opts.limits.clone(),
            };
            let gate = Gate::new("secure", opts.limits.clone(), metrics.clone());
            let incoming = xds_server::identity::tls::incoming(listener, swap, gate);
            let streams = opts.limits.max_concurrent_streams;
            tasks.push(tokio::spawn(async move {
                let r = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                    .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                    .max_concurrent_streams(Some(streams))
                    .add_service(AdsService::secure(shared, auth))
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = r {
                    warn!(error = %e, "the relay's secure xDS server failed");
                }
            }));
            secrets = Some(provider);
        }
        tasks.push(tokio::spawn(trust::own_loop(
            channel,
            identity.clone(),
            trust_rx,
            trust::Own {
                live,
                server_tls,
                state_dir: opts.state_dir.clone(),
                applied: applied.clone(),
                moved,
            },
        )));
        let xds_addr = opts.listen.local_addr().map_err(RelayError::Listener)?;
        let admin_addr = opts.admin.local_addr().map_err(RelayError::Listener)?;
        let shared = AdsShared {
            snapshots: cache.subscribe(),
            secrets: None,
            subscriptions: Default::default(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            limits: opts.limits.clone(),
        };
        let incoming = net::accept(
            opts.listen,
            Gate::new("xds", opts.limits.clone(), metrics.clone()),
        );
        let admin_gate = Gate::new("admin", opts.limits.clone(), metrics.clone());
        let streams = opts.limits.max_concurrent_streams;
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .max_concurrent_streams(Some(streams))
                .add_service(AdsService::new(shared))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = r {
                warn!(error = %e, "the relay's xDS server failed");
            }
        }));
        let admin = AdminState {
            cluster: opts.cluster.clone(),
            cache: cache.clone(),
            registry: registry.clone(),
            upstream: stats.clone(),
            metrics,
            identity: identity.clone(),
            report,
            trust_epoch: applied,
        };
        let router = Router::new()
            .route("/healthz/ready", get(|| async { "ready\n" }))
            .route("/debug/syncz", get(syncz))
            .route("/debug/relay", get(relay_status))
            .route("/metrics", get(metrics_text))
            .with_state(admin);
        let admin_listener = opts.admin;
        tasks.push(tokio::spawn(async move {
            let listener = net::GatedListener {
                listener: admin_listener,
                gate: admin_gate,
            };
            if let Err(e) = axum::serve(listener, router).await {
                warn!(error = %e, "the relay's admin server failed");
            }
        }));
        Ok(Relay {
            xds_addr,
            secure_addr,
            secrets,
            admin_addr,
            cache,
            registry,
            upstream: stats,
            identity,
            tasks,
        })
    }
}

async fn syncz(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let proxies: Vec<_> = s.registry.all().iter().map(|p| p.view()).collect();
    Json(json!({
        "cluster": s.cluster,
        "connected": proxies.len(),
        "synced": proxies.iter().filter(|p| p.synced).count(),
        "proxies": proxies,
    }))
}

async fn relay_status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let classes: Vec<_> = s
        .cache
        .classes()
        .into_iter()
        .map(|(k, n)| json!({"workload": k.workload, "namespace": k.namespace, "resources": n}))
        .collect();
    let id = s.identity.read().map(|i| i.id.uri()).unwrap_or_default();
    Json(json!({
        "cluster": s.cluster,
        "identity": id,
        "upstream_streams": s.upstream.streams.load(Ordering::Relaxed),
        "trust_epoch": s.trust_epoch.load(Ordering::Relaxed),
        "registry": s.report.lock().map(|r| json!(*r)).unwrap_or_default(),
        "classes": classes,
    }))
}

async fn metrics_text(State(s): State<AdminState>) -> String {
    s.metrics.render()
}
