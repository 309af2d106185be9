//! `echo`: the workload that integration tests put behind Envoy.
//!
//! Every request, whatever its method or path, is answered `200` with a JSON description of
//! what arrived (so a test can see which workload and version served it, and which headers
//! Envoy added or rewrote) plus `x-echo-workload` / `x-echo-version` response headers, and
//! logs one line per request (method, path, authority).
//!
//! `--file PATH=FILE` (repeatable) makes `GET PATH` answer the contents of `FILE` instead,
//! read on every request: a file server for tests (a JWKS document, say).

use std::collections::BTreeMap;
use std::future::IntoFuture as _;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
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
    /// `PATH=FILE`: answer `GET PATH` with the current contents of FILE, as JSON.
    #[arg(long = "file", value_name = "PATH=FILE")]
    files: Vec<String>,
}

#[derive(Debug, Clone)]
struct Identity {
    name: String,
    version: String,
    name_header: HeaderValue,
    version_header: HeaderValue,
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
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        // Either a signal or the sender being dropped means stop.
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let mut server = std::pin::pin!(server.into_future());

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
    (response_headers, Json(body))
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
