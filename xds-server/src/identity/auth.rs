//! Who is calling on the secure port.

use crate::ads::{Authenticate, Caller};
use cert_authority::{Authority, SpiffeId, TokenKind};
use std::net::SocketAddr;
use tonic::Status;

/// What the TLS handshake established about the peer; tonic puts it in every request's
/// extensions (see [`super::tls::TlsConn`]).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE id of a client certificate that verified against the trust bundle.
    pub identity: Option<SpiffeId>,
}

pub struct Authenticator {
    authority: Authority,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("trust_domain", &self.authority.trust_domain())
            .finish()
    }
}

impl Authenticator {
    pub fn new(authority: Authority) -> Self {
        Self { authority }
    }

    /// A verified client certificate wins; otherwise a workload token must be presented.
    pub fn caller(&self, bearer: Option<&str>, peer: Option<&PeerInfo>) -> Result<Caller, Status> {
        if let Some(id) = peer.and_then(|p| p.identity.clone()) {
            return Ok(Caller {
                identity: id,
                via: "certificate",
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
            .map_err(|e| Status::unauthenticated(format!("bearer token refused: {e}")))?;
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
        Ok(Caller {
            identity: id,
            via: "token",
        })
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
