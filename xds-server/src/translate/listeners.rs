use super::clusters::socket_address;
use super::l4_routes::{self, Caller};
use super::{ads, any, duration, inbound_cluster_name, tls, ProxyScope};
use crate::config::peer_authentication::MtlsMode;
use crate::mesh::Service;
use crate::mesh::{MeshState, Protocol, Workload};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    filter::ConfigType, listener_filter::ConfigType as ListenerFilterConfig, Filter, FilterChain,
    FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails,
        UpgradeConfig,
    },
    http_filter::ConfigType as HttpFilterConfig,
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::ClusterSpecifier as TcpCluster, TcpProxy,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(HttpFilterConfig::TypedConfig(any(&Router::default()))),
        ..Default::default()
    }
}

/// An HTTP filter with its default (empty) config: VirtualService rules turn it on per
/// route through `typed_per_filter_config`.
fn per_route_filter<M: prost::Name>(name: &str, config: &M) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(HttpFilterConfig::TypedConfig(any(config))),
        ..Default::default()
    }
}

/// The outbound connection manager, with istiod's outbound filters: CORS and fault
/// injection (inactive unless a route configures them), then the router.
fn hcm(stat_prefix: String, route: RouteSpecifier) -> Filter {
    hcm_filter(HttpConnectionManager {
        stat_prefix,
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(route),
        http_filters: vec![
            per_route_filter(super::CORS_FILTER, &Cors::default()),
            per_route_filter(super::FAULT_FILTER, &HttpFault::default()),
            router(),
        ],
        ..Default::default()
    })
}

/// Every connection manager lets WebSocket upgrades through, as istiod's do (which is why
/// Istio deprecated the VirtualService's `websocketUpgrade`).
fn hcm_filter(mut m: HttpConnectionManager) -> Filter {
    m.upgrade_configs = vec![UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }];
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(ConfigType::TypedConfig(any(&m))),
    }
}

fn tcp_proxy(stat_prefix: String, cluster: String, idle: Option<String>) -> Filter {
    let t = TcpProxy {
        stat_prefix,
        cluster_specifier: Some(TcpCluster::Cluster(cluster)),
        idle_timeout: idle
            .and_then(|d| crate::config::parse_duration(&d).ok())
            .map(super::duration),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(ConfigType::TypedConfig(any(&t))),
    }
}

/// What the services on one outbound port need.
#[derive(Default)]
struct PortPlan<'a> {
    /// Some service speaks HTTP here: route by Host through RDS.
    http: bool,
    /// The first TCP service by host name (without virtual IPs a port can only mean one).
    tcp: Option<&'a Service>,
    /// TLS the app opens itself (HTTPS, TLS), routed by SNI.
    tls: Vec<&'a Service>,
}

fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(ListenerFilterConfig::TypedConfig(any(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

/// A DestinationRule's `connectionPool.tcp.idleTimeout` for a TCP port: like istiod, the
/// outbound `tcp_proxy` closes idle connections after it (Envoy's default: 1 h).
pub fn tcp_idle_timeout(mesh: &MeshState, svc: &Service, port: u32) -> Option<String> {
    mesh.cluster_policy(svc, None, port)
        .connection_pool
        .and_then(|cp| cp.tcp)
        .and_then(|t| t.idle_timeout)
}

/// One outbound listener per service port on the sidecar's outbound address. HTTP ports
/// route by Host through RDS, TLS services (HTTPS, TLS) by SNI (filter chains per host,
/// wildcards included, read by the TLS inspector), and a TCP port forwards to the service
/// owning it; VirtualService `tls` and `tcp` rules shape those chains (`l4_routes.rs`).
/// Services with resolution NONE are left out: their destination is only known to an
/// intercepted connection (see `external.rs`).
fn outbound(mesh: &MeshState, bind: IpAddr, caller: Caller<'_>) -> Vec<Listener> {
    let mut ports: BTreeMap<u32, PortPlan<'_>> = BTreeMap::new();
    for svc in mesh.services.values().filter(|s| s.explicitly_reachable()) {
        for p in &svc.ports {
            let e = ports.entry(p.number).or_default();
            match p.protocol {
                pr if pr.is_http() => e.http = true,
                Protocol::Tls => e.tls.push(svc),
                _ => {
                    e.tcp.get_or_insert(svc);
                }
            }
        }
    }
    ports
        .into_iter()
        .map(|(port, plan)| {
            let mut taken = BTreeSet::new();
            let mut chains: Vec<FilterChain> = plan
                .tls
                .iter()
                .flat_map(|svc| l4_routes::tls_chains(mesh, svc, port, caller, &mut taken))
                .collect();
            let sni = !chains.is_empty();
            if plan.http {
                chains.push(FilterChain {
                    filters: vec![hcm(
                        format!("outbound_{port}"),
                        RouteSpecifier::Rds(Rds {
                            config_source: Some(ads()),
                            route_config_name: port.to_string(),
                        }),
                    )],
                    ..Default::default()
                });
            } else if let Some(svc) = plan.tcp {
                chains.extend(l4_routes::tcp_chains(mesh, svc, port, caller));
            }
            Listener {
                name: format!("{bind}_{port}"),
                address: Some(socket_address(bind, port)),
                traffic_direction: TrafficDirection::Outbound as i32,
                filter_chains: chains,
                listener_filters: if sni {
                    vec![tls_inspector()]
                } else {
                    Vec::new()
                },
                // Plaintext and server-first protocols on a port with TLS services go on
                // to the fallback chain after the inspector's timeout.
                continue_on_listener_filters_timeout: sni,
                ..Default::default()
            }
        })
        .collect()
}

/// The HTTP filters of a workload's inbound connection manager on `port` (the
/// workload's port), in order; the router last. Policy filters (authorization, JWT)
/// go here, before the router, so every inbound chain (mTLS and plaintext) gets them.
pub(crate) fn inbound_http_filters(mesh: &MeshState, w: &Workload, _port: u32) -> Vec<HttpFilter> {
    let mut filters = super::authz::http_filters(mesh, w);
    filters.push(router());
    filters
}

/// The network filters of a workload's inbound TCP port, in order; `tcp_proxy` last.
pub(crate) fn inbound_tcp_filters(mesh: &MeshState, w: &Workload, port: u32) -> Vec<Filter> {
    let mut filters = super::authz::network_filters(mesh, w);
    filters.push(tcp_proxy(
        format!("inbound_{port}"),
        inbound_cluster_name(port),
        None,
    ));
    filters
}

/// Whether an inbound filter chain terminates mutual TLS: the connection manager then
/// tells the app who called (the caller's SPIFFE id in `x-forwarded-client-cert`),
/// and a plaintext chain strips any such header a caller forged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    Mtls,
    Plaintext,
}

fn inbound_filters(
    mesh: &MeshState,
    w: &Workload,
    port: u32,
    protocol: Protocol,
    chain: Chain,
) -> Vec<Filter> {
    if !protocol.is_http() {
        return inbound_tcp_filters(mesh, w, port);
    }
    let cluster = inbound_cluster_name(port);
    let rc = RouteConfiguration {
        name: cluster.clone(),
        virtual_hosts: vec![VirtualHost {
            // Istio's name for it, so EnvoyFilters written for Istio match it.
            name: format!("inbound|http|{port}"),
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
    let mut m = HttpConnectionManager {
        stat_prefix: format!("inbound_{port}"),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(rc)),
        http_filters: inbound_http_filters(mesh, w, port),
        normalize_path: super::authz::normalize_path(mesh, w),
        // SANITIZE (Envoy's default, so plaintext chains encode as before).
        forward_client_cert_details: ForwardClientCertDetails::Sanitize as i32,
        ..Default::default()
    };
    if chain == Chain::Mtls {
        m.forward_client_cert_details = ForwardClientCertDetails::SanitizeSet as i32;
        m.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
            uri: true,
            ..Default::default()
        });
    }
    vec![hcm_filter(m)]
}

/// Filter chains of one inbound port by its PeerAuthentication mode. PERMISSIVE tells
/// TLS from plaintext with the TLS inspector, so both kinds of caller share the port.
fn inbound_chains(
    mesh: &MeshState,
    w: &Workload,
    port: u32,
    protocol: Protocol,
    mode: MtlsMode,
) -> (Vec<ListenerFilter>, Vec<FilterChain>) {
    let mtls = |transport_protocol: &str| FilterChain {
        name: "mtls".into(),
        filter_chain_match: (!transport_protocol.is_empty()).then(|| FilterChainMatch {
            transport_protocol: transport_protocol.into(),
            ..Default::default()
        }),
        filters: inbound_filters(mesh, w, port, protocol, Chain::Mtls),
        transport_socket: Some(tls::inbound_transport_socket(mesh, protocol)),
        ..Default::default()
    };
    let plaintext = || FilterChain {
        filters: inbound_filters(mesh, w, port, protocol, Chain::Plaintext),
        ..Default::default()
    };
    match mode {
        MtlsMode::Strict => (Vec::new(), vec![mtls("")]),
        MtlsMode::Permissive | MtlsMode::Unset => {
            let inspector = tls_inspector();
            let raw = FilterChain {
                name: "plaintext".into(),
                filter_chain_match: Some(FilterChainMatch {
                    transport_protocol: "raw_buffer".into(),
                    ..Default::default()
                }),
                ..plaintext()
            };
            (vec![inspector], vec![mtls("tls"), raw])
        }
        MtlsMode::Disable => (Vec::new(), vec![plaintext()]),
    }
}

/// Inbound listeners on the workload address, forwarding to the application. A
/// workload with an identity gets the chains its PeerAuthentication mode asks for;
/// one without (no certificate to present) keeps a single plaintext chain.
fn inbound(mesh: &MeshState, w: &Workload) -> Vec<Listener> {
    let identity = tls::has_identity(&w.labels);
    mesh.inbound_ports(w)
        .into_iter()
        .map(|(port, protocol)| {
            let mode = if identity {
                mesh.peer_authentication.mode(&w.namespace, &w.labels, port)
            } else {
                MtlsMode::Disable
            };
            let (listener_filters, filter_chains) = inbound_chains(mesh, w, port, protocol, mode);
            Listener {
                name: format!("{}_{port}", w.address),
                address: Some(socket_address(w.address, port)),
                traffic_direction: TrafficDirection::Inbound as i32,
                // The TLS inspector waits for the client's first bytes; a protocol where
                // the server speaks first would otherwise be cut off at the listener
                // filter timeout instead of going on as plaintext (Istio does the same).
                continue_on_listener_filters_timeout: !listener_filters.is_empty(),
                listener_filters,
                filter_chains,
                ..Default::default()
            }
        })
        .collect()
}

pub fn listeners(mesh: &MeshState, scope: &ProxyScope) -> Vec<Listener> {
    let loopback = IpAddr::from([127, 0, 0, 1]);
    match scope {
        ProxyScope::Workload(id) => match mesh.workloads.get(id) {
            Some(w) => {
                let caller = Caller {
                    namespace: &w.namespace,
                    labels: Some(&w.labels),
                };
                let mut out = inbound(mesh, w);
                out.extend(outbound(mesh, w.outbound_address, caller));
                out
            }
            None => outbound(
                mesh,
                loopback,
                Caller {
                    namespace: "",
                    labels: None,
                },
            ),
        },
        ProxyScope::Namespace { namespace, .. } => {
            let caller = Caller {
                namespace,
                labels: None,
            };
            outbound(mesh, loopback, caller)
        }
    }
}
