//! `envoy.service.discovery.v3.AggregatedDiscoveryService` as a plain HTTP/2 service:
//! tonic's transport serves it, but requests and responses bypass tonic's codec so
//! shared response bodies reach HTTP/2 without being copied per stream (see `grpc`).

use super::driver::{self, Protocol};
use super::grpc::{RequestReader, ResponseBody};
use super::{delta, sotw, AdsShared};
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

#[derive(Clone, Debug)]
pub struct AdsService {
    shared: Arc<AdsShared>,
}

impl AdsService {
    pub fn new(shared: AdsShared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

fn start<P: Protocol + 'static, B>(shared: Arc<AdsShared>, body: B) -> http::Response<Body>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(driver::run::<P>(shared, RequestReader::new(body), tx));
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
        let body = req.into_body();
        Box::pin(async move {
            if let Some(enc) = encoding {
                return Ok(
                    Status::unimplemented(format!("grpc-encoding {enc} is not supported"))
                        .into_http(),
                );
            }
            Ok(match path.as_str() {
                SOTW_PATH => start::<sotw::Stream, B>(shared, body),
                DELTA_PATH => start::<delta::Stream, B>(shared, body),
                _ => Status::unimplemented(format!("unknown ADS method {path}")).into_http(),
            })
        })
    }
}
