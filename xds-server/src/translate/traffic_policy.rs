//! A DestinationRule's traffic policy on an outbound cluster: load balancer, connection
//! pool (circuit breakers, HTTP protocol options, TCP keepalive) and outlier detection,
//! mapped as istiod's `cluster_traffic_policy.go` maps them. TLS is `tls.rs`'s.

use super::{any, duration};
use crate::config::model::{
    ClusterPolicy, ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection,
};
use crate::config::parse_duration;
use crate::mesh::Protocol;
use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers::Thresholds,
    cluster::{
        CommonLbConfig, LbConfig, LbPolicy, LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig,
        RoundRobinLbConfig, SlowStartConfig,
    },
    CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlierDetection, UpstreamConnectionOptions,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CommonHttpOptions,
    TcpKeepalive,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
        UseDownstreamHttpConfig,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value, UInt64Value};

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Envoy's (and Istio's) ring size when a consistent hash names none.
const DEFAULT_RING_SIZE: u64 = 1024;

fn u32v(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

/// A validated duration; validation has rejected anything that does not parse.
fn dur(s: &Option<String>) -> Option<PbDuration> {
    s.as_deref()
        .and_then(|s| parse_duration(s).ok())
        .map(duration)
}

/// A validated non-negative count; zero means unset, as in Istio's protos.
fn positive(v: Option<i64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0)
}

/// Applies the rule's policy to a cluster built with Trellis's defaults (round robin,
/// `default_outlier_detection`, the mesh connect timeout).
pub fn apply(cluster: &mut Cluster, policy: &ClusterPolicy, protocol: Protocol) {
    if let Some(lb) = &policy.load_balancer {
        load_balancer(cluster, lb);
    }
    if let Some(od) = &policy.outlier_detection {
        outlier_detection(cluster, od);
    }
    http_options(cluster, policy.connection_pool.as_ref(), protocol);
    if let Some(cp) = &policy.connection_pool {
        connection_pool(cluster, cp);
    }
}

fn load_balancer(c: &mut Cluster, lb: &LoadBalancerSettings) {
    let slow_start = lb.warmup_duration_secs.as_ref().map(|w| SlowStartConfig {
        slow_start_window: dur(&Some(w.clone())),
        ..Default::default()
    });
    match lb.simple.as_deref() {
        Some("LEAST_REQUEST") | Some("LEAST_CONN") => {
            c.lb_policy = LbPolicy::LeastRequest as i32;
            c.lb_config = slow_start.map(|s| {
                LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                    slow_start_config: Some(s),
                    ..Default::default()
                })
            });
        }
        Some("RANDOM") => c.lb_policy = LbPolicy::Random as i32,
        _ => {
            c.lb_policy = LbPolicy::RoundRobin as i32;
            c.lb_config = slow_start.map(|s| {
                LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                    slow_start_config: Some(s),
                })
            });
        }
    }
    let Some(ch) = &lb.consistent_hash else {
        return;
    };
    if let Some(m) = &ch.maglev {
        c.lb_policy = LbPolicy::Maglev as i32;
        c.lb_config = m.table_size.filter(|t| *t > 0).map(|t| {
            LbConfig::MaglevLbConfig(MaglevLbConfig {
                table_size: Some(UInt64Value { value: t }),
            })
        });
        return;
    }
    let ring = ch
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .or(ch.minimum_ring_size)
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_RING_SIZE);
    c.lb_policy = LbPolicy::RingHash as i32;
    c.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
        minimum_ring_size: Some(UInt64Value { value: ring }),
        ..Default::default()
    }));
}

/// Trellis's passive health checking, which makes cross-cluster failover work; see
/// `clusters.rs` for why each value is what it is.
pub fn default_outlier_detection() -> EnvoyOutlierDetection {
    EnvoyOutlierDetection {
        consecutive_5xx: u32v(5),
        consecutive_gateway_failure: u32v(3),
        enforcing_consecutive_gateway_failure: u32v(100),
        enforcing_success_rate: u32v(0),
        interval: Some(duration(std::time::Duration::from_secs(1))),
        base_ejection_time: Some(duration(std::time::Duration::from_secs(30))),
        max_ejection_percent: u32v(100),
        ..Default::default()
    }
}

/// A rule's `outlierDetection` overrides Trellis's defaults field by field (where
/// istiod starts from Envoy's, whose 10 % ejection cap would stop failover), with
/// istiod's mapping: a count of 0 switches its detector off, any other enforces it at
/// 100 %; `minHealthPercent` is the cluster's panic threshold.
fn outlier_detection(c: &mut Cluster, od: &OutlierDetection) {
    let mut out = c
        .outlier_detection
        .take()
        .unwrap_or_else(default_outlier_detection);
    let enforce = |n: u32| u32v(if n > 0 { 100 } else { 0 });
    let count = |v: Option<i64>| v.and_then(|n| u32::try_from(n).ok());
    if let Some(n) = count(od.consecutive_5xx_errors) {
        out.consecutive_5xx = u32v(n);
        out.enforcing_consecutive_5xx = enforce(n);
    }
    if let Some(n) = count(od.consecutive_gateway_errors).or(count(od.consecutive_errors)) {
        out.consecutive_gateway_failure = u32v(n);
        out.enforcing_consecutive_gateway_failure = enforce(n);
    }
    if od.split_external_local_origin_errors == Some(true) {
        out.split_external_local_origin_errors = true;
        if let Some(n) = positive(od.consecutive_local_origin_failures) {
            out.consecutive_local_origin_failure = u32v(n);
            out.enforcing_consecutive_local_origin_failure = u32v(100);
        }
        out.enforcing_local_origin_success_rate = u32v(0);
    }
    if let Some(i) = dur(&od.interval) {
        out.interval = Some(i);
    }
    if let Some(b) = dur(&od.base_ejection_time) {
        out.base_ejection_time = Some(b);
    }
    if let Some(p) = count(od.max_ejection_percent) {
        out.max_ejection_percent = u32v(p);
    }
    if let Some(p) = od.min_health_percent {
        c.common_lb_config
            .get_or_insert_with(CommonLbConfig::default)
            .healthy_panic_threshold = Some(Percent { value: p as f64 });
    }
    c.outlier_detection = Some(out);
}

/// Circuit breakers start from istiod's "unlimited" thresholds (Envoy's own defaults,
/// 1024 and 3 retries, are too low for a mesh), then take the rule's limits.
fn connection_pool(c: &mut Cluster, cp: &ConnectionPoolSettings) {
    let max = u32v(u32::MAX);
    let mut t = Thresholds {
        max_connections: max,
        max_pending_requests: max,
        max_requests: max,
        max_retries: max,
        track_remaining: true,
        ..Default::default()
    };
    if let Some(http) = &cp.http {
        if let Some(n) = positive(http.http2_max_requests) {
            t.max_requests = u32v(n);
        }
        if let Some(n) = positive(http.http1_max_pending_requests) {
            t.max_pending_requests = u32v(n);
        }
        if let Some(n) = positive(http.max_retries) {
            t.max_retries = u32v(n);
        }
    }
    if let Some(tcp) = &cp.tcp {
        if let Some(ct) = dur(&tcp.connect_timeout) {
            c.connect_timeout = Some(ct);
        }
        if let Some(n) = positive(tcp.max_connections) {
            t.max_connections = u32v(n);
        }
        if let Some(k) = &tcp.tcp_keepalive {
            let secs = |s: &Option<String>| {
                s.as_deref()
                    .and_then(|s| parse_duration(s).ok())
                    .map(|d| UInt32Value {
                        value: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
                    })
            };
            c.upstream_connection_options = Some(UpstreamConnectionOptions {
                tcp_keepalive: Some(TcpKeepalive {
                    keepalive_probes: k.probes.map(|value| UInt32Value { value }),
                    keepalive_time: secs(&k.time),
                    keepalive_interval: secs(&k.interval),
                }),
                ..Default::default()
            });
        }
    }
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![t],
        ..Default::default()
    });
}

fn h2_upgrade(cp: Option<&ConnectionPoolSettings>, protocol: Protocol) -> bool {
    let http = cp.and_then(|cp| cp.http.as_ref());
    match http.and_then(|h| h.h2_upgrade_policy.as_deref()) {
        // HTTP2 and GRPC ports speak HTTP/2 whatever the policy says, as in istiod.
        Some("UPGRADE") => protocol.is_http(),
        _ => protocol.is_h2(),
    }
}

/// The ALPN the cluster's TLS offers: `h2` when it talks HTTP/2 to its endpoints,
/// `http/1.1` on other HTTP ports. With `useClientProtocol` it follows each caller, so it
/// offers none and the server side picks its codec from the first bytes.
pub fn upstream_alpn(policy: &ClusterPolicy, protocol: Protocol) -> &'static [&'static str] {
    let http = policy
        .connection_pool
        .as_ref()
        .and_then(|cp| cp.http.as_ref());
    if http.and_then(|h| h.use_client_protocol) == Some(true) {
        return &[];
    }
    match (
        h2_upgrade(policy.connection_pool.as_ref(), protocol),
        protocol.is_http(),
    ) {
        (true, _) => &["h2"],
        (false, true) => &["http/1.1"],
        _ => &[],
    }
}

/// The upstream HTTP protocol options of an HTTP port's cluster: HTTP/2 for HTTP2/GRPC
/// ports (or `h2UpgradePolicy: UPGRADE`), the caller's protocol with
/// `useClientProtocol`, and the pool's connection limits. Envoy 1.40 takes these only as
/// typed extension protocol options.
fn http_options(c: &mut Cluster, cp: Option<&ConnectionPoolSettings>, protocol: Protocol) {
    if !protocol.is_http() {
        return;
    }
    let http = cp.and_then(|cp| cp.http.as_ref());
    let tcp = cp.and_then(|cp| cp.tcp.as_ref());
    let h2 = h2_upgrade(cp, protocol);
    // An HTTP idle timeout wins over the TCP one, as in istiod.
    let common = CommonHttpOptions {
        idle_timeout: dur(&http.and_then(|h| h.idle_timeout.clone()))
            .or_else(|| dur(&tcp.and_then(|t| t.idle_timeout.clone()))),
        max_connection_duration: dur(&tcp.and_then(|t| t.max_connection_duration.clone())),
        max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection))
            .and_then(u32v),
        ..Default::default()
    };
    let h2_options = Http2ProtocolOptions {
        max_concurrent_streams: positive(http.and_then(|h| h.max_concurrent_streams))
            .and_then(u32v),
        ..Default::default()
    };
    let client_protocol = http.and_then(|h| h.use_client_protocol) == Some(true);
    let upstream = if client_protocol {
        UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
            http_protocol_options: Some(Http1ProtocolOptions::default()),
            http2_protocol_options: Some(h2_options),
            ..Default::default()
        })
    } else if h2 {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(h2_options)),
        })
    } else if common != CommonHttpOptions::default() {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::HttpProtocolOptions(
                Http1ProtocolOptions::default(),
            )),
        })
    } else {
        // HTTP/1.1 with nothing to say: Envoy's default, no options at all.
        return;
    };
    let opts = HttpProtocolOptions {
        common_http_protocol_options: (common != CommonHttpOptions::default()).then_some(common),
        upstream_protocol_options: Some(upstream),
        ..Default::default()
    };
    // A single-entry map, so the encoding (and thus the content-hash version) is deterministic.
    c.typed_extension_protocol_options.clear();
    c.typed_extension_protocol_options
        .insert(HTTP_PROTOCOL_OPTIONS.into(), any(&opts));
}

/// HTTP/2 to the application of an HTTP2/GRPC inbound port.
pub fn h2_options(c: &mut Cluster) {
    http_options(c, None, Protocol::Http2);
}
