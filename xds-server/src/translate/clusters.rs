use super::{ads, duration, inbound_cluster_name, outbound_cluster_name, tls, traffic_policy};
use crate::config::model::ClusterPolicy;
use crate::mesh::{MeshState, Service, ServicePortInfo, Workload};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{
        common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbPolicy,
    },
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address::Address as AddressKind, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use std::net::IpAddr;

/// An outbound cluster: Trellis's defaults, then the DestinationRule's `policy`.
///
/// The default passive health checking (`traffic_policy::default_outlier_detection`,
/// which a rule's `outlierDetection` overrides field by field) makes failing endpoints
/// stop getting traffic and, once the proxy's own cluster has too few healthy ones, EDS
/// priority 1 (other clusters) take over. What makes that work in Envoy:
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
///
/// A DNS or passthrough service's cluster comes from `external.rs` instead of EDS; a
/// passthrough cluster picks its one host itself, so it keeps `CLUSTER_PROVIDED` and no
/// health checking whatever the rule says.
fn base_cluster(
    mesh: &MeshState,
    svc: &Service,
    port: &ServicePortInfo,
    subset: Option<&str>,
    policy: &ClusterPolicy,
) -> Cluster {
    let name = outbound_cluster_name(port.number, subset, &svc.fqdn);
    let labels = subset
        .and_then(|s| mesh.destination_rules.get(&svc.fqdn)?.subsets.get(s))
        .map(|s| &s.labels);
    let mut c =
        super::external::cluster(mesh, svc, port, labels, name.clone()).unwrap_or_else(|| {
            Cluster {
                name,
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    eds_config: Some(ads()),
                    service_name: String::new(),
                }),
                connect_timeout: Some(duration(mesh.connect_timeout)),
                ..Default::default()
            }
        });
    let passthrough = c.lb_policy == LbPolicy::ClusterProvided as i32;
    c.lb_policy = LbPolicy::RoundRobin as i32;
    c.outlier_detection = Some(traffic_policy::default_outlier_detection());
    traffic_policy::apply(&mut c, policy, port.protocol);
    if super::endpoints::locality_weighted(svc, policy) {
        // `distribute`: EDS gives every locality a weight (see `locality.rs`).
        c.common_lb_config
            .get_or_insert_with(CommonLbConfig::default)
            .locality_config_specifier = Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
            LocalityWeightedLbConfig {},
        ));
    }
    if passthrough {
        c.lb_policy = LbPolicy::ClusterProvided as i32;
        c.lb_config = None;
        c.outlier_detection = None;
    }
    c
}

/// One EDS cluster per port of a service, plus one per DestinationRule subset, as
/// proxies without an identity get them: plaintext (or TLS origination with files; a
/// cluster whose TLS needs a credential's secrets is left out).
pub fn service_clusters(mesh: &MeshState, svc: &Service) -> Vec<Cluster> {
    build_service_clusters(mesh, svc, false)
}

/// The same clusters (same order, plus those using a credential) for proxies with an
/// identity: with the client side of mutual TLS where automatic mTLS or the
/// DestinationRule asks for it.
pub fn service_clusters_with_identity(mesh: &MeshState, svc: &Service) -> Vec<Cluster> {
    build_service_clusters(mesh, svc, true)
}

fn build_service_clusters(mesh: &MeshState, svc: &Service, identity: bool) -> Vec<Cluster> {
    let mut out = Vec::new();
    let subsets: Vec<&String> = mesh
        .destination_rules
        .get(&svc.fqdn)
        .map(|dr| dr.subsets.keys().collect())
        .unwrap_or_default();
    for p in &svc.ports {
        for subset in std::iter::once(None).chain(subsets.iter().map(|s| Some(s.as_str()))) {
            let policy = mesh.cluster_policy(svc, subset, p.number);
            let mut c = base_cluster(mesh, svc, p, subset, &policy);
            let alpn = traffic_policy::upstream_alpn(&policy, p.protocol);
            match (&policy.tls, tls::upstream_tls(svc, &policy)) {
                // Its secrets go to proxies with an identity only (see `credentials`).
                (Some(t), tls::UpstreamTls::Origination)
                    if !identity && t.credential().is_some() =>
                {
                    continue;
                }
                (Some(t), tls::UpstreamTls::Origination) => {
                    c.transport_socket = Some(tls::origination_socket(t, alpn));
                }
                _ if identity => tls::secure_cluster(mesh, svc, (p, subset), &policy, alpn, &mut c),
                _ => {}
            }
            out.push(c);
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
                traffic_policy::h2_options(&mut c);
            }
            c
        })
        .collect()
}
