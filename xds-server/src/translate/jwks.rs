//! Remote JWKS (`jwksUri: http(s)://...`): the sidecar's Envoy fetches the keys itself
//! through a cluster for the URI's authority, refetches them every
//! [`CACHE_DURATION`] and retries failed fetches. The control plane never fetches (no
//! outbound requests on users' behalf, no cache of other parties' keys to keep fresh);
//! istiod, by default, fetches and inlines instead.
//!
//! Which cluster: an `http://` URI whose host and port are a service's
//! (`outbound|PORT||HOST`, a ServiceEntry host not of `resolution: NONE`) goes through that service's cluster, so
//! an in-mesh key server is reached like any other call (mutual TLS, DestinationRule).
//! Anything else gets a dedicated `jwks|HOST|PORT` cluster: STRICT_DNS through
//! `MeshConfig.dnsResolvers` (STATIC for an IP literal), and for `https://` TLS with
//! SNI and a certificate checked against `MeshConfig.jwksCaCertificates` and the host
//! name. `https://` never reuses a service's cluster: Trellis' DestinationRules do not
//! originate TLS, so that cluster would speak plaintext to a TLS port.
//!
//! The dedicated clusters are mesh-wide (every sidecar gets every one that any
//! RequestAuthentication names): they are few, shared and cost nothing until used.

use super::{any, duration, external::dns_resolver_config, outbound_cluster_name};
use crate::config::request_authentication::{JwksSource, JwtRule, RemoteJwks as RemoteUri};
use crate::mesh::{MeshState, Resolution};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address::Address as AddressKind, data_source::Specifier, http_uri::HttpUpstreamType,
    socket_address::PortSpecifier, transport_socket::ConfigType as SocketConfig, Address,
    BackoffStrategy, DataSource, HttpUri, RetryPolicy, SocketAddress, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwksAsyncFetch, RemoteJwks,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// How long fetched keys are used before Envoy fetches them again: a rotated key is
/// picked up within this time.
pub const CACHE_DURATION: Duration = Duration::from_secs(5 * 60);
/// Istio's default for `JWTRule.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch, Envoy tries again this often until one succeeds.
const FAILED_REFETCH: Duration = Duration::from_secs(10);

/// The cluster a sidecar fetches `uri` through.
pub fn cluster_name(mesh: &MeshState, uri: &RemoteUri) -> String {
    if !uri.tls && service_port(mesh, uri) {
        return outbound_cluster_name(u32::from(uri.port), None, &uri.host);
    }
    dedicated_name(uri)
}

fn dedicated_name(uri: &RemoteUri) -> String {
    format!("jwks|{}|{}", uri.host, uri.port)
}

fn service_port(mesh: &MeshState, uri: &RemoteUri) -> bool {
    // An ORIGINAL_DST cluster (`resolution: NONE`) has no destination for a request
    // Envoy makes itself.
    mesh.services.get(&uri.host).is_some_and(|s| {
        s.resolution != Resolution::None && s.ports.iter().any(|p| p.number == u32::from(uri.port))
    })
}

/// The provider's key source for a remote `jwksUri`.
pub fn remote_jwks(mesh: &MeshState, rule: &JwtRule, uri: &RemoteUri) -> RemoteJwks {
    // Validated per document; the default stands in should one ever be unparsable.
    let timeout = rule
        .timeout
        .as_deref()
        .and_then(|t| crate::config::parse_duration(t).ok())
        .unwrap_or(DEFAULT_TIMEOUT);
    RemoteJwks {
        http_uri: Some(HttpUri {
            uri: uri.uri.to_string(),
            timeout: Some(duration(timeout)),
            http_upstream_type: Some(HttpUpstreamType::Cluster(cluster_name(mesh, uri))),
        }),
        cache_duration: Some(duration(CACHE_DURATION)),
        // Fetched when the listener is created, not on the first request, and refreshed
        // before the cache expires, so no request waits for a fetch. The listener
        // becomes ready once the first fetch has finished (fast_listener false): the
        // first requests are checked against real keys rather than refused while the
        // fetch is under way; an unreachable server delays it by the bounded retries.
        async_fetch: Some(JwksAsyncFetch {
            fast_listener: false,
            failed_refetch_duration: Some(duration(FAILED_REFETCH)),
        }),
        retry_policy: Some(RetryPolicy {
            retry_back_off: Some(BackoffStrategy {
                base_interval: Some(duration(Duration::from_millis(500))),
                max_interval: Some(duration(Duration::from_secs(5))),
            }),
            num_retries: Some(UInt32Value { value: 2 }),
            ..Default::default()
        }),
    }
}

/// The cluster of every remote `jwksUri` of the mesh, in policy order: JWT providers name
/// them, so listeners built for one mesh are only valid for another with the same list.
pub fn provider_clusters(mesh: &MeshState) -> Vec<String> {
    remote_uris(mesh)
        .map(|uri| cluster_name(mesh, &uri))
        .collect()
}

fn remote_uris(mesh: &MeshState) -> impl Iterator<Item = RemoteUri<'_>> {
    mesh.security
        .authentication
        .iter()
        .flat_map(|p| &p.spec.jwt_rules)
        .filter_map(|rule| match rule.jwks_source() {
            Ok(JwksSource::Remote(uri)) => Some(uri),
            _ => None,
        })
}

/// The dedicated clusters of every remote `jwksUri` any RequestAuthentication names,
/// sorted by name.
pub fn clusters(mesh: &MeshState) -> Vec<Cluster> {
    let mut out: BTreeMap<String, Cluster> = BTreeMap::new();
    for uri in remote_uris(mesh) {
        let name = cluster_name(mesh, &uri);
        if name == dedicated_name(&uri) && !out.contains_key(&name) {
            let c = cluster(mesh, &uri, name.clone());
            out.insert(name, c);
        }
    }
    out.into_values().collect()
}

fn cluster(mesh: &MeshState, uri: &RemoteUri, name: String) -> Cluster {
    let ip: Option<IpAddr> = uri.host.parse().ok();
    let mut c = Cluster {
        connect_timeout: Some(duration(mesh.connect_timeout)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(AddressKind::SocketAddress(SocketAddress {
                                address: uri.host.clone(),
                                port_specifier: Some(PortSpecifier::PortValue(u32::from(uri.port))),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        name,
        ..Default::default()
    };
    if ip.is_some() {
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
    } else {
        c.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
        c.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
        c.typed_dns_resolver_config = dns_resolver_config(mesh);
    }
    if uri.tls {
        c.transport_socket = Some(tls_socket(mesh, &uri.host, ip.is_some()));
    }
    c
}

/// TLS to a JWKS server: its chain must lead to a CA of the bundle and name the host
/// (Envoy checks no host name unless told to). No SNI for an IP literal (RFC 6066).
fn tls_socket(mesh: &MeshState, host: &str, ip: bool) -> TransportSocket {
    let san = SubjectAltNameMatcher {
        san_type: if ip { SanType::IpAddress } else { SanType::Dns } as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(host.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let context = UpstreamTlsContext {
        sni: if ip { String::new() } else { host.to_string() },
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: Some(ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(DataSource {
                        specifier: Some(Specifier::Filename(mesh.jwks_ca_certificates.clone())),
                        ..Default::default()
                    }),
                    match_typed_subject_alt_names: vec![san],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(SocketConfig::TypedConfig(any(&context))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::request_authentication::parse_remote as remote;

    #[test]
    fn dedicated_clusters_by_authority() {
        let mesh = MeshState::default();
        let https = remote("https://idp.example/jwks.json").unwrap();
        assert_eq!(cluster_name(&mesh, &https), "jwks|idp.example|443");
        let c = cluster(&mesh, &https, cluster_name(&mesh, &https));
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
        );
        assert!(c.transport_socket.is_some());
        let plain = remote("http://127.0.0.9:8080/jwks.json").unwrap();
        let c = cluster(&mesh, &plain, cluster_name(&mesh, &plain));
        assert_eq!(c.name, "jwks|127.0.0.9|8080");
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32))
        );
        assert!(c.transport_socket.is_none());
    }
}
