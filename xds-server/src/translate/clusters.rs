use super::{ads, any, duration, inbound_cluster_name, outbound_cluster_name, tls};
use crate::mesh::{MeshState, Service, ServicePortInfo, Workload};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    address::Address as AddressKind, socket_address::PortSpecifier, Address, Http2ProtocolOptions,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

fn lb_policy(name: Option<&str>) -> LbPolicy {
    match name {
        Some("LEAST_REQUEST") | Some("LEAST_CONN") => LbPolicy::LeastRequest,
        Some("RANDOM") => LbPolicy::Random,
        _ => LbPolicy::RoundRobin,
    }
}

fn h2_options(cluster: &mut Cluster) {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    };
    // A single-entry map, so the encoding (and thus the content-hash version) is deterministic.
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        any(&opts),
    );
}

/// Passive health checking, so that failing endpoints stop getting traffic and, once the
/// proxy's own cluster has too few healthy ones, EDS priority 1 (other clusters) takes
/// over. What makes that work in Envoy:
/// - A connection refused, reset or timed out counts as a 503 (local-origin errors are
///   not split off), so an endpoint that is gone is ejected after 3 consecutive gateway
///   failures; Envoy's default enforcement of that detector is 0 %, hence 100 here. App
///   5xx eject after 5 (Envoy's default, stated).
/// - `max_ejection_percent` 100: with Envoy's default 10 % a cluster's last local
///   endpoints could never all be ejected, and traffic would never fail over.
/// - Ejected endpoints are unhealthy for the priority load: priority 0 keeps
///   `1.4 x healthy share` of the traffic (the default overprovisioning factor), so it
///   spills to priority 1 in proportion once less than ~71 % of it is healthy, and
///   entirely when none is. While priority 1 can take the rest, Envoy ignores the panic
///   threshold; the default (50 %) is kept so that a cluster whose endpoints are all
///   ejected still sends to them rather than failing every request.
/// - The success-rate detector (on by default) is statistical, needs 5 hosts and 100
///   requests per interval, and would eject by comparison with peers: off.
///
/// Ejections are checked every second and last 30 s, growing with repeated ejections.
fn outlier_detection() -> OutlierDetection {
    let n = |value| Some(UInt32Value { value });
    OutlierDetection {
        consecutive_5xx: n(5),
        consecutive_gateway_failure: n(3),
        enforcing_consecutive_gateway_failure: n(100),
        enforcing_success_rate: n(0),
        interval: Some(duration(std::time::Duration::from_secs(1))),
        base_ejection_time: Some(duration(std::time::Duration::from_secs(30))),
        max_ejection_percent: n(100),
        ..Default::default()
    }
}

/// A service port's cluster before TLS: EDS for IP endpoints, else what its resolution
/// asks for (`external.rs`), with the load balancer and passive health checks.
fn base_cluster(
    mesh: &MeshState,
    svc: &Service,
    port: &ServicePortInfo,
    subset_labels: Option<&BTreeMap<String, String>>,
    name: String,
    lb: Option<&str>,
) -> Cluster {
    let mut c = super::external::cluster(mesh, svc, port, subset_labels, name.clone())
        .unwrap_or_else(|| Cluster {
            name,
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            }),
            connect_timeout: Some(duration(mesh.connect_timeout)),
            ..Default::default()
        });
    // A passthrough cluster picks its one host itself.
    if c.lb_policy != LbPolicy::ClusterProvided as i32 {
        c.lb_policy = lb_policy(lb) as i32;
        c.outlier_detection = Some(outlier_detection());
    }
    if port.protocol.is_h2() {
        h2_options(&mut c);
    }
    c
}

/// One EDS cluster per port of a service, plus one per DestinationRule subset, as
/// proxies without an identity get them: plaintext.
pub fn service_clusters(mesh: &MeshState, svc: &Service) -> Vec<Cluster> {
    build_service_clusters(mesh, svc, false)
}

/// The same clusters (same names, same order) for proxies with an identity: with the
/// client side of mutual TLS where automatic mTLS or the DestinationRule asks for it.
pub fn service_clusters_with_identity(mesh: &MeshState, svc: &Service) -> Vec<Cluster> {
    build_service_clusters(mesh, svc, true)
}

fn build_service_clusters(mesh: &MeshState, svc: &Service, identity: bool) -> Vec<Cluster> {
    let mut out = Vec::new();
    let dr = mesh.destination_rules.get(&svc.fqdn);
    let default_lb = dr.and_then(|d| d.lb.as_deref());
    let mut push = |p: &ServicePortInfo, subset: Option<&str>, lb: Option<&str>| {
        let labels = subset
            .and_then(|s| dr.and_then(|d| d.subsets.get(s)))
            .map(|s| &s.labels);
        let name = outbound_cluster_name(p.number, subset, &svc.fqdn);
        let mut c = base_cluster(mesh, svc, p, labels, name, lb);
        if identity {
            tls::secure_cluster(mesh, svc, p, subset, &mut c);
        }
        out.push(c);
    };
    for p in &svc.ports {
        push(p, None, default_lb);
        if let Some(dr) = dr {
            for (subset, info) in &dr.subsets {
                push(p, Some(subset), info.lb.as_deref().or(default_lb));
            }
        }
    }
    out
}

pub fn outbound_clusters(mesh: &MeshState) -> Vec<Cluster> {
    mesh.services
        .values()
        .flat_map(|s| service_clusters(mesh, s))
        .collect()
}

pub(crate) fn socket_address(ip: IpAddr, port: u32) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// Static clusters from the sidecar to its own application, one per inbound port.
pub fn inbound_clusters(mesh: &MeshState, w: &Workload) -> Vec<Cluster> {
    mesh.inbound_ports(w)
        .into_iter()
        .map(|(port, protocol)| {
            let name = inbound_cluster_name(port);
            let mut c = Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                    DiscoveryType::Static as i32,
                )),
                connect_timeout: Some(duration(mesh.connect_timeout)),
                load_assignment: Some(ClusterLoadAssignment {
                    cluster_name: name,
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![LbEndpoint {
                            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                                address: Some(socket_address(w.app_address, port)),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            if protocol.is_h2() {
                h2_options(&mut c);
            }
            c
        })
        .collect()
}
