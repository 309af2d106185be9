//! [`MeshStore`]: the config store's files made into a mesh, one change at a time.
//!
//! A change (a folder reload, a member cluster's report) is proposed by the file store,
//! applied to a copy of the per-kind inputs, and built incrementally; only if the mesh it
//! makes is consistent do the files, the inputs and the mesh move forward together.
//! Otherwise the changed files are held back with the errors, and what was in effect
//! stays, untouched.

use super::inputs::Inputs;
use super::stages::{self, Outputs};
use super::MeshState;
use crate::config::store::{
    Changes, ClusterStatus, FileStore, RegistryError, RegistryOutcome, StoreError,
};
use crate::config::{ClusterMeta, ConfigError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
pub struct MeshStore {
    files: FileStore,
    inputs: Inputs,
    outputs: Outputs,
    mesh: Arc<MeshState>,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadOutcome {
    /// The mesh changed (a new [`MeshState`] is in effect).
    pub changed: bool,
    /// Errors found in this reload (already logged by the caller).
    pub new_errors: Vec<ConfigError>,
}

impl MeshStore {
    /// Opens the config folder `dir` and loads it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<(MeshStore, ReloadOutcome), StoreError> {
        let mut store = MeshStore {
            files: FileStore::open(dir)?,
            inputs: Inputs::default(),
            outputs: Outputs::default(),
            mesh: Arc::new(MeshState::default()),
        };
        let outcome = store.reload()?;
        Ok((store, outcome))
    }

    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    pub fn mesh(&self) -> Arc<MeshState> {
        self.mesh.clone()
    }

    /// Every error currently keeping a file from taking effect.
    pub fn errors(&self) -> Vec<ConfigError> {
        self.files.errors()
    }

    /// The stages the last accepted change ran (the others were reused).
    pub fn rebuilt_stages(&self) -> &[&'static str] {
        &self.outputs.rebuilt
    }

    /// The mesh of the files in effect built from nothing: what the incremental build must
    /// always equal.
    pub fn build_from_scratch(&self) -> Result<MeshState, Vec<ConfigError>> {
        let mut inputs = Inputs {
            clusters: Arc::new(self.files.clusters().clone()),
            credentials: Arc::new(
                self.files
                    .credentials()
                    .map(|c| (c.name.clone(), c.clone()))
                    .collect(),
            ),
            ..Default::default()
        };
        for (key, objects) in self.files.in_effect() {
            inputs.set_file(key, Some(objects));
        }
        stages::build(&inputs, &Outputs::default()).map(|(mesh, _)| mesh)
    }

    /// Re-reads the folder. Only an unreadable folder is an error; bad files are reported
    /// in the outcome and keep their last good version.
    pub fn reload(&mut self) -> Result<ReloadOutcome, StoreError> {
        let changes = self.files.scan()?;
        Ok(self.apply(changes))
    }

    /// Puts `changes` into effect if the mesh they make is consistent; else holds the
    /// changed files back with the errors (a member cluster's new network or locality
    /// needs no file, so it still takes effect).
    fn apply(&mut self, mut changes: Changes) -> ReloadOutcome {
        let mut outcome = ReloadOutcome {
            changed: false,
            new_errors: std::mem::take(&mut changes.errors),
        };
        if changes.is_empty(self.files.clusters()) {
            return outcome;
        }
        match self.try_build(&changes) {
            Ok(changed) => {
                outcome.changed = changed;
                self.files.commit(changes);
            }
            Err(errs) => {
                self.files.hold_back(&changes, &errs);
                outcome.new_errors.extend(errs);
                let rest = changes.without_files();
                if !rest.is_empty(self.files.clusters()) {
                    if let Ok(changed) = self.try_build(&rest) {
                        outcome.changed = changed;
                        self.files.commit_without_files(rest);
                    }
                }
            }
        }
        outcome
    }

    /// Builds the mesh `changes` would make; if it is consistent, puts the inputs and the
    /// mesh into effect and says whether the mesh changed.
    fn try_build(&mut self, changes: &Changes) -> Result<bool, Vec<ConfigError>> {
        let mut next = self.inputs.clone();
        for (key, objects) in &changes.files {
            next.set_file(key, objects.as_deref().map(Vec::as_slice));
        }
        if *next.clusters != changes.clusters {
            next.clusters = Arc::new(changes.clusters.clone());
        }
        if !changes.credentials.is_empty() {
            let credentials = Arc::make_mut(&mut next.credentials);
            for (name, c) in &changes.credentials {
                match c {
                    Some(c) => credentials.insert(name.clone(), c.clone()),
                    None => credentials.remove(name),
                };
            }
        }
        let (mesh, outputs) = stages::build(&next, &self.outputs)?;
        // Stages keep their `Arc`s when their result is unchanged, so this is cheap.
        let changed = *self.mesh != mesh;
        self.inputs = next;
        self.outputs = outputs;
        if changed {
            self.mesh = Arc::new(mesh);
        }
        Ok(changed)
    }

    /// Takes member cluster `cluster`'s report: where it runs (`meta`) and its registry,
    /// `files` as (name, YAML text), the whole set (a file not in it is deleted).
    /// Unchanged files are not parsed again; a bad file is rejected on its own and keeps
    /// its last good version. Errors only when the report as a whole cannot be taken (bad
    /// cluster name or metadata, a missing or repeated file name).
    pub fn set_cluster_registry(
        &mut self,
        cluster: &str,
        meta: ClusterMeta,
        files: Vec<(String, String)>,
    ) -> Result<RegistryOutcome, RegistryError> {
        let changes = self
            .files
            .registry(&self.mesh.cluster_name, cluster, meta, files)?;
        let applied = self.apply(changes);
        Ok(self.registry_outcome(cluster, applied))
    }

    /// Drops member cluster `cluster` and its workloads (its relay left the mesh).
    pub fn remove_cluster_registry(&mut self, cluster: &str) -> RegistryOutcome {
        if !self.files.has_cluster(cluster) {
            return RegistryOutcome::default();
        }
        let changes = self.files.remove_registry(cluster);
        let applied = self.apply(changes);
        self.registry_outcome(cluster, applied)
    }

    fn registry_outcome(&self, cluster: &str, applied: ReloadOutcome) -> RegistryOutcome {
        RegistryOutcome {
            changed: applied.changed,
            generation: 0,
            workloads: self.cluster_workloads(cluster),
            new_errors: applied.new_errors,
            errors: self.files.cluster_errors(cluster),
        }
    }

    fn cluster_workloads(&self, cluster: &str) -> usize {
        self.mesh
            .workloads
            .values()
            .filter(|w| w.cluster == cluster)
            .count()
    }

    /// Member clusters with a registry, for the admin API.
    pub fn cluster_status(&self) -> Vec<ClusterStatus> {
        self.files
            .clusters()
            .iter()
            .map(|(name, meta)| {
                let (files, errors) = self.files.cluster_file_counts(name);
                ClusterStatus {
                    name: name.clone(),
                    network: meta.network_of(name),
                    locality: meta.locality(),
                    files,
                    workloads: self.cluster_workloads(name),
                    errors,
                }
            })
            .collect()
    }
}
