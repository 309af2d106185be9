//! Just enough protobuf decoding for a simulated Envoy.
//!
//! A real Envoy decodes every resource; a load generator that did the same would spend
//! more CPU than the server it measures. The client only needs a response's type,
//! version, nonce and resource names (plus, for clusters, whether they use EDS and, for
//! listeners, the RDS names they reference), so this module walks the wire format with
//! `prost::encoding` primitives and borrows slices instead of building messages.

use prost::encoding::{decode_key, decode_varint, WireType};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("length-delimited field {tag} runs past the end of its message")]
    Truncated { tag: u32 },
    #[error("field {tag} is not valid UTF-8")]
    Utf8 { tag: u32 },
    #[error("groups are not supported (field {tag})")]
    Group { tag: u32 },
}

/// One top-level field of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed32 / fixed64: skipped, the client never needs them.
    Fixed,
}

/// Iterates the top-level fields of an encoded message without decoding nested ones.
pub struct Fields<'a> {
    buf: &'a [u8],
}

pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.step())
    }
}

impl<'a> Fields<'a> {
    fn step(&mut self) -> Result<(u32, Value<'a>), WireError> {
        let mut cur: &'a [u8] = self.buf;
        let result = (|| {
            let (tag, wt) = decode_key(&mut cur)?;
            let v = match wt {
                WireType::Varint => Value::Varint(decode_varint(&mut cur)?),
                WireType::LengthDelimited => {
                    let len = decode_varint(&mut cur)?;
                    let len = usize::try_from(len).map_err(|_| WireError::Truncated { tag })?;
                    if len > cur.len() {
                        return Err(WireError::Truncated { tag });
                    }
                    let (head, rest) = cur.split_at(len);
                    cur = rest;
                    Value::Bytes(head)
                }
                WireType::ThirtyTwoBit | WireType::SixtyFourBit => {
                    let n = if wt == WireType::ThirtyTwoBit { 4 } else { 8 };
                    if n > cur.len() {
                        return Err(WireError::Truncated { tag });
                    }
                    cur = &cur[n..];
                    Value::Fixed
                }
                WireType::StartGroup | WireType::EndGroup => return Err(WireError::Group { tag }),
            };
            Ok((tag, v))
        })();
        match result {
            Ok(r) => {
                self.buf = cur;
                Ok(r)
            }
            Err(e) => {
                // Stop iterating after an error.
                self.buf = &[];
                Err(e)
            }
        }
    }
}

fn utf8(tag: u32, b: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(b).map_err(|_| WireError::Utf8 { tag })
}

/// The first string field `tag` of a message, or "" if absent.
pub fn string_field(msg: &[u8], tag: u32) -> Result<&str, WireError> {
    for f in fields(msg) {
        if let (t, Value::Bytes(b)) = f? {
            if t == tag {
                return utf8(t, b);
            }
        }
    }
    Ok("")
}

/// `google.protobuf.Any { type_url = 1; value = 2; }`: the value bytes.
fn any_value(any: &[u8]) -> Result<&[u8], WireError> {
    for f in fields(any) {
        if let (2, Value::Bytes(b)) = f? {
            return Ok(b);
        }
    }
    Ok(&[])
}

/// `DiscoveryResponse { version_info = 1; resources = 2 (Any); type_url = 4; nonce = 5; }`
#[derive(Debug, Default)]
pub struct SotwResponse<'a> {
    pub version: &'a str,
    pub type_url: &'a str,
    pub nonce: &'a str,
    /// The whole message: [`SotwResponse::resources`] reads the resources from it only
    /// when asked (a push the client only ACKs never walks them).
    msg: &'a [u8],
}

impl<'a> SotwResponse<'a> {
    /// The encoded resources (the `value` of each Any).
    pub fn resources(&self) -> impl Iterator<Item = Result<&'a [u8], WireError>> + 'a {
        fields(self.msg).filter_map(|f| match f {
            Ok((2, Value::Bytes(b))) => Some(any_value(b)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    }
}

pub fn sotw_response(msg: &[u8]) -> Result<SotwResponse<'_>, WireError> {
    let mut r = SotwResponse {
        msg,
        ..Default::default()
    };
    for f in fields(msg) {
        match f? {
            (1, Value::Bytes(b)) => r.version = utf8(1, b)?,
            (4, Value::Bytes(b)) => r.type_url = utf8(4, b)?,
            (5, Value::Bytes(b)) => r.nonce = utf8(5, b)?,
            _ => {}
        }
    }
    Ok(r)
}

/// One `envoy.service.discovery.v3.Resource { version = 1; resource = 2 (Any); name = 3; }`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeltaResource<'a> {
    pub name: &'a str,
    pub version: &'a str,
    /// The encoded resource (value of the Any); empty if the server sent none.
    pub body: &'a [u8],
}

/// `DeltaDiscoveryResponse { system_version_info = 1; resources = 2; type_url = 4;
///  nonce = 5; removed_resources = 6; }`
#[derive(Debug, Default)]
pub struct DeltaResponse<'a> {
    pub system_version: &'a str,
    pub type_url: &'a str,
    pub nonce: &'a str,
    pub resources: Vec<DeltaResource<'a>>,
    pub removed: Vec<&'a str>,
}

fn delta_resource(msg: &[u8]) -> Result<DeltaResource<'_>, WireError> {
    let mut r = DeltaResource::default();
    for f in fields(msg) {
        match f? {
            (1, Value::Bytes(b)) => r.version = utf8(1, b)?,
            (2, Value::Bytes(b)) => r.body = any_value(b)?,
            (3, Value::Bytes(b)) => r.name = utf8(3, b)?,
            _ => {}
        }
    }
    Ok(r)
}

pub fn delta_response(msg: &[u8]) -> Result<DeltaResponse<'_>, WireError> {
    let mut r = DeltaResponse::default();
    for f in fields(msg) {
        match f? {
            (1, Value::Bytes(b)) => r.system_version = utf8(1, b)?,
            (2, Value::Bytes(b)) => r.resources.push(delta_resource(b)?),
            (4, Value::Bytes(b)) => r.type_url = utf8(4, b)?,
            (5, Value::Bytes(b)) => r.nonce = utf8(5, b)?,
            (6, Value::Bytes(b)) => r.removed.push(utf8(6, b)?),
            _ => {}
        }
    }
    Ok(r)
}

/// The name of a Cluster, ClusterLoadAssignment, Listener or RouteConfiguration: all
/// four keep it in field 1.
pub fn resource_name(body: &[u8]) -> Result<&str, WireError> {
    string_field(body, 1)
}

/// `Cluster { name = 1; type = 2 (DiscoveryType, EDS = 3); }`: the name and whether
/// the cluster's endpoints come from EDS.
pub fn cluster_summary(body: &[u8]) -> Result<(&str, bool), WireError> {
    let (mut name, mut eds) = ("", false);
    for f in fields(body) {
        match f? {
            (1, Value::Bytes(b)) => name = utf8(1, b)?,
            (2, Value::Varint(v)) => eds = v == 3,
            _ => {}
        }
    }
    Ok((name, eds))
}

const HCM_TYPE_SUFFIX: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// RDS route configuration names a Listener references:
/// `Listener.filter_chains(3) | default_filter_chain(25)` → `FilterChain.filters(3)` →
/// `Filter.typed_config(4)` (an Any holding an `HttpConnectionManager`) →
/// `HttpConnectionManager.rds(3)` → `Rds.route_config_name(2)`.
pub fn listener_rds_names(body: &[u8]) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    for f in fields(body) {
        let (3 | 25, Value::Bytes(chain)) = f? else {
            continue;
        };
        for f in fields(chain) {
            let (3, Value::Bytes(filter)) = f? else {
                continue;
            };
            for f in fields(filter) {
                let (4, Value::Bytes(any)) = f? else {
                    continue;
                };
                let mut is_hcm = false;
                let mut value: &[u8] = &[];
                for f in fields(any) {
                    match f? {
                        (1, Value::Bytes(b)) => is_hcm = utf8(1, b)?.ends_with(HCM_TYPE_SUFFIX),
                        (2, Value::Bytes(b)) => value = b,
                        _ => {}
                    }
                }
                if !is_hcm {
                    continue;
                }
                for f in fields(value) {
                    if let (3, Value::Bytes(rds)) = f? {
                        let name = string_field(rds, 2)?;
                        if !name.is_empty() {
                            out.push(name.to_string());
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Finds `prefix` followed by a decimal number in `body` and returns the largest such
/// number. Scenarios plant these markers in the mesh (an endpoint address
/// `127.254.H.L`, a route name `bench-seq-N`) to tell which change a client has seen.
pub fn max_marker(body: &[u8], prefix: &memchr::memmem::Finder<'_>, dotted: bool) -> Option<u64> {
    let mut best: Option<u64> = None;
    let n = prefix.needle().len();
    for pos in prefix.find_iter(body) {
        let rest = &body[pos + n..];
        let value = if dotted {
            // H.L → H * 256 + L
            let (h, n) = digits(rest);
            match rest.get(n) {
                Some(b'.') if n > 0 => {
                    let (l, m) = digits(&rest[n + 1..]);
                    (m > 0).then_some(h * 256 + l)
                }
                _ => None,
            }
        } else {
            let (v, n) = digits(rest);
            (n > 0).then_some(v)
        };
        if let Some(v) = value {
            best = Some(best.map_or(v, |b| b.max(v)));
        }
    }
    best
}

fn digits(b: &[u8]) -> (u64, usize) {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b.iter().take(12) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v * 10 + u64::from(c - b'0');
        n += 1;
    }
    (v, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager, Rds,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::{Message, Name};

    fn any<M: Message + Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn eds_cluster(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_response_fields_and_cluster_summaries() {
        let static_cluster = Cluster {
            name: "inbound|8080||".into(),
            ..Default::default()
        };
        let resp = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![any(&eds_cluster("outbound|8080||a")), any(&static_cluster)],
            type_url: Cluster::type_url(),
            nonce: "7".into(),
            ..Default::default()
        };
        let bytes = resp.encode_to_vec();
        let r = sotw_response(&bytes).unwrap();
        assert_eq!(r.version, "v1");
        assert_eq!(r.nonce, "7");
        assert_eq!(r.type_url, Cluster::type_url());
        let resources: Vec<&[u8]> = r.resources().collect::<Result<_, _>>().unwrap();
        assert_eq!(resources.len(), 2);
        assert_eq!(
            cluster_summary(resources[0]).unwrap(),
            ("outbound|8080||a", true)
        );
        assert_eq!(
            cluster_summary(resources[1]).unwrap(),
            ("inbound|8080||", false)
        );
    }

    #[test]
    fn delta_response_fields() {
        let cla = ClusterLoadAssignment {
            cluster_name: "outbound|8080||a".into(),
            ..Default::default()
        };
        let resp = DeltaDiscoveryResponse {
            system_version_info: "3".into(),
            resources: vec![Resource {
                name: "outbound|8080||a".into(),
                version: "abc".into(),
                resource: Some(any(&cla)),
                ..Default::default()
            }],
            type_url: ClusterLoadAssignment::type_url(),
            nonce: "9".into(),
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let bytes = resp.encode_to_vec();
        let r = delta_response(&bytes).unwrap();
        assert_eq!(r.system_version, "3");
        assert_eq!(r.nonce, "9");
        assert_eq!(r.removed, vec!["gone"]);
        assert_eq!(r.resources[0].name, "outbound|8080||a");
        assert_eq!(r.resources[0].version, "abc");
        assert_eq!(
            resource_name(r.resources[0].body).unwrap(),
            "outbound|8080||a"
        );
    }

    #[test]
    fn listener_rds_names_follow_the_hcm() {
        let hcm = HttpConnectionManager {
            stat_prefix: "outbound_8080".into(),
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "8080".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let l = Listener {
            name: "127.0.0.1_8080".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = l.encode_to_vec();
        assert_eq!(
            listener_rds_names(&bytes).unwrap(),
            vec!["8080".to_string()]
        );
        assert_eq!(resource_name(&bytes).unwrap(), "127.0.0.1_8080");
    }

    #[test]
    fn markers() {
        let max_marker = |body: &[u8], prefix: &[u8], dotted| {
            super::max_marker(body, &memchr::memmem::Finder::new(prefix), dotted)
        };
        assert_eq!(
            max_marker(b"x127.254.1.2y 127.254.0.9", b"127.254.", true),
            Some(258)
        );
        assert_eq!(max_marker(b"127.254.", b"127.254.", true), None);
        assert_eq!(
            max_marker(b"bench-seq-12 bench-seq-7", b"bench-seq-", false),
            Some(12)
        );
        assert_eq!(max_marker(b"nothing", b"bench-seq-", false), None);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let resp = DiscoveryResponse {
            version_info: "v1".into(),
            ..Default::default()
        };
        let bytes = resp.encode_to_vec();
        assert!(sotw_response(&bytes[..bytes.len() - 1]).is_err());
    }
}
