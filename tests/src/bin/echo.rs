//! `echo`: the workload that integration tests put behind Envoy.
//!
//! Every request, whatever its method or path, is answered `200` with a JSON description of
//! what arrived (so a test can see which workload and version served it, and which headers
//! Envoy added or rewrote) plus `x-echo-workload` / `x-echo-version` response headers, and
//! logs one line per request (method, path, authority).
//!
//! Requests can ask for misbehaviour, so tests drive failures through the mesh without
//! restarting apps: `x-echo-delay-ms: N` answers after N ms (at most 30 s), and
//! `x-echo-fail-version: V` answers `503` if this app's version is V. With `--tls-cert`
//! and `--tls-key` the app serves HTTPS (and reports `"tls": true`).
//! `--file PATH=FILE` (repeatable) makes `GET PATH` answer the contents of `FILE` instead,
//! read on every request: a file server for tests (a JWKS document, say).

use std::collections::BTreeMap;
use std::future::IntoFuture as _;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

/// How long in-flight requests get to finish after a shutdown signal; bounded so that a
/// client holding a connection open cannot keep the process alive.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "echo",
    about = "HTTP server that echoes each request back as JSON"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port, logged at startup).
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Workload name reported in every response.
    #[arg(long, env = "ECHO_NAME", default_value = "echo")]
    name: String,
    /// Workload version reported in every response.
    #[arg(long, env = "ECHO_VERSION", default_value = "v1")]
    version: String,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require a client certificate issued by a CA of this file (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// `PATH=FILE`: answer `GET PATH` with the current contents of FILE, as JSON.
    #[arg(long = "file", value_name = "PATH=FILE")]
    files: Vec<String>,
}

/// The longest delay a request may ask for, so a test cannot hang the app.
const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Identity {
    name: String,
    version: String,
    name_header: HeaderValue,
    version_header: HeaderValue,
    tls: bool,
    /// Clients had to present a certificate of `--tls-client-ca`.
    client_auth: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Tests record stderr to a file; escape codes would only obscure the log tail.
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let args = Args::parse();
    let identity = Identity {
        name_header: HeaderValue::from_str(&args.name)
            .context("--name is not a valid header value")?,
        version_header: HeaderValue::from_str(&args.version)
            .context("--version is not a valid header value")?,
        name: args.name,
        version: args.version,
        tls: args.tls_cert.is_some(),
        client_auth: args.tls_client_ca.is_some(),
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        listen = %local,
        workload = %identity.name,
        version = %identity.version,
        "echo listening"
    );

    let mut app = Router::new();
    for spec in &args.files {
        let (path, file) = spec
            .split_once('=')
            .with_context(|| format!("--file {spec}: expected PATH=FILE"))?;
        let file = std::path::PathBuf::from(file);
        let served = path.to_owned();
        app = app.route(
            path,
            axum::routing::get(move || serve_file(served.clone(), file.clone())),
        );
    }
    let app = app.fallback(echo).with_state(identity);

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stopped = async move {
        // Either a signal or the sender being dropped means stop.
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let server = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let listener =
                tls::TlsListener::new(listener, cert, key, args.tls_client_ca.as_deref())?;
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .into_future()
        }
        _ => axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .into_future(),
    };
    let mut server = std::pin::pin!(server);

    tokio::select! {
        result = &mut server => return result.context("server failed"),
        signal = shutdown_signal() => {
            let name = signal?;
            tracing::info!(signal = name, "shutting down");
        }
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(result) => result.context("server failed during shutdown")?,
        Err(_) => tracing::warn!("connections still open after grace period; exiting anyway"),
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        ctrl_c = tokio::signal::ctrl_c() => {
            ctrl_c.context("installing Ctrl-C handler")?;
            Ok("SIGINT")
        }
    }
}

async fn echo(State(identity): State<Identity>, request: Request) -> impl IntoResponse {
    // Owned values only: nothing borrowed from the (non-Sync) request across the await.
    let (delay, fail) = {
        let header = |name: &str| -> Option<String> {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            header("x-echo-delay-ms").and_then(|v| v.parse::<u64>().ok()),
            header("x-echo-fail-version").is_some_and(|v| v == identity.version),
        )
    };
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
    }
    let status = if fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let uri = request.uri();
    // HTTP/2 carries the host in :authority, which is not in the header map; report it
    // under one name for both protocols so tests need not care which one Envoy used.
    let authority = uri.authority().map(|a| a.as_str().to_owned()).or_else(|| {
        request
            .headers()
            .get(axum::http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
    });
    // One line per request, so a test can see requests whose response nobody reads
    // (e.g. the copies Envoy mirrors to a shadow, with `-shadow` appended to the host).
    tracing::info!(
        method = %request.method(),
        path = %uri.path(),
        authority = %authority.as_deref().unwrap_or(""),
        "request"
    );
    let body = json!({
        "workload": identity.name,
        "version": identity.version,
        "method": request.method().as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "authority": authority,
        "protocol": format!("{:?}", request.version()),
        "tls": identity.tls,
        "client_auth": identity.client_auth,
        "headers": headers_json(request.headers()),
    });

    let mut response_headers = HeaderMap::new();
    response_headers.insert(
        HeaderName::from_static("x-echo-workload"),
        identity.name_header.clone(),
    );
    response_headers.insert(
        HeaderName::from_static("x-echo-version"),
        identity.version_header.clone(),
    );
    (status, response_headers, Json(body))
}

mod tls {
    //! HTTPS for the echo app: a listener that hands axum TLS streams.

    use anyhow::Context as _;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::server::TlsStream;
    use tokio_rustls::TlsAcceptor;

    pub struct TlsListener {
        tcp: TcpListener,
        acceptor: TlsAcceptor,
    }

    impl TlsListener {
        pub fn new(
            tcp: TcpListener,
            cert: &Path,
            key: &Path,
            client_ca: Option<&Path>,
        ) -> anyhow::Result<Self> {
            use rustls_pki_types::pem::PemObject as _;
            use rustls_pki_types::{CertificateDer, PrivateKeyDer};
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .context("TLS versions")?;
            let builder = match client_ca {
                None => builder.with_no_client_auth(),
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in CertificateDer::pem_file_iter(ca)
                        .with_context(|| format!("reading {}", ca.display()))?
                    {
                        roots
                            .add(c.with_context(|| format!("parsing {}", ca.display()))?)
                            .context("adding a client CA")?;
                    }
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .context("client certificate verifier")?;
                    builder.with_client_cert_verifier(verifier)
                }
            };
            let config = builder
                .with_single_cert(certs, key)
                .context("certificate and key")?;
            Ok(TlsListener {
                tcp,
                acceptor: TlsAcceptor::from(Arc::new(config)),
            })
        }
    }

    impl axum::serve::Listener for TlsListener {
        type Io = TlsStream<TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, peer)) = self.tcp.accept().await else {
                    continue;
                };
                // A failed handshake is the client's problem; keep serving the others.
                match self.acceptor.accept(tcp).await {
                    Ok(tls) => return (tls, peer),
                    Err(e) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }
}

async fn serve_file(path: String, file: std::path::PathBuf) -> axum::response::Response {
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            tracing::info!(method = "GET", path = %path, file = %file.display(), "served file");
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(path = %path, file = %file.display(), error = %e, "cannot read file");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {}: {e}\n", file.display()),
            )
                .into_response()
        }
    }
}

/// Repeated headers are joined with ", " (RFC 9110 list semantics) so a test can still see
/// every value Envoy forwarded, e.g. a chain of `x-forwarded-for` entries.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    json!(map)
}
