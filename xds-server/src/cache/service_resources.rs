//! One service's translated outbound clusters and endpoints, kept with the inputs they
//! came from so the next snapshot reuses what did not change (incremental translation),
//! and its assignments per proxy [`EdsClass`], built when a proxy of the class first
//! needs them.

use super::snapshot::{carry, memo, Memo};
use super::{Resource, TypeKind};
use crate::mesh::{DestinationRuleInfo, MeshState, Service};
use crate::translate::{self, EdsClass, EdsNeeds, ProxyLocality};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A service's translated resources with the inputs they came from, so the next
/// snapshot can reuse them when those inputs are unchanged (incremental translation).
#[derive(Debug)]
pub(super) struct ServiceResources {
    service: Arc<Service>,
    rule: Option<Arc<DestinationRuleInfo>>,
    connect_timeout: Duration,
    /// DNS clusters name the mesh's resolvers.
    dns_resolvers: Vec<std::net::SocketAddr>,
    /// For proxies without an identity (plaintext).
    pub clusters: Vec<Arc<Resource>>,
    /// For proxies with an identity (mTLS-capable): built on first use only, since a
    /// mesh without labelled workloads never needs them. A cluster that comes out the
    /// same as its plaintext twin (DISABLE, MESH_EXTERNAL) is that same `Resource`.
    identity_clusters: OnceLock<Vec<Arc<Resource>>>,
    /// The assignments for no proxy in particular: what proxies get whose class (in
    /// `needs`) is empty.
    pub endpoints: Vec<Arc<Resource>>,
    /// What of a proxy its assignments depend on: its cluster where they are ranked by
    /// cluster (only when they run in two or more), its locality and labels where a
    /// `localityLbSetting` looks at them. Empty in a single-cluster mesh without such
    /// settings. Depends on the service and its rule only.
    pub needs: EdsNeeds,
    /// Per proxy class, built on first use; an assignment that comes out as in
    /// `endpoints` (a subset all in one cluster) is that same `Resource`.
    class_endpoints: Memo<EdsClass, Arc<Vec<Arc<Resource>>>>,
    /// The class assignments by version, so that one that comes out the same for two
    /// classes (a cluster whose setting looks at less than its siblings') is encoded
    /// once.
    shared: Mutex<HashMap<Arc<str>, Arc<Resource>>>,
}

/// What a carried-over [`ServiceResources`] depends on beyond its own service and rule;
/// compared once per snapshot rather than once per service.
#[derive(Debug, Clone, Copy)]
pub(super) struct MeshInputs {
    /// Trust domain unchanged: the identity clusters' SAN checks still hold.
    trust_domain: bool,
    /// PeerAuthentication unchanged: endpoint metadata (which ports take mTLS) still holds.
    peer_authentication: bool,
}

impl MeshInputs {
    pub fn between(prev: &MeshState, next: &MeshState) -> MeshInputs {
        MeshInputs {
            trust_domain: prev.trust_domain == next.trust_domain,
            peer_authentication: prev.peer_authentication == next.peer_authentication,
        }
    }
}

impl ServiceResources {
    /// Translates `svc`, reusing from `prev` (the same service's resources in the last
    /// snapshot) whatever part did not change.
    pub fn build(
        mesh: &MeshState,
        svc: &Arc<Service>,
        prev: Option<(&ServiceResources, MeshInputs)>,
    ) -> ServiceResources {
        let rule = mesh.destination_rules.get(&svc.fqdn).cloned();
        let clusters_valid = prev.filter(|(p, _)| {
            *p.service == **svc
                && p.rule.as_deref() == rule.as_deref()
                && p.connect_timeout == mesh.connect_timeout
                && p.dns_resolvers == mesh.dns_resolvers
        });
        let (clusters, identity_clusters) = match clusters_valid {
            Some((p, inputs)) => (
                p.clusters.clone(),
                if inputs.trust_domain {
                    p.identity_clusters.clone()
                } else {
                    OnceLock::new()
                },
            ),
            None => (
                translate::service_clusters(mesh, svc)
                    .iter()
                    .map(|c| Resource::new(TypeKind::Cluster, c.name.as_str(), c))
                    .collect(),
                OnceLock::new(),
            ),
        };
        // A class's assignments depend on the proxy only through the class (its key), so
        // with the same service, rule and endpoint metadata they carry over.
        let (endpoints, needs, class_endpoints, shared) = match clusters_valid {
            Some((p, inputs)) if inputs.peer_authentication => (
                p.endpoints.clone(),
                p.needs.clone(),
                carry(&p.class_endpoints, true),
                p.shared.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ),
            _ => (
                translate::service_endpoints(mesh, svc)
                    .iter()
                    .map(|c| Resource::new(TypeKind::Endpoint, c.cluster_name.as_str(), c))
                    .collect(),
                translate::service_needs(mesh, svc),
                HashMap::new(),
                HashMap::new(),
            ),
        };
        ServiceResources {
            service: svc.clone(),
            rule,
            connect_timeout: mesh.connect_timeout,
            dns_resolvers: mesh.dns_resolvers.clone(),
            clusters,
            identity_clusters,
            endpoints,
            needs,
            class_endpoints: Mutex::new(class_endpoints),
            shared: Mutex::new(shared),
        }
    }

    /// The assignments `proxy` gets, when its class of this service is not empty (else
    /// `endpoints`). `mesh` is any mesh this entry is valid for: the result is the same
    /// for all.
    pub fn endpoints_for(
        &self,
        mesh: &MeshState,
        proxy: &ProxyLocality,
    ) -> Option<Arc<Vec<Arc<Resource>>>> {
        let class = self.needs.class(proxy);
        if class == EdsClass::default() {
            return None;
        }
        Some(memo(&self.class_endpoints, &class, || {
            let ranked: Vec<Arc<Resource>> =
                translate::service_endpoints_for(mesh, &self.service, Some(proxy))
                    .iter()
                    .map(|cla| Resource::new(TypeKind::Endpoint, cla.cluster_name.as_str(), cla))
                    .collect();
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            Arc::new(
                ranked
                    .into_iter()
                    .zip(&self.endpoints)
                    .map(|(r, base)| {
                        if r.version == base.version {
                            base.clone()
                        } else {
                            shared.entry(r.version.clone()).or_insert(r).clone()
                        }
                    })
                    .collect(),
            )
        }))
    }

    pub fn still_valid(&self, mesh: &MeshState, svc: &Service, inputs: MeshInputs) -> bool {
        *self.service == *svc
            && self.rule.as_deref() == mesh.destination_rules.get(&svc.fqdn).map(|r| &**r)
            && self.connect_timeout == mesh.connect_timeout
            && self.dns_resolvers == mesh.dns_resolvers
            && inputs.trust_domain
            && inputs.peer_authentication
    }

    /// `mesh` is any mesh this entry is valid for: the result is the same for all.
    pub fn identity_clusters(&self, mesh: &MeshState) -> &[Arc<Resource>] {
        self.identity_clusters.get_or_init(|| {
            // By name: the plaintext set lacks the clusters that use a credential.
            let plain: HashMap<&str, &Arc<Resource>> =
                self.clusters.iter().map(|r| (&*r.name, r)).collect();
            translate::service_clusters_with_identity(mesh, &self.service)
                .iter()
                .map(|c| match plain.get(c.name.as_str()) {
                    Some(p)
                        if c.transport_socket.is_none()
                            && c.transport_socket_matches.is_empty() =>
                    {
                        (*p).clone()
                    }
                    _ => Resource::new(TypeKind::Cluster, c.name.as_str(), c),
                })
                .collect()
        })
    }
}
