//! Member clusters' registries: the WorkloadEntry files a relay reports for its cluster,
//! the whole set each time. They follow the config folder's rules: a file is the unit of
//! change, a bad file keeps its last good version, and errors name the file as
//! `cluster NAME: FILE`. Only WorkloadEntries are accepted: policies and services take
//! effect only when written on the mesh control plane.

use super::{ConfigStore, FileKey, Proposed};
use crate::config::parse::parse_file;
use crate::config::validate::{dns_label, label_value};
use crate::config::{ConfigError, ConfigObject};
use crate::mesh::ClusterMeta;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64;

/// How a registry file is named in errors and the admin API.
pub(super) fn display(cluster: &str, name: &str) -> String {
    format!("cluster {cluster}: {name}")
}

/// A registry report that cannot be considered at all (as opposed to a bad file in it,
/// which is reported in [`RegistryOutcome::errors`] and keeps its last good version).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid member cluster name: {0}")]
    InvalidClusterName(String),
    #[error(
        "cluster `{0}` is the mesh control plane's own cluster (MeshConfig.clusterName): \
         its workloads come from the config folder; a member cluster needs another name"
    )]
    OwnCluster(String),
    #[error("cluster {cluster}: invalid {field}: {message}")]
    InvalidMeta {
        cluster: String,
        field: &'static str,
        message: String,
    },
    #[error("cluster {cluster}: invalid registry file name {name:?}: {message}")]
    InvalidFileName {
        cluster: String,
        name: String,
        message: String,
    },
}

/// What a registry report did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegistryOutcome {
    /// The mesh changed, so a new snapshot was published.
    pub changed: bool,
    /// The snapshot generation in effect after the report (set by the controller).
    pub generation: u64,
    /// The cluster's workloads in effect.
    pub workloads: usize,
    /// Errors found in this report (the controller logs them).
    pub new_errors: Vec<ConfigError>,
    /// Every error keeping a file of this cluster from taking effect, from this report
    /// or an earlier one (an unchanged bad file is not parsed again).
    pub errors: Vec<ConfigError>,
}

/// A member cluster in `/debug/configz`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub network: String,
    pub locality: Option<String>,
    pub files: usize,
    pub workloads: usize,
    pub errors: usize,
}

fn check_meta(cluster: &str, meta: &ClusterMeta) -> Result<(), RegistryError> {
    let fields = [
        ("network", Some(&meta.network).filter(|n| !n.is_empty())),
        ("region", meta.region.as_ref()),
        ("zone", meta.zone.as_ref()),
    ];
    for (field, value) in fields {
        if let Some(v) = value {
            label_value(v).map_err(|message| RegistryError::InvalidMeta {
                cluster: cluster.to_string(),
                field,
                message,
            })?;
        }
    }
    Ok(())
}

/// Member clusters report WorkloadEntries only; anything else rejects its file.
fn only_workload_entries(
    cluster: &str,
    objects: Vec<ConfigObject>,
) -> Result<Vec<ConfigObject>, Vec<ConfigError>> {
    let errors: Vec<ConfigError> = objects
        .iter()
        .filter(|o| !matches!(o, ConfigObject::WorkloadEntry(_)))
        .map(|o| crate::mesh::member_kind_error(cluster, o))
        .collect();
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

impl ConfigStore {
    /// Replaces what member cluster `cluster` reports: where it runs (`meta`) and its
    /// registry, `files` as (name, YAML text), the whole set (a file not in it is
    /// deleted). Unchanged files are not parsed again; a bad file is rejected on its own
    /// and keeps its last good version. Errors only when the report as a whole cannot be
    /// taken (bad cluster name or metadata, a missing or repeated file name).
    pub fn set_cluster_registry(
        &mut self,
        cluster: &str,
        meta: ClusterMeta,
        files: Vec<(String, String)>,
    ) -> Result<RegistryOutcome, RegistryError> {
        dns_label(cluster).map_err(RegistryError::InvalidClusterName)?;
        if cluster == self.mesh.cluster_name {
            return Err(RegistryError::OwnCluster(cluster.to_string()));
        }
        check_meta(cluster, &meta)?;
        let mut names = BTreeSet::new();
        for (name, _) in &files {
            let bad = |message: &str| RegistryError::InvalidFileName {
                cluster: cluster.to_string(),
                name: name.clone(),
                message: message.to_string(),
            };
            if name.trim().is_empty() {
                return Err(bad("a file needs a name"));
            }
            if !names.insert(name.as_str()) {
                return Err(bad("sent twice in one report"));
            }
        }

        let mut outcome = RegistryOutcome::default();
        let mut proposed: BTreeMap<FileKey, Proposed> = BTreeMap::new();
        for (name, text) in &files {
            let key = FileKey::Registry(cluster.to_string(), name.clone());
            let hash = xxh3_64(text.as_bytes());
            let state = self.files.entry(key.clone()).or_default();
            if state.seen == Some(hash) {
                continue;
            }
            state.seen = Some(hash);
            let parsed = parse_file(&display(cluster, name), text)
                .and_then(|objects| only_workload_entries(cluster, objects));
            match parsed {
                Ok(objects) => {
                    proposed.insert(key, (hash, Some(Arc::new(objects))));
                }
                Err(errors) => {
                    state.errors = errors.clone();
                    outcome.new_errors.extend(errors);
                }
            }
        }
        for key in self.cluster_files(cluster) {
            if matches!(&key, FileKey::Registry(_, n) if !names.contains(n.as_str())) {
                proposed.insert(key, (0, None));
            }
        }
        let mut clusters = self.clusters.clone();
        clusters.insert(cluster.to_string(), meta);
        if !proposed.is_empty() || clusters != self.clusters {
            let (changed, errors) = self.apply(proposed, clusters);
            outcome.changed = changed;
            outcome.new_errors.extend(errors);
        }
        self.fill_outcome(cluster, &mut outcome);
        Ok(outcome)
    }

    /// Drops member cluster `cluster` and its workloads (its relay left the mesh).
    pub fn remove_cluster_registry(&mut self, cluster: &str) -> RegistryOutcome {
        let mut outcome = RegistryOutcome::default();
        if !self.clusters.contains_key(cluster) && self.cluster_files(cluster).is_empty() {
            return outcome;
        }
        let proposed = self
            .cluster_files(cluster)
            .into_iter()
            .map(|k| (k, (0, None)))
            .collect();
        let mut clusters = self.clusters.clone();
        clusters.remove(cluster);
        let (changed, errors) = self.apply(proposed, clusters);
        outcome.changed = changed;
        outcome.new_errors = errors;
        self.fill_outcome(cluster, &mut outcome);
        outcome
    }

    /// Member clusters with a registry, for the admin API.
    pub fn cluster_status(&self) -> Vec<ClusterStatus> {
        self.clusters
            .iter()
            .map(|(name, meta)| {
                let files = self.cluster_files(name);
                ClusterStatus {
                    name: name.clone(),
                    network: meta.network_of(name),
                    locality: meta.locality(),
                    files: files.len(),
                    workloads: self.cluster_workloads(name),
                    errors: files
                        .iter()
                        .filter_map(|k| self.files.get(k))
                        .map(|f| f.errors.len())
                        .sum(),
                }
            })
            .collect()
    }

    fn cluster_files(&self, cluster: &str) -> Vec<FileKey> {
        let start = FileKey::Registry(cluster.to_string(), String::new());
        self.files
            .range(start..)
            .take_while(|(k, _)| matches!(k, FileKey::Registry(c, _) if c == cluster))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn cluster_workloads(&self, cluster: &str) -> usize {
        self.mesh
            .workloads
            .values()
            .filter(|w| w.cluster == cluster)
            .count()
    }

    fn fill_outcome(&self, cluster: &str, outcome: &mut RegistryOutcome) {
        outcome.workloads = self.cluster_workloads(cluster);
        outcome.errors = self
            .cluster_files(cluster)
            .iter()
            .filter_map(|k| self.files.get(k))
            .flat_map(|f| f.errors.iter().cloned())
            .collect();
    }
}
