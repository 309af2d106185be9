//! `trellis.relay.v1.Registration/Report` on the secure port: a joined member cluster's
//! relay reports the cluster's WorkloadEntries; the control plane validates and merges
//! them (see `Controller::set_cluster_registry`) and answers every report with what it
//! refused. Which cluster a report is for comes from the relay's certificate, never from
//! the message. A closed stream keeps the cluster's workloads: a relay that reconnects
//! must not make its cluster's endpoints vanish and come back (that would be churn and a
//! needless failover).

use super::auth::{bearer, Authenticator, PeerInfo};
use crate::controller::Controller;
use crate::mesh::ClusterMeta;
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use trellis_proto::trellis::relay::v1::registration_server::{Registration, RegistrationServer};
use trellis_proto::trellis::relay::v1::{
    ClusterRegistry, ProxyList, ProxyListAck, RegistryAck, TokenKeys, TokenKeysRequest,
    TrustRequest, TrustUpdate,
};

/// A member cluster's last accepted registry, kept so that a restarted control plane
/// knows the cluster's workloads before its relay reports again: otherwise the relay's
/// class streams would be answered, for a moment, as if those workloads did not exist,
/// and that config would reach the sidecars.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    network: String,
    region: Option<String>,
    zone: Option<String>,
    files: Vec<(String, String)>,
}

const KEPT_DIR: &str = "registries";

fn keep(ca_dir: &std::path::Path, cluster: &str, meta: &ClusterMeta, files: &[(String, String)]) {
    let dir = ca_dir.join(KEPT_DIR);
    let kept = Kept {
        network: meta.network.clone(),
        region: meta.region.clone(),
        zone: meta.zone.clone(),
        files: files.to_vec(),
    };
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec(&kept).map_err(|e| e.to_string()))
        .and_then(|text| {
            cert_authority::write_atomic(&dir.join(format!("{cluster}.json")), &text, false)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        warn!(cluster, error = %e, "cannot keep the member cluster's registry on disk");
    }
}

/// Applies every kept member-cluster registry (at start, before serving).
pub fn restore(ca_dir: &std::path::Path, controller: &Controller) {
    let Ok(entries) = std::fs::read_dir(ca_dir.join(KEPT_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(cluster) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| !n.starts_with('.'))
        else {
            continue;
        };
        let kept: Kept = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(k) => k,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "kept registry unreadable; the cluster's relay will report it again");
                continue;
            }
        };
        let meta = ClusterMeta {
            network: kept.network,
            region: kept.region,
            zone: kept.zone,
        };
        match controller.set_cluster_registry(cluster, meta, kept.files) {
            Ok(o) => info!(
                cluster,
                workloads = o.workloads,
                "member cluster registry restored"
            ),
            Err(e) => warn!(cluster, error = %e, "kept registry refused"),
        }
    }
}

/// What each member cluster's relay last reported about its sidecars, for the admin API.
#[derive(Debug, Default)]
pub struct RelayProxies {
    by_cluster: std::sync::Mutex<std::collections::BTreeMap<String, Stored>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Reported {
    /// The relay's report stream is open.
    pub connected: bool,
    pub reported_at_ms: u64,
    /// The trust epoch the relay itself is at (its own certificate and trust files).
    pub trust_epoch: u64,
    pub proxies: Vec<serde_json::Value>,
}

/// A relay's last report as received: turned into JSON only when someone asks (a relay
/// of 10,000 sidecars reports every few seconds; the admin API is asked rarely).
#[derive(Debug)]
struct Stored {
    connected: bool,
    reported_at_ms: u64,
    list: ProxyList,
}

impl RelayProxies {
    fn update(&self, cluster: &str, f: impl FnOnce(&mut Stored)) {
        let mut m = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        let r = m.entry(cluster.to_string()).or_insert_with(|| Stored {
            connected: true,
            reported_at_ms: 0,
            list: ProxyList::default(),
        });
        f(r);
    }

    /// What holds a root rotation at `epoch` in the member clusters: every connected
    /// relay that is not at `epoch` itself, and every sidecar behind one that holds
    /// secrets and has not ACKed `epoch`. A relay whose report stream is closed is not
    /// waited for (it is not connected; `/debug/ca` lists it under `relays_away`).
    pub fn pending(&self, epoch: u64) -> (Vec<super::rotation::Pending>, Vec<String>) {
        let m = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = Vec::new();
        let mut away = Vec::new();
        for (cluster, r) in m.iter() {
            if !r.connected {
                away.push(cluster.clone());
                continue;
            }
            if r.list.relay_trust_epoch < epoch {
                pending.push(super::rotation::Pending {
                    node: format!("relay of cluster {cluster}"),
                    identity: None,
                    epoch_sent: None,
                    epoch_acked: Some(r.list.relay_trust_epoch),
                });
            }
            for p in &r.list.proxies {
                let (sent, acked) = (p.trust_epoch_sent, p.trust_epoch_acked);
                if sent.is_some() && acked.is_none_or(|a| a < epoch) {
                    pending.push(super::rotation::Pending {
                        node: format!("{cluster}/{}", p.id),
                        identity: (!p.identity.is_empty()).then(|| p.identity.clone()),
                        epoch_sent: sent,
                        epoch_acked: acked,
                    });
                }
            }
        }
        (pending, away)
    }

    /// How many take part in a rotation: connected relays and their sidecars holding
    /// secrets (what [`Self::pending`] counts from).
    pub fn with_secrets(&self) -> usize {
        let m = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|r| r.connected)
            .map(|r| {
                1 + r
                    .list
                    .proxies
                    .iter()
                    .filter(|p| p.trust_epoch_sent.is_some())
                    .count()
            })
            .sum()
    }

    pub fn get(&self, cluster: &str) -> Option<Reported> {
        let m = self.by_cluster.lock().unwrap_or_else(|e| e.into_inner());
        m.get(cluster).map(|r| Reported {
            connected: r.connected,
            reported_at_ms: r.reported_at_ms,
            trust_epoch: r.list.relay_trust_epoch,
            proxies: r.list.proxies.iter().map(summary_json).collect(),
        })
    }
}

fn summary_json(p: &trellis_proto::trellis::relay::v1::ProxySummary) -> serde_json::Value {
    serde_json::json!({
        "id": p.id,
        "workload": (!p.workload.is_empty()).then_some(&p.workload),
        "namespace": p.namespace,
        "mode": p.mode,
        "synced": p.synced,
        "identity": (!p.identity.is_empty()).then_some(&p.identity),
        "connected_at_ms": p.connected_at_ms,
        "acked": p.acked,
        "trust_epoch_sent": p.trust_epoch_sent,
        "trust_epoch_acked": p.trust_epoch_acked,
    })
}

pub struct RegistrationService {
    proxies: Arc<RelayProxies>,
    ca_dir: std::path::PathBuf,
    authority: cert_authority::Authority,
    controller: Arc<Controller>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
}

impl RegistrationService {
    pub fn server(
        proxies: Arc<RelayProxies>,
        ca_dir: std::path::PathBuf,
        authority: cert_authority::Authority,
        controller: Arc<Controller>,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
    ) -> RegistrationServer<RegistrationService> {
        RegistrationServer::new(RegistrationService {
            proxies,
            ca_dir,
            authority,
            controller,
            auth,
            metrics,
        })
    }
}

impl RegistrationService {
    /// The member cluster whose relay is calling, or PermissionDenied.
    fn relay_cluster<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let headers = request.metadata().clone().into_headers();
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = self
            .auth
            .caller(bearer(&headers), peer.as_ref())
            .inspect_err(|e| self.metrics.refused(e.code()))?;
        caller.relay_of.clone().ok_or_else(|| {
            self.metrics.refused(tonic::Code::PermissionDenied);
            Status::permission_denied(format!(
                "{} is not the relay of a joined member cluster: only relays may call this",
                caller.identity
            ))
        })
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    type ReportStream = ReceiverStream<Result<RegistryAck, Status>>;
    type WatchTrustStream = ReceiverStream<Result<TrustUpdate, Status>>;

    async fn watch_trust(
        &self,
        request: Request<TrustRequest>,
    ) -> Result<Response<Self::WatchTrustStream>, Status> {
        let cluster = self.relay_cluster(&request)?;
        let mut trust = self.authority.subscribe();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let update = {
                    let t = trust.borrow_and_update();
                    TrustUpdate {
                        epoch: t.epoch,
                        bundle_pem: t.bundle_pem.clone(),
                        signer: t.signer.clone(),
                    }
                };
                info!(cluster = %cluster, epoch = update.epoch, "trust state sent to the relay");
                if tx.send(Ok(update)).await.is_err() || trust.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_proxies(
        &self,
        request: Request<Streaming<ProxyList>>,
    ) -> Result<Response<ProxyListAck>, Status> {
        let cluster = self.relay_cluster(&request)?;
        let mut lists = request.into_inner();
        let now_ms = crate::ads::status::now_ms;
        loop {
            match lists.message().await {
                Ok(Some(list)) => self.proxies.update(&cluster, |r| {
                    r.connected = true;
                    r.reported_at_ms = now_ms();
                    r.list = list;
                }),
                Ok(None) => break,
                Err(e) => {
                    warn!(cluster = %cluster, error = %e, "proxy report stream failed");
                    break;
                }
            }
        }
        // Kept, marked stale: the last word of a relay that may just be reconnecting.
        self.proxies.update(&cluster, |r| r.connected = false);
        Ok(Response::new(ProxyListAck {}))
    }

    async fn get_token_keys(
        &self,
        request: Request<TokenKeysRequest>,
    ) -> Result<Response<TokenKeys>, Status> {
        self.relay_cluster(&request)?;
        Ok(Response::new(TokenKeys {
            es256_public_keys: vec![self.authority.tokens().verifier().public_key().to_vec()],
            trust_domain: self.authority.trust_domain().to_string(),
        }))
    }

    async fn report(
        &self,
        request: Request<Streaming<ClusterRegistry>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let cluster = self.relay_cluster(&request)?;
        let member = self.auth.clusters().get(&cluster).ok_or_else(|| {
            Status::permission_denied(format!("member cluster {cluster} is not joined"))
        })?;
        let meta = ClusterMeta {
            network: member.network.clone(),
            region: member.region.clone(),
            zone: member.zone.clone(),
        };
        let mut reports = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let controller = self.controller.clone();
        let ca_dir = self.ca_dir.clone();
        tokio::spawn(async move {
            loop {
                let report = match reports.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(cluster = %cluster, error = %e, "registry report stream failed");
                        break;
                    }
                };
                let files: Vec<(String, String)> =
                    report.files.into_iter().map(|f| (f.name, f.yaml)).collect();
                let (c, m, name, dir) = (
                    controller.clone(),
                    meta.clone(),
                    cluster.clone(),
                    ca_dir.clone(),
                );
                let outcome = tokio::task::spawn_blocking(move || {
                    let outcome = c.set_cluster_registry(&name, m.clone(), files.clone());
                    if outcome.is_ok() {
                        keep(&dir, &name, &m, &files);
                    }
                    outcome
                })
                .await;
                let errors: Vec<String> = match outcome {
                    Ok(Ok(o)) => {
                        info!(cluster = %cluster, revision = report.revision, workloads = o.workloads, changed = o.changed, errors = o.errors.len(), "member cluster registry reported");
                        o.errors.iter().map(|e| e.to_string()).collect()
                    }
                    Ok(Err(e)) => vec![e.to_string()],
                    Err(e) => vec![format!("internal error applying the registry: {e}")],
                };
                let ack = RegistryAck {
                    revision: report.revision,
                    errors,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
