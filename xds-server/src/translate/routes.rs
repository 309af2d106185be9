use super::{duration, hash_policy, outbound_cluster_name};
use crate::config::model::StringMatch;
use crate::mesh::{HttpRouteRule, MeshState, RetryPolicy as MeshRetry, Service};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, weighted_cluster::ClusterWeight, HeaderMatcher, RetryPolicy, Route,
    RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;

/// Istio's retry default for routes without a VirtualService retry policy: two attempts on
/// failures that are safe to retry (the request never reached the application).
fn default_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn retry(r: &MeshRetry) -> Option<RetryPolicy> {
    if r.attempts == 0 {
        return None;
    }
    let mut policy = RetryPolicy {
        num_retries: Some(UInt32Value { value: r.attempts }),
        per_try_timeout: r.per_try_timeout.map(duration),
        ..Default::default()
    };
    let mut conditions = Vec::new();
    for c in r
        .retry_on
        .as_deref()
        .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,5xx")
        .split(',')
    {
        let c = c.trim();
        match c.parse::<u32>() {
            Ok(code) => policy.retriable_status_codes.push(code),
            Err(_) => conditions.push(c.to_string()),
        }
    }
    if !policy.retriable_status_codes.is_empty()
        && !conditions.iter().any(|c| c == "retriable-status-codes")
    {
        conditions.push("retriable-status-codes".into());
    }
    policy.retry_on = conditions.join(",");
    Some(policy)
}

fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &m.exact {
        MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        MatchPattern::Prefix(p.clone())
    } else {
        MatchPattern::SafeRegex(regex(m.regex.as_ref()?))
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

fn header(name: &str, m: &StringMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: string_matcher(m).map(HeaderMatchSpecifier::StringMatch),
        ..Default::default()
    }
}

fn route_matches(rule: &HttpRouteRule) -> Vec<RouteMatch> {
    if rule.matches.is_empty() {
        return vec![RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }];
    }
    rule.matches
        .iter()
        .map(|m| {
            let path = match &m.uri {
                Some(StringMatch { exact: Some(e), .. }) => PathSpecifier::Path(e.clone()),
                Some(StringMatch {
                    prefix: Some(p), ..
                }) => PathSpecifier::Prefix(p.clone()),
                Some(StringMatch { regex: Some(r), .. }) => PathSpecifier::SafeRegex(regex(r)),
                _ => PathSpecifier::Prefix("/".into()),
            };
            let mut headers: Vec<HeaderMatcher> =
                m.headers.iter().map(|(n, v)| header(n, v)).collect();
            if let Some(method) = &m.method {
                headers.push(header(":method", method));
            }
            RouteMatch {
                path_specifier: Some(path),
                headers,
                ..Default::default()
            }
        })
        .collect()
}

/// The cluster a destination maps to when reached through route config `port`: an explicit
/// port wins, then the same port on the destination, then the destination's only port.
fn destination_cluster(
    mesh: &MeshState,
    port: u32,
    host: &str,
    subset: Option<&str>,
    dport: Option<u32>,
) -> String {
    let p = dport.unwrap_or_else(|| match mesh.services.get(host) {
        Some(s) if s.port(port).is_none() && s.ports.len() == 1 => s.ports[0].number,
        _ => port,
    });
    outbound_cluster_name(p, subset, host)
}

fn rule_routes(
    mesh: &MeshState,
    port: u32,
    vs_key: &str,
    idx: usize,
    rule: &HttpRouteRule,
) -> Vec<Route> {
    let live: Vec<_> = rule.destinations.iter().filter(|d| d.weight > 0).collect();
    let cluster_specifier = if live.len() == 1 {
        let d = live[0];
        ClusterSpecifier::Cluster(destination_cluster(
            mesh,
            port,
            &d.host,
            d.subset.as_deref(),
            d.port,
        ))
    } else {
        ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: live
                .iter()
                .map(|d| ClusterWeight {
                    name: destination_cluster(mesh, port, &d.host, d.subset.as_deref(), d.port),
                    weight: Some(UInt32Value { value: d.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // Istio disables Envoy's 15 s default: a route without a timeout never times out.
        timeout: Some(duration(rule.timeout.unwrap_or_default())),
        retry_policy: match &rule.retries {
            Some(r) => retry(r),
            None => Some(default_retry()),
        },
        hash_policy: hash_policy::for_targets(
            mesh,
            live.iter().map(|d| hash_policy::Target {
                host: &d.host,
                subset: d.subset.as_deref(),
                port: d.port,
                route_port: port,
            }),
        ),
        ..Default::default()
    };
    let name = rule
        .name
        .clone()
        .unwrap_or_else(|| format!("{vs_key}#{idx}"));
    route_matches(rule)
        .into_iter()
        .map(|m| Route {
            name: name.clone(),
            r#match: Some(m),
            action: Some(Action::Route(action.clone())),
            ..Default::default()
        })
        .collect()
}

fn virtual_host(mesh: &MeshState, namespace: &str, svc: &Service, port: u32) -> VirtualHost {
    let mut domains = Vec::new();
    for alias in mesh.host_aliases(&svc.fqdn, namespace) {
        domains.push(format!("{alias}:{port}"));
        domains.push(alias);
    }
    let routes = match mesh.virtual_services.get(&svc.fqdn) {
        Some(vs) => vs
            .http
            .iter()
            .enumerate()
            .flat_map(|(i, r)| rule_routes(mesh, port, &vs.key, i, r))
            .collect(),
        None => vec![Route {
            name: "default".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(outbound_cluster_name(
                    port, None, &svc.fqdn,
                ))),
                timeout: Some(duration(Default::default())),
                retry_policy: Some(default_retry()),
                hash_policy: hash_policy::for_targets(
                    mesh,
                    [hash_policy::Target {
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

/// One route configuration per HTTP service port, named by the port as Istio does,
/// holding a virtual host per service on that port.
pub fn routes(mesh: &MeshState, namespace: &str) -> Vec<RouteConfiguration> {
    let mut by_port: BTreeMap<u32, Vec<VirtualHost>> = BTreeMap::new();
    for svc in mesh.services.values() {
        for p in svc.ports.iter().filter(|p| p.protocol.is_http()) {
            by_port
                .entry(p.number)
                .or_default()
                .push(virtual_host(mesh, namespace, svc, p.number));
        }
    }
    by_port
        .into_iter()
        .map(|(port, virtual_hosts)| RouteConfiguration {
            name: port.to_string(),
            virtual_hosts,
            validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
            ..Default::default()
        })
        .collect()
}
