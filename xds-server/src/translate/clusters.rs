use super::{ads, any, duration, inbound_cluster_name, outbound_cluster_name, tls};
use crate::mesh::{MeshState, Protocol, Service, ServicePortInfo, Workload};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster,
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

fn eds_cluster(mesh: &MeshState, name: String, lb: Option<&str>, protocol: Protocol) -> Cluster {
    let mut c = Cluster {
        name,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration(mesh.connect_timeout)),
        lb_policy: lb_policy(lb) as i32,
        ..Default::default()
    };
    if protocol.is_h2() {
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
        let mut c = eds_cluster(
            mesh,
            outbound_cluster_name(p.number, subset, &svc.fqdn),
            lb,
            p.protocol,
        );
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
