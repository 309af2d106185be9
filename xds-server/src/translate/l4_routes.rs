//! Opaque connections on a sidecar's outbound listeners: one TCP service per port, TLS
//! services by SNI, each routed by its VirtualService's `tcp` / `tls` rules when it has
//! them (weighted destinations, matches on port, destination subnets and the caller's
//! labels and namespace), else to the service's own cluster.

use super::{any, outbound_cluster_name};
use crate::config::l4_routes::L4Match;
use crate::mesh::{selects, L4RouteRule, MeshState, RouteDestination, Service};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{
    filter::ConfigType, Filter, FilterChain, FilterChainMatch,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::{weighted_cluster::ClusterWeight, ClusterSpecifier, WeightedCluster},
    TcpProxy,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::{BTreeMap, BTreeSet};

/// Who opens the connection: what `sourceLabels` and `sourceNamespace` match.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub namespace: &'a str,
    /// `None`: a proxy that is not a known workload (matches no `sourceLabels`).
    pub labels: Option<&'a BTreeMap<String, String>>,
}

fn applies(m: &L4Match, port: u32, caller: Caller<'_>) -> bool {
    crate::config::virtual_service_validate::applies_to_mesh(&m.gateways)
        && m.port.is_none_or(|p| p == port)
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns == caller.namespace)
        && (m.source_labels.is_empty()
            || caller.labels.is_some_and(|l| selects(&m.source_labels, l)))
}

/// The cluster of a destination reached through listener `port`: an explicit port wins,
/// then the same port on the destination, then the destination's only port.
fn cluster(mesh: &MeshState, port: u32, d: &RouteDestination) -> String {
    let p = d.port.unwrap_or_else(|| match mesh.services.get(&d.host) {
        Some(s) if s.port(port).is_none() && s.ports.len() == 1 => s.ports[0].number,
        _ => port,
    });
    outbound_cluster_name(p, d.subset.as_deref(), &d.host)
}

pub(super) fn tcp_proxy(
    stat_prefix: String,
    specifier: ClusterSpecifier,
    idle: Option<std::time::Duration>,
) -> Filter {
    let t = TcpProxy {
        stat_prefix,
        cluster_specifier: Some(specifier),
        idle_timeout: idle.map(super::duration),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(ConfigType::TypedConfig(any(&t))),
    }
}

fn weighted(mesh: &MeshState, port: u32, dests: &[RouteDestination]) -> ClusterSpecifier {
    let live: Vec<&RouteDestination> = dests.iter().filter(|d| d.weight > 0).collect();
    if let [one] = live.as_slice() {
        return ClusterSpecifier::Cluster(cluster(mesh, port, one));
    }
    ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters: live
            .iter()
            .map(|d| ClusterWeight {
                name: cluster(mesh, port, d),
                weight: d.weight,
                ..Default::default()
            })
            .collect(),
    })
}

fn cidr(s: &str) -> Option<CidrRange> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()?),
        None => (s, if s.contains(':') { 128 } else { 32 }),
    };
    Some(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len }),
    })
}

/// The filter chains of `rules` for connections of `caller` on `port`, in rule order; a
/// rule matching without destination subnets is the catch-all and ends the list.
/// `base` is what every chain matches on besides (SNI for TLS).
fn chains(
    mesh: &MeshState,
    stat: &str,
    port: u32,
    rules: &[L4RouteRule],
    caller: Caller<'_>,
    idle: Option<std::time::Duration>,
    base: impl Fn(&L4Match) -> FilterChainMatch,
) -> (Vec<FilterChain>, bool) {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for rule in rules {
        let any_match = L4Match::default();
        let matches: Vec<&L4Match> = if rule.matches.is_empty() {
            vec![&any_match]
        } else {
            rule.matches
                .iter()
                .filter(|m| applies(m, port, caller))
                .collect()
        };
        for m in matches {
            let mut fcm = base(m);
            fcm.prefix_ranges = m
                .destination_subnets
                .iter()
                .filter_map(|s| cidr(s))
                .collect();
            // Envoy refuses two chains with one match: the first rule wins, as in Istio.
            if !seen.insert(format!("{fcm:?}")) {
                continue;
            }
            let catch_all = fcm.prefix_ranges.is_empty();
            out.push(FilterChain {
                filter_chain_match: Some(fcm),
                filters: vec![tcp_proxy(
                    stat.to_string(),
                    weighted(mesh, port, &rule.destinations),
                    idle,
                )],
                ..Default::default()
            });
            if catch_all {
                return (out, true);
            }
        }
    }
    (out, false)
}

fn own_cluster(svc: &Service, port: u32) -> ClusterSpecifier {
    ClusterSpecifier::Cluster(outbound_cluster_name(port, None, &svc.fqdn))
}

/// The chains of a TCP service on `port`: its VirtualService's `tcp` rules, then (when no
/// rule catches everything) the service's own cluster. The last chain matches anything.
pub fn tcp_chains(
    mesh: &MeshState,
    svc: &Service,
    port: u32,
    caller: Caller<'_>,
) -> Vec<FilterChain> {
    let stat = format!("outbound_{port}");
    let rules = mesh
        .virtual_service_for(&svc.fqdn, caller.namespace)
        .map(|vs| vs.tcp.as_slice())
        .unwrap_or_default();
    let idle = super::tcp_idle_timeout(mesh, svc, port)
        .and_then(|d| crate::config::parse_duration(&d).ok());
    let (mut out, complete) = chains(mesh, &stat, port, rules, caller, idle, |_| {
        FilterChainMatch::default()
    });
    for c in &mut out {
        if c.filter_chain_match
            .as_ref()
            .is_some_and(|m| *m == FilterChainMatch::default())
        {
            c.filter_chain_match = None;
        }
    }
    if !complete {
        out.push(FilterChain {
            filters: vec![tcp_proxy(stat, own_cluster(svc, port), idle)],
            ..Default::default()
        });
    }
    out
}

/// The chains of a TLS service (HTTPS, TLS) on `port`, by SNI: its VirtualService's `tls`
/// rules (each match's `sniHosts`), then the service's own host to its own cluster.
/// `taken` holds the SNI sets of chains already on the listener.
pub fn tls_chains(
    mesh: &MeshState,
    svc: &Service,
    port: u32,
    caller: Caller<'_>,
    taken: &mut BTreeSet<String>,
) -> Vec<FilterChain> {
    let stat = format!("outbound_{port}_{}", svc.fqdn);
    let rules = mesh
        .virtual_service_for(&svc.fqdn, caller.namespace)
        .map(|vs| vs.tls.as_slice())
        .unwrap_or_default();
    let sni = |hosts: Vec<String>| FilterChainMatch {
        server_names: hosts,
        transport_protocol: "tls".into(),
        ..Default::default()
    };
    let (mut out, _) = chains(mesh, &stat, port, rules, caller, None, |m| {
        sni(m.sni_hosts.clone())
    });
    out.push(FilterChain {
        name: svc.fqdn.clone(),
        filter_chain_match: Some(sni(vec![svc.fqdn.clone()])),
        filters: vec![tcp_proxy(stat, own_cluster(svc, port), None)],
        ..Default::default()
    });
    out.retain(|c| taken.insert(format!("{:?}", c.filter_chain_match)));
    out
}
