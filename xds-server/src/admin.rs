//! Admin HTTP API (port 15014): health, metrics, and what every proxy has been sent.

use crate::ads::status::ProxyRegistry;
use crate::cache::TypeKind;
use crate::clusters::MemberClusters;
use crate::controller::Controller;
use crate::dump::resource_json;
use crate::metrics::Metrics;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cert_authority::Authority;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub controller: Arc<Controller>,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    pub authority: Option<Authority>,
    /// Joined member clusters (with the CA only).
    pub clusters: Option<Arc<MemberClusters>>,
    /// What each member cluster's relay reports about its sidecars.
    pub relay_proxies: Option<Arc<crate::identity::registration::RelayProxies>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/debug/syncz", get(syncz))
        .route("/debug/configz", get(configz))
        .route("/debug/config_dump", get(config_dump))
        .route("/metrics", get(metrics))
        .route("/debug/ca", get(ca_status))
        .route("/ca/rotate-root", post(rotate_root))
        .route("/debug/clusters", get(clusters))
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_MAX_BODY))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(state)
}

/// Admin request bodies are tiny (a rotation request); anything larger is refused (413).
pub const ADMIN_MAX_BODY: usize = 64 * 1024;
/// An admin request still unanswered after this gets 503 (nothing here takes that long).
pub const ADMIN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("admin request took longer than {ADMIN_REQUEST_TIMEOUT:?}\n"),
        )
            .into_response(),
    }
}

async fn ready() -> &'static str {
    // Serving starts only after the initial config load, so being reachable means ready.
    "ready\n"
}

async fn syncz(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let snap = s.controller.snapshot();
    let proxies: Vec<_> = s.registry.all().iter().map(|p| p.view()).collect();
    Json(json!({
        "generation": snap.generation,
        "connected": proxies.len(),
        "synced": proxies.iter().filter(|p| p.synced).count(),
        "config_errors": s.controller.status().errors.len(),
        "proxies": proxies,
    }))
}

async fn configz(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(json!(*s.controller.status()))
}

#[derive(Deserialize)]
struct DumpQuery {
    proxy: Option<String>,
}

async fn config_dump(State(s): State<AdminState>, Query(q): Query<DumpQuery>) -> Response {
    let Some(id) = q.proxy else {
        return (
            StatusCode::BAD_REQUEST,
            "missing ?proxy=NODE_ID (or ?proxy=NAME.NAMESPACE)\n",
        )
            .into_response();
    };
    let Some(p) = s.registry.find(&id) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no connected proxy `{id}`; see /debug/syncz\n"),
        )
            .into_response();
    };
    let snap = s.controller.snapshot();
    let scope = snap.scope(
        p.node.workload.as_deref(),
        &p.node.namespace,
        p.node.cluster_id.as_deref(),
    );
    let view = snap.view(&scope);
    let mut resources = serde_json::Map::new();
    for kind in TypeKind::PUSH_ORDER {
        let list: Vec<_> = view.iter(kind).map(|r| resource_json(r)).collect();
        if !list.is_empty() {
            resources.insert(kind.short().to_string(), serde_json::Value::Array(list));
        }
    }
    Json(json!({
        "proxy": p.node.id,
        "workload": p.node.workload,
        "generation": snap.generation,
        "scope": format!("{scope:?}"),
        "resources": resources,
    }))
    .into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

fn no_ca() -> Response {
    (
        StatusCode::NOT_FOUND,
        "this server runs without a CA (no secure port)\n",
    )
        .into_response()
}

/// The CA's trust state, a running rotation, and which proxies it waits for. Roots
/// only: no private key is ever part of an admin answer.
async fn ca_status(State(s): State<AdminState>) -> Response {
    let Some(ca) = &s.authority else {
        return no_ca();
    };
    let trust = ca.current();
    let roots: Vec<_> = trust
        .roots
        .iter()
        .map(|r| json!({"fingerprint": r.fingerprint, "subject": r.subject, "not_after": r.not_after}))
        .collect();
    let (pending, relays_away) = crate::identity::rotation::waiting_for(
        &s.registry,
        s.relay_proxies.as_deref(),
        trust.epoch,
    );
    let with_secrets = s
        .registry
        .all()
        .iter()
        .filter(|p| p.secrets().epoch_sent.is_some())
        .count()
        + s.relay_proxies.as_ref().map_or(0, |r| r.with_secrets());
    Json(json!({
        "trust_domain": ca.trust_domain(),
        "epoch": trust.epoch,
        "signer": trust.signer,
        "roots": roots,
        "rotation": trust.rotation,
        "proxies_with_secrets": with_secrets,
        "pending": pending,
        "relays_away": relays_away,
    }))
    .into_response()
}

async fn rotate_root(State(s): State<AdminState>) -> Response {
    let Some(ca) = &s.authority else {
        return no_ca();
    };
    match ca.start_rotation() {
        Ok(status) => (StatusCode::ACCEPTED, Json(json!(status))).into_response(),
        Err(e) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    }
}

/// The member clusters whose relays joined, as recorded in `<ca-dir>/clusters.json`.
async fn clusters(State(s): State<AdminState>) -> Response {
    let Some(clusters) = &s.clusters else {
        return no_ca();
    };
    // Each member cluster with what its relay last reported: whether it is connected, and
    // the sidecars it serves (the control plane cannot reach member clusters itself).
    let all: Vec<serde_json::Value> = clusters
        .all()
        .into_iter()
        .map(|c| {
            let reported = s.relay_proxies.as_ref().and_then(|r| r.get(&c.name));
            let mut v = json!(c);
            v["relay_connected"] = json!(reported.as_ref().is_some_and(|r| r.connected));
            v["proxies_reported_at_ms"] = json!(reported.as_ref().map(|r| r.reported_at_ms));
            v["proxies"] = json!(reported.map(|r| r.proxies).unwrap_or_default());
            v
        })
        .collect();
    Json(json!(all)).into_response()
}
