//! The services stage: every ServiceEntry host with its ports and endpoints (inline ones,
//! and the workloads its selector picks in any cluster), which services select each
//! workload, and the catalog of hosts and ports that the routing stages read.

use super::inputs::KindStore;
use super::settings::Settings;
use super::stages::{describe, unique, Errors, StageError};
use super::workloads::{LabelIndex, Workloads};
use super::{
    selects, DnsEndpoint, Endpoint, Protocol, Resolution, Service, ServicePortInfo, Workload,
};
use crate::config::model::ServiceEntrySpec;
use crate::config::{Object, Source};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Hosts and their ports: all that the DestinationRule and VirtualService stages need of
/// services, so endpoint changes leave those stages alone.
pub type Catalog = BTreeMap<String, Vec<ServicePortInfo>>;

#[derive(Debug, Default, PartialEq)]
pub struct Services {
    pub services: Arc<BTreeMap<String, Arc<Service>>>,
    /// Workload key -> FQDNs of the services selecting it.
    pub workload_services: Arc<BTreeMap<String, Vec<String>>>,
    pub catalog: Arc<Catalog>,
}

impl Services {
    /// Distinct (workload port, protocol) pairs the sidecar of `w` must accept inbound.
    pub fn inbound_ports(&self, w: &Workload) -> BTreeSet<(u32, Protocol)> {
        inbound_ports(w, &self.services, &self.workload_services)
    }
}

pub(super) fn inbound_ports(
    w: &Workload,
    services: &BTreeMap<String, Arc<Service>>,
    workload_services: &BTreeMap<String, Vec<String>>,
) -> BTreeSet<(u32, Protocol)> {
    let mut out = BTreeSet::new();
    let selecting = workload_services.get(&w.key).into_iter().flatten();
    for s in selecting.filter_map(|fqdn| services.get(fqdn)) {
        for p in &s.ports {
            let ep_port = p.endpoint_port(&w.ports);
            out.insert((ep_port, p.protocol));
        }
    }
    out
}

pub fn build(
    store: &KindStore<ServiceEntrySpec>,
    workloads: &Workloads,
    settings: &Settings,
    prev: Option<&Services>,
    errs: &mut Errors,
) -> Services {
    // Selecting workloads by scanning all of them per service is O(services x
    // workloads); an index by (namespace, label) keeps large meshes fast.
    let by_label = LabelIndex::new(workloads.map.values());
    let mut selected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut host_owner: BTreeMap<String, &Source> = BTreeMap::new();
    let mut services = BTreeMap::new();
    for se in unique(store, "ServiceEntry", errs) {
        for (i, host) in se.spec.hosts.iter().enumerate() {
            let fqdn = settings.resolve_host(host, &se.namespace);
            if let Some(prev) = host_owner.get(&fqdn) {
                let e = StageError::HostTaken {
                    host: fqdn.clone(),
                    previous: describe(prev),
                };
                errs.push(se, "ServiceEntry", format!("spec.hosts[{i}]"), e);
                continue;
            }
            host_owner.insert(fqdn.clone(), &se.source);
            let svc = service(se, fqdn.clone(), &by_label, &mut selected);
            let svc = match prev.and_then(|p| p.services.get(&fqdn)) {
                Some(old) if **old == svc => old.clone(),
                _ => Arc::new(svc),
            };
            services.insert(fqdn, svc);
        }
    }
    let catalog: Catalog = services
        .iter()
        .map(|(k, s)| (k.clone(), s.ports.clone()))
        .collect();
    let catalog = match prev {
        Some(p) if *p.catalog == catalog => p.catalog.clone(),
        _ => Arc::new(catalog),
    };
    Services {
        services: Arc::new(services),
        workload_services: Arc::new(selected),
        catalog,
    }
}

fn service(
    se: &Object<ServiceEntrySpec>,
    fqdn: String,
    by_label: &LabelIndex,
    selected: &mut BTreeMap<String, Vec<String>>,
) -> Service {
    let ports: Vec<ServicePortInfo> = se
        .spec
        .ports
        .iter()
        .map(|p| ServicePortInfo {
            number: p.number,
            name: p.name.clone(),
            protocol: Protocol::parse(p.protocol.as_deref()),
            target_port: p.target_port,
        })
        .collect();
    let selector = se.spec.workload_selector.as_ref().map(|s| s.labels.clone());
    let resolution = Resolution::parse(se.spec.resolution.as_deref());
    let dns_endpoints = if !resolution.is_dns() {
        Vec::new()
    } else if se.spec.endpoints.is_empty() {
        vec![DnsEndpoint {
            address: fqdn.clone(),
            ports: BTreeMap::new(),
            labels: BTreeMap::new(),
            locality: None,
            weight: None,
        }]
    } else {
        se.spec
            .endpoints
            .iter()
            .map(|e| DnsEndpoint {
                address: e.address.clone(),
                ports: e.ports.clone(),
                labels: e.labels.clone(),
                locality: e.locality.clone(),
                weight: e.weight,
            })
            .collect()
    };
    let mut endpoints: Vec<Endpoint> = se
        .spec
        .endpoints
        .iter()
        .filter(|_| resolution == Resolution::Static)
        .filter_map(|e| {
            Some(Endpoint {
                address: e.address.parse().ok()?,
                ports: e.ports.clone(),
                labels: e.labels.clone(),
                locality: e.locality.clone(),
                weight: e.weight,
                workload: None,
                service_account: None,
                cluster: None,
                network: e.network.clone(),
            })
        })
        .collect();
    if let Some(sel) = &selector {
        for w in by_label.candidates(&se.namespace, sel) {
            if selects(sel, &w.labels) {
                endpoints.push(Endpoint {
                    address: w.address,
                    ports: w.ports.clone(),
                    labels: w.labels.clone(),
                    locality: w.locality.clone(),
                    weight: None,
                    workload: Some(w.key.clone()),
                    service_account: Some(w.service_account.clone()),
                    cluster: Some(w.cluster.clone()),
                    network: Some(w.network.clone()),
                });
                selected
                    .entry(w.key.clone())
                    .or_default()
                    .push(fqdn.clone());
            }
        }
    }
    Service {
        fqdn,
        namespace: se.namespace.clone(),
        entry: se.key(),
        ports,
        mesh_internal: se.spec.location.as_deref() != Some("MESH_EXTERNAL"),
        selector,
        resolution,
        endpoints,
        dns_endpoints,
        addresses: se.spec.addresses.clone(),
        subject_alt_names: se.spec.subject_alt_names.clone(),
    }
}
