//! Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate` on the secure port:
//! agents that keep their own keys send a CSR and get a chain back. The CSR may only
//! ask for the identity the caller proved.
//!
//! It is also how a relay joins (docs/multicluster.md): with a one-time join token as
//! bearer, a CSR for exactly the token's relay identity is signed, the token is used up,
//! and the member cluster is recorded.

use super::auth::{bearer, Authenticator, CsrCaller, JoinRequest, PeerInfo};
use crate::clusters::MemberCluster;
use crate::metrics::{HowLabel, Metrics};
use cert_authority::{Authority, CaError, IssuedCert, TokenKind};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};
use trellis_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use trellis_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

pub struct CaService {
    authority: Authority,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
}

impl CaService {
    pub fn server(
        authority: Authority,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
    ) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(CaService {
            authority,
            auth,
            metrics,
        })
    }
}

/// Metadata a relay forwards its sidecar's bootstrap token in, asking for that
/// sidecar's certificate.
pub const FORWARDED_TOKEN: &str = "x-trellis-workload-token";

/// Splits concatenated PEM certificates into one string each, as Istio answers.
fn pem_blocks(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .map(str::trim)
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{b}\n"))
        .collect()
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let headers = request.metadata().clone().into_headers();
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let forwarded = headers
            .get(FORWARDED_TOKEN)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let caller = self
            .auth
            .csr_caller(bearer(&headers), peer.as_ref())
            .inspect_err(|e| self.metrics.refused(e.code()))?;
        let remote = peer
            .and_then(|p| p.remote)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        let req = request.into_inner();
        let ttl =
            (req.validity_duration > 0).then(|| Duration::from_secs(req.validity_duration as u64));
        let how = match caller {
            CsrCaller::Proven(_) => "csr",
            CsrCaller::Join(_) => "join",
        };
        let cert = match caller {
            CsrCaller::Proven(caller) => match (&caller.relay_of, &forwarded) {
                // A relay asking for one of its sidecars: the sidecar's own token decides
                // the identity, so a relay cannot mint certificates for whomever it likes.
                (Some(cluster), Some(token)) => {
                    let id = self.auth.workload_identity(token)?;
                    let who = format!("{id} via the relay of cluster {cluster} from {remote}");
                    self.authority
                        .sign_csr(&req.csr, &id, ttl, &who)
                        .map_err(csr_status)
                }
                _ => {
                    let who = format!("{} by {} from {remote}", caller.identity, caller.via);
                    self.authority
                        .sign_csr(&req.csr, &caller.identity, ttl, &who)
                        .map_err(csr_status)
                }
            },
            CsrCaller::Join(join) => self.join(join, &req.csr, ttl, &remote),
        }
        .inspect_err(|e| self.metrics.refused(e.code()))?;
        self.metrics
            .ca_issued
            .get_or_create(&HowLabel { how })
            .inc();
        let mut cert_chain = pem_blocks(&cert.chain_pem);
        cert_chain.push(cert.root_pem.clone());
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

fn csr_status(e: CaError) -> Status {
    match e {
        CaError::CsrIdentity { .. } => Status::permission_denied(e.to_string()),
        e => Status::invalid_argument(e.to_string()),
    }
}

impl CaService {
    /// A relay joining: the CSR is checked first, so a wrong or malformed request leaves
    /// the one-time token usable for an honest retry; then the token is redeemed (on disk
    /// before anything is returned), the CSR signed and the member cluster recorded.
    fn join(
        &self,
        join: JoinRequest,
        csr: &str,
        ttl: Option<Duration>,
        remote: &str,
    ) -> Result<IssuedCert, Status> {
        self.authority
            .check_csr(csr, &join.identity)
            .inspect_err(|e| {
                tracing::warn!(
                    target: "trellis::audit",
                    identity = %join.identity,
                    cluster = %join.cluster,
                    jti = %join.jti,
                    remote,
                    reason = %e,
                    "join refused: the token stays unused"
                )
            })
            .map_err(|e| match e {
                CaError::CsrIdentity { .. } => Status::permission_denied(format!(
                    "the join token of cluster {:?} only gets a certificate for {}: {e}",
                    join.cluster, join.identity
                )),
                e => Status::invalid_argument(e.to_string()),
            })?;
        self.authority
            .tokens()
            .redeem(&join.token, TokenKind::Join)
            .map_err(|e| match e {
                CaError::Io { .. } | CaError::State { .. } => {
                    tracing::error!(cluster = %join.cluster, error = %e, "cannot record a join token's redemption");
                    Status::internal(format!("cannot record the join: {e}"))
                }
                e => Status::unauthenticated(format!("join token refused: {e}")),
            })?;
        let who = format!("{} by join token {} from {remote}", join.identity, join.jti);
        // From here on the token is spent: a failure needs a new token, so say so.
        let spent = |what: String| {
            tracing::error!(cluster = %join.cluster, jti = %join.jti, error = %what, "join failed after its token was redeemed");
            Status::internal(format!(
                "{what}; the join token is used up, make a new one (xds-server cluster join-token)"
            ))
        };
        let cert = self
            .authority
            .sign_csr(csr, &join.identity, ttl, &who)
            .map_err(|e| spent(format!("cannot sign the relay's certificate: {e}")))?;
        let member = MemberCluster {
            name: join.cluster.clone(),
            network: join.network,
            region: join.region,
            zone: join.zone,
            relay_identity: join.identity.uri(),
            joined_at: cert_authority::rfc3339(SystemTime::now()),
        };
        let previous = self.auth.clusters().join(member.clone()).map_err(|e| {
            spent(format!(
                "cannot record member cluster {:?}: {e}",
                join.cluster
            ))
        })?;
        match previous {
            Some(old) => tracing::warn!(
                cluster = %member.name,
                network = %member.network,
                previous_joined_at = %old.joined_at,
                previous_network = %old.network,
                remote,
                "member cluster joined again with a new token (relay reinstalled?): its record is replaced"
            ),
            None => tracing::info!(
                cluster = %member.name,
                network = %member.network,
                region = ?member.region,
                zone = ?member.zone,
                relay = %member.relay_identity,
                remote,
                "member cluster joined"
            ),
        }
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pem_blocks_split_a_chain() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let blocks = super::pem_blocks(&format!("{a}{b}"));
        assert_eq!(blocks, vec![a.to_string(), b.to_string()]);
    }
}
