//! Checks on one object in isolation. Cross-object checks (does the subset exist, is the
//! host a service) live in `crate::mesh`, because they need every file.

use super::model::*;
use super::traffic_policy_checks::traffic_policy;
use super::{parse_duration, ConfigObject};
use std::collections::BTreeSet;
use std::net::IpAddr;

pub(super) type FieldError = (String, String);

pub(super) fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
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
        ConfigObject::VirtualService(o) => super::virtual_service_validate::validate(&o.spec),
        ConfigObject::DestinationRule(o) => destination_rule(&o.spec),
        ConfigObject::PeerAuthentication(o) => super::peer_authentication::validate(&o.spec),
        ConfigObject::AuthorizationPolicy(o) => super::security::validate_authorization(&o.spec),
        ConfigObject::RequestAuthentication(o) => super::request_authentication::validate(&o.spec),
        ConfigObject::EnvoyFilter(o) => super::envoy_filter::validate(&o.spec),
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
    for (i, r) in spec.dns_resolvers.iter().enumerate() {
        dns_resolver(r).map_err(|m| fe(format!("spec.dnsResolvers[{i}]"), m))?;
    }
    if let Some(p) = &spec.jwks_ca_certificates {
        if !p.starts_with('/') {
            return Err(fe(
                "spec.jwksCaCertificates",
                format!("`{p}` must be an absolute path on the sidecars' hosts"),
            ));
        }
    }
    Ok(())
}

/// A DNS server as `IP` (port 53) or `IP:PORT`.
pub fn dns_resolver(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP address or IP:PORT"))
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

/// A ServiceEntry host: a DNS name, or a wildcard `*.example.com` for every name below
/// a domain (Istio's form; `*` alone would be every host of the internet).
pub fn service_entry_host(h: &str) -> Result<(), String> {
    match h.strip_prefix("*.") {
        Some(rest) if !rest.contains('*') => hostname(rest),
        _ if h == "*" => Err(
            "`*` alone is not a ServiceEntry host; use a wildcard below a domain (`*.example.com`)"
                .into(),
        ),
        _ => hostname(h),
    }
}

/// An address of a ServiceEntry: an IP, or a CIDR block.
pub(super) fn ip_or_cidr(a: &str) -> Result<(), String> {
    let (ip, len) = match a.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (a, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("`{a}` is not an IP address or CIDR block"))?;
    if let Some(len) = len {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match len.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(format!("`{a}` has an invalid prefix length (0-{max})")),
        }
    }
    Ok(())
}

pub(super) fn port(n: u32) -> Result<(), String> {
    if (1..=65535).contains(&n) {
        Ok(())
    } else {
        Err(format!("port {n} is out of range 1-65535"))
    }
}

pub(super) fn positive_duration(s: &str) -> Result<(), String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration `{s}` must be greater than zero"));
    }
    Ok(())
}

pub(super) fn export_to(list: &[String]) -> Result<(), FieldError> {
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

/// Protocols Trellis translates. HTTPS and TLS are routed by SNI, unopened; MONGO, MYSQL
/// and REDIS are plain TCP, as Istio treats them without their protocol filters.
pub const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTP2", "GRPC", "TCP", "HTTPS", "TLS", "MONGO", "MYSQL", "REDIS",
];

fn service_entry(spec: &ServiceEntrySpec) -> Result<(), FieldError> {
    if spec.hosts.is_empty() {
        return Err(fe("spec.hosts", "at least one host is required"));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        service_entry_host(h).map_err(|m| fe(format!("spec.hosts[{i}]"), m))?;
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        ip_or_cidr(a).map_err(|m| fe(format!("spec.addresses[{i}]"), m))?;
    }
    for (i, san) in spec.subject_alt_names.iter().enumerate() {
        if san.trim().is_empty() {
            return Err(fe(
                format!("spec.subjectAltNames[{i}]"),
                "must not be empty",
            ));
        }
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
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    let wildcard = spec.hosts.iter().any(|h| h.starts_with('*'));
    match resolution {
        "STATIC" if wildcard => {
            return Err(fe(
                "spec.resolution",
                "a wildcard host has no addresses of its own: use resolution NONE or DNS with endpoints",
            ))
        }
        "STATIC" => {}
        "NONE" => {
            if !spec.endpoints.is_empty() {
                return Err(fe(
                    "spec.endpoints",
                    "resolution NONE (the default) passes traffic to the address the caller dialled: it takes no endpoints (use STATIC or DNS)",
                ));
            }
        }
        "DNS" | "DNS_ROUND_ROBIN" => {
            if wildcard && spec.endpoints.is_empty() {
                return Err(fe(
                    "spec.resolution",
                    format!("resolution {resolution} with a wildcard host needs endpoints to resolve"),
                ));
            }
            if spec.workload_selector.is_some() {
                return Err(fe(
                    "spec.workloadSelector",
                    format!("resolution {resolution} resolves endpoints by name; a workloadSelector needs resolution STATIC"),
                ));
            }
            if resolution == "DNS_ROUND_ROBIN" && spec.endpoints.len() > 1 {
                return Err(fe(
                    "spec.endpoints",
                    "resolution DNS_ROUND_ROBIN takes at most one endpoint (use DNS for several)",
                ));
            }
        }
        other => return Err(fe("spec.resolution", format!("unknown resolution `{other}`"))),
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
        let f = format!("spec.endpoints[{i}]");
        if resolution.starts_with("DNS") && e.address.parse::<IpAddr>().is_err() {
            hostname(&e.address).map_err(|m| fe(format!("{f}.address"), m))?;
            workload_entry(
                &WorkloadEntrySpec {
                    address: "0.0.0.0".into(),
                    ..e.clone()
                },
                &f,
            )?;
        } else {
            workload_entry(e, &f)?;
        }
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
                "`{}` is not an IP address (a host name needs a ServiceEntry with resolution DNS)",
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
