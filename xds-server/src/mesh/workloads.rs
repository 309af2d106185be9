//! The workloads stage: the WorkloadEntries of the config folder (the mesh's own
//! cluster) and of the registries member clusters' relays report, each tagged with its
//! cluster, network and locality; and the check that no two workloads of a cluster share
//! an inbound address.

use super::inputs::KindStore;
use super::services::Services;
use super::settings::Settings;
use super::stages::{describe, Errors, StageError};
use super::{Workload, APP_ADDRESS_ANNOTATION, OUTBOUND_ADDRESS_ANNOTATION};
use crate::config::model::WorkloadEntrySpec;
use crate::config::{ClusterMeta, ConfigError, Object, Source};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The workloads of every cluster.
#[derive(Debug, Default, PartialEq)]
pub struct Workloads {
    /// By [`Workload::key`].
    pub map: Arc<BTreeMap<String, Arc<Workload>>>,
    /// Member clusters whose relays reported a registry.
    pub members: BTreeMap<String, ClusterMeta>,
    /// The WorkloadEntry of each workload, for errors found by later stages.
    pub objects: BTreeMap<String, Arc<Object<WorkloadEntrySpec>>>,
}

/// The cluster a WorkloadEntry runs in, and the defaults it gives it.
struct Origin<'a> {
    cluster: &'a str,
    /// A member cluster: keys carry `@cluster`.
    member: bool,
    network: String,
    locality: Option<String>,
}

pub fn build(
    store: &KindStore<WorkloadEntrySpec>,
    clusters: &BTreeMap<String, ClusterMeta>,
    settings: &Settings,
    prev: Option<&Workloads>,
    errs: &mut Errors,
) -> Workloads {
    let mut out = Workloads::default();
    let mut map = BTreeMap::new();
    for (cluster, meta) in clusters {
        if *cluster == settings.cluster_name {
            // The store refuses such a registry; only a renamed own cluster gets here.
            let e = StageError::OwnClusterIsMember {
                cluster: cluster.clone(),
            };
            match &settings.object {
                Some(mc) => errs.push(mc, "MeshConfig", "spec.clusterName", e),
                None => errs.0.push(ConfigError::file(
                    &format!("cluster {cluster}"),
                    e.to_string(),
                )),
            }
            continue;
        }
        out.members.insert(cluster.clone(), meta.clone());
    }
    // Keys are unique per cluster; a duplicate is an error on the later one.
    let mut seen: BTreeMap<(Option<&str>, &str, &str), &Source> = BTreeMap::new();
    for (file, we) in store.iter() {
        let origin = match file.cluster() {
            None => Origin {
                cluster: &settings.cluster_name,
                member: false,
                network: settings.network.clone(),
                locality: None,
            },
            Some(c) => match out.members.get(c) {
                Some(meta) => Origin {
                    cluster: c,
                    member: true,
                    network: meta.network_of(c),
                    locality: meta.locality(),
                },
                // The cluster's record is gone or names the own cluster (reported above).
                None => continue,
            },
        };
        let id = (file.cluster(), we.namespace.as_str(), we.name.as_str());
        if let Some(prev) = seen.insert(id, &we.source) {
            let previous = describe(prev);
            errs.push(
                we,
                "WorkloadEntry",
                "metadata.name",
                StageError::Duplicate { previous },
            );
            continue;
        }
        let Some(w) = workload(we, &origin, errs) else {
            continue;
        };
        let w = match prev.and_then(|p| p.map.get(&w.key)) {
            Some(old) if **old == w => old.clone(),
            _ => Arc::new(w),
        };
        out.objects.insert(w.key.clone(), we.clone());
        map.insert(w.key.clone(), w);
    }
    out.map = Arc::new(map);
    out
}

fn annotation_ip(we: &Object<WorkloadEntrySpec>, key: &str, errs: &mut Errors) -> Option<IpAddr> {
    match we.annotations.get(key) {
        None => Some(IpAddr::from([127, 0, 0, 1])),
        Some(v) => match v.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                let e = StageError::NotAnIp { value: v.clone() };
                errs.push(
                    we,
                    "WorkloadEntry",
                    format!("metadata.annotations.{key}"),
                    e,
                );
                None
            }
        },
    }
}

fn workload(
    we: &Object<WorkloadEntrySpec>,
    origin: &Origin<'_>,
    errs: &mut Errors,
) -> Option<Workload> {
    let app = annotation_ip(we, APP_ADDRESS_ANNOTATION, errs);
    let outbound = annotation_ip(we, OUTBOUND_ADDRESS_ANNOTATION, errs);
    let (Some(app_address), Some(outbound_address), Ok(address)) =
        (app, outbound, we.spec.address.parse())
    else {
        return None;
    };
    let id = format!("{}.{}", we.name, we.namespace);
    let key = if origin.member {
        format!("{id}@{}", origin.cluster)
    } else {
        id
    };
    Some(Workload {
        key,
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
    })
}

/// Two workloads on one inbound address:port of one cluster would make two sidecars
/// fight for a socket; other clusters are other hosts.
pub fn check_inbound(workloads: &Workloads, services: &Services, errs: &mut Errors) {
    let mut inbound: BTreeMap<(&str, IpAddr, u32), &str> = BTreeMap::new();
    for w in workloads.map.values() {
        for port in services.inbound_ports(w) {
            let Some(other) = inbound.insert((&w.cluster, w.address, port.0), &w.key) else {
                continue;
            };
            if other == w.key {
                continue;
            }
            if let Some(we) = workloads.objects.get(&w.key) {
                let e = StageError::InboundAddressTaken {
                    address: w.address,
                    port: port.0,
                    other: other.to_string(),
                };
                errs.push(we, "WorkloadEntry", "spec.address", e);
            }
        }
    }
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
