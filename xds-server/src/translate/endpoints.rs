//! EDS: endpoints grouped by locality, ranked by cluster relative to the proxy's.
//!
//! Every workload endpoint has the locality `region/zone/subzone` with its cluster as the
//! subzone (unless its WorkloadEntry sets one), so a config dump and Envoy's stats show
//! where an endpoint runs. For a proxy of cluster C, endpoints in C have priority 0 and
//! endpoints of other clusters priority 1: Envoy sends everything to priority 0 while
//! enough of it is healthy and spills over as it is not (outlier detection on the
//! clusters marks failing endpoints unhealthy, see `clusters.rs`). Envoy wants priorities
//! without gaps, so when C has none of the endpoints (or all of them) they are all
//! priority 0: that assignment is the same for every such proxy, and shared.

use super::clusters::socket_address;
use super::{outbound_cluster_name, tls};
use crate::mesh::{Endpoint as MeshEndpoint, MeshState, Service, ServicePortInfo};
use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;

/// (region, zone, subzone); all empty: no locality.
type LocalityKey<'a> = (&'a str, &'a str, &'a str);

fn locality_key(e: &MeshEndpoint) -> LocalityKey<'_> {
    let mut parts = e.locality.as_deref().unwrap_or_default().split('/');
    let region = parts.next().unwrap_or_default();
    let zone = parts.next().unwrap_or_default();
    let subzone = parts
        .next()
        .filter(|s| !s.is_empty())
        .or(e.cluster.as_deref())
        .unwrap_or_default();
    (region, zone, subzone)
}

fn locality((region, zone, sub_zone): LocalityKey<'_>) -> Option<Locality> {
    if region.is_empty() && zone.is_empty() && sub_zone.is_empty() {
        return None;
    }
    Some(Locality {
        region: region.to_string(),
        zone: zone.to_string(),
        sub_zone: sub_zone.to_string(),
    })
}

/// The locality of a `region/zone/subzone` string; `None` when empty.
pub(super) fn locality_of(s: &str) -> Option<Locality> {
    let mut parts = s.split('/');
    let region = parts.next().unwrap_or_default();
    let zone = parts.next().unwrap_or_default();
    let subzone = parts.next().unwrap_or_default();
    locality((region, zone, subzone))
}

/// In `proxy_cluster` (an inline endpoint is in no cluster: local to every proxy).
fn is_local(e: &MeshEndpoint, proxy_cluster: Option<&str>) -> bool {
    match (proxy_cluster, e.cluster.as_deref()) {
        (Some(pc), Some(c)) => pc == c,
        _ => true,
    }
}

fn assignment(
    mesh: &MeshState,
    svc: &Service,
    name: String,
    port: &ServicePortInfo,
    eps: &[&MeshEndpoint],
    proxy_cluster: Option<&str>,
) -> ClusterLoadAssignment {
    let ranked = proxy_cluster.is_some()
        && eps.iter().any(|e| is_local(e, proxy_cluster))
        && eps.iter().any(|e| !is_local(e, proxy_cluster));
    // Grouped by (priority, locality) in a BTreeMap so the output order (and the version)
    // is stable.
    let mut groups: BTreeMap<(u32, LocalityKey<'_>), Vec<LbEndpoint>> = BTreeMap::new();
    let mut sorted: Vec<&&MeshEndpoint> = eps.iter().collect();
    sorted.sort_by_key(|e| (e.address, e.port_for(port)));
    for e in sorted {
        let priority = u32::from(ranked && !is_local(e, proxy_cluster));
        groups
            .entry((priority, locality_key(e)))
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(e.address, e.port_for(port))),
                    ..Default::default()
                })),
                load_balancing_weight: e.weight.map(|w| UInt32Value { value: w }),
                metadata: tls::endpoint_metadata(mesh, svc, e, e.port_for(port)),
                ..Default::default()
            });
    }
    ClusterLoadAssignment {
        cluster_name: name,
        endpoints: groups
            .into_iter()
            .map(|((priority, loc), lb_endpoints)| LocalityLbEndpoints {
                locality: locality(loc),
                lb_endpoints,
                priority,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The ClusterLoadAssignments of one service, one per port and subset, with every
/// endpoint at priority 0: what proxies get unless the service has endpoints both in
/// their cluster and elsewhere.
pub fn service_endpoints(mesh: &MeshState, svc: &Service) -> Vec<ClusterLoadAssignment> {
    service_endpoints_for(mesh, svc, None)
}

/// The ClusterLoadAssignments of one service (same names, same order as
/// [`service_endpoints`]) for proxies of `proxy_cluster`: its endpoints first.
pub fn service_endpoints_for(
    mesh: &MeshState,
    svc: &Service,
    proxy_cluster: Option<&str>,
) -> Vec<ClusterLoadAssignment> {
    let mut out = Vec::new();
    // DNS and passthrough clusters carry their endpoints themselves.
    if !svc.uses_eds() {
        return out;
    }
    let subsets: Vec<&String> = mesh
        .destination_rules
        .get(&svc.fqdn)
        .map(|dr| dr.subsets.keys().collect())
        .unwrap_or_default();
    for p in &svc.ports {
        for subset in std::iter::once(None).chain(subsets.iter().map(|s| Some(s.as_str()))) {
            let eps = mesh.subset_endpoints(svc, subset);
            out.push(assignment(
                mesh,
                svc,
                outbound_cluster_name(p.number, subset, &svc.fqdn),
                p,
                &eps,
                proxy_cluster.filter(|_| locality_enabled(mesh, svc, subset, p.number)),
            ));
        }
    }
    out
}

/// `localityLbSetting.enabled: false` turns the ranking off: every endpoint at priority 0.
fn locality_enabled(mesh: &MeshState, svc: &Service, subset: Option<&str>, port: u32) -> bool {
    let policy = mesh.cluster_policy(svc, subset, port);
    policy
        .load_balancer
        .and_then(|lb| lb.locality_lb_setting)
        .and_then(|l| l.enabled)
        != Some(false)
}

pub fn endpoints(mesh: &MeshState) -> Vec<ClusterLoadAssignment> {
    mesh.services
        .values()
        .flat_map(|s| service_endpoints(mesh, s))
        .collect()
}
