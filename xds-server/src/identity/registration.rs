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
    ClusterRegistry, RegistryAck, TokenKeys, TokenKeysRequest,
};

pub struct RegistrationService {
    authority: cert_authority::Authority,
    controller: Arc<Controller>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
}

impl RegistrationService {
    pub fn server(
        authority: cert_authority::Authority,
        controller: Arc<Controller>,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
    ) -> RegistrationServer<RegistrationService> {
        RegistrationServer::new(RegistrationService {
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
                let (c, m, name) = (controller.clone(), meta.clone(), cluster.clone());
                let outcome =
                    tokio::task::spawn_blocking(move || c.set_cluster_registry(&name, m, files))
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
