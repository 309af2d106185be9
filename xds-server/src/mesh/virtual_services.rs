//! The VirtualService stage: routing rules by host, checked against the catalog of
//! services and the subsets DestinationRules define, with delegate VirtualServices merged
//! into the roots that name them (`delegates.rs`).

use super::delegates::Delegates;
use super::destination_rules::DestinationRules;
use super::inputs::KindStore;
use super::services::Catalog;
use super::settings::Settings;
use super::stages::{unique, Errors, StageError, Warnings};
use super::{L4RouteRule, RouteDestination, VirtualService};
use crate::config::l4_routes::{self, L4Match};
use crate::config::model::VirtualServiceSpec;
use crate::config::virtual_service_validate::applies_to_mesh;
use crate::config::{ConfigWarning, Object};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Host FQDN -> the VirtualService routing it.
pub type VirtualServices = BTreeMap<String, Arc<VirtualService>>;

/// What the stage makes: the routing by host, and the delegate rules that route nothing.
#[derive(Debug, Default, PartialEq)]
pub struct Routing {
    pub by_host: Arc<VirtualServices>,
    pub warnings: Arc<Vec<ConfigWarning>>,
}

/// What a route may refer to, for its cross-object checks.
pub(super) struct Refs<'a> {
    pub catalog: &'a Catalog,
    pub rules: &'a DestinationRules,
    pub settings: &'a Settings,
}

/// Builds the stage; unchanged parts keep the `Arc`s of `prev`, so that a change of
/// warnings alone does not look like a change of routes.
pub fn build(
    store: &KindStore<VirtualServiceSpec>,
    catalog: &Catalog,
    rules: &DestinationRules,
    settings: &Settings,
    prev: Option<&Routing>,
    errs: &mut Errors,
) -> Routing {
    let refs = Refs {
        catalog,
        rules,
        settings,
    };
    let mut warnings = Warnings::default();
    let by_host = by_host(store, &refs, errs, &mut warnings);
    let keep = |p: &Routing| *p.by_host == by_host;
    Routing {
        by_host: match prev {
            Some(p) if keep(p) => p.by_host.clone(),
            _ => Arc::new(by_host),
        },
        warnings: match prev {
            Some(p) if *p.warnings == warnings.0 => p.warnings.clone(),
            _ => Arc::new(warnings.0),
        },
    }
}

fn by_host(
    store: &KindStore<VirtualServiceSpec>,
    refs: &Refs<'_>,
    errs: &mut Errors,
    warnings: &mut Warnings,
) -> VirtualServices {
    let catalog = refs.catalog;
    let all = unique(store, "VirtualService", errs);
    let delegates = Delegates::new(&all, refs, errs);
    delegates.warn_unused(&all, warnings);
    let mut out = VirtualServices::new();
    // Wildcard hosts are resolved after every exact one: an exact host wins, then the
    // most specific wildcard (as in Istio).
    let mut wildcards: Vec<(
        String,
        Arc<VirtualService>,
        &Object<VirtualServiceSpec>,
        usize,
    )> = Vec::new();
    for &vs in &all {
        // Bound to gateways only: sidecars never use it (as in Istio); kept for gateways.
        // A delegate routes only through its roots.
        if !applies_to_mesh(&vs.spec.gateways) || Delegates::is_delegate(vs) {
            continue;
        }
        let Some(info) = virtual_service(vs, refs, &delegates, errs, warnings) else {
            continue;
        };
        let info = Arc::new(info);
        for (i, fqdn) in info.hosts.iter().enumerate() {
            if fqdn.starts_with("*.") {
                wildcards.push((fqdn.clone(), info.clone(), vs, i));
                continue;
            }
            let field = format!("spec.hosts[{i}]");
            if !catalog.contains_key(fqdn) {
                let e = StageError::UnknownService { host: fqdn.clone() };
                errs.push(vs, "VirtualService", field, e);
            } else if let Some(other) = out.get(fqdn) {
                let e = StageError::HostRouted {
                    host: fqdn.clone(),
                    by: other.key.clone(),
                };
                errs.push(vs, "VirtualService", field, e);
            } else {
                out.insert(fqdn.clone(), info.clone());
            }
        }
    }
    wildcards.sort_by_key(|(w, ..)| std::cmp::Reverse(w.len()));
    let mut patterns: BTreeMap<String, String> = BTreeMap::new();
    for (pattern, info, vs, i) in wildcards {
        let field = format!("spec.hosts[{i}]");
        if let Some(by) = patterns.insert(pattern.clone(), info.key.clone()) {
            let e = StageError::HostRouted { host: pattern, by };
            errs.push(vs, "VirtualService", field, e);
            continue;
        }
        let matched: Vec<&String> = catalog
            .keys()
            .filter(|h| **h == pattern || l4_routes::host_matches(&pattern, h))
            .collect();
        if matched.is_empty() {
            errs.push(
                vs,
                "VirtualService",
                field,
                StageError::UnknownService { host: pattern },
            );
            continue;
        }
        for h in matched {
            out.entry(h.clone()).or_insert_with(|| info.clone());
        }
    }
    out
}

/// One VirtualService for sidecars, its routes checked; `None` (with errors) when it
/// refers to something that does not exist.
fn virtual_service(
    vs: &Object<VirtualServiceSpec>,
    refs: &Refs<'_>,
    delegates: &Delegates<'_>,
    errs: &mut Errors,
    warnings: &mut Warnings,
) -> Option<VirtualService> {
    let mut ok = true;
    let mut http = Vec::new();
    for (i, r) in vs.spec.http.iter().enumerate() {
        // A delegating rule is checked too: its mirrors pass on to the delegate's rules.
        match super::http_route::http_rule(vs, i, r, refs, errs) {
            Some(rule) if r.delegate.is_none() => http.push(rule),
            Some(_) => http.extend(delegates.expand((vs, i, r), refs, errs, warnings)),
            None => ok = false,
        }
    }
    let tcp = l4_rules(
        vs,
        "tcp",
        vs.spec.tcp.iter().map(|r| (&r.matches, &r.route)),
        refs,
        errs,
    );
    let tls = l4_rules(
        vs,
        "tls",
        vs.spec.tls.iter().map(|r| (&r.matches, &r.route)),
        refs,
        errs,
    );
    let (Some(tcp), Some(tls), true) = (tcp, tls, ok) else {
        return None;
    };
    Some(VirtualService {
        key: vs.key(),
        namespace: vs.namespace.clone(),
        export_to: vs.spec.export_to.clone(),
        hosts: vs
            .spec
            .hosts
            .iter()
            .map(|h| refs.settings.resolve_host(h, &vs.namespace))
            .collect(),
        http,
        tcp,
        tls,
    })
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
