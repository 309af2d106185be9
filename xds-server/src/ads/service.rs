//! `envoy.service.discovery.v3.AggregatedDiscoveryService` as a plain HTTP/2 service:
//! tonic's transport serves it, but requests and responses bypass tonic's codec so
//! shared response bodies reach HTTP/2 without being copied per stream (see `grpc`).

use super::driver::{self, Protocol};
use super::grpc::{RequestReader, ResponseBody};
use super::{delta, sotw, AdsShared};
use cert_authority::SpiffeId;
use futures::future::BoxFuture;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream before the stream task waits for the proxy to read.
/// Small on purpose: waiting here is what lets newer snapshots supersede older ones.
const STREAM_BUFFER: usize = 2;

/// Who proved what on the secure port.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: SpiffeId,
    /// "certificate" or "token": how the identity was proved.
    pub via: &'static str,
    /// The member cluster whose relay this is: set for a client certificate of a joined
    /// cluster's relay identity (`…/ns/trellis-system/sa/relay-NAME`).
    pub relay_of: Option<String>,
}

/// Establishes the caller of a request on the secure port (client certificate or
/// bearer token); its error is the gRPC status to answer with.
pub trait Authenticate: Send + Sync + std::fmt::Debug {
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status>;
}

#[derive(Clone, Debug)]
pub struct AdsService {
    shared: Arc<AdsShared>,
    /// Set on the secure port: every stream must prove an identity.
    auth: Option<Arc<dyn Authenticate>>,
}

impl AdsService {
    /// The plaintext port: anyone may stream config, nobody gets secrets.
    pub fn new(shared: AdsShared) -> Self {
        Self {
            shared: Arc::new(shared),
            auth: None,
        }
    }

    /// The secure port: callers are authenticated and get their own secrets.
    pub fn secure(shared: AdsShared, auth: Arc<dyn Authenticate>) -> Self {
        Self {
            shared: Arc::new(shared),
            auth: Some(auth),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

fn start<P: Protocol + 'static, B>(
    shared: Arc<AdsShared>,
    caller: Option<Caller>,
    body: B,
    stream: Option<crate::net::StreamGuard>,
) -> http::Response<Body>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let max_bytes = shared.limits.max_request_bytes;
    tokio::spawn(async move {
        // The connection counts as busy (not idle) while the stream lives.
        let _stream = stream;
        driver::run::<P>(shared, caller, RequestReader::new(body, max_bytes), tx).await
    });
    let mut response = http::Response::new(Body::new(ResponseBody::new(rx)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl<B> tower_service::Service<http::Request<B>> for AdsService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let encoding = req
            .headers()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .filter(|v| *v != "identity")
            .map(str::to_owned);
        let path = req.uri().path().to_owned();
        let caller = self
            .auth
            .as_ref()
            .map(|a| a.authenticate(req.headers(), req.extensions()));
        let conn = req
            .extensions()
            .get::<crate::net::ConnInfo>()
            .map(|c| c.state.clone())
            .or_else(|| {
                req.extensions()
                    .get::<crate::identity::auth::PeerInfo>()
                    .and_then(|p| p.conn.clone())
            });
        let stream = conn.map(|c| c.stream());
        let body = req.into_body();
        Box::pin(async move {
            if let Some(enc) = encoding {
                return Ok(
                    Status::unimplemented(format!("grpc-encoding {enc} is not supported"))
                        .into_http(),
                );
            }
            let caller = match caller.transpose() {
                Ok(c) => c,
                Err(status) => {
                    shared.metrics.refused(status.code());
                    tracing::warn!(error = %status.message(), "ADS stream refused");
                    return Ok(status.into_http());
                }
            };
            Ok(match path.as_str() {
                SOTW_PATH => start::<sotw::Stream, B>(shared, caller, body, stream),
                DELTA_PATH => start::<delta::Stream, B>(shared, caller, body, stream),
                _ => Status::unimplemented(format!("unknown ADS method {path}")).into_http(),
            })
        })
    }
}
