//! Serde shapes of Istio's `DestinationRule` (networking/v1) and its traffic policy.
//!
//! Durations stay strings here (Go syntax, `2s`, `500ms`); `validate` checks them and
//! translation parses them again, so the spec kept in the mesh is exactly what was
//! written. Every struct denies unknown fields.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    /// Boxed: a policy is large and most rules have none.
    #[serde(default)]
    pub traffic_policy: Option<Box<TrafficPolicy>>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Accepted by the parser so the error can say "not supported yet" (validate).
    #[serde(default)]
    pub workload_selector: Option<super::model::WorkloadSelector>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// A `portLevelSettings` entry: replaces the four components for one port. As in Istio,
/// a component it leaves out falls back to the default, not to the rule's.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    #[serde(default)]
    pub port: Option<super::model::PortSelector>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// The policy in effect for one cluster (a port of the service, maybe a subset), after
/// port-level and subset overrides: no `portLevelSettings` left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

impl ClusterPolicy {
    fn port_override(&mut self, tp: &TrafficPolicy, port: u32) {
        let hit = tp
            .port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == port));
        if let Some(p) = hit {
            *self = ClusterPolicy {
                load_balancer: p.load_balancer.clone(),
                connection_pool: p.connection_pool.clone(),
                outlier_detection: p.outlier_detection.clone(),
                tls: p.tls.clone(),
            };
        }
    }

    /// Istio's `MergeTrafficPolicy`: the rule's policy, then the rule's port-level entry
    /// for `port`, then each component the subset sets, then the subset's port-level entry.
    pub fn resolve(
        rule: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u32,
    ) -> Self {
        let mut out = ClusterPolicy::default();
        if let Some(tp) = rule {
            out = ClusterPolicy {
                load_balancer: tp.load_balancer.clone(),
                connection_pool: tp.connection_pool.clone(),
                outlier_detection: tp.outlier_detection.clone(),
                tls: tp.tls.clone(),
            };
            out.port_override(tp, port);
        }
        if let Some(tp) = subset {
            if tp.load_balancer.is_some() {
                out.load_balancer = tp.load_balancer.clone();
            }
            if tp.connection_pool.is_some() {
                out.connection_pool = tp.connection_pool.clone();
            }
            if tp.outlier_detection.is_some() {
                out.outlier_detection = tp.outlier_detection.clone();
            }
            if tp.tls.is_some() {
                out.tls = tp.tls.clone();
            }
            out.port_override(tp, port);
        }
        out
    }
}

/// Istio's `ClientTLSSettings`. `credentialName` names a folder of the config folder's
/// `credentials/` (see `super::credentials`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

impl ClientTlsSettings {
    /// Istio's default mode is DISABLE.
    pub fn mode(&self) -> &str {
        self.mode.as_deref().unwrap_or("DISABLE")
    }

    /// The credential's name (`kubernetes://` is optional, as in Istio).
    pub fn credential(&self) -> Option<&str> {
        self.credential_name
            .as_deref()
            .map(|n| n.strip_prefix("kubernetes://").unwrap_or(n))
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(default)]
    pub warmup_duration_secs: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<RingHash>,
    #[serde(default)]
    pub maglev: Option<Maglev>,
    /// Deprecated form of `ringHash.minimumRingSize`.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// What a consistent hash hashes on: exactly one per rule.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey<'a> {
    Header(&'a str),
    Cookie(&'a HttpCookie),
    SourceIp,
    QueryParameter(&'a str),
}

impl ConsistentHash {
    /// The hash keys set, in field order (validation allows exactly one).
    pub fn keys(&self) -> Vec<(&'static str, HashKey<'_>)> {
        let mut out = Vec::new();
        if let Some(h) = &self.http_header_name {
            out.push(("httpHeaderName", HashKey::Header(h)));
        }
        if let Some(c) = &self.http_cookie {
            out.push(("httpCookie", HashKey::Cookie(c)));
        }
        if self.use_source_ip == Some(true) {
            out.push(("useSourceIp", HashKey::SourceIp));
        }
        if let Some(q) = &self.http_query_parameter_name {
            out.push(("httpQueryParameterName", HashKey::QueryParameter(q)));
        }
        out
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    #[serde(default)]
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    pub from: String,
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    #[serde(default)]
    pub probes: Option<u32>,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Deprecated: Istio's old name for gateway errors (502, 503, 504).
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    #[serde(default)]
    pub min_health_percent: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(yaml: &str) -> TrafficPolicy {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn port_level_replaces_subset_components_override() {
        let rule = policy(
            "loadBalancer: {simple: RANDOM}
outlierDetection: {consecutive5xxErrors: 7}
portLevelSettings:
- port: {number: 8080}
  connectionPool: {tcp: {maxConnections: 3}}
",
        );
        let subset = policy("outlierDetection: {consecutive5xxErrors: 1}\n");
        // Another port: the rule's components.
        let p = ClusterPolicy::resolve(Some(&rule), None, 9090);
        assert_eq!(p.load_balancer.unwrap().simple.as_deref(), Some("RANDOM"));
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(7));
        // The port-level entry replaces every component, inheriting nothing.
        let p = ClusterPolicy::resolve(Some(&rule), None, 8080);
        assert!(p.load_balancer.is_none() && p.outlier_detection.is_none());
        assert_eq!(
            p.connection_pool.unwrap().tcp.unwrap().max_connections,
            Some(3)
        );
        // A subset overrides only the components it sets.
        let p = ClusterPolicy::resolve(Some(&rule), Some(&subset), 8080);
        assert!(p.connection_pool.is_some());
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(1));
    }
}
