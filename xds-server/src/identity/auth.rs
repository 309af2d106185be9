//! Who is calling on the secure port.

use crate::ads::{Authenticate, Caller};
use crate::clusters::{self, MemberClusters};
use cert_authority::{Authority, CaError, SpiffeId, TokenClaims, TokenKind};
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::Status;

/// What the TLS handshake established about the peer; tonic puts it in every request's
/// extensions (see [`super::tls::TlsConn`]).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE id of a client certificate that verified against the trust bundle.
    pub identity: Option<SpiffeId>,
    /// The connection's stream count (idle connections are closed, see `crate::net`).
    pub conn: Option<Arc<crate::net::ConnState>>,
}

pub struct Authenticator {
    authority: Authority,
    clusters: Arc<MemberClusters>,
}

/// Who asks `CreateCertificate` for a certificate.
#[derive(Debug)]
pub enum CsrCaller {
    /// A proven identity (client certificate or workload token): signs CSRs for itself.
    Proven(Caller),
    /// A relay joining with a one-time join token, checked but not yet redeemed.
    Join(JoinRequest),
}

/// A join token that verified, and what it says about the joining cluster.
#[derive(Debug)]
pub struct JoinRequest {
    /// The token as presented: redeemed only once the CSR is known to be acceptable.
    pub token: String,
    /// The relay identity the token is for; the only identity it can get a certificate for.
    pub identity: SpiffeId,
    pub cluster: String,
    pub network: String,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub jti: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("trust_domain", &self.authority.trust_domain())
            .finish()
    }
}

impl Authenticator {
    pub fn new(authority: Authority, clusters: Arc<MemberClusters>) -> Self {
        Self {
            authority,
            clusters,
        }
    }

    /// A verified client certificate wins; otherwise a workload token must be presented.
    /// A certificate of a joined cluster's relay makes a relay caller.
    pub fn caller(&self, bearer: Option<&str>, peer: Option<&PeerInfo>) -> Result<Caller, Status> {
        if let Some(id) = peer.and_then(|p| p.identity.clone()) {
            let relay_of = self.clusters.relay_of(&id);
            return Ok(Caller {
                identity: id,
                via: "certificate",
                relay_of,
            });
        }
        let Some(token) = bearer else {
            return Err(Status::unauthenticated(
                "no client certificate and no bearer token: the secure port needs one \
                 (make a token with `xds-server token create --identity NS/SA`)",
            ));
        };
        let claims = self
            .authority
            .tokens()
            .verify(token, TokenKind::Workload)
            .map_err(|e| match e {
                CaError::TokenKind {
                    got: TokenKind::Join,
                    ..
                } => Status::unauthenticated(
                    "a join token only works for CreateCertificate: a relay joins with it \
                     once, then authenticates with the certificate it got",
                ),
                e => Status::unauthenticated(format!("bearer token refused: {e}")),
            })?;
        let id = self.token_identity(&claims)?;
        // Relay identities come from joins only, so that a relay identity always stands
        // for a recorded member cluster.
        if clusters::relay_cluster_name(&id).is_some() {
            return Err(Status::unauthenticated(format!(
                "bearer token refused: {id} is a relay identity; relays get theirs with a \
                 join token (xds-server cluster join-token), not a workload token"
            )));
        }
        Ok(Caller {
            identity: id,
            via: "token",
            relay_of: None,
        })
    }

    /// For `CreateCertificate`: like [`Authenticator::caller`], and a join token (with no
    /// client certificate) makes a [`JoinRequest`]. The join token is only verified here;
    /// the CA service redeems it once the CSR passed.
    pub fn csr_caller(
        &self,
        bearer: Option<&str>,
        peer: Option<&PeerInfo>,
    ) -> Result<CsrCaller, Status> {
        let has_cert = peer.is_some_and(|p| p.identity.is_some());
        let Some(token) = bearer.filter(|_| !has_cert) else {
            return self.caller(bearer, peer).map(CsrCaller::Proven);
        };
        let claims = match self.authority.tokens().verify(token, TokenKind::Join) {
            Ok(claims) => claims,
            Err(CaError::TokenKind {
                got: TokenKind::Workload,
                ..
            }) => return self.caller(bearer, peer).map(CsrCaller::Proven),
            Err(e) => {
                return Err(Status::unauthenticated(format!(
                    "bearer token refused: {e}"
                )))
            }
        };
        let identity = self.token_identity(&claims)?;
        self.join_request(token, identity, claims)
            .map(CsrCaller::Join)
            .map_err(|why| Status::unauthenticated(format!("join token refused: {why}")))
    }

    fn token_identity(&self, claims: &TokenClaims) -> Result<SpiffeId, Status> {
        let id = claims
            .identity()
            .map_err(|e| Status::unauthenticated(format!("bearer token refused: {e}")))?;
        if id.trust_domain != self.authority.trust_domain() {
            return Err(Status::unauthenticated(format!(
                "bearer token is for trust domain {:?}, this mesh is {:?}",
                id.trust_domain,
                self.authority.trust_domain()
            )));
        }
        Ok(id)
    }

    /// The cluster a join token describes. `xds-server cluster join-token` only makes
    /// consistent tokens; this guards against any other token signed with the same key.
    fn join_request(
        &self,
        token: &str,
        identity: SpiffeId,
        claims: TokenClaims,
    ) -> Result<JoinRequest, String> {
        let claim = |name: &str| claims.extra.get(name).cloned();
        let cluster = claim(clusters::CLAIM_CLUSTER)
            .ok_or_else(|| format!("it has no {:?} claim", clusters::CLAIM_CLUSTER))?;
        clusters::check_cluster_name(&cluster).map_err(|e| e.to_string())?;
        let expected = clusters::relay_identity(&identity.trust_domain, &cluster);
        if identity != expected {
            return Err(format!(
                "its subject {identity} is not {expected}, the relay identity of cluster {cluster:?}"
            ));
        }
        let network = claim(clusters::CLAIM_NETWORK).unwrap_or_else(|| cluster.clone());
        clusters::check_label("network", &network).map_err(|e| e.to_string())?;
        let region = claim(clusters::CLAIM_REGION);
        let zone = claim(clusters::CLAIM_ZONE);
        for (what, value) in [("region", &region), ("zone", &zone)] {
            if let Some(v) = value {
                clusters::check_label(what, v).map_err(|e| e.to_string())?;
            }
        }
        Ok(JoinRequest {
            token: token.to_string(),
            identity,
            cluster,
            network,
            region,
            zone,
            jti: claims.jti,
        })
    }

    /// The identity a workload token proves (signature, kind, expiry, trust domain).
    pub fn workload_identity(&self, token: &str) -> Result<SpiffeId, Status> {
        let claims = self
            .authority
            .tokens()
            .verify(token, TokenKind::Workload)
            .map_err(|e| {
                Status::unauthenticated(format!("forwarded workload token refused: {e}"))
            })?;
        let id = self.token_identity(&claims)?;
        if clusters::relay_cluster_name(&id).is_some() {
            // Relay identities come only from joining.
            return Err(Status::permission_denied(format!(
                "a forwarded workload token cannot be for the relay identity {id}"
            )));
        }
        Ok(id)
    }

    /// The member clusters this authenticator recognises relays of.
    pub fn clusters(&self) -> &Arc<MemberClusters> {
        &self.clusters
    }
}

/// `authorization: Bearer TOKEN`, as Envoy's `initial_metadata` and Istio agents send it.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

impl Authenticate for Authenticator {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        self.caller(bearer(headers), extensions.get::<PeerInfo>())
    }
}
