//! Outbound route configurations: one per HTTP service port, a virtual host per service,
//! the VirtualService rules of the service as Envoy routes (istiod's
//! `pilot/pkg/networking/core/route/route.go` is the yardstick).

mod actions;
mod matching;
mod per_filter;

pub use per_filter::{encode_route_configuration, CORS_FILTER, FAULT_FILTER};

use super::{duration, outbound_cluster_name};
use crate::config::virtual_service_validate::MAX_DIRECT_RESPONSE_BODY;
use crate::mesh::{selects, HttpRouteRule, MeshState, Service};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, Route, RouteAction, RouteConfiguration,
    VirtualHost,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use std::collections::{BTreeMap, BTreeSet};

/// The Envoy routes of one rule in route configuration `port` for proxies of
/// `namespace`: one per applicable match (none if no match applies there).
fn rule_routes(
    mesh: &MeshState,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u32,
    vs_key: &str,
    idx: usize,
    rule: &HttpRouteRule,
) -> Vec<Route> {
    let name = rule
        .name
        .clone()
        .unwrap_or_else(|| format!("{vs_key}#{idx}"));
    let matches: Vec<_> = if rule.matches.is_empty() {
        vec![(name.clone(), matching::catch_all())]
    } else {
        rule.matches
            .iter()
            .filter(|m| matching::applies(m, namespace, labels, port))
            .map(|m| {
                let route_name = match &m.name {
                    Some(n) => format!("{name}.{n}"),
                    None => name.clone(),
                };
                (route_name, matching::route_match(m))
            })
            .collect()
    };
    if matches.is_empty() {
        return Vec::new();
    }
    let mut ops = actions::header_ops(rule.headers.as_ref());
    let action = if let Some(r) = &rule.redirect {
        Action::Redirect(actions::redirect(r, port))
    } else if let Some(d) = &rule.direct_response {
        Action::DirectResponse(actions::direct_response(d))
    } else {
        Action::Route(actions::route_action(mesh, port, rule, &mut ops))
    };
    let typed_per_filter_config =
        per_filter::typed_per_filter_config(rule.fault.as_ref(), rule.cors.as_ref());
    matches
        .into_iter()
        .map(|(name, m)| Route {
            name,
            r#match: Some(m),
            action: Some(action.clone()),
            request_headers_to_add: ops.request_add.clone(),
            request_headers_to_remove: ops.request_remove.clone(),
            response_headers_to_add: ops.response_add.clone(),
            response_headers_to_remove: ops.response_remove.clone(),
            typed_per_filter_config: typed_per_filter_config.clone(),
            ..Default::default()
        })
        .collect()
}

fn virtual_host(
    mesh: &MeshState,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    svc: &Service,
    port: u32,
) -> VirtualHost {
    let mut domains = Vec::new();
    for alias in mesh.host_aliases(&svc.fqdn, namespace) {
        domains.push(format!("{alias}:{port}"));
        domains.push(alias);
    }
    let routes = match mesh.virtual_service_for(&svc.fqdn, namespace) {
        Some(vs) => vs
            .http
            .iter()
            .enumerate()
            .flat_map(|(i, r)| rule_routes(mesh, namespace, labels, port, &vs.key, i, r))
            .collect(),
        None => vec![Route {
            name: "default".into(),
            r#match: Some(matching::catch_all()),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(outbound_cluster_name(
                    port, None, &svc.fqdn,
                ))),
                timeout: Some(duration(Default::default())),
                retry_policy: Some(actions::default_retry()),
                hash_policy: super::hash_policy::for_targets(
                    mesh,
                    [super::hash_policy::Target {
                        host: &svc.fqdn,
                        subset: None,
                        port: Some(port),
                        route_port: port,
                    }],
                ),
                ..Default::default()
            })),
            ..Default::default()
        }],
    };
    VirtualHost {
        name: format!("{}:{port}", svc.fqdn),
        domains,
        routes,
        ..Default::default()
    }
}

/// What the routes of a proxy in `namespace` whose workload has `labels` depend on: the
/// namespace, and which `sourceLabels` selectors of the mesh's rules pick the workload.
/// Proxies with equal keys get equal routes (and share one encoding).
pub fn route_key(mesh: &MeshState, namespace: &str, labels: &BTreeMap<String, String>) -> String {
    let selectors: BTreeSet<&BTreeMap<String, String>> = mesh
        .virtual_services
        .values()
        .flat_map(|vs| &vs.http)
        .flat_map(|r| &r.matches)
        .map(|m| &m.source_labels)
        .filter(|sel| !sel.is_empty() && selects(sel, labels))
        .collect();
    if selectors.is_empty() {
        namespace.to_string()
    } else {
        // Debug quotes and escapes every label, so distinct sets give distinct keys.
        format!("{namespace} {selectors:?}")
    }
}

/// One route configuration per HTTP service port, named by the port as Istio does,
/// holding a virtual host per service on that port, for proxies of `namespace` whose
/// workload has `labels` (empty for a proxy that is no workload). Encode with
/// [`encode_route_configuration`] (deterministic bytes, hence stable versions).
pub fn routes(
    mesh: &MeshState,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<RouteConfiguration> {
    let mut by_port: BTreeMap<u32, Vec<VirtualHost>> = BTreeMap::new();
    // Resolution NONE has no route in explicit mode: see `external.rs`.
    for svc in mesh.services.values().filter(|s| s.explicitly_reachable()) {
        for p in svc.ports.iter().filter(|p| p.protocol.is_http()) {
            by_port
                .entry(p.number)
                .or_default()
                .push(virtual_host(mesh, namespace, labels, svc, p.number));
        }
    }
    by_port
        .into_iter()
        .map(|(port, virtual_hosts)| {
            let direct_bodies = virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .any(|r| matches!(&r.action, Some(Action::DirectResponse(d)) if d.body.is_some()));
            RouteConfiguration {
                name: port.to_string(),
                virtual_hosts,
                validate_clusters: Some(BoolValue { value: false }),
                // Envoy's default limit is 4 KiB; Istio allows bodies up to 1 MiB.
                max_direct_response_body_size_bytes: direct_bodies.then_some(UInt32Value {
                    value: MAX_DIRECT_RESPONSE_BODY as u32,
                }),
                ..Default::default()
            }
        })
        .collect()
}
