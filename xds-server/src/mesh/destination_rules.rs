//! The DestinationRule stage: one rule per service host, with its subsets.

use super::inputs::KindStore;
use super::services::Catalog;
use super::settings::Settings;
use super::stages::{unique, Errors, StageError};
use super::{DestinationRuleInfo, ServicePortInfo, SubsetInfo};
use crate::config::model::DestinationRuleSpec;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Host FQDN -> its DestinationRule.
pub type DestinationRules = BTreeMap<String, Arc<DestinationRuleInfo>>;

/// A `portLevelSettings` entry for a port the service does not have would be silently
/// unused: the first such one, with its field.
fn unknown_port(spec: &DestinationRuleSpec, ports: &[ServicePortInfo]) -> Option<(String, u32)> {
    let policies = spec
        .traffic_policy
        .as_deref()
        .into_iter()
        .map(|tp| ("spec.trafficPolicy".to_string(), tp))
        .chain(spec.subsets.iter().enumerate().filter_map(|(i, s)| {
            let f = format!("spec.subsets[{i}].trafficPolicy");
            s.traffic_policy.as_ref().map(|tp| (f, tp))
        }));
    for (f, tp) in policies {
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            let Some(n) = p.port.as_ref().map(|p| p.number) else {
                continue;
            };
            if !ports.iter().any(|sp| sp.number == n) {
                return Some((format!("{f}.portLevelSettings[{i}].port.number"), n));
            }
        }
    }
    None
}

pub fn build(
    store: &KindStore<DestinationRuleSpec>,
    catalog: &Catalog,
    settings: &Settings,
    errs: &mut Errors,
) -> DestinationRules {
    let mut out = DestinationRules::new();
    for dr in unique(store, "DestinationRule", errs) {
        let host = settings.resolve_host(&dr.spec.host, &dr.namespace);
        if !catalog.contains_key(&host) {
            let e = StageError::UnknownService { host };
            errs.push(dr, "DestinationRule", "spec.host", e);
            continue;
        }
        let ports = catalog.get(&host).map(Vec::as_slice).unwrap_or_default();
        if let Some((field, port)) = unknown_port(&dr.spec, ports) {
            errs.push(
                dr,
                "DestinationRule",
                &field,
                StageError::NoSuchPort { host, port },
            );
            continue;
        }
        if out.contains_key(&host) {
            let e = StageError::SecondDestinationRule { host };
            errs.push(dr, "DestinationRule", "spec.host", e);
            continue;
        }
        let subsets = dr
            .spec
            .subsets
            .iter()
            .map(|s| {
                let info = SubsetInfo {
                    labels: s.labels.clone(),
                    policy: s.traffic_policy.clone(),
                };
                (s.name.clone(), info)
            })
            .collect();
        let info = DestinationRuleInfo {
            key: dr.key(),
            namespace: dr.namespace.clone(),
            policy: dr.spec.traffic_policy.as_deref().cloned(),
            subsets,
        };
        out.insert(host, Arc::new(info));
    }
    out
}
