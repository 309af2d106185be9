//! CLUSTER patches (istiod's cluster_patch.go).

use super::*;
use crate::config::envoy_filter::{ApplyTo, CompiledPatch, Operation};
use crate::mesh::envoy_filters::PatchSet;

/// `clusters` generated in `ctx` with the patches of `set` applied, plus the clusters
/// the set ADDs in that context (ADDs without a context go with the outbound ones, so
/// they are added once). `inbound_hosts`: the services of the workload, which an
/// inbound cluster's `service` match is checked against, as istiod does.
pub fn patch_clusters<'a>(
    clusters: impl Iterator<Item = &'a Arc<Resource>>,
    set: &PatchSet,
    ctx: PatchContext,
    inbound_hosts: &[String],
) -> Vec<Arc<Resource>> {
    if !set.has(ApplyTo::Cluster) {
        return clusters.cloned().collect();
    }
    let mut out = Vec::new();
    'clusters: for r in clusters {
        let Some(mut c) = decode(r) else {
            out.push(r.clone());
            continue;
        };
        for p in set.patches(ApplyTo::Cluster) {
            if !p.context.applies_to(ctx) || !cluster_match(&c, p, inbound_hosts) {
                continue;
            }
            match (p.operation, &p.value) {
                (Operation::Remove, _) => continue 'clusters,
                (Operation::Merge, Some(v)) if !merge_transport_socket(&mut c, v) => {
                    merge(&mut c, v)
                }
                _ => {}
            }
        }
        out.push(encode(TypeKind::Cluster, Some(r), &c));
    }
    for p in set.patches(ApplyTo::Cluster) {
        let here = match ctx {
            PatchContext::SidecarInbound => p.context == PatchContext::SidecarInbound,
            _ => p.context.applies_to(PatchContext::SidecarOutbound),
        };
        if let (Operation::Add, Some(v), true) = (p.operation, &p.value, here) {
            out.push(encode(TypeKind::Cluster, None, v));
        }
    }
    out
}

/// istiod's cluster match: by name, or by the parts of the Istio cluster name
/// (`DIRECTION|PORT|SUBSET|HOST`).
fn cluster_match(c: &DynamicMessage, p: &CompiledPatch, inbound_hosts: &[String]) -> bool {
    let Some(m) = &p.cluster else {
        return true;
    };
    let name = str_field(c, "name");
    if !m.name.is_empty() {
        return m.name == name;
    }
    let mut parts = name.split('|');
    let direction = parts.next().unwrap_or_default();
    let port: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let subset = parts.next().unwrap_or_default();
    let host = parts.next().unwrap_or_default();
    if !m.subset.is_empty() && m.subset != subset {
        return false;
    }
    if !m.service.is_empty() {
        let found = if direction == "inbound" && !inbound_hosts.is_empty() {
            inbound_hosts.contains(&m.service)
        } else {
            host == m.service
        };
        if !found {
            return false;
        }
    }
    m.port_number == 0 || m.port_number == port
}
