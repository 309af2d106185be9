//! Workloads: the WorkloadEntries of the config folder (the mesh's own cluster) and of
//! the registries member clusters' relays report, each tagged with its cluster, network
//! and locality.

use super::build::Errors;
use super::{MeshState, Workload, APP_ADDRESS_ANNOTATION, OUTBOUND_ADDRESS_ANNOTATION};
use crate::config::model::WorkloadEntrySpec;
use crate::config::{ConfigError, ConfigObject, Object};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// Where a member cluster runs, from its join record: the defaults for its workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterMeta {
    /// The cluster's network; empty: the cluster's name (as the join token defaults it).
    pub network: String,
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl ClusterMeta {
    /// The locality of a workload that sets none itself: `region/zone` (Envoy takes an
    /// empty region, so a zone alone is `/zone`).
    pub fn locality(&self) -> Option<String> {
        match (&self.region, &self.zone) {
            (Some(r), Some(z)) => Some(format!("{r}/{z}")),
            (Some(r), None) => Some(r.clone()),
            (None, Some(z)) => Some(format!("/{z}")),
            (None, None) => None,
        }
    }

    pub fn network_of(&self, cluster: &str) -> String {
        if self.network.is_empty() {
            cluster.to_string()
        } else {
            self.network.clone()
        }
    }
}

/// A member cluster's registry as the config store holds it: the objects of the files in
/// effect (only WorkloadEntries are ever accepted from a member cluster).
#[derive(Debug)]
pub struct MemberRegistry<'a> {
    pub cluster: &'a str,
    pub meta: &'a ClusterMeta,
    pub objects: Vec<&'a ConfigObject>,
}

/// The error for an object a member cluster may not write: policies and services take
/// effect only when written on the mesh control plane (docs/multicluster.md).
pub fn member_kind_error(cluster: &str, obj: &ConfigObject) -> ConfigError {
    ConfigError::new(
        obj.source(),
        Some(format!("{} {}", obj.kind(), obj.key())),
        Some("kind".into()),
        format!(
            "a member cluster reports only WorkloadEntries; {} is not accepted from cluster {cluster} \
             (policies and services are written on the mesh control plane)",
            obj.kind()
        ),
    )
}

/// The cluster a batch of WorkloadEntries runs in, and the defaults it gives them.
pub(super) struct Origin<'a> {
    pub cluster: &'a str,
    /// A member cluster: keys carry `@cluster`.
    pub member: bool,
    pub network: String,
    pub locality: Option<String>,
}

/// Adds the workloads of `wes` to `mesh`; returns them by key, for later errors.
pub(super) fn add<'a>(
    mesh: &mut MeshState,
    errs: &mut Errors,
    wes: &[&'a Object<WorkloadEntrySpec>],
    origin: &Origin<'_>,
) -> Vec<(String, &'a Object<WorkloadEntrySpec>)> {
    let mut out = Vec::with_capacity(wes.len());
    for we in wes {
        let annotation_ip = |key: &str, errs: &mut Errors| -> Option<IpAddr> {
            match we.annotations.get(key) {
                None => Some(IpAddr::from([127, 0, 0, 1])),
                Some(v) => match v.parse() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        errs.push(
                            we,
                            "WorkloadEntry",
                            format!("metadata.annotations.{key}"),
                            format!("`{v}` is not an IP address"),
                        );
                        None
                    }
                },
            }
        };
        let app = annotation_ip(APP_ADDRESS_ANNOTATION, errs);
        let outbound = annotation_ip(OUTBOUND_ADDRESS_ANNOTATION, errs);
        let (Some(app_address), Some(outbound_address), Ok(address)) =
            (app, outbound, we.spec.address.parse())
        else {
            continue;
        };
        let id = format!("{}.{}", we.name, we.namespace);
        let key = if origin.member {
            format!("{id}@{}", origin.cluster)
        } else {
            id
        };
        let w = Workload {
            key: key.clone(),
            name: we.name.clone(),
            namespace: we.namespace.clone(),
            address,
            app_address,
            outbound_address,
            ports: we.spec.ports.clone(),
            labels: we.spec.labels.clone(),
            service_account: we
                .spec
                .service_account
                .clone()
                .unwrap_or_else(|| "default".into()),
            locality: we.spec.locality.clone().or_else(|| origin.locality.clone()),
            cluster: origin.cluster.to_string(),
            network: we
                .spec
                .network
                .clone()
                .unwrap_or_else(|| origin.network.clone()),
        };
        mesh.workloads.insert(key.clone(), Arc::new(w));
        out.push((key, *we));
    }
    out
}

/// Workloads by (namespace, label key, label value), across clusters.
pub(super) struct LabelIndex {
    map: HashMap<(String, String, String), Vec<Arc<Workload>>>,
}

impl LabelIndex {
    pub fn new<'a>(workloads: impl Iterator<Item = &'a Arc<Workload>>) -> Self {
        let mut map: HashMap<_, Vec<Arc<Workload>>> = Default::default();
        for w in workloads {
            for (k, v) in &w.labels {
                map.entry((w.namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .push(w.clone());
            }
        }
        Self { map }
    }

    /// Workloads that carry at least the rarest label of `selector`.
    pub fn candidates(&self, ns: &str, selector: &BTreeMap<String, String>) -> &[Arc<Workload>] {
        selector
            .iter()
            .map(|(k, v)| {
                let key = (ns.to_string(), k.clone(), v.clone());
                self.map.get(&key).map(Vec::as_slice).unwrap_or_default()
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default()
    }
}
