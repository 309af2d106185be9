//! The VirtualService stage: routing rules by host, checked against the catalog of
//! services and the subsets DestinationRules define.

use super::destination_rules::DestinationRules;
use super::inputs::KindStore;
use super::services::Catalog;
use super::settings::Settings;
use super::stages::{describe, Errors, StageError};
use super::{L4RouteRule, RouteDestination, VirtualService};
use crate::config::l4_routes::{self, L4Match};
use crate::config::model::VirtualServiceSpec;
use crate::config::{Object, Source};
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
            match super::http_route::http_rule(vs, i, r, &refs, errs) {
                Some(rule) => http.push(rule),
                None => ok = false,
            }
        }
        let tcp = l4_rules(
            vs,
            "tcp",
            vs.spec.tcp.iter().map(|r| (&r.matches, &r.route)),
            &refs,
            errs,
        );
        let tls = l4_rules(
            vs,
            "tls",
            vs.spec.tls.iter().map(|r| (&r.matches, &r.route)),
            &refs,
            errs,
        );
        let (Some(tcp), Some(tls)) = (tcp, tls) else {
            continue;
        };
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

/// The `tcp` or `tls` (`kind`) rules of a VirtualService with their destinations checked;
/// `None` (with errors) when one refers to something that does not exist.
fn l4_rules<'a>(
    vs: &Object<VirtualServiceSpec>,
    kind: &str,
    rules: impl Iterator<Item = (&'a Vec<L4Match>, &'a Vec<l4_routes::RouteDestination>)>,
    refs: &Refs<'_>,
    errs: &mut Errors,
) -> Option<Vec<L4RouteRule>> {
    let mut ok = true;
    let mut out = Vec::new();
    for (i, (matches, route)) in rules.enumerate() {
        let mut destinations = Vec::new();
        for (j, d) in route.iter().enumerate() {
            let f = format!("spec.{kind}[{i}].route[{j}].destination");
            match super::http_route::destination(vs, &f, &d.destination, refs, errs) {
                Some((host, port)) => destinations.push(RouteDestination {
                    host,
                    subset: d.destination.subset.clone(),
                    port,
                    weight: d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }),
                    headers: None,
                }),
                None => ok = false,
            }
        }
        out.push(L4RouteRule {
            matches: matches.clone(),
            destinations,
        });
    }
    ok.then_some(out)
}
