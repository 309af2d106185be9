//! Clusters of services whose endpoints are not sent over EDS (ServiceEntry `resolution`):
//!
//! - `DNS`: Envoy's STRICT_DNS, every address of every named endpoint is a host;
//!   `DNS_ROUND_ROBIN`: LOGICAL_DNS, one address at a time (Istio's mapping). The names
//!   are resolved by the sidecar, through `MeshConfig.dnsResolvers` when set (c-ares,
//!   without search domains, so `httpbin.test` is asked as written), else through its
//!   host's resolvers; names are resolved again every 5 s (Envoy's refresh rate).
//! - `NONE`: ORIGINAL_DST, the connection goes where the caller dialled. Only an
//!   intercepted connection carries that destination; in explicit interception mode the
//!   service gets its cluster (as in Istio) but no outbound listener or route, since the
//!   destination would be the sidecar's own listener.

use super::{any, duration};
use crate::mesh::{DnsEndpoint, MeshState, Resolution, Service, ServicePortInfo};
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address::Address as AddressKind, socket_address::PortSpecifier, Address, DnsResolverOptions,
    SocketAddress, TypedExtensionConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;

fn named_address(host: &str, port: u32) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// The c-ares resolver config for `MeshConfig.dnsResolvers`; `None` keeps Envoy's default
/// (the host's resolvers).
pub fn dns_resolver_config(mesh: &MeshState) -> Option<TypedExtensionConfig> {
    if mesh.dns_resolvers.is_empty() {
        return None;
    }
    let config = CaresDnsResolverConfig {
        resolvers: mesh
            .dns_resolvers
            .iter()
            .map(|a| super::clusters::socket_address(a.ip(), u32::from(a.port())))
            .collect(),
        dns_resolver_options: Some(DnsResolverOptions {
            no_default_search_domain: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(TypedExtensionConfig {
        name: "envoy.network.dns_resolver.cares".into(),
        typed_config: Some(any(&config)),
    })
}

/// The named endpoints of a subset, grouped by locality (in a BTreeMap, so the order and
/// the version are stable).
fn dns_assignment(
    name: &str,
    port: &ServicePortInfo,
    eps: &[&DnsEndpoint],
) -> ClusterLoadAssignment {
    let mut groups: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for e in eps {
        groups
            .entry(e.locality.as_deref().unwrap_or_default())
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(named_address(&e.address, e.port_for(port))),
                    ..Default::default()
                })),
                load_balancing_weight: e.weight.map(|w| UInt32Value { value: w }),
                ..Default::default()
            });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: groups
            .into_iter()
            .map(|(loc, lb_endpoints)| LocalityLbEndpoints {
                locality: super::endpoints::locality_of(loc),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The cluster of a DNS or NONE service's port (and subset), before policies; `None` for
/// a service whose endpoints go over EDS.
pub fn cluster(
    mesh: &MeshState,
    svc: &Service,
    port: &ServicePortInfo,
    subset_labels: Option<&BTreeMap<String, String>>,
    name: String,
) -> Option<Cluster> {
    let mut c = Cluster {
        name,
        connect_timeout: Some(duration(mesh.connect_timeout)),
        ..Default::default()
    };
    match svc.resolution {
        Resolution::Static => return None,
        Resolution::None => {
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            ));
            c.lb_policy = LbPolicy::ClusterProvided as i32;
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let eps: Vec<&DnsEndpoint> = svc
                .dns_endpoints
                .iter()
                .filter(|e| subset_labels.is_none_or(|l| crate::mesh::selects(l, &e.labels)))
                .collect();
            // Envoy wants exactly one endpoint in a LOGICAL_DNS cluster; a subset that
            // selects none is a STRICT_DNS cluster without hosts instead.
            let kind = if svc.resolution == Resolution::DnsRoundRobin && eps.len() == 1 {
                DiscoveryType::LogicalDns
            } else {
                DiscoveryType::StrictDns
            };
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(kind as i32));
            c.load_assignment = Some(dns_assignment(&c.name, port, &eps));
            c.dns_lookup_family = DnsLookupFamily::V4Only as i32;
            c.typed_dns_resolver_config = dns_resolver_config(mesh);
        }
    }
    Some(c)
}
