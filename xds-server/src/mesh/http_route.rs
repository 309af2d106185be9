//! One VirtualService `http` rule -> [`HttpRouteRule`]: hosts resolved against the mesh,
//! every destination (route and mirror) checked to be a service with that port and
//! subset. Per-object validation already ran, so parse failures cannot happen here.

use super::build::Errors;
use super::*;
use crate::config::{parse_duration, Object};

/// The service, port and subset a destination names, or an error pushed for `f`
/// (`spec.http[i].route[j].destination`, `spec.http[i].mirror`, ...).
fn destination(
    mesh: &MeshState,
    errs: &mut Errors,
    vs: &Object<VirtualServiceSpec>,
    f: &str,
    d: &Destination,
) -> Option<(String, Option<u32>)> {
    let host = mesh.resolve_host(&d.host, &vs.namespace);
    let Some(svc) = mesh.services.get(&host) else {
        errs.push(
            vs,
            "VirtualService",
            format!("{f}.host"),
            format!("`{host}` is not a service in the mesh"),
        );
        return None;
    };
    let mut ok = true;
    let port = d.port.as_ref().map(|p| p.number);
    if let Some(p) = port {
        if svc.port(p).is_none() {
            errs.push(
                vs,
                "VirtualService",
                format!("{f}.port.number"),
                format!("service `{host}` has no port {p}"),
            );
            ok = false;
        }
    }
    if let Some(subset) = &d.subset {
        let defined = mesh
            .destination_rules
            .get(&host)
            .is_some_and(|dr| dr.subsets.contains_key(subset));
        if !defined {
            errs.push(
                vs,
                "VirtualService",
                format!("{f}.subset"),
                format!("subset `{subset}` of `{host}` is not defined by any DestinationRule"),
            );
            ok = false;
        }
    }
    ok.then_some((host, port))
}

fn mirrors(
    mesh: &MeshState,
    errs: &mut Errors,
    vs: &Object<VirtualServiceSpec>,
    f: &str,
    r: &HttpRoute,
) -> Option<Vec<MirrorTarget>> {
    let mut ok = true;
    let mut out = Vec::new();
    let single = r
        .mirror
        .as_ref()
        .map(|m| (format!("{f}.mirror"), m, r.mirror_percentage));
    let listed = r.mirrors.iter().enumerate().map(|(j, m)| {
        (
            format!("{f}.mirrors[{j}].destination"),
            &m.destination,
            m.percentage,
        )
    });
    for (mf, d, percentage) in single.into_iter().chain(listed) {
        match destination(mesh, errs, vs, &mf, d) {
            Some((host, port)) => out.push(MirrorTarget {
                host,
                subset: d.subset.clone(),
                port,
                percentage: percentage.map(|p| p.value),
            }),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Rule `i` of `vs`, or `None` after pushing every cross-object error it has.
pub(super) fn http_rule(
    mesh: &MeshState,
    errs: &mut Errors,
    vs: &Object<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
) -> Option<HttpRouteRule> {
    let mut ok = true;
    let mut destinations = Vec::new();
    for (j, d) in r.route.iter().enumerate() {
        let f = format!("spec.http[{i}].route[{j}].destination");
        let Some((host, port)) = destination(mesh, errs, vs, &f, &d.destination) else {
            ok = false;
            continue;
        };
        destinations.push(RouteDestination {
            host,
            subset: d.destination.subset.clone(),
            port,
            weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
            headers: d.headers.clone(),
        });
    }
    let mirrors = mirrors(mesh, errs, vs, &format!("spec.http[{i}]"), r);
    let rule = HttpRouteRule {
        name: r.name.clone(),
        matches: r.matches.clone(),
        destinations,
        redirect: r.redirect.clone(),
        direct_response: r.direct_response.clone(),
        rewrite: r.rewrite.clone(),
        timeout: r.timeout.as_deref().and_then(|t| parse_duration(t).ok()),
        retries: r.retries.as_ref().map(|rt| RetryPolicy {
            attempts: rt.attempts,
            per_try_timeout: rt
                .per_try_timeout
                .as_deref()
                .and_then(|t| parse_duration(t).ok()),
            retry_on: rt.retry_on.clone(),
            retry_remote_localities: rt.retry_remote_localities.unwrap_or(false),
        }),
        fault: r.fault.clone(),
        mirrors: mirrors?,
        headers: r.headers.clone(),
        cors: r.cors_policy.clone(),
    };
    ok.then_some(rule)
}
