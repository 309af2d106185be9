//! The config folder: every `*.yaml` / `*.yml` file below it, reloaded on change; and
//! the registries of member clusters, which their relays report as sets of files.
//!
//! A file is the unit of change and keeps its last good contents: an edit that fails
//! to parse or validate, or that breaks a cross-file rule (a route to a deleted service),
//! is rejected and the previous version of that file stays in effect. Errors are kept
//! per file until the file is fixed, for the admin API. A member cluster's registry file
//! is named `cluster NAME: FILE` in errors and holds WorkloadEntries only.

mod registry;

pub use registry::{ClusterStatus, RegistryError, RegistryOutcome};

use super::parse::parse_file;
use super::{ConfigError, ConfigObject};
use crate::mesh::{ClusterMeta, MemberRegistry, MeshState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read config dir {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config dir {0} is not a directory")]
    NotADirectory(PathBuf),
}

#[derive(Debug, Default)]
struct FileState {
    /// Hash of the text last looked at, so unchanged files are not re-parsed.
    seen: Option<u64>,
    /// Objects of the last good version (in effect).
    good: Option<Arc<Vec<ConfigObject>>>,
    errors: Vec<ConfigError>,
}

/// A changed file's new objects; `None` when the file was deleted.
type Proposed = (u64, Option<Arc<Vec<ConfigObject>>>);

/// Where a file comes from. Ordered so each member cluster's files are contiguous.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum FileKey {
    /// A file of the config folder: the mesh's own cluster.
    Dir(PathBuf),
    /// A file of a member cluster's registry: (cluster, name as its relay sent it).
    Registry(String, String),
}

#[derive(Debug)]
pub struct ConfigStore {
    dir: PathBuf,
    files: BTreeMap<FileKey, FileState>,
    /// Member clusters with a registry, and where they run.
    clusters: BTreeMap<String, ClusterMeta>,
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

impl ConfigStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<(ConfigStore, ReloadOutcome), StoreError> {
        let dir = dir.into();
        let meta = std::fs::metadata(&dir).map_err(|source| StoreError::Unreadable {
            path: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(dir));
        }
        let mut store = ConfigStore {
            dir,
            files: BTreeMap::new(),
            clusters: BTreeMap::new(),
            mesh: Arc::new(MeshState::default()),
        };
        let outcome = store.reload()?;
        Ok((store, outcome))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn mesh(&self) -> Arc<MeshState> {
        self.mesh.clone()
    }

    /// Every error currently keeping a file from taking effect.
    pub fn errors(&self) -> Vec<ConfigError> {
        self.files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect()
    }

    fn scan(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|source| StoreError::Unreadable {
                path: d.clone(),
                source,
            })?;
            for e in entries.flatten() {
                let p = e.path();
                let hidden = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'));
                if hidden {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                    out.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn display(&self, key: &FileKey) -> String {
        match key {
            FileKey::Dir(p) => p.display().to_string(),
            FileKey::Registry(cluster, name) => registry::display(cluster, name),
        }
    }

    /// Re-reads the folder. Only an unreadable folder is an error; bad files are reported
    /// in the outcome and keep their last good version.
    pub fn reload(&mut self) -> Result<ReloadOutcome, StoreError> {
        let paths = self.scan()?;
        let mut outcome = ReloadOutcome::default();
        // Per changed file: the proposed new objects (None = file deleted).
        let mut proposed: BTreeMap<FileKey, Proposed> = BTreeMap::new();
        for p in &paths {
            let name = p.display().to_string();
            let text = match std::fs::read(p) {
                Ok(b) => b,
                Err(e) => {
                    // Likely deleted between scan and read; the next event will tell.
                    tracing::debug!(file = %name, error = %e, "config file vanished while reading");
                    continue;
                }
            };
            let hash = xxh3_64(&text);
            let state = self.files.entry(FileKey::Dir(p.clone())).or_default();
            if state.seen == Some(hash) {
                continue;
            }
            state.seen = Some(hash);
            let parsed = match String::from_utf8(text) {
                Ok(t) => parse_file(&name, &t),
                Err(_) => Err(vec![ConfigError::file(&name, "file is not UTF-8".into())]),
            };
            match parsed {
                Ok(objs) => {
                    proposed.insert(FileKey::Dir(p.clone()), (hash, Some(Arc::new(objs))));
                }
                Err(errs) => {
                    state.errors = errs.clone();
                    outcome.new_errors.extend(errs);
                }
            }
        }
        let removed: Vec<FileKey> = self
            .files
            .keys()
            .filter(|k| matches!(k, FileKey::Dir(p) if !paths.contains(p)))
            .cloned()
            .collect();
        for p in removed {
            proposed.insert(p, (0, None));
        }
        if proposed.is_empty() {
            return Ok(outcome);
        }
        let clusters = self.clusters.clone();
        let (changed, new_errors) = self.apply(proposed, clusters);
        outcome.changed = changed;
        outcome.new_errors.extend(new_errors);
        Ok(outcome)
    }

    /// The mesh if `proposed` (changed files) and `clusters` (member clusters) took effect.
    fn build(
        &self,
        proposed: &BTreeMap<FileKey, Proposed>,
        clusters: &BTreeMap<String, ClusterMeta>,
    ) -> Result<MeshState, Vec<ConfigError>> {
        // The objects in effect if this change is accepted: borrowed, not copied.
        let sets: Vec<(&FileKey, Arc<Vec<ConfigObject>>)> = self
            .files
            .iter()
            .filter_map(|(k, f)| {
                let set = match proposed.get(k) {
                    Some((_, new)) => new.clone(),
                    None => f.good.clone(),
                };
                set.map(|s| (k, s))
            })
            .collect();
        let own = sets
            .iter()
            .filter(|(k, _)| matches!(k, FileKey::Dir(_)))
            .flat_map(|(_, set)| set.iter());
        let members: Vec<MemberRegistry<'_>> = clusters
            .iter()
            .map(|(cluster, meta)| MemberRegistry {
                cluster,
                meta,
                objects: sets
                    .iter()
                    .filter(|(k, _)| matches!(k, FileKey::Registry(c, _) if c == cluster))
                    .flat_map(|(_, set)| set.iter())
                    .collect(),
            })
            .collect();
        MeshState::build_with_members(own, &members)
    }

    /// Puts `proposed` and `clusters` into effect if the mesh they make is consistent;
    /// else holds the changed files back with the errors. Returns (mesh changed, errors).
    fn apply(
        &mut self,
        proposed: BTreeMap<FileKey, Proposed>,
        clusters: BTreeMap<String, ClusterMeta>,
    ) -> (bool, Vec<ConfigError>) {
        let mut changed = false;
        let mut new_errors = Vec::new();
        match self.build(&proposed, &clusters) {
            Ok(mesh) => {
                for (p, (_, new)) in proposed {
                    match new {
                        Some(objs) => {
                            let state = self.files.entry(p).or_default();
                            state.good = Some(objs);
                            state.errors.clear();
                        }
                        None => {
                            self.files.remove(&p);
                        }
                    }
                }
                self.clusters = clusters;
                changed = *self.mesh != mesh;
                self.mesh = Arc::new(mesh);
            }
            Err(errs) => {
                // Cross-file errors: the whole batch of changed files is held back, and
                // every changed file carries the errors so none of them looks accepted.
                let batch: Vec<String> = proposed.keys().map(|p| self.display(p)).collect();
                for p in proposed.keys() {
                    let state = self.files.entry(p.clone()).or_default();
                    // Retried at the next reload: a change elsewhere may make it fit. A
                    // deleted file that others depend on keeps its objects in effect meanwhile.
                    state.seen = None;
                    state.errors = errs
                        .iter()
                        .map(|e| {
                            let mut e = e.clone();
                            if !batch.iter().any(|c| **c == *e.file) {
                                e.message = format!(
                                    "{} (after changes to {})",
                                    e.message,
                                    batch.join(", ")
                                );
                            }
                            e
                        })
                        .collect();
                }
                new_errors.extend(errs);
                // A member cluster's new network or locality needs no file: it still
                // takes effect, with the files of the batch held back.
                if clusters != self.clusters {
                    if let Ok(mesh) = self.build(&BTreeMap::new(), &clusters) {
                        self.clusters = clusters;
                        changed = *self.mesh != mesh;
                        self.mesh = Arc::new(mesh);
                    }
                }
            }
        }
        (changed, new_errors)
    }
}
