//! EDS: endpoints grouped by locality, ranked relative to the proxy.
//!
//! Every workload endpoint has the locality `region/zone/subzone` with its cluster as the
//! subzone (unless its WorkloadEntry sets one), so a config dump and Envoy's stats show
//! where an endpoint runs. Unless its DestinationRule says otherwise, for a proxy of
//! cluster C, endpoints in C have priority 0 and endpoints of other clusters priority 1:
//! Envoy sends everything to priority 0 while enough of it is healthy and spills over as
//! it is not (outlier detection on the clusters marks failing endpoints unhealthy, see
//! `clusters.rs`). A `localityLbSetting` with `failover`, `failoverPriority` or
//! `distribute` ranks (or weighs) them by locality as Istio does instead (`locality.rs`),
//! and `enabled: false` puts them all at priority 0. Envoy wants priorities without gaps,
//! so ranks are numbered densely: when C has none of the endpoints (or all of them) they
//! are all priority 0, and that assignment is the same for every such proxy, and shared.

use super::clusters::socket_address;
use super::locality::{endpoint_locality, EdsNeeds, LocalityKey, Mode, ProxyLocality, Ranker};
use super::{outbound_cluster_name, tls};
use crate::config::model::ClusterPolicy;
use crate::mesh::{Endpoint as MeshEndpoint, MeshState, Service, ServicePortInfo};
use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::{BTreeMap, BTreeSet};

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

/// Endpoints of one group: same rank, same locality.
type Group = Vec<(LbEndpoint, u32)>;

fn assignment(
    mesh: &MeshState,
    svc: &Service,
    name: String,
    port: &ServicePortInfo,
    eps: &[&MeshEndpoint],
    ranker: &Ranker<'_>,
) -> ClusterLoadAssignment {
    // Grouped by (rank, locality) in a BTreeMap so the output order (and the version)
    // is stable.
    let mut groups: BTreeMap<((u32, u32), LocalityKey<'_>), Group> = BTreeMap::new();
    let mut sorted: Vec<&&MeshEndpoint> = eps.iter().collect();
    sorted.sort_by_key(|e| (e.address, e.port_for(port)));
    for e in sorted {
        let lb = LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(e.address, e.port_for(port))),
                ..Default::default()
            })),
            load_balancing_weight: e.weight.map(|w| UInt32Value { value: w }),
            metadata: tls::endpoint_metadata(mesh, svc, e, e.port_for(port)),
            ..Default::default()
        };
        groups
            .entry((ranker.rank(e), endpoint_locality(e)))
            .or_default()
            .push((lb, e.weight.unwrap_or(1)));
    }
    // Ranks nobody holds are skipped: priorities 0..n without gaps.
    let ranks: BTreeSet<(u32, u32)> = groups.keys().map(|(r, _)| *r).collect();
    let priority = |r: &(u32, u32)| ranks.iter().position(|x| x == r).unwrap_or_default();
    let natural: Vec<(LocalityKey<'_>, u32)> = groups
        .iter()
        .map(|((_, loc), g)| (*loc, g.iter().map(|(_, w)| *w).sum()))
        .collect();
    let weights = ranker.weights(&natural);
    let endpoints = groups
        .into_iter()
        .enumerate()
        .filter_map(|(i, ((rank, loc), group))| {
            let weight = match &weights {
                Some(w) => Some(w.get(i).copied().flatten()?),
                None => None,
            };
            Some(LocalityLbEndpoints {
                locality: locality(loc),
                lb_endpoints: group.into_iter().map(|(lb, _)| lb).collect(),
                load_balancing_weight: weight.map(|value| UInt32Value { value }),
                priority: u32::try_from(priority(&rank)).unwrap_or(u32::MAX),
                ..Default::default()
            })
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name,
        endpoints,
        ..Default::default()
    }
}

/// The EDS clusters of a service: (port, subset), in output order.
fn eds_clusters<'a>(
    mesh: &'a MeshState,
    svc: &'a Service,
) -> impl Iterator<Item = (&'a ServicePortInfo, Option<&'a str>)> + 'a {
    let subsets: Vec<&String> = mesh
        .destination_rules
        .get(&svc.fqdn)
        .map(|dr| dr.subsets.keys().collect())
        .unwrap_or_default();
    // DNS and passthrough clusters carry their endpoints themselves.
    let ports = svc.ports.iter().filter(|_| svc.uses_eds());
    ports.flat_map(move |p| {
        std::iter::once(None)
            .chain(subsets.clone().into_iter().map(|s| Some(s.as_str())))
            .map(move |s| (p, s))
    })
}

/// The ClusterLoadAssignments of one service, one per port and subset, for no proxy in
/// particular: every endpoint at priority 0 where they are ranked by cluster. What
/// proxies get unless the service's [`service_needs`] say they differ.
pub fn service_endpoints(mesh: &MeshState, svc: &Service) -> Vec<ClusterLoadAssignment> {
    service_endpoints_for(mesh, svc, None)
}

/// The ClusterLoadAssignments of one service (same names, same order as
/// [`service_endpoints`]) for `proxy`. They depend only on the proxy's
/// [`EdsNeeds::class`] of the service's [`service_needs`].
pub fn service_endpoints_for(
    mesh: &MeshState,
    svc: &Service,
    proxy: Option<&ProxyLocality>,
) -> Vec<ClusterLoadAssignment> {
    eds_clusters(mesh, svc)
        .map(|(p, subset)| {
            let eps = mesh.subset_endpoints(svc, subset);
            let policy = mesh.cluster_policy(svc, subset, p.number);
            let ranker = Ranker::new(mode(&policy), proxy);
            let name = outbound_cluster_name(p.number, subset, &svc.fqdn);
            assignment(mesh, svc, name, p, &eps, &ranker)
        })
        .collect()
}

/// Which part of a proxy the service's assignments depend on.
pub fn service_needs(mesh: &MeshState, svc: &Service) -> EdsNeeds {
    let mut needs = EdsNeeds::default();
    let mut by_cluster = false;
    for (p, subset) in eds_clusters(mesh, svc) {
        let policy = mesh.cluster_policy(svc, subset, p.number);
        let mode = mode(&policy);
        by_cluster |= matches!(mode, Mode::ByCluster);
        needs.add(mode);
    }
    let clusters: BTreeSet<&str> = svc
        .endpoints
        .iter()
        .filter_map(|e| e.cluster.as_deref())
        .collect();
    if by_cluster && clusters.len() >= 2 {
        needs.clusters = clusters.into_iter().map(str::to_string).collect();
    }
    needs
}

/// Whether an outbound cluster of `svc` is locality-weighted (`distribute`).
pub(super) fn locality_weighted(svc: &Service, policy: &ClusterPolicy) -> bool {
    svc.uses_eds() && mode(policy).weighted()
}

fn mode(policy: &ClusterPolicy) -> Mode<'_> {
    Mode::of(
        policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref()),
    )
}

pub fn endpoints(mesh: &MeshState) -> Vec<ClusterLoadAssignment> {
    mesh.services
        .values()
        .flat_map(|s| service_endpoints(mesh, s))
        .collect()
}
