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
    /// Set: connect to the secure port with this token, trusting these roots.
    pub secure: Option<SecureBootstrap>,
}

#[derive(Debug, Clone)]
pub struct SecureBootstrap {
    pub token: String,
    pub trust_bundle_pem: String,
    /// The control plane's SPIFFE id, checked against its serving certificate.
    pub server_id: String,
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
    let mut grpc_service = json!({ "envoy_grpc": { "cluster_name": "xds-grpc" } });
    let mut xds_cluster_tls = serde_json::Value::Null;
    if let Some(sec) = &opts.secure {
        // Envoy sends initial_metadata with every stream: the server reads the caller
        // from it. The token is a credential: this bootstrap is as secret as the token.
        grpc_service["initial_metadata"] =
            json!([{ "key": "authorization", "value": format!("Bearer {}", sec.token) }]);
        xds_cluster_tls = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "xds-server.trellis-system.svc",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": { "inline_string": sec.trust_bundle_pem },
                        "match_typed_subject_alt_names": [{
                            "san_type": "URI",
                            "matcher": { "exact": sec.server_id },
                        }],
                    },
                },
            },
        });
    }
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
                "grpc_services": [grpc_service],
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
    let mut doc = doc;
    if !xds_cluster_tls.is_null() {
        doc["static_resources"]["clusters"][0]["transport_socket"] = xds_cluster_tls;
    }
    serde_yaml_ng::to_string(&doc)
}
