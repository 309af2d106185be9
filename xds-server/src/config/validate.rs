//! Checks on one object in isolation. Cross-object checks (does the subset exist, is the
//! host a service) live in `crate::mesh`, because they need every file.

use super::model::*;
use super::traffic_policy_checks::traffic_policy;
use super::{parse_duration, ConfigObject};
use std::collections::BTreeSet;
use std::net::IpAddr;

type FieldError = (String, String);

fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

/// RFC 1123 label, the rule Kubernetes applies to names and namespaces.
pub fn object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("`{name}` is longer than 253 characters"));
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"
        ))
    }
}

pub fn object(obj: &ConfigObject) -> Result<(), FieldError> {
    match obj {
        ConfigObject::MeshConfig(o) => mesh_config(&o.spec),
        ConfigObject::ServiceEntry(o) => service_entry(&o.spec),
        ConfigObject::WorkloadEntry(o) => workload_entry(&o.spec, "spec"),
        ConfigObject::VirtualService(o) => virtual_service(&o.spec),
        ConfigObject::DestinationRule(o) => destination_rule(&o.spec),
        ConfigObject::PeerAuthentication(o) => super::peer_authentication::validate(&o.spec),
        ConfigObject::AuthorizationPolicy(o) => super::security::validate_authorization(&o.spec),
        ConfigObject::RequestAuthentication(o) => super::request_authentication::validate(&o.spec),
    }
}

fn mesh_config(spec: &MeshConfigSpec) -> Result<(), FieldError> {
    if let Some(td) = &spec.trust_domain {
        hostname(td).map_err(|m| fe("spec.trustDomain", m))?;
    }
    if let Some(cd) = &spec.cluster_domain {
        hostname(cd).map_err(|m| fe("spec.clusterDomain", m))?;
    }
    if let Some(t) = &spec.connect_timeout {
        positive_duration(t).map_err(|m| fe("spec.connectTimeout", m))?;
    }
    if let Some(ns) = &spec.root_namespace {
        object_name(ns).map_err(|m| fe("spec.rootNamespace", m))?;
    }
    if let Some(c) = &spec.cluster_name {
        dns_label(c).map_err(|m| fe("spec.clusterName", m))?;
    }
    if let Some(n) = &spec.network {
        dns_label(n).map_err(|m| fe("spec.network", m))?;
    }
    Ok(())
}

/// An RFC 1123 label (no dots): cluster and network names become parts of locality
/// strings, workload keys (`name.namespace@cluster`) and relay service accounts.
pub fn dns_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a DNS label (1-63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

/// A locality part (region, zone) or network of a member cluster: a Kubernetes label
/// value (letters, digits, '-', '.', '_'), so never a '/' that would shift the parts of
/// `region/zone/subzone`.
pub fn label_value(value: &str) -> Result<(), String> {
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && edge(value.bytes().next())
        && edge(value.bytes().last());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a label value (1-63 letters, digits, '-', '.' or '_', starting and ending with a letter or digit)"
        ))
    }
}

pub fn hostname(h: &str) -> Result<(), String> {
    if h.is_empty() {
        return Err("host must not be empty".into());
    }
    if h.contains('*') {
        return Err(format!("wildcard host `{h}` is not supported yet"));
    }
    let ok = h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{h}` is not a valid DNS host name"))
    }
}

fn port(n: u32) -> Result<(), String> {
    if (1..=65535).contains(&n) {
        Ok(())
    } else {
        Err(format!("port {n} is out of range 1-65535"))
    }
}

fn positive_duration(s: &str) -> Result<(), String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration `{s}` must be greater than zero"));
    }
    Ok(())
}

fn export_to(list: &[String]) -> Result<(), FieldError> {
    for (i, e) in list.iter().enumerate() {
        if e != "*" {
            return Err(fe(
                format!("spec.exportTo[{i}]"),
                format!("exportTo `{e}` is not supported yet (only \"*\")"),
            ));
        }
    }
    Ok(())
}

/// Protocols Trellis translates; the rest of Istio's list needs TLS origination or
/// sniffing that is not built yet.
pub const PROTOCOLS: &[&str] = &["HTTP", "HTTP2", "GRPC", "TCP"];

fn service_entry(spec: &ServiceEntrySpec) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        return Err(fe("spec.hosts", "at least one host is required"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        hostname(h).map_err(|m| fe(format!("spec.hosts[{i}]"), m))?;
    }
    if spec.ports.is_empty() {
        return Err(fe("spec.ports", "at least one port is required"));
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        port(p.number).map_err(|m| fe(format!("{f}.number"), m))?;
        if let Some(t) = p.target_port {
            port(t).map_err(|m| fe(format!("{f}.targetPort"), m))?;
        }
        if !names.insert(p.name.as_str()) {
            return Err(fe(
                format!("{f}.name"),
                format!("duplicate port name `{}`", p.name),
            ));
        }
        if !numbers.insert(p.number) {
            return Err(fe(
                format!("{f}.number"),
                format!("duplicate port number {}", p.number),
            ));
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase();
        if !PROTOCOLS.contains(&proto.as_str()) {
            return Err(fe(
                format!("{f}.protocol"),
                format!(
                    "protocol `{proto}` is not supported yet (supported: {})",
                    PROTOCOLS.join(", ")
                ),
            ));
        }
    }
    match spec.location.as_deref() {
        None | Some("MESH_INTERNAL") | Some("MESH_EXTERNAL") => {}
        Some(other) => return Err(fe("spec.location", format!("unknown location `{other}`"))),
    }
    match spec.resolution.as_deref() {
        Some("STATIC") => {}
        None | Some("NONE") => {
            return Err(fe(
                "spec.resolution",
                "resolution NONE (the default) needs transparent interception, which is not supported yet; use STATIC",
            ))
        }
        Some(other @ ("DNS" | "DNS_ROUND_ROBIN")) => {
            return Err(fe("spec.resolution", format!("resolution {other} is not supported yet; use STATIC")))
        }
        Some(other) => return Err(fe("spec.resolution", format!("unknown resolution `{other}`"))),
    }
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        return Err(fe(
            "spec.workloadSelector",
            "workloadSelector and endpoints are mutually exclusive",
        ));
    }
    if let Some(sel) = &spec.workload_selector {
        if sel.labels.is_empty() {
            return Err(fe(
                "spec.workloadSelector.labels",
                "must select at least one label",
            ));
        }
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        workload_entry(e, &format!("spec.endpoints[{i}]"))?;
        for name in e.ports.keys() {
            if !names.contains(name.as_str()) {
                return Err(fe(
                    format!("spec.endpoints[{i}].ports.{name}"),
                    format!("no service port is named `{name}`"),
                ));
            }
        }
    }
    export_to(&spec.export_to)
}

fn workload_entry(spec: &WorkloadEntrySpec, f: &str) -> Result<(), FieldError> {
    if spec.address.is_empty() {
        return Err(fe(format!("{f}.address"), "address is required"));
    }
    spec.address.parse::<IpAddr>().map_err(|_| {
        fe(
            format!("{f}.address"),
            format!(
                "`{}` is not an IP address (DNS endpoints are not supported yet)",
                spec.address
            ),
        )
    })?;
    for (name, p) in &spec.ports {
        port(*p).map_err(|m| fe(format!("{f}.ports.{name}"), m))?;
    }
    if let Some(w) = spec.weight {
        if w == 0 || w > 128 {
            return Err(fe(
                format!("{f}.weight"),
                format!("weight {w} is out of range 1-128"),
            ));
        }
    }
    if let Some(loc) = &spec.locality {
        if loc.split('/').count() > 3 || loc.split('/').any(str::is_empty) {
            return Err(fe(
                format!("{f}.locality"),
                format!("`{loc}` is not region[/zone[/subzone]]"),
            ));
        }
    }
    if let Some(sa) = &spec.service_account {
        object_name(sa).map_err(|m| fe(format!("{f}.serviceAccount"), m))?;
    }
    Ok(())
}

fn string_match(m: &StringMatch, f: &str) -> Result<(), FieldError> {
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

fn virtual_service(spec: &VirtualServiceSpec) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        return Err(fe("spec.hosts", "at least one host is required"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        hostname(h).map_err(|m| fe(format!("spec.hosts[{i}]"), m))?;
    }
    for (i, g) in spec.gateways.iter().enumerate() {
        if g != "mesh" {
            return Err(fe(
                format!("spec.gateways[{i}]"),
                format!("gateway `{g}`: gateways are not supported yet (only `mesh`)"),
            ));
        }
    }
    if spec.http.is_empty() {
        return Err(fe(
            "spec.http",
            "at least one http route is required (tcp and tls routes are not supported yet)",
        ));
    }
    for (i, r) in spec.http.iter().enumerate() {
        let f = format!("spec.http[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mf = format!("{f}.match[{j}]");
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
            if let Some(me) = &m.method {
                string_match(me, &format!("{mf}.method"))?;
            }
            for (name, hm) in &m.headers {
                let hf = format!("{mf}.headers.{name}");
                if name.is_empty()
                    || name
                        .chars()
                        .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
                {
                    return Err(fe(hf, "header names must be lowercase and non-empty"));
                }
                string_match(hm, &hf)?;
            }
        }
        if r.route.is_empty() {
            return Err(fe(
                format!("{f}.route"),
                "at least one destination is required (redirect and direct response are not supported yet)",
            ));
        }
        let mut total = 0u64;
        for (j, d) in r.route.iter().enumerate() {
            let df = format!("{f}.route[{j}]");
            hostname(&d.destination.host).map_err(|m| fe(format!("{df}.destination.host"), m))?;
            if let Some(p) = &d.destination.port {
                port(p.number).map_err(|m| fe(format!("{df}.destination.port.number"), m))?;
            }
            if let Some(s) = &d.destination.subset {
                object_name(s).map_err(|m| fe(format!("{df}.destination.subset"), m))?;
            }
            total += u64::from(d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }));
        }
        if total == 0 {
            return Err(fe(
                format!("{f}.route"),
                "the weights of the destinations add up to 0",
            ));
        }
        if let Some(t) = &r.timeout {
            parse_duration(t).map_err(|m| fe(format!("{f}.timeout"), m))?;
        }
        if let Some(rt) = &r.retries {
            if let Some(t) = &rt.per_try_timeout {
                positive_duration(t).map_err(|m| fe(format!("{f}.retries.perTryTimeout"), m))?;
            }
            if let Some(on) = &rt.retry_on {
                for cond in on.split(',').map(str::trim) {
                    let is_code = cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                    if !is_code && !RETRY_ON.contains(&cond) {
                        return Err(fe(
                            format!("{f}.retries.retryOn"),
                            format!("unknown retry condition `{cond}`"),
                        ));
                    }
                }
            }
        }
    }
    export_to(&spec.export_to)
}

/// `exportTo` of a DestinationRule: `*`, `.` or namespace names. Its clusters are the
/// same for every proxy, so only a rule exported everywhere can be honoured.
fn destination_rule_export_to(list: &[String]) -> Result<(), FieldError> {
    for (i, e) in list.iter().enumerate() {
        if e != "*" && e != "." {
            dns_label(e).map_err(|m| {
                fe(
                    format!("spec.exportTo[{i}]"),
                    format!("not `*`, `.` or a namespace: {m}"),
                )
            })?;
        }
    }
    if list.is_empty() || list.iter().any(|e| e == "*") {
        return Ok(());
    }
    Err(fe(
        "spec.exportTo",
        "exporting a DestinationRule to some namespaces only (`.` or names) is not supported yet: every proxy gets the same clusters; use [\"*\"] or leave it out",
    ))
}

fn destination_rule(spec: &DestinationRuleSpec) -> Result<(), FieldError> {
    hostname(&spec.host).map_err(|m| fe("spec.host", m))?;
    if spec.workload_selector.is_some() {
        return Err(fe(
            "spec.workloadSelector",
            "is not supported yet: a DestinationRule applies to every proxy",
        ));
    }
    if let Some(tp) = &spec.traffic_policy {
        traffic_policy(tp, "spec.trafficPolicy")?;
    }
    let mut names = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        object_name(&s.name).map_err(|m| fe(format!("{f}.name"), m))?;
        if !names.insert(s.name.as_str()) {
            return Err(fe(
                format!("{f}.name"),
                format!("duplicate subset `{}`", s.name),
            ));
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(tp, &format!("{f}.trafficPolicy"))?;
        }
    }
    destination_rule_export_to(&spec.export_to)
}
