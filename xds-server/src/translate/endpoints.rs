use super::clusters::socket_address;
use super::{outbound_cluster_name, tls};
use crate::mesh::{Endpoint as MeshEndpoint, MeshState, Service, ServicePortInfo};
use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;

fn locality(l: Option<&str>) -> Option<Locality> {
    let l = l?;
    let mut parts = l.split('/');
    Some(Locality {
        region: parts.next().unwrap_or_default().to_string(),
        zone: parts.next().unwrap_or_default().to_string(),
        sub_zone: parts.next().unwrap_or_default().to_string(),
    })
}

fn assignment(
    mesh: &MeshState,
    svc: &Service,
    name: String,
    port: &ServicePortInfo,
    eps: &[&MeshEndpoint],
) -> ClusterLoadAssignment {
    // Grouped by locality in a BTreeMap so the output order (and the version) is stable.
    let mut groups: BTreeMap<Option<&str>, Vec<LbEndpoint>> = BTreeMap::new();
    let mut sorted: Vec<&&MeshEndpoint> = eps.iter().collect();
    sorted.sort_by_key(|e| (e.address, e.port_for(port)));
    for e in sorted {
        groups
            .entry(e.locality.as_deref())
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
            .map(|(loc, lb_endpoints)| LocalityLbEndpoints {
                locality: locality(loc),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The ClusterLoadAssignments of one service: one per port and subset.
pub fn service_endpoints(mesh: &MeshState, svc: &Service) -> Vec<ClusterLoadAssignment> {
    let mut out = Vec::new();
    let subsets: Vec<&String> = mesh
        .destination_rules
        .get(&svc.fqdn)
        .map(|dr| dr.subsets.keys().collect())
        .unwrap_or_default();
    for p in &svc.ports {
        let all = mesh.subset_endpoints(svc, None);
        out.push(assignment(
            mesh,
            svc,
            outbound_cluster_name(p.number, None, &svc.fqdn),
            p,
            &all,
        ));
        for s in &subsets {
            let eps = mesh.subset_endpoints(svc, Some(s));
            out.push(assignment(
                mesh,
                svc,
                outbound_cluster_name(p.number, Some(s), &svc.fqdn),
                p,
                &eps,
            ));
        }
    }
    out
}

pub fn endpoints(mesh: &MeshState) -> Vec<ClusterLoadAssignment> {
    mesh.services
        .values()
        .flat_map(|s| service_endpoints(mesh, s))
        .collect()
}
