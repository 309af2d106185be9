//! What ADS streams serve from. The control plane serves its [`Snapshot`]s; a relay
//! serves its cache of what the control plane sent it. Both hand streams the same
//! [`ProxyView`]s, so one stream implementation (SotW and Delta, ACK/NACK bookkeeping,
//! secrets) serves sidecars in both places.

use super::node::NodeInfo;
use super::Caller;
use crate::cache::{ProxyView, ResourceSet, Snapshot};
use std::sync::Arc;
use std::time::Instant;

pub trait ConfigSource: Send + Sync + std::fmt::Debug {
    /// Increases with every published state; tells a push caused by a change (for
    /// latency metrics) from a first push.
    fn generation(&self) -> u64;
    /// When this state was published.
    fn created(&self) -> Instant;
    /// The resources of the proxy's class in this state; `None` while the source has
    /// nothing for that class yet (the stream then waits for the next state).
    fn view_for(&self, node: &NodeInfo) -> Option<Arc<ProxyView>>;
    /// Why `caller` (`None`: not authenticated) may not be `node`, if it may not.
    fn claim_error(&self, node: &NodeInfo, caller: Option<&Caller>) -> Option<String>;
    /// Why a new stream for `node` cannot be taken now (a bounded source that is full),
    /// if it cannot; asked once, when the stream starts.
    fn admission_error(&self, _node: &NodeInfo) -> Option<tonic::Status> {
        None
    }
    /// Secrets shared by the proxies of `node`'s namespace that hold a mesh identity (the
    /// credentials DestinationRules name), served beside the proxy's own; `None`: none.
    /// Only asked for authenticated proxies.
    fn credential_secrets(&self, _node: &NodeInfo) -> Option<Arc<ResourceSet>> {
        None
    }
}

impl ConfigSource for Snapshot {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn created(&self) -> Instant {
        self.created
    }

    fn view_for(&self, node: &NodeInfo) -> Option<Arc<ProxyView>> {
        Some(self.view(&self.scope(
            node.workload.as_deref(),
            &node.namespace,
            node.cluster_id.as_deref(),
        )))
    }

    fn credential_secrets(&self, node: &NodeInfo) -> Option<Arc<ResourceSet>> {
        Snapshot::credential_secrets(self, &node.namespace)
    }

    fn claim_error(&self, node: &NodeInfo, caller: Option<&Caller>) -> Option<String> {
        let Some(caller) = caller else {
            // Its config would point at secrets it can never get here: fail closed, loudly,
            // rather than serve a workload meant for mTLS a plaintext config.
            let w = self
                .mesh
                .workload(node.workload.as_deref()?, node.cluster_id.as_deref())?;
            return crate::translate::tls::has_identity(&w.labels).then(|| {
                format!(
                    "workload {}.{} is labelled {}=istio (a sidecar with a certificate): \
                     connect on the secure port with a token (xds-server bootstrap --token-file)",
                    w.name,
                    w.namespace,
                    crate::translate::tls::TLS_MODE_LABEL
                )
            });
        };
        if let Some(relay_cluster) = &caller.relay_of {
            // A relay acts for the proxies of its own cluster, and only those.
            return match node.cluster_id.as_deref() {
                Some(c) if c == relay_cluster => None,
                other => Some(format!(
                    "the relay of cluster {relay_cluster} may not act for a proxy of cluster {:?} \
                     (node metadata CLUSTER_ID)",
                    other.unwrap_or(&self.mesh.cluster_name)
                )),
            };
        }
        let id = &caller.identity;
        if node.namespace != id.namespace {
            return Some(format!(
                "identity {id} may not act for a proxy in namespace {:?}",
                node.namespace
            ));
        }
        let w = self
            .mesh
            .workload(node.workload.as_deref()?, node.cluster_id.as_deref())?;
        (w.namespace != id.namespace || w.service_account != id.service_account).then(|| {
            format!(
                "identity {id} may not claim workload {}.{}: it runs as service account {:?}",
                w.name, w.namespace, w.service_account
            )
        })
    }
}
