//! The unit a stream task hands to the transport.

use bytes::Bytes;

/// One outgoing message: the concatenation of `parts` is its protobuf encoding. The
/// first part is the stream's own header fields; the rest are shared, pre-encoded
/// resource fragments that go to HTTP/2 without being copied.
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
