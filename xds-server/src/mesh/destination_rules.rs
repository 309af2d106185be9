//! The DestinationRule stage: one rule per service host, with its subsets.

use super::inputs::KindStore;
use super::services::Catalog;
use super::settings::Settings;
use super::stages::{describe, Errors, StageError};
use super::{DestinationRuleInfo, SubsetInfo};
use crate::config::model::{DestinationRuleSpec, TrafficPolicy};
use crate::config::Source;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Host FQDN -> its DestinationRule.
pub type DestinationRules = BTreeMap<String, Arc<DestinationRuleInfo>>;

fn lb(tp: &Option<TrafficPolicy>) -> Option<String> {
    tp.as_ref()
        .and_then(|t| t.load_balancer.as_ref())
        .map(|l| l.simple.clone())
}

fn tls(tp: &Option<TrafficPolicy>) -> Option<String> {
    tp.as_ref()
        .and_then(|t| t.tls.as_ref())
        .map(|t| t.mode.clone())
}

pub fn build(
    store: &KindStore<DestinationRuleSpec>,
    catalog: &Catalog,
    settings: &Settings,
    errs: &mut Errors,
) -> DestinationRules {
    let mut out = DestinationRules::new();
    let mut seen: BTreeMap<String, &Source> = BTreeMap::new();
    for (_, dr) in store.iter() {
        if let Some(prev) = seen.insert(dr.key(), &dr.source) {
            let previous = describe(prev);
            errs.push(
                dr,
                "DestinationRule",
                "metadata.name",
                StageError::Duplicate { previous },
            );
            continue;
        }
        let host = settings.resolve_host(&dr.spec.host, &dr.namespace);
        if !catalog.contains_key(&host) {
            let e = StageError::UnknownService { host };
            errs.push(dr, "DestinationRule", "spec.host", e);
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
                    lb: lb(&s.traffic_policy),
                    tls: tls(&s.traffic_policy),
                };
                (s.name.clone(), info)
            })
            .collect();
        let info = DestinationRuleInfo {
            key: dr.key(),
            lb: lb(&dr.spec.traffic_policy),
            tls: tls(&dr.spec.traffic_policy),
            subsets,
        };
        out.insert(host, Arc::new(info));
    }
    out
}
