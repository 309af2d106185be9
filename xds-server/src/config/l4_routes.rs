//! VirtualService `tcp` and `tls` routes: opaque connections routed by port, SNI and the
//! caller's labels, with weighted destinations. Shapes as Istio's `TCPRoute`,
//! `TLSRoute`, `L4MatchAttributes`, `TLSMatchAttributes` and `RouteDestination`.

use super::virtual_service::{Destination, VirtualServiceSpec};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// `L4MatchAttributes` and `TLSMatchAttributes` in one: `sniHosts` only in `tls` routes.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Match {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
}

type FieldError = (String, String);

/// Whether `host` is `pattern` or under its wildcard (`*.example.com`, `*`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) || pattern == "*",
        None => pattern.eq_ignore_ascii_case(host),
    }
}

fn destinations(route: &[RouteDestination], f: &str) -> Result<(), FieldError> {
    if route.is_empty() {
        return Err((
            format!("{f}.route"),
            "at least one destination is required".into(),
        ));
    }
    let mut total = 0u64;
    for (j, d) in route.iter().enumerate() {
        let df = format!("{f}.route[{j}]");
        super::virtual_service_validate::destination(&d.destination, &format!("{df}.destination"))?;
        total += u64::from(d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }));
    }
    if total == 0 {
        return Err((
            format!("{f}.route"),
            "the weights of the destinations add up to 0".into(),
        ));
    }
    Ok(())
}

fn l4_match(m: &L4Match, f: &str, tls: bool) -> Result<(), FieldError> {
    if !tls && !m.sni_hosts.is_empty() {
        return Err((
            format!("{f}.sniHosts"),
            "sniHosts belong to tls routes".into(),
        ));
    }
    for (i, s) in m.destination_subnets.iter().enumerate() {
        super::validate::ip_or_cidr(s).map_err(|e| (format!("{f}.destinationSubnets[{i}]"), e))?;
    }
    if let Some(p) = m.port {
        super::validate::port(p).map_err(|e| (format!("{f}.port"), e))?;
    }
    for (i, g) in m.gateways.iter().enumerate() {
        super::virtual_service_validate::gateway_ref(g)
            .map_err(|e| (format!("{f}.gateways[{i}]"), e))?;
    }
    Ok(())
}

/// The `tcp` and `tls` routes of a VirtualService.
pub fn validate(spec: &VirtualServiceSpec) -> Result<(), FieldError> {
    for (i, r) in spec.tcp.iter().enumerate() {
        let f = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            l4_match(m, &format!("{f}.match[{j}]"), false)?;
        }
        destinations(&r.route, &f)?;
    }
    for (i, r) in spec.tls.iter().enumerate() {
        let f = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            return Err((
                format!("{f}.match"),
                "a tls route needs a match with sniHosts".into(),
            ));
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mf = format!("{f}.match[{j}]");
            l4_match(m, &mf, true)?;
            if m.sni_hosts.is_empty() {
                return Err((
                    format!("{mf}.sniHosts"),
                    "at least one SNI host is required".into(),
                ));
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                super::validate::service_entry_host(sni)
                    .map_err(|e| (format!("{mf}.sniHosts[{k}]"), e))?;
                // Istio: a route only sees connections for the VirtualService's hosts.
                if !spec.hosts.iter().any(|h| host_matches(h, sni)) {
                    return Err((
                        format!("{mf}.sniHosts[{k}]"),
                        format!("SNI host `{sni}` is not one of the VirtualService's hosts"),
                    ));
                }
            }
        }
        destinations(&r.route, &f)?;
    }
    Ok(())
}
