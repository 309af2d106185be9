//! gRPC framing for the ADS streams without a per-stream copy of responses.
//!
//! A response is a 5-byte gRPC prefix plus the per-stream header, then the body that
//! every stream of a proxy class shares: the body `Bytes` goes to HTTP/2 as is, so ten
//! thousand streams sending one 40 KB snapshot hold one 40 KB buffer, not ten thousand.
//! Requests are decoded from a buffer that is released after each message, so an idle
//! stream does not keep the capacity of the largest ACK it ever sent.

use super::codec::Frame;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body;
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

/// Streamed response: messages from the stream task, then `grpc-status` trailers.
pub struct ResponseBody {
    rx: mpsc::Receiver<Result<Frame, Status>>,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl ResponseBody {
    pub fn new(rx: mpsc::Receiver<Result<Frame, Status>>) -> Self {
        Self {
            rx,
            pending: VecDeque::new(),
            done: false,
        }
    }
}

fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::Internal as i32),
        );
    }
    map
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(b) = self.pending.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.len();
                let mut parts = frame.parts.into_iter();
                let head = parts.next().unwrap_or_default();
                let mut first = BytesMut::with_capacity(5 + head.len());
                first.put_u8(0);
                first.put_u32(len as u32);
                first.put_slice(&head);
                self.pending.extend(parts.filter(|p| !p.is_empty()));
                Poll::Ready(Some(Ok(http_body::Frame::data(first.freeze()))))
            }
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers(&status)))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers(&Status::ok(
                    "",
                ))))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Status>;

/// Decodes the length-prefixed messages of a gRPC request body.
pub struct RequestReader<M> {
    body: BoxBody,
    buf: BytesMut,
    /// Requests larger than this are refused (`NetLimits::max_request_bytes`).
    max_bytes: usize,
    _m: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> RequestReader<M> {
    pub fn new<B>(body: B, max_bytes: usize) -> Self
    where
        B: Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body = body
            .map_frame(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
            .map_err(|e| Status::from_error(e.into()))
            .boxed_unsync();
        Self {
            body,
            buf: BytesMut::new(),
            max_bytes,
            _m: PhantomData,
        }
    }

    /// The next message, `None` at the end of the request stream.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Err(Status::unimplemented(
                        "compressed xDS requests are not supported",
                    ));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.max_bytes {
                    return Err(Status::resource_exhausted(format!(
                        "xDS request of {len} bytes exceeds the limit of {} bytes (--max-request-bytes)",
                        self.max_bytes
                    )));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len);
                    if self.buf.is_empty() {
                        // Drop the allocation: idle streams should not pin their largest request.
                        self.buf = BytesMut::new();
                    }
                    return M::decode(msg).map(Some).map_err(|e| {
                        Status::invalid_argument(format!("malformed xDS request: {e}"))
                    });
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(e),
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(Status::invalid_argument(
                        "xDS request stream ended inside a message",
                    ))
                }
            }
        }
    }
}
