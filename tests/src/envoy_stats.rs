//! What a running Envoy's admin interface reports: stat counters and the certificates it
//! holds, read the same way by every end-to-end fixture.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::anyhow;

use crate::envoy::envoy_admin_get;

/// A counter or gauge from Envoy's `/stats` (0 when Envoy has not created it yet).
pub fn envoy_stat(admin: SocketAddr, stat: &str) -> anyhow::Result<u64> {
    // Anchored and escaped: stat names are full of `.` and may hold `|`.
    let filter = format!("^{}$", regex_escape(stat));
    let stats = envoy_admin_get(admin, &format!("/stats?filter={}", url_encode(&filter)))?.text();
    Ok(stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// The sum of Envoy's counters whose names match `regex` (its `/stats?filter=`), e.g. every
/// cluster's `ssl.handshake` towards one service.
pub fn envoy_stat_sum(admin: SocketAddr, regex: &str) -> anyhow::Result<u64> {
    let stats = envoy_admin_get(admin, &format!("/stats?filter={}", url_encode(regex)))?.text();
    Ok(stats
        .lines()
        .filter_map(|l| l.rsplit_once(": "))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// One certificate Envoy presents (a `cert_chain` entry of its `/certs`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EnvoyCert {
    /// See [`normalize_serial`].
    pub serial: String,
    /// Its URI SANs.
    pub uris: Vec<String>,
}

/// The certificates a running Envoy uses: what the data plane really holds, whatever the
/// control plane's books say.
#[derive(Debug, Clone, Default)]
pub struct EnvoyCerts {
    /// Every TLS context's `cert_chain`, deduplicated.
    pub chain: BTreeSet<EnvoyCert>,
    /// The serials of the trust anchors (`ca_cert`) it validates peers with.
    pub anchors: BTreeSet<String>,
}

/// Envoy's `/certs`.
pub fn envoy_certs(admin: SocketAddr) -> anyhow::Result<EnvoyCerts> {
    let certs = envoy_admin_get(admin, "/certs")?.json()?;
    let mut out = EnvoyCerts::default();
    for context in certs["certificates"].as_array().into_iter().flatten() {
        for cert in context["cert_chain"].as_array().into_iter().flatten() {
            let serial = cert["serial_number"]
                .as_str()
                .ok_or_else(|| anyhow!("a certificate without serial: {cert}"))?;
            let uris = cert["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|san| san["uri"].as_str().map(str::to_owned))
                .collect();
            out.chain.insert(EnvoyCert {
                serial: normalize_serial(serial),
                uris,
            });
        }
        for ca in context["ca_cert"].as_array().into_iter().flatten() {
            if let Some(serial) = ca["serial_number"].as_str() {
                out.anchors.insert(normalize_serial(serial));
            }
        }
    }
    Ok(out)
}

/// A certificate serial as one string whatever the source: lowercase hex without `:`
/// separators or leading zeros (a relay reports `0a:1b:...`, Envoy `a1b...`).
pub fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_across_formats() {
        assert_eq!(normalize_serial("0A:1b:C3"), "a1bc3");
        assert_eq!(normalize_serial("a1bc3"), "a1bc3");
        assert_eq!(normalize_serial("00:00"), "0");
    }

    #[test]
    fn stat_filters_are_escaped_for_the_query() {
        assert_eq!(
            url_encode(&format!("^{}$", regex_escape("cluster.outbound|9080||a"))),
            "%5Ecluster%5C.outbound%5C%7C9080%5C%7C%5C%7Ca%24"
        );
    }
}
