//! Checks on a DestinationRule `trafficPolicy` (rule, subset and port level), named by
//! field. What Istio accepts but Trellis cannot honour yet is an error that says so, and
//! so is what Istio would silently ignore (a `failoverPriority` beside `distribute`, a
//! second `failover` entry for one region).

use super::destination_rule::*;
use super::parse_duration;
use super::validate::{dns_label, label_value};
use std::collections::BTreeSet;

type FieldError = (String, String);

fn fe(field: impl Into<String>, msg: impl Into<String>) -> FieldError {
    (field.into(), msg.into())
}

pub const LB_POLICIES: &[&str] = &[
    "UNSPECIFIED",
    "ROUND_ROBIN",
    "LEAST_REQUEST",
    "LEAST_CONN",
    "RANDOM",
];

pub const TLS_MODES: &[&str] = &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

/// Envoy's limits: a ring of at most 8M entries, a Maglev table of a prime size below 5000011.
const MAX_RING_SIZE: u64 = 8_388_608;
const MAX_MAGLEV_TABLE: u64 = 5_000_011;

fn duration(s: &str, f: &str, min_ms: u64) -> Result<(), FieldError> {
    if s.trim_start().starts_with('-') {
        return Err(fe(f, format!("duration `{s}` must not be negative")));
    }
    let d = parse_duration(s).map_err(|m| fe(f, m))?;
    if d.as_millis() < u128::from(min_ms) {
        let msg = if min_ms == 1 {
            format!("duration `{s}` must be at least 1ms")
        } else {
            format!("duration `{s}` must be at least {min_ms}ms")
        };
        return Err(fe(f, msg));
    }
    Ok(())
}

fn opt_duration(s: &Option<String>, f: &str, min_ms: u64) -> Result<(), FieldError> {
    s.as_deref().map_or(Ok(()), |s| duration(s, f, min_ms))
}

/// Istio's int32 counters: zero or more, within u32 for Envoy.
fn count(v: Option<i64>, f: &str) -> Result<(), FieldError> {
    match v {
        Some(n) if n < 0 => Err(fe(f, format!("{n} must not be negative"))),
        Some(n) if n > i64::from(i32::MAX) => Err(fe(f, format!("{n} is too large"))),
        _ => Ok(()),
    }
}

fn percent(v: Option<i64>, f: &str) -> Result<(), FieldError> {
    match v {
        Some(n) if !(0..=100).contains(&n) => {
            Err(fe(f, format!("{n} is not a percentage (0-100)")))
        }
        _ => Ok(()),
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// An HTTP header name as Envoy takes it: a non-empty token, lowercase.
fn header_name(h: &str, f: &str) -> Result<(), FieldError> {
    let ok = !h.is_empty()
        && h.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        });
    if ok {
        Ok(())
    } else {
        Err(fe(
            f,
            format!("`{h}` is not a valid header name (lowercase token characters)"),
        ))
    }
}

fn consistent_hash(ch: &ConsistentHash, f: &str) -> Result<(), FieldError> {
    let keys = ch.keys();
    match keys.as_slice() {
        [] => return Err(fe(
            f,
            "needs one hash key: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
        )),
        [_] => {}
        [(a, _), (b, _), ..] => {
            return Err(fe(
                format!("{f}.{b}"),
                format!("only one hash key per consistentHash, `{a}` is already set"),
            ))
        }
    }
    match &keys[0].1 {
        HashKey::Header(h) => header_name(h, &format!("{f}.httpHeaderName"))?,
        HashKey::Cookie(c) => {
            let cf = format!("{f}.httpCookie");
            if c.name.is_empty() {
                return Err(fe(format!("{cf}.name"), "must not be empty"));
            }
            if let Some(p) = &c.path {
                if !p.starts_with('/') {
                    return Err(fe(
                        format!("{cf}.path"),
                        format!("`{p}` must start with '/'"),
                    ));
                }
            }
            opt_duration(&c.ttl, &format!("{cf}.ttl"), 0)?;
        }
        HashKey::QueryParameter("") => {
            return Err(fe(
                format!("{f}.httpQueryParameterName"),
                "must not be empty",
            ))
        }
        _ => {}
    }
    if ch.ring_hash.is_some() && ch.maglev.is_some() {
        return Err(fe(
            format!("{f}.maglev"),
            "ringHash and maglev are alternatives, set one",
        ));
    }
    if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
        return Err(fe(
            format!("{f}.minimumRingSize"),
            "deprecated form of ringHash.minimumRingSize: not together with ringHash or maglev",
        ));
    }
    let ring = ch
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .map(|n| (n, format!("{f}.ringHash.minimumRingSize")))
        .or_else(|| {
            ch.minimum_ring_size
                .map(|n| (n, format!("{f}.minimumRingSize")))
        });
    if let Some((n, rf)) = ring {
        if n > MAX_RING_SIZE {
            return Err(fe(
                rf,
                format!("{n} is larger than Envoy's {MAX_RING_SIZE}"),
            ));
        }
    }
    if let Some(t) = ch.maglev.as_ref().and_then(|m| m.table_size) {
        if !is_prime(t) || t >= MAX_MAGLEV_TABLE {
            return Err(fe(
                format!("{f}.maglev.tableSize"),
                format!("{t} must be a prime below {MAX_MAGLEV_TABLE} (Envoy's rule)"),
            ));
        }
    }
    Ok(())
}

/// A `distribute` locality: `region[/zone[/subzone]]`, the last part possibly `*`
/// (`*` alone: everywhere). Returns the fixed parts, which say what it overlaps.
fn locality_pattern<'a>(p: &'a str, f: &str) -> Result<Vec<&'a str>, FieldError> {
    let parts: Vec<&str> = p.split('/').collect();
    let bad = |why: &str| {
        Err(fe(
            f,
            format!("`{p}` is not a locality (region[/zone[/subzone]], the last part may be `*`): {why}"),
        ))
    };
    if parts.len() > 3 {
        return bad("more than three parts");
    }
    if parts.iter().any(|s| s.is_empty()) {
        return bad("an empty part");
    }
    let (last, fixed) = parts.split_last().unwrap_or((&"", &[]));
    if fixed.iter().any(|s| s.contains('*')) || (last.contains('*') && *last != "*") {
        return bad("`*` stands for a whole part, the last one");
    }
    let mut fixed = fixed.to_vec();
    if *last != "*" {
        fixed.push(last);
    }
    Ok(fixed)
}

/// Two patterns overlap when some locality matches both: one's fixed parts begin the
/// other's.
fn overlaps(a: &[&str], b: &[&str]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// A `failover` region: one part, no wildcard.
fn region(r: &str, f: &str) -> Result<(), FieldError> {
    if r.is_empty() {
        return Err(fe(f, "must name a region"));
    }
    if r.contains('/') || r.contains('*') {
        return Err(fe(
            f,
            format!("`{r}` is not a region: failover goes from region to region (no '/', no '*')"),
        ));
    }
    Ok(())
}

/// A Kubernetes label key: `[prefix/]name`, the prefix a DNS subdomain.
fn label_key(k: &str, f: &str) -> Result<(), FieldError> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok =
        prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(|l| dns_label(l).is_ok()));
    if prefix_ok && label_value(name).is_ok() {
        return Ok(());
    }
    Err(fe(
        f,
        format!("`{k}` is not a label key ([prefix/]name: a name of 1-63 letters, digits, '-', '.' or '_' starting and ending with a letter or digit, a DNS subdomain as prefix)"),
    ))
}

/// The topology labels that rank by locality, as `failover` does.
const LOCALITY_LABELS: [&str; 3] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
];

fn distribute(l: &LocalityLbSetting, f: &str) -> Result<(), FieldError> {
    let mut froms: Vec<(usize, Vec<&str>)> = Vec::new();
    for (i, d) in l.distribute.iter().enumerate() {
        let df = format!("{f}.distribute[{i}]");
        let from = locality_pattern(&d.from, &format!("{df}.from"))?;
        if let Some((j, _)) = froms.iter().find(|(_, o)| overlaps(o, &from)) {
            return Err(fe(
                format!("{df}.from"),
                format!(
                    "`{}` overlaps distribute[{j}].from `{}`: a proxy would match both",
                    d.from, l.distribute[*j].from
                ),
            ));
        }
        froms.push((i, from));
        if d.to.is_empty() {
            return Err(fe(
                format!("{df}.to"),
                "must give at least one locality a weight",
            ));
        }
        let mut seen: Vec<(&str, Vec<&str>)> = Vec::new();
        for (loc, weight) in &d.to {
            let tf = format!("{df}.to.{loc}");
            let to = locality_pattern(loc, &tf)?;
            if let Some((other, _)) = seen.iter().find(|(_, o)| overlaps(o, &to)) {
                return Err(fe(
                    tf,
                    format!("`{loc}` overlaps `{other}`: a locality would get two weights"),
                ));
            }
            seen.push((loc, to));
            if !(1..=100).contains(weight) {
                return Err(fe(tf, format!("weight {weight} is out of range 1-100")));
            }
        }
        let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            return Err(fe(
                format!("{df}.to"),
                format!("the weights add up to {sum}, not 100"),
            ));
        }
    }
    Ok(())
}

fn locality(l: &LocalityLbSetting, f: &str) -> Result<(), FieldError> {
    if !l.distribute.is_empty() {
        let other = if !l.failover.is_empty() {
            Some("failover")
        } else if !l.failover_priority.is_empty() {
            Some("failoverPriority")
        } else {
            None
        };
        if let Some(other) = other {
            return Err(fe(
                format!("{f}.{other}"),
                format!("distribute and {other} are alternatives (weights at one priority, or priorities to fail over by): set one"),
            ));
        }
    }
    distribute(l, f)?;
    for (i, fo) in l.failover.iter().enumerate() {
        let ff = format!("{f}.failover[{i}]");
        region(&fo.from, &format!("{ff}.from"))?;
        region(&fo.to, &format!("{ff}.to"))?;
        if fo.from == fo.to {
            return Err(fe(
                format!("{ff}.to"),
                format!(
                    "`{}` is the from region: failover goes to another region",
                    fo.to
                ),
            ));
        }
        if let Some(j) = l.failover[..i].iter().position(|o| o.from == fo.from) {
            return Err(fe(
                format!("{ff}.from"),
                format!(
                    "region `{}` fails over to failover[{j}].to already",
                    fo.from
                ),
            ));
        }
    }
    let mut keys: Vec<&str> = Vec::new();
    for (i, entry) in l.failover_priority.iter().enumerate() {
        let pf = format!("{f}.failoverPriority[{i}]");
        let (key, value) = match entry.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (entry.as_str(), None),
        };
        label_key(key, &pf)?;
        if let Some(v) = value {
            label_value(v).map_err(|m| fe(&pf, m))?;
        }
        if keys.contains(&key) {
            return Err(fe(pf, format!("label `{key}` is listed already")));
        }
        keys.push(key);
        if !l.failover.is_empty() && LOCALITY_LABELS.contains(&key) {
            return Err(fe(
                pf,
                format!("`{key}` ranks by locality, as failover does: not together with failover (Istio's rule)"),
            ));
        }
    }
    Ok(())
}

fn load_balancer(lb: &LoadBalancerSettings, f: &str) -> Result<(), FieldError> {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        return Err(fe(
            format!("{f}.consistentHash"),
            "simple and consistentHash are alternatives, set one",
        ));
    }
    if let Some(simple) = &lb.simple {
        if !LB_POLICIES.contains(&simple.as_str()) {
            let msg = if simple == "PASSTHROUGH" {
                "PASSTHROUGH (original destination) is not supported: in explicit interception mode the connection's destination is the sidecar's own listener".to_string()
            } else {
                format!(
                    "unknown load balancer `{simple}` (supported: {})",
                    LB_POLICIES.join(", ")
                )
            };
            return Err(fe(format!("{f}.simple"), msg));
        }
    }
    if let Some(ch) = &lb.consistent_hash {
        consistent_hash(ch, &format!("{f}.consistentHash"))?;
    }
    if let Some(l) = &lb.locality_lb_setting {
        locality(l, &format!("{f}.localityLbSetting"))?;
    }
    if let Some(w) = &lb.warmup_duration_secs {
        let wf = format!("{f}.warmupDurationSecs");
        duration(w, &wf, 1)?;
        if lb.consistent_hash.is_some() || lb.simple.as_deref() == Some("RANDOM") {
            return Err(fe(
                wf,
                "warmup (slow start) works with ROUND_ROBIN and LEAST_REQUEST only",
            ));
        }
    }
    Ok(())
}

fn connection_pool(cp: &ConnectionPoolSettings, f: &str) -> Result<(), FieldError> {
    if let Some(tcp) = &cp.tcp {
        let f = format!("{f}.tcp");
        count(tcp.max_connections, &format!("{f}.maxConnections"))?;
        opt_duration(&tcp.connect_timeout, &format!("{f}.connectTimeout"), 1)?;
        opt_duration(
            &tcp.max_connection_duration,
            &format!("{f}.maxConnectionDuration"),
            1,
        )?;
        opt_duration(&tcp.idle_timeout, &format!("{f}.idleTimeout"), 0)?;
        if let Some(k) = &tcp.tcp_keepalive {
            opt_duration(&k.time, &format!("{f}.tcpKeepalive.time"), 1000)?;
            opt_duration(&k.interval, &format!("{f}.tcpKeepalive.interval"), 1000)?;
        }
    }
    if let Some(http) = &cp.http {
        let f = format!("{f}.http");
        count(
            http.http1_max_pending_requests,
            &format!("{f}.http1MaxPendingRequests"),
        )?;
        count(http.http2_max_requests, &format!("{f}.http2MaxRequests"))?;
        count(
            http.max_requests_per_connection,
            &format!("{f}.maxRequestsPerConnection"),
        )?;
        count(http.max_retries, &format!("{f}.maxRetries"))?;
        count(
            http.max_concurrent_streams,
            &format!("{f}.maxConcurrentStreams"),
        )?;
        opt_duration(&http.idle_timeout, &format!("{f}.idleTimeout"), 0)?;
        if let Some(p) = &http.h2_upgrade_policy {
            if !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(&p.as_str()) {
                return Err(fe(
                    format!("{f}.h2UpgradePolicy"),
                    format!("unknown policy `{p}` (DEFAULT, DO_NOT_UPGRADE, UPGRADE)"),
                ));
            }
        }
    }
    Ok(())
}

fn outlier_detection(od: &OutlierDetection, f: &str) -> Result<(), FieldError> {
    count(od.consecutive_errors, &format!("{f}.consecutiveErrors"))?;
    count(
        od.consecutive_5xx_errors,
        &format!("{f}.consecutive5xxErrors"),
    )?;
    count(
        od.consecutive_gateway_errors,
        &format!("{f}.consecutiveGatewayErrors"),
    )?;
    count(
        od.consecutive_local_origin_failures,
        &format!("{f}.consecutiveLocalOriginFailures"),
    )?;
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        return Err(fe(
            format!("{f}.consecutiveLocalOriginFailures"),
            "counts only with splitExternalLocalOriginErrors: true (else local failures count as 5xx)",
        ));
    }
    if od.consecutive_errors.is_some() && od.consecutive_gateway_errors.is_some() {
        return Err(fe(
            format!("{f}.consecutiveErrors"),
            "deprecated form of consecutiveGatewayErrors: set one",
        ));
    }
    opt_duration(&od.interval, &format!("{f}.interval"), 1)?;
    opt_duration(&od.base_ejection_time, &format!("{f}.baseEjectionTime"), 1)?;
    percent(od.max_ejection_percent, &format!("{f}.maxEjectionPercent"))?;
    percent(od.min_health_percent, &format!("{f}.minHealthPercent"))
}

fn absolute_path(p: &Option<String>, f: &str) -> Result<(), FieldError> {
    match p {
        Some(p) if !p.starts_with('/') => Err(fe(
            f,
            format!("`{p}` must be an absolute path (read by the sidecar on its host)"),
        )),
        _ => Ok(()),
    }
}

/// `credentialName`: the material comes from `credentials/NAME/` and replaces the files.
fn credential_name(
    t: &ClientTlsSettings,
    name: &str,
    mode: &str,
    f: &str,
) -> Result<(), FieldError> {
    let field = format!("{f}.credentialName");
    if !matches!(mode, "SIMPLE" | "MUTUAL") {
        return Err(fe(
            field,
            format!("tls mode {mode} takes no credential (only SIMPLE and MUTUAL)"),
        ));
    }
    let secret_name = name.strip_prefix("kubernetes://").unwrap_or(name);
    let valid = !secret_name.is_empty()
        && secret_name.len() <= 253
        && secret_name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(fe(
            field,
            format!("`{name}` is not a secret name (lowercase letters, digits, '-' and '.')"),
        ));
    }
    let files = [
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
    ];
    if let Some((other, _)) = files.iter().find(|(_, v)| v.is_some()) {
        return Err(fe(
            format!("{f}.{other}"),
            "credentialName and certificate files are alternatives, set one",
        ));
    }
    Ok(())
}

fn tls(t: &ClientTlsSettings, f: &str) -> Result<(), FieldError> {
    let mode = t.mode();
    if !TLS_MODES.contains(&mode) {
        return Err(fe(
            format!("{f}.mode"),
            format!(
                "unknown tls mode `{mode}` (supported: {})",
                TLS_MODES.join(", ")
            ),
        ));
    }
    if let Some(name) = &t.credential_name {
        credential_name(t, name, mode, f)?;
    }
    let files = [
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
    ];
    for (name, v) in files {
        absolute_path(v, &format!("{f}.{name}"))?;
    }
    let set = |name: &str| files.iter().any(|(n, v)| *n == name && v.is_some());
    match mode {
        "DISABLE" | "ISTIO_MUTUAL" => {
            if let Some((name, _)) = files.iter().find(|(_, v)| v.is_some()) {
                return Err(fe(
                    format!("{f}.{name}"),
                    format!("tls mode {mode} takes no certificate files (the mesh's own are used with ISTIO_MUTUAL)"),
                ));
            }
            if mode == "DISABLE"
                && (t.sni.is_some()
                    || !t.subject_alt_names.is_empty()
                    || t.insecure_skip_verify.is_some())
            {
                return Err(fe(
                    format!("{f}.mode"),
                    "tls mode DISABLE takes no sni, subjectAltNames or insecureSkipVerify",
                ));
            }
        }
        "SIMPLE" => {
            for name in ["clientCertificate", "privateKey"] {
                if set(name) {
                    return Err(fe(
                        format!("{f}.{name}"),
                        "is for tls mode MUTUAL: SIMPLE presents no client certificate",
                    ));
                }
            }
        }
        _ if t.credential_name.is_some() => {}
        _ => {
            for name in ["clientCertificate", "privateKey"] {
                if !set(name) {
                    return Err(fe(
                        format!("{f}.{name}"),
                        "is required with tls mode MUTUAL",
                    ));
                }
            }
        }
    }
    if t.insecure_skip_verify == Some(true)
        && (set("caCertificates") || !t.subject_alt_names.is_empty())
    {
        return Err(fe(
            format!("{f}.insecureSkipVerify"),
            "skips verifying the server: not together with caCertificates or subjectAltNames",
        ));
    }
    for (i, san) in t.subject_alt_names.iter().enumerate() {
        if san.is_empty() {
            return Err(fe(format!("{f}.subjectAltNames[{i}]"), "must not be empty"));
        }
    }
    if let Some(sni) = &t.sni {
        if sni.is_empty() || sni.contains(char::is_whitespace) {
            return Err(fe(
                format!("{f}.sni"),
                format!("`{sni}` is not a server name"),
            ));
        }
    }
    Ok(())
}

/// The four components a policy, a subset's policy and a port-level entry share.
fn components(
    lb: &Option<LoadBalancerSettings>,
    cp: &Option<ConnectionPoolSettings>,
    od: &Option<OutlierDetection>,
    t: &Option<ClientTlsSettings>,
    f: &str,
) -> Result<(), FieldError> {
    if let Some(lb) = lb {
        load_balancer(lb, &format!("{f}.loadBalancer"))?;
    }
    if let Some(cp) = cp {
        connection_pool(cp, &format!("{f}.connectionPool"))?;
    }
    if let Some(od) = od {
        outlier_detection(od, &format!("{f}.outlierDetection"))?;
    }
    if let Some(t) = t {
        tls(t, &format!("{f}.tls"))?;
    }
    Ok(())
}

pub fn traffic_policy(tp: &TrafficPolicy, f: &str) -> Result<(), FieldError> {
    components(
        &tp.load_balancer,
        &tp.connection_pool,
        &tp.outlier_detection,
        &tp.tls,
        f,
    )?;
    let mut ports = BTreeSet::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        let Some(port) = &p.port else {
            return Err(fe(format!("{pf}.port"), "is required"));
        };
        if !(1..=65535).contains(&port.number) {
            return Err(fe(
                format!("{pf}.port.number"),
                format!("port {} is out of range 1-65535", port.number),
            ));
        }
        if !ports.insert(port.number) {
            return Err(fe(
                format!("{pf}.port.number"),
                format!("port {} has settings already", port.number),
            ));
        }
        components(
            &p.load_balancer,
            &p.connection_pool,
            &p.outlier_detection,
            &p.tls,
            &pf,
        )?;
    }
    Ok(())
}
