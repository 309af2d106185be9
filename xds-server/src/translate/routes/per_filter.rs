//! Per-route configuration of the outbound HTTP filters (`fault`, `corsPolicy`), as
//! istiod's `TranslateFault` and `TranslateCORSPolicy` build it, and the deterministic
//! encoding of route configurations that carry it.

use super::super::{any, duration};
use super::actions::{fraction, whole_percent};
use super::matching::string_matcher;
use crate::config::model::{CorsPolicy as SpecCors, HttpFaultInjection};
use crate::config::parse_duration;
use crate::config::virtual_service_validate::grpc_status_code;
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::{Route, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    fault_delay::FaultDelaySecifier, FaultDelay,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, FaultAbort, HttpFault,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use prost::Message as _;
use std::collections::BTreeMap;

pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

pub(super) fn fault(f: &HttpFaultInjection) -> HttpFault {
    let delay = f.delay.as_ref().map(|d| FaultDelay {
        percentage: Some(match &d.percentage {
            Some(p) => fraction(p.value),
            // The deprecated integer `percent`; neither set means no request (istiod).
            None => whole_percent(d.percent.and_then(|p| u32::try_from(p).ok()).unwrap_or(0)),
        }),
        fault_delay_secifier: d
            .fixed_delay
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .map(|t| FaultDelaySecifier::FixedDelay(duration(t))),
    });
    let abort = f.abort.as_ref().map(|a| FaultAbort {
        percentage: a.percentage.map(|p| fraction(p.value)),
        error_type: match (a.http_status, &a.grpc_status) {
            (Some(s), _) => u32::try_from(s).ok().map(ErrorType::HttpStatus),
            (None, Some(g)) => grpc_status_code(g).map(ErrorType::GrpcStatus),
            (None, None) => None,
        },
        ..Default::default()
    });
    HttpFault {
        delay,
        abort,
        ..Default::default()
    }
}

pub(super) fn cors(c: &SpecCors) -> CorsPolicy {
    CorsPolicy {
        allow_origin_string_match: c.allow_origins.iter().filter_map(string_matcher).collect(),
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .as_deref()
            .and_then(|m| parse_duration(m).ok())
            .map(|d| d.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        filter_enabled: Some(RuntimeFractionalPercent {
            default_value: Some(whole_percent(100)),
            ..Default::default()
        }),
        // Envoy's behaviour before 1.30 and istiod's default: FORWARD.
        forward_not_matching_preflights: Some(BoolValue {
            value: c.unmatched_preflights.as_deref() != Some("IGNORE"),
        }),
        ..Default::default()
    }
}

/// Route's `typed_per_filter_config` with its entries in name order: prost encodes the
/// generated `HashMap` in random order, and a resource's version is the hash of its
/// bytes. Wire-compatible with the field of `envoy.config.route.v3.Route`.
#[derive(Clone, PartialEq, prost::Message)]
struct SortedPerFilterConfig {
    #[prost(btree_map = "string, message", tag = "13")]
    typed_per_filter_config: BTreeMap<String, Any>,
}

/// Protobuf fields may come in any order and repeated fields concatenate, so a message
/// encoded without a field followed by that field's encoding is the same message.
fn encode_route(r: &Route, buf: &mut Vec<u8>) {
    if r.typed_per_filter_config.len() < 2 {
        buf.extend_from_slice(&r.encode_to_vec());
        return;
    }
    let mut shell = r.clone();
    let sorted = SortedPerFilterConfig {
        typed_per_filter_config: std::mem::take(&mut shell.typed_per_filter_config)
            .into_iter()
            .collect(),
    };
    buf.extend_from_slice(&shell.encode_to_vec());
    buf.extend_from_slice(&sorted.encode_to_vec());
}

fn encode_virtual_host(vh: &VirtualHost, buf: &mut Vec<u8>) {
    let mut shell = vh.clone();
    let routes = std::mem::take(&mut shell.routes);
    buf.extend_from_slice(&shell.encode_to_vec());
    for r in &routes {
        let mut body = Vec::new();
        encode_route(r, &mut body);
        // VirtualHost.routes = 3.
        prost::encoding::bytes::encode(3, &body, buf);
    }
}

/// A route configuration's protobuf encoding, byte-for-byte the same for equal configs.
pub fn encode_route_configuration(rc: &RouteConfiguration) -> Vec<u8> {
    let maps = rc.virtual_hosts.iter().flat_map(|vh| &vh.routes);
    if maps.clone().all(|r| r.typed_per_filter_config.len() < 2) {
        // Nothing to sort: prost's own (canonical field order) encoding.
        return rc.encode_to_vec();
    }
    let mut shell = rc.clone();
    let hosts = std::mem::take(&mut shell.virtual_hosts);
    let mut buf = shell.encode_to_vec();
    for vh in &hosts {
        let mut body = Vec::new();
        encode_virtual_host(vh, &mut body);
        // RouteConfiguration.virtual_hosts = 2.
        prost::encoding::bytes::encode(2, &body, &mut buf);
    }
    buf
}

/// The per-route filter configs of a rule, by filter name.
pub(super) fn typed_per_filter_config(
    fault_spec: Option<&HttpFaultInjection>,
    cors_spec: Option<&SpecCors>,
) -> std::collections::HashMap<String, Any> {
    let mut out = std::collections::HashMap::new();
    if let Some(f) = fault_spec {
        out.insert(FAULT_FILTER.to_string(), any(&fault(f)));
    }
    if let Some(c) = cors_spec {
        out.insert(CORS_FILTER.to_string(), any(&cors(c)));
    }
    out
}
