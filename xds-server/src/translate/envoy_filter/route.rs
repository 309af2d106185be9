//! ROUTE_CONFIGURATION, VIRTUAL_HOST and HTTP_ROUTE patches (istiod's rc_patch.go).

use super::*;
use crate::config::envoy_filter::{ApplyTo, CompiledPatch, Operation, RouteAction};
use crate::mesh::envoy_filters::PatchSet;

/// A proxy's outbound route configurations (RDS) with the patches of `set` applied.
pub fn patch_routes(routes: Vec<Arc<Resource>>, set: &PatchSet) -> Vec<Arc<Resource>> {
    if ![
        ApplyTo::RouteConfiguration,
        ApplyTo::VirtualHost,
        ApplyTo::HttpRoute,
    ]
    .into_iter()
    .any(|a| set.has(a))
    {
        return routes;
    }
    routes
        .iter()
        .map(|r| match decode(r) {
            Some(mut rc) => {
                patch_route_config(PatchContext::SidecarOutbound, set, &mut rc);
                encode(TypeKind::Route, Some(r), &rc)
            }
            None => r.clone(),
        })
        .collect()
}

struct RouteInfo {
    name: String,
    port: u32,
}

/// The port a route configuration serves: outbound ones are named by it, inbound ones
/// `inbound|PORT||` (Istio's subset key).
fn info(rc: &DynamicMessage) -> RouteInfo {
    let name = str_field(rc, "name");
    let port = match name.strip_prefix("inbound|") {
        Some(rest) => rest.split('|').next().unwrap_or_default().parse(),
        None => name.parse(),
    }
    .unwrap_or(0);
    RouteInfo { name, port }
}

fn rc_match(rc: &RouteInfo, p: &CompiledPatch) -> bool {
    let Some(m) = &p.route_configuration else {
        return true;
    };
    (m.port_number == 0 || m.port_number == rc.port) && (m.name.is_empty() || m.name == rc.name)
}

fn vhost_match(vh: &DynamicMessage, p: &CompiledPatch) -> bool {
    match p
        .route_configuration
        .as_ref()
        .and_then(|m| m.vhost.as_ref())
    {
        None => true,
        Some(m) => m.name.is_empty() || m.name == str_field(vh, "name"),
    }
}

fn route_match(r: &DynamicMessage, p: &CompiledPatch) -> bool {
    let Some(m) = p
        .route_configuration
        .as_ref()
        .and_then(|m| m.vhost.as_ref())
        .and_then(|v| v.route.as_ref())
    else {
        return true;
    };
    if !m.name.is_empty() && m.name != str_field(r, "name") {
        return false;
    }
    let field = match m.action {
        RouteAction::Any => return true,
        RouteAction::Route => "route",
        RouteAction::Redirect => "redirect",
        RouteAction::DirectResponse => "direct_response",
    };
    let actions = ["route", "redirect", "direct_response"];
    if !actions.iter().any(|a| has(r, a)) {
        // istiod's type switch lets other actions through.
        return true;
    }
    has(r, field)
}

fn has_route_match(p: &CompiledPatch) -> bool {
    p.route_configuration
        .as_ref()
        .and_then(|m| m.vhost.as_ref())
        .is_some_and(|v| v.route.is_some())
}

/// Patches one route configuration generated in `ctx`.
pub(super) fn patch_route_config(ctx: PatchContext, set: &PatchSet, rc: &mut DynamicMessage) {
    let info = info(rc);
    let applies = |p: &CompiledPatch| p.context.applies_to(ctx) && rc_match(&info, p);
    for p in set.patches(ApplyTo::RouteConfiguration) {
        if let (Operation::Merge, Some(v)) = (p.operation, &p.value) {
            if applies(p) {
                merge(rc, v);
            }
        }
    }
    let mut out = Vec::new();
    'hosts: for mut vh in take_list(rc, "virtual_hosts") {
        for p in set.patches(ApplyTo::VirtualHost) {
            if !applies(p) || !vhost_match(&vh, p) {
                continue;
            }
            match (p.operation, &p.value) {
                (Operation::Remove, _) => continue 'hosts,
                (Operation::Merge, Some(v)) => merge(&mut vh, v),
                (Operation::Replace, Some(v)) => vh = v.clone(),
                _ => {}
            }
        }
        patch_http_routes(&applies, set, &mut vh);
        out.push(vh);
    }
    for p in set.patches(ApplyTo::VirtualHost) {
        if let (Operation::Add, Some(v)) = (p.operation, &p.value) {
            if applies(p) {
                out.push(v.clone());
            }
        }
    }
    set_list(rc, "virtual_hosts", out);
}

fn patch_http_routes(
    applies: &dyn Fn(&CompiledPatch) -> bool,
    set: &PatchSet,
    vh: &mut DynamicMessage,
) {
    let selects = |p: &CompiledPatch, vh: &DynamicMessage| applies(p) && vhost_match(vh, p);
    let mut routes = Vec::new();
    'routes: for mut r in take_list(vh, "routes") {
        for p in set.patches(ApplyTo::HttpRoute) {
            if !selects(p, vh) || !route_match(&r, p) {
                continue;
            }
            match (p.operation, &p.value) {
                (Operation::Remove, _) => continue 'routes,
                (Operation::Merge, Some(v)) => merge(&mut r, v),
                _ => {}
            }
        }
        routes.push(r);
    }
    for p in set.patches(ApplyTo::HttpRoute) {
        let Some(v) = &p.value else {
            continue;
        };
        if !selects(p, vh) {
            continue;
        }
        let matched = |r: &DynamicMessage| route_match(r, p);
        match (p.operation, has_route_match(p)) {
            (Operation::Add, _) | (Operation::InsertAfter, false) => routes.push(v.clone()),
            (Operation::InsertBefore | Operation::InsertFirst, false) => {
                routes.insert(0, v.clone())
            }
            (Operation::InsertAfter, true) => {
                insert_at(&mut routes, v, true, matched);
            }
            (Operation::InsertBefore, true) => {
                insert_at(&mut routes, v, false, matched);
            }
            (Operation::InsertFirst, true) if routes.iter().any(matched) => {
                routes.insert(0, v.clone());
            }
            _ => {}
        }
    }
    set_list(vh, "routes", routes);
}
