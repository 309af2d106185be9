//! One Envoy resource, encoded once and shared by every stream that sends it.
//!
//! Besides the message bytes, a resource keeps the two wire fragments the ADS streams
//! need: the `resources` field of a SotW `DiscoveryResponse` (an `Any`) and of a
//! `DeltaDiscoveryResponse` (a `Resource` with name and version). Protobuf lets a message
//! be the concatenation of its fields, so a response is these shared fragments plus a
//! few per-stream bytes (version, nonce); no stream ever re-encodes a resource.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use std::collections::BTreeMap;
use std::sync::Arc;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum TypeKind {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl TypeKind {
    /// Make-before-break order for pushes on one ADS stream: a cluster exists before
    /// its endpoints and before any route points at it; a listener before its routes.
    pub const PUSH_ORDER: [TypeKind; 5] = [
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Listener,
        TypeKind::Route,
        TypeKind::Secret,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            TypeKind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            TypeKind::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            TypeKind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            TypeKind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            TypeKind::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
        }
    }

    pub fn from_type_url(url: &str) -> Option<TypeKind> {
        TypeKind::PUSH_ORDER
            .into_iter()
            .find(|k| k.type_url() == url)
    }

    pub fn short(self) -> &'static str {
        match self {
            TypeKind::Cluster => "cds",
            TypeKind::Endpoint => "eds",
            TypeKind::Listener => "lds",
            TypeKind::Route => "rds",
            TypeKind::Secret => "sds",
        }
    }

    /// Types Envoy requests with an empty name list meaning "everything" (wildcard).
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, TypeKind::Cluster | TypeKind::Listener)
    }
}

#[derive(Debug)]
pub struct Resource {
    pub kind: TypeKind,
    pub name: Arc<str>,
    /// Content hash of the encoded message: equal bytes, equal version, across restarts.
    pub version: Arc<str>,
    /// The encoded resource message itself.
    pub body: Bytes,
    /// `resources` field (2) of a SotW DiscoveryResponse holding this resource as an Any.
    pub sotw_field: Bytes,
    /// `resources` field (2) of a DeltaDiscoveryResponse holding this resource.
    pub delta_field: Bytes,
}

fn len_delimited(buf: &mut BytesMut, tag: u32, data: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(data.len() as u64, buf);
    buf.put_slice(data);
}

fn len_delimited_size(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

impl Resource {
    pub fn new<M: prost::Message>(
        kind: TypeKind,
        name: impl Into<Arc<str>>,
        msg: &M,
    ) -> Arc<Resource> {
        Self::from_body(kind, name.into(), Bytes::from(msg.encode_to_vec()))
    }

    pub fn from_body(kind: TypeKind, name: Arc<str>, body: Bytes) -> Arc<Resource> {
        let version: Arc<str> = Arc::from(format!("{:016x}", xxh3_64(&body)));
        let type_url = kind.type_url().as_bytes();

        // google.protobuf.Any { type_url = 1; value = 2; }
        let any_len = len_delimited_size(1, type_url.len()) + len_delimited_size(2, body.len());
        let mut any = BytesMut::with_capacity(any_len);
        len_delimited(&mut any, 1, type_url);
        len_delimited(&mut any, 2, &body);

        let mut sotw = BytesMut::with_capacity(len_delimited_size(2, any.len()));
        len_delimited(&mut sotw, 2, &any);

        // envoy.service.discovery.v3.Resource { version = 1; resource = 2; name = 3; }
        let mut res = BytesMut::with_capacity(
            len_delimited_size(1, version.len())
                + len_delimited_size(2, any.len())
                + len_delimited_size(3, name.len()),
        );
        len_delimited(&mut res, 3, name.as_bytes());
        len_delimited(&mut res, 1, version.as_bytes());
        len_delimited(&mut res, 2, &any);
        let mut delta = BytesMut::with_capacity(len_delimited_size(2, res.len()));
        len_delimited(&mut delta, 2, &res);

        Arc::new(Resource {
            kind,
            name,
            version,
            body,
            sotw_field: sotw.freeze(),
            delta_field: delta.freeze(),
        })
    }
}

/// All resources of one type for one proxy class, by name, with a version that changes
/// exactly when any member's content or the membership changes.
#[derive(Debug, Default)]
pub struct ResourceSet {
    pub map: BTreeMap<Arc<str>, Arc<Resource>>,
    pub version: u64,
}

impl ResourceSet {
    pub fn new(resources: impl IntoIterator<Item = Arc<Resource>>) -> Arc<ResourceSet> {
        let map: BTreeMap<Arc<str>, Arc<Resource>> =
            resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut h = Xxh3::new();
        for (name, r) in &map {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
        }
        Arc::new(ResourceSet {
            version: h.digest(),
            map,
        })
    }

    pub fn empty() -> Arc<ResourceSet> {
        ResourceSet::new(std::iter::empty())
    }
}

/// Write helpers for the per-stream parts of responses.
pub mod wire {
    use super::*;

    pub fn string_field(buf: &mut BytesMut, tag: u32, s: &str) {
        if !s.is_empty() {
            len_delimited(buf, tag, s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse,
    };
    use prost::Message;

    #[test]
    fn fragments_decode_as_the_messages_they_claim_to_be() {
        let c = Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let r = Resource::new(TypeKind::Cluster, c.name.clone(), &c);
        let sotw = DiscoveryResponse::decode(r.sotw_field.clone()).unwrap();
        assert_eq!(sotw.resources.len(), 1);
        assert_eq!(sotw.resources[0].type_url, TypeKind::Cluster.type_url());
        assert_eq!(
            Cluster::decode(sotw.resources[0].value.as_slice()).unwrap(),
            c
        );

        let delta = DeltaDiscoveryResponse::decode(r.delta_field.clone()).unwrap();
        assert_eq!(delta.resources[0].name, c.name);
        assert_eq!(delta.resources[0].version, &*r.version);
        let any = delta.resources[0].resource.as_ref().unwrap();
        assert_eq!(Cluster::decode(any.value.as_slice()).unwrap(), c);
    }

    #[test]
    fn versions_follow_content() {
        let a = Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let b = Cluster {
            name: "b".into(),
            ..Default::default()
        };
        let r1 = Resource::new(TypeKind::Cluster, "a", &a);
        let r2 = Resource::new(TypeKind::Cluster, "a", &a);
        let r3 = Resource::new(TypeKind::Cluster, "a", &b);
        assert_eq!(r1.version, r2.version);
        assert_ne!(r1.version, r3.version);
        let s1 = ResourceSet::new([r1.clone()]);
        let s2 = ResourceSet::new([r2]);
        let s3 = ResourceSet::new([r1, r3.clone()]);
        assert_eq!(s1.version, s2.version);
        assert_ne!(s1.version, s3.version);
    }
}
