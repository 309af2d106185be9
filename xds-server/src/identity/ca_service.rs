//! Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate` on the secure port:
//! agents that keep their own keys send a CSR and get a chain back. The CSR may only
//! ask for the identity the caller proved.

use super::auth::{bearer, Authenticator, PeerInfo};
use crate::metrics::{HowLabel, Metrics};
use cert_authority::{Authority, CaError};
use std::sync::Arc;
use std::time::Duration;
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
        let caller = self
            .auth
            .caller(bearer(&headers), peer.as_ref())
            .inspect_err(|e| self.metrics.refused(e.code()))?;
        let req = request.into_inner();
        let ttl =
            (req.validity_duration > 0).then(|| Duration::from_secs(req.validity_duration as u64));
        let who = format!(
            "{} by {} from {}",
            caller.identity,
            caller.via,
            peer.and_then(|p| p.remote)
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into())
        );
        let cert = self
            .authority
            .sign_csr(&req.csr, &caller.identity, ttl, &who)
            .map_err(|e| match e {
                CaError::CsrIdentity { .. } => Status::permission_denied(e.to_string()),
                e => Status::invalid_argument(e.to_string()),
            })
            .inspect_err(|e| self.metrics.refused(e.code()))?;
        self.metrics
            .ca_issued
            .get_or_create(&HowLabel { how: "csr" })
            .inc();
        let mut cert_chain = pem_blocks(&cert.chain_pem);
        cert_chain.push(cert.root_pem.clone());
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
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
