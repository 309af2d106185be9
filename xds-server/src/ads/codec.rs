//! A gRPC codec whose outgoing messages are pre-encoded fragments.
//!
//! tonic's prost codec would re-encode every `DiscoveryResponse` per stream; here a
//! response is a list of `Bytes` (per-stream header + resource fragments shared by all
//! streams), so sending costs one copy into the HTTP/2 buffer and no protobuf work.

use bytes::{BufMut, Bytes};
use std::marker::PhantomData;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// One outgoing message: the concatenation of `parts` is its protobuf encoding.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub parts: Vec<Bytes>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
pub struct FrameCodec<D>(PhantomData<fn() -> D>);

impl<D> Default for FrameCodec<D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<D: prost::Message + Default + Send + 'static> Codec for FrameCodec<D> {
    type Encode = Frame;
    type Decode = D;
    type Encoder = FrameEncoder;
    type Decoder = MessageDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        for p in &item.parts {
            dst.put_slice(p);
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct MessageDecoder<D>(PhantomData<fn() -> D>);

impl<D: prost::Message + Default> Decoder for MessageDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))
    }
}
