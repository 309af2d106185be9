//! The VirtualService stage: routing rules by host, checked against the catalog of
//! services and the subsets DestinationRules define.

use super::destination_rules::DestinationRules;
use super::inputs::KindStore;
use super::services::Catalog;
use super::settings::Settings;
use super::stages::{describe, Errors, StageError};
use super::{HttpRouteRule, L4RouteRule, RetryPolicy, RouteDestination, VirtualService};
use crate::config::l4_routes::{self, L4Match};
use crate::config::model::{Destination, HttpRoute, VirtualServiceSpec};
use crate::config::{parse_duration, Object, Source};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Host FQDN -> the VirtualService routing it.
pub type VirtualServices = BTreeMap<String, Arc<VirtualService>>;

/// What a route may refer to, for its cross-object checks.
pub(super) struct Refs<'a> {
    pub catalog: &'a Catalog,
    pub rules: &'a DestinationRules,
    pub settings: &'a Settings,
}

pub fn build(
    store: &KindStore<VirtualServiceSpec>,
    catalog: &Catalog,
    rules: &DestinationRules,
    settings: &Settings,
    errs: &mut Errors,
) -> VirtualServices {
    let refs = Refs {
        catalog,
        rules,
        settings,
    };
    let mut out = VirtualServices::new();
    let mut seen: BTreeMap<String, &Source> = BTreeMap::new();
    for (_, vs) in store.iter() {
        if let Some(prev) = seen.insert(vs.key(), &vs.source) {
            let previous = describe(prev);
            errs.push(
                vs,
                "VirtualService",
                "metadata.name",
                StageError::Duplicate { previous },
            );
            continue;
        }
        let mut hosts = Vec::new();
        let mut ok = true;
        for (i, h) in vs.spec.hosts.iter().enumerate() {
            let fqdn = settings.resolve_host(h, &vs.namespace);
            let field = format!("spec.hosts[{i}]");
            if !catalog.contains_key(&fqdn) {
                errs.push(
                    vs,
                    "VirtualService",
                    field,
                    StageError::UnknownService { host: fqdn.clone() },
                );
                ok = false;
            } else if let Some(other) = out.get(&fqdn) {
                let e = StageError::HostRouted {
                    host: fqdn.clone(),
                    by: other.key.clone(),
                };
                errs.push(vs, "VirtualService", field, e);
                ok = false;
            }
            hosts.push(fqdn);
        }
        let mut http = Vec::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            match http_rule(vs, i, r, &refs, errs) {
                Some(rule) => http.push(rule),
                None => ok = false,
            }
        }
        let mut l4 =
            |kind: &str, rules: Vec<(&Vec<L4Match>, &Vec<l4_routes::RouteDestination>)>| {
                let mut out = Vec::new();
                for (i, (matches, route)) in rules.into_iter().enumerate() {
                    let mut destinations = Vec::new();
                    for (j, d) in route.iter().enumerate() {
                        let f = format!("spec.{kind}[{i}].route[{j}].destination");
                        match destination(
                            vs,
                            &f,
                            &d.destination,
                            d.weight,
                            route.len(),
                            &refs,
                            errs,
                        ) {
                            Some(d) => destinations.push(d),
                            None => ok = false,
                        }
                    }
                    out.push(L4RouteRule {
                        matches: matches.clone(),
                        destinations,
                    });
                }
                out
            };
        let tcp = l4(
            "tcp",
            vs.spec.tcp.iter().map(|r| (&r.matches, &r.route)).collect(),
        );
        let tls = l4(
            "tls",
            vs.spec.tls.iter().map(|r| (&r.matches, &r.route)).collect(),
        );
        if ok {
            let info = Arc::new(VirtualService {
                key: vs.key(),
                namespace: vs.namespace.clone(),
                hosts: hosts.clone(),
                http,
                tcp,
                tls,
            });
            for h in hosts {
                out.insert(h, info.clone());
            }
        }
    }
    out
}

/// `spec.http[i]` as the mesh keeps it; `None` (with errors) when it refers to something
/// that does not exist.
pub(super) fn http_rule(
    vs: &Object<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
    refs: &Refs<'_>,
    errs: &mut Errors,
) -> Option<HttpRouteRule> {
    let mut ok = true;
    let mut destinations = Vec::new();
    for (j, d) in r.route.iter().enumerate() {
        let f = format!("spec.http[{i}].route[{j}].destination");
        match destination(vs, &f, &d.destination, d.weight, r.route.len(), refs, errs) {
            Some(d) => destinations.push(d),
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(HttpRouteRule {
        name: r.name.clone(),
        matches: r.matches.clone(),
        destinations,
        timeout: r.timeout.as_deref().and_then(|t| parse_duration(t).ok()),
        retries: r.retries.as_ref().map(|rt| RetryPolicy {
            attempts: rt.attempts,
            per_try_timeout: rt
                .per_try_timeout
                .as_deref()
                .and_then(|t| parse_duration(t).ok()),
            retry_on: rt.retry_on.clone(),
        }),
    })
}

/// A route destination, checked against the catalog and the DestinationRules; `None`
/// (with errors) when it refers to something that does not exist. `f` is its field,
/// `of` the number of destinations of its route (a lone one weighs 100).
fn destination(
    vs: &Object<VirtualServiceSpec>,
    f: &str,
    d: &Destination,
    weight: Option<u32>,
    of: usize,
    refs: &Refs<'_>,
    errs: &mut Errors,
) -> Option<RouteDestination> {
    let host = refs.settings.resolve_host(&d.host, &vs.namespace);
    let Some(ports) = refs.catalog.get(&host) else {
        errs.push(
            vs,
            "VirtualService",
            format!("{f}.host"),
            StageError::UnknownService { host },
        );
        return None;
    };
    let mut ok = true;
    let port = d.port.as_ref().map(|p| p.number);
    if let Some(p) = port {
        if !ports.iter().any(|sp| sp.number == p) {
            let e = StageError::NoSuchPort {
                host: host.clone(),
                port: p,
            };
            errs.push(vs, "VirtualService", format!("{f}.port.number"), e);
            ok = false;
        }
    }
    if let Some(subset) = &d.subset {
        let defined = refs
            .rules
            .get(&host)
            .is_some_and(|dr| dr.subsets.contains_key(subset));
        if !defined {
            let e = StageError::UndefinedSubset {
                subset: subset.clone(),
                host: host.clone(),
            };
            errs.push(vs, "VirtualService", format!("{f}.subset"), e);
            ok = false;
        }
    }
    ok.then(|| RouteDestination {
        host,
        subset: d.subset.clone(),
        port,
        weight: weight.unwrap_or(if of == 1 { 100 } else { 0 }),
    })
}
