//! One VirtualService `http` rule -> [`HttpRouteRule`]: hosts resolved, every destination
//! (route and mirror) checked to be a service with that port and subset. Per-object
//! validation already ran, so parse failures cannot happen here.

use super::stages::{Errors, StageError};
use super::virtual_services::Refs;
use super::{HttpRouteRule, MirrorTarget, RetryPolicy, RouteDestination};
use crate::config::model::{Destination, HttpRoute, VirtualServiceSpec};
use crate::config::{parse_duration, Object};

/// The service and port a destination names (`f`: `spec.http[i].route[j].destination`,
/// `spec.http[i].mirror`, ...), or `None` after pushing its errors.
pub(super) fn destination(
    vs: &Object<VirtualServiceSpec>,
    f: &str,
    d: &Destination,
    refs: &Refs<'_>,
    errs: &mut Errors,
) -> Option<(String, Option<u32>)> {
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
    ok.then_some((host, port))
}

/// `mirror` (with `mirrorPercentage`) and `mirrors`, in that order.
fn mirrors(
    vs: &Object<VirtualServiceSpec>,
    i: usize,
    r: &HttpRoute,
    refs: &Refs<'_>,
    errs: &mut Errors,
) -> Option<Vec<MirrorTarget>> {
    let single = r
        .mirror
        .as_ref()
        .map(|m| (format!("spec.http[{i}].mirror"), m, r.mirror_percentage));
    let listed = r.mirrors.iter().enumerate().map(|(j, m)| {
        (
            format!("spec.http[{i}].mirrors[{j}].destination"),
            &m.destination,
            m.percentage,
        )
    });
    let mut ok = true;
    let mut out = Vec::new();
    for (f, d, percentage) in single.into_iter().chain(listed) {
        match destination(vs, &f, d, refs, errs) {
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
        let Some((host, port)) = destination(vs, &f, &d.destination, refs, errs) else {
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
    let mirrors = mirrors(vs, i, r, refs, errs);
    if !ok {
        return None;
    }
    Some(HttpRouteRule {
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
    })
}
