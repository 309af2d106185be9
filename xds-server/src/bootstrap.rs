//! The Envoy bootstrap for a workload's sidecar: node identity, the ADS cluster, admin.

use crate::mesh::Workload;
use serde_json::json;
use std::net::SocketAddr;

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub xds_addr: SocketAddr,
    pub admin_port: u16,
    pub delta: bool,
    pub cluster_domain: String,
}

/// Istio's node id form, which the server parses back into workload and namespace.
pub fn node_id(w: &Workload, cluster_domain: &str) -> String {
    format!(
        "sidecar~{}~{}.{}~{}.svc.{cluster_domain}",
        w.address, w.name, w.namespace, w.namespace
    )
}

pub fn bootstrap(w: &Workload, opts: &BootstrapOptions) -> Result<String, serde_yaml_ng::Error> {
    let api_type = if opts.delta { "DELTA_GRPC" } else { "GRPC" };
    let ads = json!({ "ads": {}, "resource_api_version": "V3" });
    let doc = json!({
        "node": {
            "id": node_id(w, &opts.cluster_domain),
            "cluster": format!("{}.{}", w.labels.get("app").cloned().unwrap_or_else(|| w.name.clone()), w.namespace),
            "metadata": {
                "NAMESPACE": w.namespace,
                "WORKLOAD_NAME": w.name,
                "SERVICE_ACCOUNT": w.service_account,
                "LABELS": w.labels,
                "INTERCEPTION_MODE": "EXPLICIT",
            },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [{
                "name": "xds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {
                            "http2_protocol_options": {
                                "connection_keepalive": { "interval": "30s", "timeout": "5s" }
                            }
                        }
                    }
                },
                "load_assignment": {
                    "cluster_name": "xds-grpc",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                        "address": opts.xds_addr.ip().to_string(),
                        "port_value": opts.xds_addr.port(),
                    }}}}]}],
                },
            }],
        },
        "admin": {
            "address": { "socket_address": {
                "address": w.outbound_address.to_string(),
                "port_value": opts.admin_port,
            }},
        },
    });
    serde_yaml_ng::to_string(&doc)
}
