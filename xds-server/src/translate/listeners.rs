use super::clusters::socket_address;
use super::{ads, any, duration, inbound_cluster_name, ProxyScope};
use crate::mesh::{MeshState, Protocol, Workload};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    filter::ConfigType, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter::ConfigType as HttpFilterConfig,
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::ClusterSpecifier as TcpCluster, TcpProxy,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

fn hcm(stat_prefix: String, route: RouteSpecifier) -> Filter {
    let m = HttpConnectionManager {
        stat_prefix,
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(route),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(HttpFilterConfig::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(ConfigType::TypedConfig(any(&m))),
    }
}

fn tcp_proxy(stat_prefix: String, cluster: String) -> Filter {
    let t = TcpProxy {
        stat_prefix,
        cluster_specifier: Some(TcpCluster::Cluster(cluster)),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(ConfigType::TypedConfig(any(&t))),
    }
}

fn listener(ip: IpAddr, port: u32, direction: TrafficDirection, filter: Filter) -> Listener {
    Listener {
        name: format!("{ip}_{port}"),
        address: Some(socket_address(ip, port)),
        traffic_direction: direction as i32,
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One outbound listener per service port on the sidecar's outbound address. HTTP ports
/// route by Host through RDS; a TCP port forwards to the service owning it (without
/// virtual IPs a port can only mean one TCP service: the first by host name).
fn outbound(mesh: &MeshState, bind: IpAddr) -> Vec<Listener> {
    let mut ports: BTreeMap<u32, (bool, Option<String>)> = BTreeMap::new();
    for svc in mesh.services.values() {
        for p in &svc.ports {
            let e = ports.entry(p.number).or_insert((false, None));
            if p.protocol.is_http() {
                e.0 = true;
            } else if e.1.is_none() {
                e.1 = Some(super::outbound_cluster_name(p.number, None, &svc.fqdn));
            }
        }
    }
    ports
        .into_iter()
        .filter_map(|(port, (http, tcp))| {
            let filter = if http {
                hcm(
                    format!("outbound_{port}"),
                    RouteSpecifier::Rds(Rds {
                        config_source: Some(ads()),
                        route_config_name: port.to_string(),
                    }),
                )
            } else {
                tcp_proxy(format!("outbound_{port}"), tcp?)
            };
            Some(listener(bind, port, TrafficDirection::Outbound, filter))
        })
        .collect()
}

/// Inbound listeners on the workload address, forwarding to the application.
fn inbound(mesh: &MeshState, w: &Workload) -> Vec<Listener> {
    mesh.inbound_ports(w)
        .into_iter()
        .map(|(port, protocol)| {
            let cluster = inbound_cluster_name(port);
            let filter = if protocol == Protocol::Tcp {
                tcp_proxy(format!("inbound_{port}"), cluster)
            } else {
                let rc = RouteConfiguration {
                    name: cluster.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: cluster.clone(),
                        domains: vec!["*".into()],
                        routes: vec![Route {
                            name: "default".into(),
                            r#match: Some(RouteMatch {
                                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                                ..Default::default()
                            }),
                            action: Some(Action::Route(RouteAction {
                                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster)),
                                timeout: Some(duration(Default::default())),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                hcm(format!("inbound_{port}"), RouteSpecifier::RouteConfig(rc))
            };
            listener(w.address, port, TrafficDirection::Inbound, filter)
        })
        .collect()
}

pub fn listeners(mesh: &MeshState, scope: &ProxyScope) -> Vec<Listener> {
    match scope {
        ProxyScope::Workload(id) => match mesh.workloads.get(id) {
            Some(w) => {
                let mut out = inbound(mesh, w);
                out.extend(outbound(mesh, w.outbound_address));
                out
            }
            None => outbound(mesh, IpAddr::from([127, 0, 0, 1])),
        },
        ProxyScope::Namespace(_) => outbound(mesh, IpAddr::from([127, 0, 0, 1])),
    }
}
