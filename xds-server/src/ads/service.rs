//! The gRPC plumbing of `envoy.service.discovery.v3.AggregatedDiscoveryService`, written
//! against tonic's server primitives so responses can use [`super::codec::FrameCodec`].

use super::codec::{Frame, FrameCodec};
use super::{delta, driver, sotw, AdsShared};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::future::BoxFuture;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

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

struct Sotw(Arc<AdsShared>);
struct Delta(Arc<AdsShared>);

type FrameStream = ReceiverStream<Result<Frame, Status>>;

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = Frame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<'static, Result<Response<FrameStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            tokio::spawn(driver::run::<sotw::Stream>(
                shared,
                request.into_inner(),
                tx,
            ));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = Frame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<'static, Result<Response<FrameStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            tokio::spawn(driver::run::<delta::Stream>(
                shared,
                request.into_inner(),
                tx,
            ));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
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
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(FrameCodec::<DiscoveryRequest>::default());
                Ok(grpc.streaming(Sotw(shared), req).await)
            }),
            DELTA_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(FrameCodec::<DeltaDiscoveryRequest>::default());
                Ok(grpc.streaming(Delta(shared), req).await)
            }),
            _ => {
                Box::pin(async move { Ok(Status::unimplemented("unknown ADS method").into_http()) })
            }
        }
    }
}
