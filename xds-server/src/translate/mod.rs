//! Mesh model -> Envoy resources for sidecars in explicit interception mode.
//!
//! Naming follows Istio so a config dump reads the same: clusters
//! `outbound|PORT|SUBSET|FQDN` and `inbound|PORT||`, route configurations named by port,
//! virtual hosts `FQDN:PORT`. Which proxies share which output (DESIGN.md "proxy classes"):
//! outbound clusters are mesh-wide (in two variants: plaintext, and with mutual TLS for
//! sidecars with an identity, see [`tls`]), endpoints depend on the proxy's cluster (its
//! own cluster's endpoints first, see `endpoints.rs`) and, where a DestinationRule's
//! `localityLbSetting` asks for it, on its locality and labels ([`locality`]: the
//! proxy's [`EdsClass`]), route configurations on its
//! namespace (short host names, `sourceNamespace`) and on which VirtualService
//! `sourceLabels` selectors pick its workload ([`route_key`]), listeners and inbound
//! clusters on its workload.

pub mod authz;
mod clusters;
pub mod credentials;
mod endpoints;
pub mod envoy_filter;
pub mod external;
mod hash_policy;
pub mod jwks;
pub mod jwt;
mod l4_routes;
mod listeners;
pub mod locality;
mod routes;
pub mod tls;
mod traffic_policy;

pub use clusters::{
    inbound_clusters, outbound_clusters, service_clusters, service_clusters_with_identity,
};
pub use endpoints::{endpoints, service_endpoints, service_endpoints_for, service_needs};
pub use listeners::{listeners, tcp_idle_timeout};
pub use locality::{EdsClass, EdsNeeds, ProxyLocality};
pub use routes::{encode_route_configuration, route_key, routes, CORS_FILTER, FAULT_FILTER};

use envoy_types::pb::envoy::config::core::v3::{
    config_source::ConfigSourceSpecifier, AggregatedConfigSource, ApiVersion, ConfigSource,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};

pub fn outbound_cluster_name(port: u32, subset: Option<&str>, fqdn: &str) -> String {
    format!("outbound|{port}|{}|{fqdn}", subset.unwrap_or(""))
}

pub fn inbound_cluster_name(port: u32) -> String {
    format!("inbound|{port}||")
}

pub(crate) fn any<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

pub(crate) fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Who a proxy is, as far as translation cares: its class.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProxyScope {
    /// A sidecar of a known workload, by its key (`name.namespace`, or
    /// `name.namespace@cluster` in a member cluster): the workload knows its cluster.
    Workload(String),
    /// A proxy that is not a known workload: outbound-only, bound on `127.0.0.1`, in
    /// this namespace and cluster (node metadata `CLUSTER_ID`).
    Namespace { namespace: String, cluster: String },
}

impl ProxyScope {
    pub fn namespace(namespace: &str, cluster: &str) -> ProxyScope {
        ProxyScope::Namespace {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
        }
    }
}
