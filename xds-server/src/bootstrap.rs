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
    /// The mesh cluster the sidecar runs in (node metadata `CLUSTER_ID`): the server
    /// finds its workload there and ranks its endpoints first.
    pub cluster: String,
    /// Set: connect to the secure port with this token, trusting these roots.
    pub secure: Option<SecureBootstrap>,
}

/// How the sidecar trusts the secure port's certificate.
#[derive(Debug, Clone)]
pub enum XdsTrust {
    /// Watch the server's file-based SDS secret (same filesystem): survives root rotations.
    File { path: String, dir: String },
    /// These roots, inline: the bootstrap must be made again after a root rotation.
    Inline(String),
}

#[derive(Debug, Clone)]
pub struct SecureBootstrap {
    pub token: String,
    pub trust: XdsTrust,
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

fn common_tls(sec: &SecureBootstrap) -> serde_json::Value {
    let san = json!([{ "san_type": "URI", "matcher": { "exact": sec.server_id } }]);
    match &sec.trust {
        XdsTrust::Inline(pem) => json!({
            "alpn_protocols": ["h2"],
            "validation_context": {
                "trusted_ca": { "inline_string": pem },
                "match_typed_subject_alt_names": san,
            },
        }),
        XdsTrust::File { path, dir } => json!({
            "alpn_protocols": ["h2"],
            "combined_validation_context": {
                "default_validation_context": { "match_typed_subject_alt_names": san },
                "validation_context_sds_secret_config": {
                    "name": crate::identity::XDS_TRUST_SECRET,
                    "sds_config": {
                        "resource_api_version": "V3",
                        "path_config_source": { "path": path, "watched_directory": { "path": dir } },
                    },
                },
            },
        }),
    }
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
                "common_tls_context": common_tls(sec),
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
                "CLUSTER_ID": opts.cluster,
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
