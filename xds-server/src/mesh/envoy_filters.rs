//! The EnvoyFilter stage: every EnvoyFilter compiled (patch values as Envoy messages),
//! in the order istiod applies them, and which of them select a given proxy.

use super::inputs::KindStore;
use super::settings::Settings;
use super::stages::{describe, Errors, StageError};
use crate::config::envoy_filter::{compile, ApplyTo, CompiledPatch, EnvoyFilterSpec};
use crate::config::Source;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One EnvoyFilter, ready to apply.
#[derive(Debug, PartialEq)]
pub struct EnvoyFilter {
    /// `namespace/name`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    /// `workloadSelector.labels`; `None`: every proxy of the namespace (or the mesh).
    pub selector: Option<BTreeMap<String, String>>,
    pub priority: i32,
    pub patches: Vec<CompiledPatch>,
}

/// Every EnvoyFilter of the mesh, sorted as istiod applies them: lower `priority` first,
/// then the root namespace's before a namespace's own, then by name.
#[derive(Debug, Default, PartialEq)]
pub struct EnvoyFilters {
    pub root_namespace: String,
    pub filters: Vec<Arc<EnvoyFilter>>,
}

pub fn build(
    store: &KindStore<EnvoyFilterSpec>,
    settings: &Settings,
    errs: &mut Errors,
) -> EnvoyFilters {
    let mut seen: BTreeMap<String, &Source> = BTreeMap::new();
    let mut filters = Vec::with_capacity(store.len());
    for (_, o) in store.iter() {
        if let Some(prev) = seen.insert(o.key(), &o.source) {
            let previous = describe(prev);
            errs.push(
                o,
                "EnvoyFilter",
                "metadata.name",
                StageError::Duplicate { previous },
            );
            continue;
        }
        // Parsing validated the patches already; compiling again cannot fail, but a
        // failure would still be reported rather than dropped.
        let patches = match compile(&o.spec) {
            Ok(p) => p,
            Err((field, message)) => {
                errs.push(o, "EnvoyFilter", field, StageError::Invalid { message });
                continue;
            }
        };
        filters.push(Arc::new(EnvoyFilter {
            key: o.key(),
            name: o.name.clone(),
            namespace: o.namespace.clone(),
            selector: o.spec.workload_selector.as_ref().map(|s| s.labels.clone()),
            priority: o.spec.priority,
            patches,
        }));
    }
    let root = settings.root_namespace.as_str();
    filters.sort_by(|a, b| {
        (a.priority, a.namespace != root, &a.name, &a.namespace).cmp(&(
            b.priority,
            b.namespace != root,
            &b.name,
            &b.namespace,
        ))
    });
    EnvoyFilters {
        root_namespace: settings.root_namespace.clone(),
        filters,
    }
}

impl EnvoyFilters {
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The filters that apply to a proxy in `namespace` whose workload has `labels`
    /// (`None`: not a known workload, so only filters without a selector apply). A
    /// filter of the root namespace applies in every namespace.
    pub fn select(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> PatchSet {
        let filters = self
            .filters
            .iter()
            .filter(|f| f.namespace == self.root_namespace || f.namespace == namespace)
            .filter(|f| match (&f.selector, labels) {
                (None, _) => true,
                (Some(sel), Some(l)) => super::selects(sel, l),
                (Some(sel), None) => sel.is_empty(),
            })
            .cloned()
            .collect();
        PatchSet { filters }
    }
}

/// The filters applying to one proxy class, in order. Two classes with the same set
/// get the same patched resources, so results are shared by [`PatchSet::key`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatchSet {
    filters: Vec<Arc<EnvoyFilter>>,
}

/// Identifies a [`PatchSet`]: its filters' keys, in order.
pub type PatchKey = Arc<[String]>;

impl PatchSet {
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn key(&self) -> PatchKey {
        self.filters.iter().map(|f| f.key.clone()).collect()
    }

    /// Only the filters with a patch for which `keep` holds (a class's clusters do not
    /// depend on its listener patches, so those need not split the cluster sets).
    pub fn only(&self, keep: impl Fn(ApplyTo) -> bool) -> PatchSet {
        PatchSet {
            filters: self
                .filters
                .iter()
                .filter(|f| f.patches.iter().any(|p| keep(p.apply_to)))
                .cloned()
                .collect(),
        }
    }

    /// The patches of `apply_to` in application order.
    pub fn patches(&self, apply_to: ApplyTo) -> impl Iterator<Item = &CompiledPatch> + '_ {
        self.filters
            .iter()
            .flat_map(|f| f.patches.iter())
            .filter(move |p| p.apply_to == apply_to)
    }

    pub fn has(&self, apply_to: ApplyTo) -> bool {
        self.patches(apply_to).next().is_some()
    }
}
