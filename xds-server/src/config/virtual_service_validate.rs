//! Checks on one VirtualService in isolation (Istio's validation rules, plus Trellis's
//! rule that an option which would have no effect is an error, not silently ignored).
//! Whether destinations exist is checked when the mesh is built.

use super::model::*;
use super::parse_duration;
use super::validate::{fe, hostname, object_name, port, FieldError};
use base64::Engine as _;
use std::time::Duration;

/// Envoy's `retry_on` conditions (router filter docs) plus HTTP status codes, which Istio
/// turns into `retriable_status_codes`.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names Istio accepts in `fault.abort.grpcStatus`, by code.
const GRPC_STATUS: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The code of a gRPC status name (`UNAVAILABLE` -> 14).
pub fn grpc_status_code(name: &str) -> Option<u32> {
    GRPC_STATUS
        .iter()
        .position(|s| *s == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// Envoy refuses larger direct response bodies unless the route configuration raises
/// its limit; Trellis raises it to this (as istiod does) and rejects anything bigger.
pub const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

/// The decoded body of a direct response (`bytes` is base64, as in protobuf JSON).
pub fn direct_response_body(body: &HttpBody) -> Result<Vec<u8>, String> {
    match (&body.string, &body.bytes) {
        (Some(s), None) => Ok(s.as_bytes().to_vec()),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|e| format!("bytes is not valid base64: {e}")),
        _ => Err("exactly one of string or bytes must be set".into()),
    }
}

/// A Go-style duration that may be zero but not negative.
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("duration `{s}` must not be negative"));
    }
    parse_duration(s)
}

fn percent(p: &Percent, f: &str) -> Result<(), FieldError> {
    if p.value.is_finite() && (0.0..=100.0).contains(&p.value) {
        Ok(())
    } else {
        Err(fe(
            format!("{f}.value"),
            format!("percentage {} is outside 0..100", p.value),
        ))
    }
}

pub(super) fn string_match(m: &StringMatch, f: &str) -> Result<(), FieldError> {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        return Err(fe(f, "exactly one of exact, prefix or regex must be set"));
    }
    if let Some(r) = &m.regex {
        regex::Regex::new(r)
            .map_err(|e| fe(format!("{f}.regex"), format!("invalid regex: {e}")))?;
    }
    Ok(())
}

fn header_match_name(name: &str, f: &str) -> Result<(), FieldError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
    {
        return Err(fe(f, "header names must be lowercase and non-empty"));
    }
    Ok(())
}

fn http_match(m: &HttpMatchRequest, mf: &str) -> Result<(), FieldError> {
    if let Some(u) = &m.uri {
        string_match(u, &format!("{mf}.uri"))?;
        if let Some(p) = u.exact.as_ref().or(u.prefix.as_ref()) {
            if !p.starts_with('/') {
                return Err(fe(
                    format!("{mf}.uri"),
                    format!("path `{p}` must start with '/'"),
                ));
            }
        }
    }
    for (field, sm) in [
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match(sm, &format!("{mf}.{field}"))?;
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, hm) in map {
            let hf = format!("{mf}.{field}.{name}");
            header_match_name(name, &hf)?;
            string_match(hm, &hf)?;
        }
    }
    for (name, qm) in &m.query_params {
        let qf = format!("{mf}.queryParams.{name}");
        if name.is_empty() {
            return Err(fe(qf, "query parameter names must be non-empty"));
        }
        string_match(qm, &qf)?;
    }
    if let Some(p) = m.port {
        port(p).map_err(|e| fe(format!("{mf}.port"), e))?;
    }
    for (k, v) in &m.source_labels {
        if k.is_empty() || k.chars().any(char::is_whitespace) {
            return Err(fe(
                format!("{mf}.sourceLabels"),
                format!("`{k}` is not a label name"),
            ));
        }
        if v.chars().any(char::is_whitespace) {
            return Err(fe(
                format!("{mf}.sourceLabels.{k}"),
                format!("`{v}` is not a label value"),
            ));
        }
    }
    if let Some(ns) = &m.source_namespace {
        object_name(ns).map_err(|e| fe(format!("{mf}.sourceNamespace"), e))?;
    }
    for (i, g) in m.gateways.iter().enumerate() {
        gateway_ref(g).map_err(|e| fe(format!("{mf}.gateways[{i}]"), e))?;
    }
    Ok(())
}

/// `mesh` (the sidecars) or a Gateway, as `name` or `namespace/name`.
pub(super) fn gateway_ref(g: &str) -> Result<(), String> {
    if g == "mesh" {
        return Ok(());
    }
    let (ns, name) = g.split_once('/').unwrap_or(("", g));
    if !ns.is_empty() {
        object_name(ns).map_err(|e| format!("gateway `{g}`: namespace {e}"))?;
    }
    object_name(name).map_err(|e| format!("gateway `{g}`: {e}"))
}

/// Whether a VirtualService with `gateways` applies to sidecars: no gateways, or `mesh`.
pub fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

/// A VirtualService host: a name, a wildcard `*.example.com`, or `*` (gateways only).
fn vs_host(h: &str, mesh: bool) -> Result<(), String> {
    if h == "*" {
        return if mesh {
            Err("`*` would route every host of every sidecar; Istio allows it only for gateways (drop `mesh` from gateways, or name the hosts)".into())
        } else {
            Ok(())
        };
    }
    super::validate::service_entry_host(h)
}

/// `exportTo`: `*` (every namespace, the default), `.` (the object's own) or namespaces.
pub(super) fn export_to_list(list: &[String]) -> Result<(), FieldError> {
    for (i, e) in list.iter().enumerate() {
        if e != "*" && e != "." {
            object_name(e).map_err(|m| fe(format!("spec.exportTo[{i}]"), m))?;
        }
    }
    Ok(())
}

pub(super) fn destination(d: &Destination, df: &str) -> Result<(), FieldError> {
    hostname(&d.host).map_err(|m| fe(format!("{df}.host"), m))?;
    if let Some(p) = &d.port {
        port(p.number).map_err(|m| fe(format!("{df}.port.number"), m))?;
    }
    if let Some(s) = &d.subset {
        object_name(s).map_err(|m| fe(format!("{df}.subset"), m))?;
    }
    Ok(())
}

fn header_name(name: &str, f: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fe(f, format!("`{name}` is not a valid header name")));
    }
    Ok(())
}

/// Pseudo-headers and `host` cannot be changed by Envoy's header mutations; istiod turns
/// a request `set`/`add` of `:authority` or `host` into a host rewrite, and so does Trellis.
fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

fn header_operations(ops: &HeaderOperations, f: &str, request: bool) -> Result<(), FieldError> {
    for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
        for (name, value) in map {
            let hf = format!("{f}.{op}.{name}");
            header_name(name, &hf)?;
            // Envoy NACKs a value that could split the header (CR, LF, NUL).
            if value.chars().any(|c| matches!(c, '\r' | '\n' | '\0')) {
                return Err(fe(hf, "header values must not contain CR, LF or NUL"));
            }
            let internal = name.starts_with(':') || name.eq_ignore_ascii_case("host");
            if internal && !(request && is_authority(name)) {
                return Err(fe(
                    hf,
                    format!("header `{name}` cannot be changed (only a request's `:authority`/`host`, as a host rewrite)"),
                ));
            }
        }
    }
    for (i, name) in ops.remove.iter().enumerate() {
        let hf = format!("{f}.remove[{i}]");
        header_name(name, &hf)?;
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            return Err(fe(hf, format!("header `{name}` cannot be removed")));
        }
    }
    Ok(())
}

fn headers(h: &Headers, f: &str) -> Result<(), FieldError> {
    if let Some(r) = &h.request {
        header_operations(r, &format!("{f}.request"), true)?;
    }
    if let Some(r) = &h.response {
        header_operations(r, &format!("{f}.response"), false)?;
    }
    Ok(())
}

fn fault(fl: &HttpFaultInjection, f: &str) -> Result<(), FieldError> {
    if fl.delay.is_none() && fl.abort.is_none() {
        return Err(fe(f, "at least one of delay or abort is required"));
    }
    if let Some(d) = &fl.delay {
        let df = format!("{f}.delay");
        let Some(fixed) = &d.fixed_delay else {
            return Err(fe(
                format!("{df}.fixedDelay"),
                "fixedDelay is required (exponentialDelay is not supported, as in Istio)",
            ));
        };
        let v = duration(fixed).map_err(|m| fe(format!("{df}.fixedDelay"), m))?;
        if v < Duration::from_millis(1) {
            return Err(fe(
                format!("{df}.fixedDelay"),
                format!("delay `{fixed}` must be at least 1ms"),
            ));
        }
        if let Some(p) = &d.percentage {
            percent(p, &format!("{df}.percentage"))?;
            if d.percent.is_some() {
                return Err(fe(
                    format!("{df}.percent"),
                    "percent and percentage are mutually exclusive",
                ));
            }
        }
        if let Some(p) = d.percent {
            if !(0..=100).contains(&p) {
                return Err(fe(
                    format!("{df}.percent"),
                    format!("percentage {p} is outside 0..100"),
                ));
            }
        }
    }
    if let Some(a) = &fl.abort {
        let af = format!("{f}.abort");
        match (a.http_status, &a.grpc_status) {
            (Some(s), None) => {
                if !(200..=599).contains(&s) {
                    return Err(fe(
                        format!("{af}.httpStatus"),
                        format!("HTTP status {s} is outside 200..599"),
                    ));
                }
            }
            (None, Some(g)) => {
                if grpc_status_code(g).is_none() {
                    return Err(fe(
                        format!("{af}.grpcStatus"),
                        format!("unknown gRPC status `{g}` (e.g. UNAVAILABLE)"),
                    ));
                }
            }
            _ => {
                return Err(fe(
                    af,
                    "exactly one of httpStatus or grpcStatus is required",
                ))
            }
        }
        if let Some(p) = &a.percentage {
            percent(p, &format!("{af}.percentage"))?;
        }
    }
    Ok(())
}

fn redirect(r: &HttpRedirect, f: &str) -> Result<(), FieldError> {
    if r.uri.is_none()
        && r.authority.is_none()
        && r.port.is_none()
        && r.derive_port.is_none()
        && r.scheme.is_none()
    {
        return Err(fe(
            f,
            "at least one of uri, authority, port, derivePort or scheme is required",
        ));
    }
    if let Some(u) = &r.uri {
        if !u.starts_with('/') {
            return Err(fe(
                format!("{f}.uri"),
                format!("path `{u}` must start with '/'"),
            ));
        }
    }
    if let Some(a) = &r.authority {
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(fe(
                format!("{f}.authority"),
                format!("`{a}` is not a valid authority"),
            ));
        }
    }
    if let Some(p) = r.port {
        port(p).map_err(|m| fe(format!("{f}.port"), m))?;
        if r.derive_port.is_some() {
            return Err(fe(
                format!("{f}.derivePort"),
                "port and derivePort are mutually exclusive",
            ));
        }
    }
    if let Some(d) = &r.derive_port {
        if !matches!(d.as_str(), "FROM_PROTOCOL_DEFAULT" | "FROM_REQUEST_PORT") {
            return Err(fe(
                format!("{f}.derivePort"),
                format!("unknown derivePort `{d}` (FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT)"),
            ));
        }
    }
    if let Some(s) = &r.scheme {
        let ok = !s.is_empty()
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !ok {
            return Err(fe(
                format!("{f}.scheme"),
                format!("`{s}` is not a URI scheme"),
            ));
        }
    }
    if let Some(c) = r.redirect_code {
        if ![301, 302, 303, 307, 308].contains(&c) {
            return Err(fe(
                format!("{f}.redirectCode"),
                format!("redirect code {c} is not one of 301, 302, 303, 307, 308"),
            ));
        }
    }
    Ok(())
}

fn direct_response(d: &HttpDirectResponse, f: &str) -> Result<(), FieldError> {
    if !(200..=599).contains(&d.status) {
        return Err(fe(
            format!("{f}.status"),
            format!("HTTP status {} is outside 200..599", d.status),
        ));
    }
    if let Some(b) = &d.body {
        let body = direct_response_body(b).map_err(|m| fe(format!("{f}.body"), m))?;
        if body.len() > MAX_DIRECT_RESPONSE_BODY {
            return Err(fe(
                format!("{f}.body"),
                format!(
                    "body of {} bytes is larger than {MAX_DIRECT_RESPONSE_BODY}",
                    body.len()
                ),
            ));
        }
    }
    Ok(())
}

fn rewrite(r: &HttpRewrite, f: &str) -> Result<(), FieldError> {
    if r.uri.is_none() && r.authority.is_none() && r.uri_regex_rewrite.is_none() {
        return Err(fe(
            f,
            "at least one of uri, authority or uriRegexRewrite is required",
        ));
    }
    if let Some(u) = &r.uri {
        if u.is_empty() {
            return Err(fe(format!("{f}.uri"), "must not be empty"));
        }
        if r.uri_regex_rewrite.is_some() {
            return Err(fe(
                format!("{f}.uriRegexRewrite"),
                "uri and uriRegexRewrite are mutually exclusive",
            ));
        }
    }
    if let Some(a) = &r.authority {
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(fe(
                format!("{f}.authority"),
                format!("`{a}` is not a valid authority"),
            ));
        }
    }
    if let Some(rr) = &r.uri_regex_rewrite {
        regex::Regex::new(&rr.pattern).map_err(|e| {
            fe(
                format!("{f}.uriRegexRewrite.match"),
                format!("invalid regex: {e}"),
            )
        })?;
    }
    Ok(())
}

fn cors(c: &CorsPolicy, f: &str) -> Result<(), FieldError> {
    for (i, o) in c.allow_origins.iter().enumerate() {
        string_match(o, &format!("{f}.allowOrigins[{i}]"))?;
    }
    for (field, list) in [
        ("allowMethods", &c.allow_methods),
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        for (i, v) in list.iter().enumerate() {
            if v.is_empty() || v.contains(',') || v.chars().any(char::is_whitespace) {
                return Err(fe(
                    format!("{f}.{field}[{i}]"),
                    format!("`{v}` is not a single token"),
                ));
            }
        }
    }
    if let Some(m) = &c.max_age {
        let d = duration(m).map_err(|e| fe(format!("{f}.maxAge"), e))?;
        if d.subsec_nanos() != 0 {
            return Err(fe(
                format!("{f}.maxAge"),
                format!("maxAge `{m}` must be whole seconds"),
            ));
        }
    }
    if let Some(u) = &c.unmatched_preflights {
        if !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE") {
            return Err(fe(
                format!("{f}.unmatchedPreflights"),
                format!("unknown value `{u}` (FORWARD, IGNORE)"),
            ));
        }
    }
    Ok(())
}

fn retries(rt: &HttpRetry, f: &str) -> Result<(), FieldError> {
    if let Some(t) = &rt.per_try_timeout {
        let d = duration(t).map_err(|m| fe(format!("{f}.perTryTimeout"), m))?;
        if d.is_zero() {
            return Err(fe(
                format!("{f}.perTryTimeout"),
                format!("duration `{t}` must be greater than zero"),
            ));
        }
    }
    if let Some(on) = &rt.retry_on {
        for cond in on.split(',').map(str::trim) {
            let is_code = cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
            if !is_code && !RETRY_ON.contains(&cond) {
                return Err(fe(
                    format!("{f}.retryOn"),
                    format!("unknown retry condition `{cond}`"),
                ));
            }
        }
    }
    Ok(())
}

/// A root's rule that hands its requests to a delegate: the delegate's rules say where
/// they go, so none of route / redirect / directResponse. Its other options fill in what
/// the delegate's rules leave unset.
fn delegating_rule(d: &Delegate, r: &HttpRoute, f: &str) -> Result<(), FieldError> {
    let actions = [
        ("route", !r.route.is_empty()),
        ("redirect", r.redirect.is_some()),
        ("directResponse", r.direct_response.is_some()),
    ];
    if let Some((field, _)) = actions.iter().find(|(_, set)| *set) {
        return Err(fe(
            format!("{f}.{field}"),
            format!("{field} and delegate are mutually exclusive (the delegate's rules say where requests go)"),
        ));
    }
    object_name(&d.name).map_err(|m| fe(format!("{f}.delegate.name"), m))?;
    if let Some(ns) = &d.namespace {
        object_name(ns).map_err(|m| fe(format!("{f}.delegate.namespace"), m))?;
    }
    Ok(())
}

/// Which of route / redirect / directResponse / delegate a rule uses, and the options
/// that only make sense with a route.
fn action(r: &HttpRoute, f: &str) -> Result<(), FieldError> {
    if let Some(d) = &r.delegate {
        return delegating_rule(d, r, f);
    }
    let has_route = !r.route.is_empty();
    if r.redirect.is_some() && has_route {
        return Err(fe(
            format!("{f}.redirect"),
            "redirect and route are mutually exclusive",
        ));
    }
    if r.direct_response.is_some() && has_route {
        return Err(fe(
            format!("{f}.directResponse"),
            "directResponse and route are mutually exclusive",
        ));
    }
    if r.direct_response.is_some() && r.redirect.is_some() {
        return Err(fe(
            format!("{f}.directResponse"),
            "directResponse and redirect are mutually exclusive",
        ));
    }
    if !has_route && r.redirect.is_none() && r.direct_response.is_none() {
        return Err(fe(
            format!("{f}.route"),
            "one of route, redirect, directResponse or delegate is required",
        ));
    }
    if !has_route {
        let what = if r.redirect.is_some() {
            "redirect"
        } else {
            "directResponse"
        };
        let route_only = [
            ("rewrite", r.rewrite.is_some()),
            ("timeout", r.timeout.is_some()),
            ("retries", r.retries.is_some()),
            ("mirror", r.mirror.is_some()),
            ("mirrorPercentage", r.mirror_percentage.is_some()),
            ("mirrors", !r.mirrors.is_empty()),
        ];
        if let Some((field, _)) = route_only.iter().find(|(_, set)| *set) {
            return Err(fe(
                format!("{f}.{field}"),
                format!("{field} has no effect with {what} (it needs a route)"),
            ));
        }
    }
    Ok(())
}

fn route_destinations(r: &HttpRoute, f: &str) -> Result<(), FieldError> {
    let mut total = 0u64;
    for (j, d) in r.route.iter().enumerate() {
        let df = format!("{f}.route[{j}]");
        destination(&d.destination, &format!("{df}.destination"))?;
        if let Some(h) = &d.headers {
            headers(h, &format!("{df}.headers"))?;
        }
        total += u64::from(d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }));
    }
    if !r.route.is_empty() && total == 0 {
        return Err(fe(
            format!("{f}.route"),
            "the weights of the destinations add up to 0",
        ));
    }
    Ok(())
}

fn http_route(r: &HttpRoute, f: &str) -> Result<(), FieldError> {
    for (j, m) in r.matches.iter().enumerate() {
        http_match(m, &format!("{f}.match[{j}]"))?;
    }
    action(r, f)?;
    route_destinations(r, f)?;
    if let Some(rd) = &r.redirect {
        redirect(rd, &format!("{f}.redirect"))?;
    }
    if let Some(d) = &r.direct_response {
        direct_response(d, &format!("{f}.directResponse"))?;
    }
    if let Some(rw) = &r.rewrite {
        rewrite(rw, &format!("{f}.rewrite"))?;
    }
    if let Some(t) = &r.timeout {
        duration(t).map_err(|m| fe(format!("{f}.timeout"), m))?;
    }
    if let Some(rt) = &r.retries {
        retries(rt, &format!("{f}.retries"))?;
    }
    if let Some(fl) = &r.fault {
        fault(fl, &format!("{f}.fault"))?;
    }
    if let Some(m) = &r.mirror {
        destination(m, &format!("{f}.mirror"))?;
    }
    if let Some(p) = &r.mirror_percentage {
        if r.mirror.is_none() {
            return Err(fe(
                format!("{f}.mirrorPercentage"),
                "mirrorPercentage needs mirror",
            ));
        }
        percent(p, &format!("{f}.mirrorPercentage"))?;
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        let mf = format!("{f}.mirrors[{j}]");
        destination(&m.destination, &format!("{mf}.destination"))?;
        if let Some(p) = &m.percentage {
            percent(p, &format!("{mf}.percentage"))?;
        }
    }
    if let Some(h) = &r.headers {
        headers(h, &format!("{f}.headers"))?;
    }
    if let Some(c) = &r.cors_policy {
        cors(c, &format!("{f}.corsPolicy"))?;
    }
    Ok(())
}

/// What Istio requires of a delegate (a VirtualService without hosts): HTTP rules that
/// do not delegate again (one level only), and nothing that belongs to a root.
fn delegate(spec: &VirtualServiceSpec) -> Result<(), FieldError> {
    const WHAT: &str = "a delegate VirtualService (one without hosts)";
    if !spec.gateways.is_empty() {
        return Err(fe(
            "spec.gateways",
            format!("{WHAT} applies where its root does; it cannot name gateways"),
        ));
    }
    for (field, set) in [("tcp", !spec.tcp.is_empty()), ("tls", !spec.tls.is_empty())] {
        if set {
            return Err(fe(
                format!("spec.{field}"),
                format!("{WHAT} has http rules only ({field} routes are not delegated)"),
            ));
        }
    }
    if spec.http.is_empty() {
        return Err(fe(
            "spec.http",
            format!(
                "{WHAT} needs http rules (or give it hosts to make it a VirtualService of its own)"
            ),
        ));
    }
    if let Some(i) = spec.http.iter().position(|r| r.delegate.is_some()) {
        return Err(fe(
            format!("spec.http[{i}].delegate"),
            format!("{WHAT} cannot delegate again (Istio supports one level of delegation)"),
        ));
    }
    Ok(())
}

pub(super) fn validate(spec: &VirtualServiceSpec) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        delegate(spec)?;
    }
    let mesh = applies_to_mesh(&spec.gateways);
    for (i, h) in spec.hosts.iter().enumerate() {
        vs_host(h, mesh).map_err(|m| fe(format!("spec.hosts[{i}]"), m))?;
    }
    for (i, g) in spec.gateways.iter().enumerate() {
        gateway_ref(g).map_err(|m| fe(format!("spec.gateways[{i}]"), m))?;
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return Err(fe(
            "spec",
            "at least one http, tcp or tls route is required",
        ));
    }
    for (i, r) in spec.http.iter().enumerate() {
        http_route(r, &format!("spec.http[{i}]"))?;
    }
    super::l4_routes::validate(spec)?;
    export_to_list(&spec.export_to)
}
