//! Member clusters' registries: the WorkloadEntry files a relay reports for its cluster,
//! the whole set each time. They follow the config folder's rules: a file is the unit of
//! change, a bad file keeps its last good version, and errors name the file as
//! `cluster NAME: FILE`. Only WorkloadEntries are accepted: policies and services take
//! effect only when written on the mesh control plane.

use super::{Changes, FileKey, FileStore};
use crate::config::parse::parse_file;
use crate::config::validate::{dns_label, label_value};
use crate::config::{ClusterMeta, ConfigError, ConfigObject};
use serde::Serialize;
use std::collections::BTreeSet;
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

/// Member clusters report WorkloadEntries only; anything else rejects its file.
fn only_workload_entries(
    cluster: &str,
    objects: Vec<ConfigObject>,
) -> Result<Vec<ConfigObject>, Vec<ConfigError>> {
    let errors: Vec<ConfigError> = objects
        .iter()
        .filter(|o| !matches!(o, ConfigObject::WorkloadEntry(_)))
        .map(|o| member_kind_error(cluster, o))
        .collect();
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

impl FileStore {
    /// The change that member cluster `cluster`'s report proposes: where it runs
    /// (`meta`) and its registry, `files` as (name, YAML text), the whole set (a file not
    /// in it is deleted). Unchanged files are not parsed again; a bad file is rejected on
    /// its own and keeps its last good version. Errors only when the report as a whole
    /// cannot be taken (bad cluster name or metadata, the mesh's own cluster `own`, a
    /// missing or repeated file name).
    pub fn registry(
        &mut self,
        own: &str,
        cluster: &str,
        meta: ClusterMeta,
        files: Vec<(String, String)>,
    ) -> Result<Changes, RegistryError> {
        dns_label(cluster).map_err(RegistryError::InvalidClusterName)?;
        if cluster == own {
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

        let mut changes = Changes {
            clusters: self.clusters.clone(),
            ..Default::default()
        };
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
                    changes.files.insert(key, Some(Arc::new(objects)));
                }
                Err(errors) => {
                    state.errors = errors.clone();
                    changes.errors.extend(errors);
                }
            }
        }
        for key in self.cluster_files(cluster) {
            if matches!(&key, FileKey::Registry(_, n) if !names.contains(n.as_str())) {
                changes.files.insert(key, None);
            }
        }
        changes.clusters.insert(cluster.to_string(), meta);
        Ok(changes)
    }

    /// The change that drops member cluster `cluster` and its files (its relay left).
    pub fn remove_registry(&self, cluster: &str) -> Changes {
        let mut clusters = self.clusters.clone();
        clusters.remove(cluster);
        Changes {
            files: self
                .cluster_files(cluster)
                .into_iter()
                .map(|k| (k, None))
                .collect(),
            clusters,
            credentials: Default::default(),
            errors: Vec::new(),
        }
    }

    /// Whether `cluster` has a record or files.
    pub fn has_cluster(&self, cluster: &str) -> bool {
        self.clusters.contains_key(cluster) || !self.cluster_files(cluster).is_empty()
    }

    /// (files, errors) of `cluster`'s registry, for the admin API.
    pub fn cluster_file_counts(&self, cluster: &str) -> (usize, usize) {
        let files = self.cluster_files(cluster);
        let errors = files
            .iter()
            .filter_map(|k| self.files.get(k))
            .map(|f| f.errors.len())
            .sum();
        (files.len(), errors)
    }
}
