//! The running server: config controller, ADS on one listener, admin on another.
//! `main` is a thin wrapper over [`Server::start`]; tests start servers in-process the same way.

use crate::admin::{self, AdminState};
use crate::ads::{status::ProxyRegistry, AdsService, AdsShared};
use crate::clusters::{ClusterError, MemberClusters};
use crate::config::store::StoreError;
use crate::controller::Controller;
use crate::identity::auth::Authenticator;
use crate::identity::ca_service::CaService;
use crate::identity::registration::RegistrationService;
use crate::identity::secrets::CaSecrets;
use crate::identity::{self, IdentityError};
use crate::metrics::Metrics;
use crate::net::{self, Gate, NetLimits};
use cert_authority::{Authority, CaOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] StoreError),
    #[error("cannot watch the config dir: {0}")]
    Watch(#[from] notify::Error),
    #[error("cannot read the local address of a listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error("cannot open the CA: {0}")]
    Ca(#[from] cert_authority::CaError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot load the member clusters: {0}")]
    Clusters(#[from] ClusterError),
}

/// The secure port (ADS + CA over TLS) and the CA behind it.
pub struct SecureOptions {
    pub listener: TcpListener,
    /// The trust domain is filled in from the mesh config.
    pub ca: CaOptions,
    /// Lifetime of the certificates the server makes for proxies (`None`: the CA default).
    pub workload_ttl: Option<Duration>,
}

/// Accept queue for the ADS listener: a fleet of sidecars reconnecting at once (a
/// control plane restart, a node pool coming up) must not see dropped SYNs and wait
/// for TCP's 1 s retransmit. The kernel caps it at `net.core.somaxconn`.
pub const ACCEPT_BACKLOG: u32 = 4096;

/// HTTP/2 PINGs to every connection: a peer that stops answering (a silent half-open
/// link) is dropped after the timeout, and its streams and proxies with it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds a listener with [`ACCEPT_BACKLOG`] (tokio's `bind` uses 128).
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

pub struct Server {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub secure_addr: Option<SocketAddr>,
    pub authority: Option<Authority>,
    /// Clusters whose relays joined (with the CA: `None` without the secure port).
    pub clusters: Option<Arc<MemberClusters>>,
    /// Who callers on the secure port are; `None` without it.
    pub authenticator: Option<Arc<Authenticator>>,
    /// What member clusters' relays report about their sidecars.
    pub relay_proxies: Option<Arc<identity::registration::RelayProxies>>,
    pub controller: Arc<Controller>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), String>>,
    _watch: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// Loads `config_dir`, then serves ADS on `xds` and the admin API on `admin` until
    /// [`Server::stop`] is called or the returned server is dropped.
    pub async fn start(
        config_dir: PathBuf,
        xds: TcpListener,
        admin: TcpListener,
    ) -> Result<Server, ServerError> {
        Self::start_with(config_dir, xds, admin, None).await
    }

    /// Like [`Server::start`], plus the secure port and the CA when `secure` is given.
    pub async fn start_with(
        config_dir: PathBuf,
        xds: TcpListener,
        admin: TcpListener,
        secure: Option<SecureOptions>,
    ) -> Result<Server, ServerError> {
        Self::start_limited(config_dir, xds, admin, secure, NetLimits::default()).await
    }

    /// Like [`Server::start_with`], with the connection and request limits of every port.
    pub async fn start_limited(
        config_dir: PathBuf,
        xds: TcpListener,
        admin: TcpListener,
        secure: Option<SecureOptions>,
        limits: NetLimits,
    ) -> Result<Server, ServerError> {
        let metrics = Arc::new(Metrics::default());
        let controller = Controller::open(&config_dir, metrics.clone())?;
        let watch = controller.watch()?;
        let registry = Arc::new(ProxyRegistry::default());
        let xds_addr = xds.local_addr().map_err(ServerError::Listener)?;
        let admin_addr = admin.local_addr().map_err(ServerError::Listener)?;
        let shared = AdsShared {
            snapshots: controller.sources(),
            secrets: None,
            subscriptions: Default::default(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
        };
        let mut background = Vec::new();
        let mut secure_addr = None;
        let mut authority = None;
        let mut clusters = None;
        let mut authenticator = None;
        let mut secure_server = None;
        let mut relay_proxies_for_admin = None;
        if let Some(opts) = secure {
            let mut ca = opts.ca;
            ca.trust_domain = controller.snapshot().mesh.trust_domain.clone();
            let ca_dir = ca.dir.clone();
            let plugged = ca.plugged.clone();
            let auth_ca = Authority::open(ca)?;
            if let Some(dir) = plugged {
                background.push(identity::watch_plugged(auth_ca.clone(), &dir)?);
            }
            let addr = opts.listener.local_addr().map_err(ServerError::Listener)?;
            let live = identity::tls::live_config(
                auth_ca.clone(),
                identity::tls::cert_ips(addr),
                ca_dir.clone(),
            )?;
            background.push(live.task);
            let members = Arc::new(MemberClusters::load(&ca_dir)?);
            let relay_proxies = Arc::new(identity::registration::RelayProxies::default());
            background.push(identity::rotation::spawn(
                auth_ca.clone(),
                registry.clone(),
                relay_proxies.clone(),
                metrics.clone(),
            ));
            relay_proxies_for_admin = Some(relay_proxies.clone());
            identity::registration::restore(&ca_dir, &controller);
            let authn = Arc::new(Authenticator::new(auth_ca.clone(), members.clone()));
            let secure_shared = AdsShared {
                secrets: Some(Arc::new(CaSecrets::new(
                    auth_ca.clone(),
                    opts.workload_ttl,
                    metrics.clone(),
                ))),
                ..shared.clone()
            };
            let gate = Gate::new("secure", limits.clone(), metrics.clone());
            let incoming = identity::tls::incoming(opts.listener, live.config, gate);
            secure_server = Some((
                incoming,
                AdsService::secure(secure_shared, authn.clone()),
                CaService::server(auth_ca.clone(), authn.clone(), metrics.clone()),
                RegistrationService::server(
                    relay_proxies.clone(),
                    ca_dir.clone(),
                    auth_ca.clone(),
                    controller.clone(),
                    authn.clone(),
                    metrics.clone(),
                ),
            ));
            secure_addr = Some(addr);
            authority = Some(auth_ca);
            clusters = Some(members);
            authenticator = Some(authn);
        }
        let router = admin::router(AdminState {
            controller: controller.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            authority: authority.clone(),
            clusters: clusters.clone(),
            relay_proxies: relay_proxies_for_admin.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let xds_gate = Gate::new("xds", limits.clone(), metrics.clone());
        let admin_gate = Gate::new("admin", limits.clone(), metrics.clone());
        let streams = limits.max_concurrent_streams;
        let task = tokio::spawn(async move {
            let incoming = net::accept(xds, xds_gate);
            let xds = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .max_concurrent_streams(Some(streams))
                .add_service(AdsService::new(shared))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                });
            let admin = axum::serve(
                net::GatedListener {
                    listener: admin,
                    gate: admin_gate,
                },
                router,
            );
            let secure = async move {
                match secure_server {
                    Some((incoming, ads, ca, registration)) => tonic::transport::Server::builder()
                        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                        .max_concurrent_streams(Some(streams))
                        .add_service(ads)
                        .add_service(ca)
                        .add_service(registration)
                        .serve_with_incoming(incoming)
                        .await
                        .map_err(|e| format!("secure xDS server failed: {e}")),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = xds => r.map_err(|e| format!("xDS server failed: {e}")),
                r = admin => r.map_err(|e| format!("admin server failed: {e}")),
                r = secure => r,
            }
        });
        Ok(Server {
            xds_addr,
            admin_addr,
            secure_addr,
            authority,
            clusters,
            relay_proxies: relay_proxies_for_admin,
            authenticator,
            background,
            controller,
            registry,
            metrics,
            stop: Some(stop),
            task,
            _watch: watch,
        })
    }

    /// Runs until `signal` resolves, then stops serving.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), String> {
        tokio::select! {
            r = &mut self.task => return r.map_err(|e| e.to_string())?,
            _ = signal => {}
        }
        self.stop();
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
        self._watch.abort();
        for t in &self.background {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
