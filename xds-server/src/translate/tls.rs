//! Mutual TLS between sidecars: who has an identity, the TLS contexts of inbound
//! listeners (PeerAuthentication) and of outbound clusters (automatic mTLS and
//! DestinationRule `tls.mode`), and the endpoint metadata that drives automatic mTLS.
//!
//! Certificates are never inlined: contexts name the SDS secrets every proxy with an
//! identity receives on its ADS stream, `default` (its own chain and key) and `ROOTCA`
//! (the mesh trust bundle), as Istio names them. A proxy without an identity would wait
//! for those secrets forever, so nothing here is ever used for one (see `has_identity`).

use super::{ads, any};
use crate::config::model::{ClientTlsSettings, ClusterPolicy};
use crate::config::peer_authentication::MtlsMode;
use crate::mesh::{Endpoint, MeshState, Protocol, Service, ServicePortInfo};
use envoy_types::pb::envoy::config::cluster::v3::{cluster::TransportSocketMatch, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, transport_socket::ConfigType as SocketConfig, DataSource, Metadata,
    TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    certificate_validation_context::SystemRootCerts,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Istio's label for "this workload runs a sidecar with a mesh certificate".
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// SDS secret holding the proxy's own certificate chain and key.
pub const SECRET_CERTIFICATE: &str = "default";
/// SDS secret holding the mesh trust bundle.
pub const SECRET_ROOT_CA: &str = "ROOTCA";
/// Endpoint metadata namespace Envoy matches `transport_socket_matches` against.
const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";

/// Whether a workload (or inline endpoint) with these labels has a sidecar with an
/// identity: Istio's `security.istio.io/tlsMode: istio`.
pub fn has_identity(labels: &BTreeMap<String, String>) -> bool {
    labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

fn uri_matcher(pattern: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A ServiceEntry `subjectAltNames` entry: a URI SAN for a SPIFFE id (or any URI), a DNS
/// SAN for a name, as Istio reads them.
fn san_matcher(san: &str) -> SubjectAltNameMatcher {
    if san.contains("://") {
        return uri_matcher(MatchPattern::Exact(san.to_string()));
    }
    SubjectAltNameMatcher {
        san_type: SanType::Dns as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(san.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Any identity of this mesh: the peer's chain must end in `ROOTCA` and its URI SAN
/// must be in our trust domain (a bundle may hold other domains' roots).
fn trust_domain_matcher(mesh: &MeshState) -> SubjectAltNameMatcher {
    uri_matcher(MatchPattern::Prefix(format!(
        "spiffe://{}/",
        mesh.trust_domain
    )))
}

fn common_context(sans: Vec<SubjectAltNameMatcher>, alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(SECRET_CERTIFICATE)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(SECRET_ROOT_CA)),
                ..Default::default()
            },
        )),
        alpn_protocols: alpn.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn tls_socket<M: prost::Name>(context: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(SocketConfig::TypedConfig(any(context))),
    }
}

/// The server side of an inbound mTLS filter chain: the workload's certificate, a client
/// certificate required and issued by the mesh CA for this trust domain. HTTP ports
/// offer both HTTP versions over ALPN so the connection manager picks the caller's.
pub fn inbound_transport_socket(mesh: &MeshState, protocol: Protocol) -> TransportSocket {
    let alpn: &[&str] = if protocol.is_http() {
        &["h2", "http/1.1"]
    } else {
        &[]
    };
    tls_socket(&DownstreamTlsContext {
        common_tls_context: Some(common_context(vec![trust_domain_matcher(mesh)], alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    })
}

/// How an outbound cluster talks to its endpoints, for a proxy with an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plaintext: DestinationRule `tls.mode: DISABLE`, or a MESH_EXTERNAL service.
    Plaintext,
    /// Automatic mTLS: mTLS to endpoints labelled as having a sidecar, plaintext to the rest.
    Auto,
    /// DestinationRule `tls.mode: ISTIO_MUTUAL`: mTLS to every endpoint.
    IstioMutual,
    /// DestinationRule `tls.mode: SIMPLE` or `MUTUAL`: TLS with the rule's own files, for
    /// every proxy, identity or not (see [`origination_socket`]).
    Origination,
}

/// The cluster policy's `tls.mode` (already resolved over subset and port), else
/// automatic mTLS for services inside the mesh.
pub fn upstream_tls(svc: &Service, policy: &ClusterPolicy) -> UpstreamTls {
    match policy.tls.as_ref().map(ClientTlsSettings::mode) {
        Some("DISABLE") => UpstreamTls::Plaintext,
        Some("ISTIO_MUTUAL") => UpstreamTls::IstioMutual,
        Some("SIMPLE") | Some("MUTUAL") => UpstreamTls::Origination,
        _ if svc.mesh_internal => UpstreamTls::Auto,
        _ => UpstreamTls::Plaintext,
    }
}

/// `subjectAltNames` of a DestinationRule: a URI (SPIFFE id) when it has a scheme, an IP
/// address when it parses as one, a DNS name otherwise; each matched exactly.
fn san_matchers(sans: &[String]) -> Vec<SubjectAltNameMatcher> {
    sans.iter()
        .map(|s| {
            let san_type = if s.contains("://") {
                SanType::Uri
            } else if s.parse::<std::net::IpAddr>().is_ok() {
                SanType::IpAddress
            } else {
                SanType::Dns
            };
            SubjectAltNameMatcher {
                san_type: san_type as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(MatchPattern::Exact(s.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect()
}

fn file(path: &str) -> DataSource {
    DataSource {
        specifier: Some(Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// TLS origination (`SIMPLE`, `MUTUAL`) with files on the sidecar's host, as Istio's
/// sidecars read them, or with a credential's SDS secrets (`credentialName`, see
/// `super::credentials`): the server is verified against `caCertificates` (the system's
/// roots without it, as Istio does) and `subjectAltNames`, unless `insecureSkipVerify`.
pub fn origination_socket(t: &ClientTlsSettings, alpn: &[&str]) -> TransportSocket {
    let sans = san_matchers(&t.subject_alt_names);
    let verify = t.insecure_skip_verify != Some(true);
    let mutual = t.mode() == "MUTUAL";
    let common = match t.credential() {
        Some(name) => CommonTlsContext {
            tls_certificate_sds_secret_configs: if mutual {
                vec![sds(&super::credentials::certificate_secret(name))]
            } else {
                Vec::new()
            },
            validation_context_type: verify.then(|| {
                ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: sans,
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(
                            &super::credentials::ca_secret(name),
                        )),
                        ..Default::default()
                    },
                )
            }),
            ..Default::default()
        },
        None => CommonTlsContext {
            tls_certificates: match (&t.client_certificate, &t.private_key) {
                (Some(cert), Some(key)) if mutual => vec![TlsCertificate {
                    certificate_chain: Some(file(cert)),
                    private_key: Some(file(key)),
                    ..Default::default()
                }],
                _ => Vec::new(),
            },
            validation_context_type: verify.then(|| {
                ValidationContextType::ValidationContext(CertificateValidationContext {
                    trusted_ca: t.ca_certificates.as_deref().map(file),
                    system_root_certs: t.ca_certificates.is_none().then(SystemRootCerts::default),
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                })
            }),
            ..Default::default()
        },
    };
    tls_socket(&UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: alpn.iter().map(|p| p.to_string()).collect(),
            ..common
        }),
        sni: t.sni.clone().unwrap_or_default(),
        ..Default::default()
    })
}

/// Istio's SNI for mesh traffic, `outbound_.PORT_.SUBSET_.FQDN`: lets the server side
/// (and anything on the path) see which service and subset a connection is for.
pub fn outbound_sni(port: u32, subset: Option<&str>, fqdn: &str) -> String {
    format!("outbound_.{port}_.{}_.{fqdn}", subset.unwrap_or(""))
}

/// Who the cluster's peers may be: the SPIFFE ids of the workloads behind it. An inline
/// endpoint has no known service account, so any identity of the trust domain is
/// accepted for it; an empty list would switch SAN checks off, so it is never empty.
fn peer_identities(
    mesh: &MeshState,
    svc: &Service,
    eps: &[&Endpoint],
    mode: UpstreamTls,
) -> Vec<SubjectAltNameMatcher> {
    // The ServiceEntry says who its endpoints are: that replaces what the selected
    // workloads would tell.
    if !svc.subject_alt_names.is_empty() {
        return svc
            .subject_alt_names
            .iter()
            .map(|san| san_matcher(san))
            .collect();
    }
    let mut ids = BTreeSet::new();
    for e in eps {
        if mode == UpstreamTls::Auto && !has_identity(&e.labels) {
            continue;
        }
        match &e.service_account {
            Some(sa) => ids.insert(spiffe_id(&mesh.trust_domain, &svc.namespace, sa)),
            None => return vec![trust_domain_matcher(mesh)],
        };
    }
    if ids.is_empty() {
        return vec![trust_domain_matcher(mesh)];
    }
    ids.into_iter()
        .map(|id| uri_matcher(MatchPattern::Exact(id)))
        .collect()
}

fn upstream_socket(
    mesh: &MeshState,
    svc: &Service,
    target: (&ServicePortInfo, Option<&str>),
    mode: UpstreamTls,
    policy: &ClusterPolicy,
    alpn: &[&str],
) -> TransportSocket {
    let (port, subset) = target;
    let eps = mesh.subset_endpoints(svc, subset);
    // ISTIO_MUTUAL may name the server's identities and SNI itself.
    let rule = policy
        .tls
        .as_ref()
        .filter(|_| mode == UpstreamTls::IstioMutual);
    let sans = match rule.filter(|t| !t.subject_alt_names.is_empty()) {
        Some(t) => san_matchers(&t.subject_alt_names),
        None => peer_identities(mesh, svc, &eps, mode),
    };
    tls_socket(&UpstreamTlsContext {
        common_tls_context: Some(common_context(sans, alpn)),
        sni: rule
            .and_then(|t| t.sni.clone())
            .unwrap_or_else(|| outbound_sni(port.number, subset, &svc.fqdn)),
        ..Default::default()
    })
}

fn string_struct(fields: &[(&str, &str)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// Adds the client side of mTLS to an outbound cluster of a proxy with an identity.
/// Automatic mTLS is Istio's pair of socket matches: endpoints whose metadata says
/// `tlsMode: istio` get mTLS, every other endpoint plaintext.
pub fn secure_cluster(
    mesh: &MeshState,
    svc: &Service,
    target: (&ServicePortInfo, Option<&str>),
    policy: &ClusterPolicy,
    alpn: &[&str],
    cluster: &mut Cluster,
) {
    match upstream_tls(svc, policy) {
        UpstreamTls::Plaintext | UpstreamTls::Origination => {}
        UpstreamTls::IstioMutual => {
            cluster.transport_socket = Some(upstream_socket(
                mesh,
                svc,
                target,
                UpstreamTls::IstioMutual,
                policy,
                alpn,
            ));
        }
        UpstreamTls::Auto => {
            cluster.transport_socket_matches = vec![
                TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(string_struct(&[("tlsMode", "istio")])),
                    transport_socket: Some(upstream_socket(
                        mesh,
                        svc,
                        target,
                        UpstreamTls::Auto,
                        policy,
                        alpn,
                    )),
                },
                TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(TransportSocket {
                        name: "envoy.transport_sockets.raw_buffer".into(),
                        config_type: Some(SocketConfig::TypedConfig(any(&RawBuffer {}))),
                    }),
                },
            ];
        }
    }
}

/// Metadata for an endpoint that accepts mTLS on `port`: it has a sidecar with an
/// identity and its PeerAuthentication does not DISABLE mTLS there (as Istio does, so
/// automatic mTLS never sends TLS to a port that only takes plaintext). One shared EDS
/// set serves every proxy: clusters of proxies without identity have no socket matches,
/// so they ignore it.
pub fn endpoint_metadata(
    mesh: &MeshState,
    svc: &Service,
    e: &Endpoint,
    port: u32,
) -> Option<Metadata> {
    if !has_identity(&e.labels)
        || mesh
            .peer_authentication
            .mode(&svc.namespace, &e.labels, port)
            == MtlsMode::Disable
    {
        return None;
    }
    Some(Metadata {
        filter_metadata: HashMap::from([(
            SOCKET_MATCH_KEY.to_string(),
            string_struct(&[("tlsMode", "istio")]),
        )]),
        ..Default::default()
    })
}
