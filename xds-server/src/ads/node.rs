//! Who is on the other end of a stream, from the Envoy `Node` of its first request.

use envoy_types::pb::envoy::config::core::v3::Node;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    /// `name.namespace` of the WorkloadEntry this proxy claims to be.
    pub workload: Option<String>,
    pub namespace: String,
    /// Envoy's `node.cluster` (the service cluster, e.g. `reviews.default`).
    pub cluster: String,
    /// The mesh cluster the proxy runs in: node metadata `CLUSTER_ID`, as Istio names it.
    /// `None`: the mesh control plane's own cluster (`MeshConfig.clusterName`).
    pub cluster_id: Option<String>,
}

impl NodeInfo {
    /// Accepts Istio's node id form `sidecar~IP~NAME.NAMESPACE~NAMESPACE.svc.DOMAIN`,
    /// with `NAMESPACE` / `WORKLOAD_NAME` node metadata as an alternative, and any other
    /// id as an outbound-only proxy of the `default` namespace. The cluster comes from
    /// `CLUSTER_ID` metadata.
    pub fn from_node(node: &Node) -> Result<NodeInfo, String> {
        if node.id.is_empty() {
            return Err("the first request of a stream must carry node.id".into());
        }
        let meta = |k: &str| -> Option<String> {
            use envoy_types::pb::google::protobuf::value::Kind;
            node.metadata
                .as_ref()?
                .fields
                .get(k)
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })
        };
        let parts: Vec<&str> = node.id.split('~').collect();
        let (mut workload, mut namespace) = (None, None);
        if parts.len() == 4 {
            if let Some(ns) = parts[3].split('.').next().filter(|s| !s.is_empty()) {
                namespace = Some(ns.to_string());
                workload = parts[2]
                    .strip_suffix(&format!(".{ns}"))
                    .map(|n| format!("{n}.{ns}"));
            }
        }
        let namespace = meta("NAMESPACE")
            .or(namespace)
            .unwrap_or_else(|| "default".into());
        if let Some(name) = meta("WORKLOAD_NAME") {
            workload = Some(format!("{name}.{namespace}"));
        }
        Ok(NodeInfo {
            id: node.id.clone(),
            workload,
            namespace,
            cluster: node.cluster.clone(),
            cluster_id: meta("CLUSTER_ID"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_node_ids() {
        let n = NodeInfo::from_node(&Node {
            id: "sidecar~127.0.1.11~reviews-v1.default~default.svc.cluster.local".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(n.workload.as_deref(), Some("reviews-v1.default"));
        assert_eq!(n.namespace, "default");

        let n = NodeInfo::from_node(&Node {
            id: "bench-42".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(n.workload, None);
        assert_eq!(n.namespace, "default");
        assert_eq!(n.cluster_id, None);
        assert!(NodeInfo::from_node(&Node::default()).is_err());
    }

    #[test]
    fn cluster_id_from_metadata() {
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let n = NodeInfo::from_node(&Node {
            id: "sidecar~127.0.1.11~reviews-v1.default~default.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: [(
                    "CLUSTER_ID".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("b".into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(n.workload.as_deref(), Some("reviews-v1.default"));
        assert_eq!(n.cluster_id.as_deref(), Some("b"));
    }
}
