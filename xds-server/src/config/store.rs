//! The config folder and the member clusters' registries, as files: every `*.yaml` /
//! `*.yml` file below the folder, and the files each member cluster's relay reports.
//!
//! This store knows files and the objects parsed from them, nothing of the mesh they
//! make: `crate::mesh::MeshStore` sits above it and decides, with the whole mesh in view,
//! whether a change takes effect. Changes go through two phases so nothing is ever half
//! applied: [`FileStore::scan`] (or [`FileStore::registry`]) parses what changed into a
//! [`Changes`] without touching what is in effect; then the caller either
//! [`FileStore::commit`]s it or [`FileStore::hold_back`]s it with the errors that
//! rejected it. A file is the unit of change and keeps its last good contents; errors are
//! kept per file until the file is fixed, for the admin API. A member cluster's registry
//! file is named `cluster NAME: FILE` in errors and holds WorkloadEntries only.

mod registry;

pub use registry::{member_kind_error, ClusterStatus, RegistryError, RegistryOutcome};

use super::credentials::{self, Credential, CREDENTIALS_DIR};
use super::parse::parse_file;
use super::{ClusterMeta, ConfigError, ConfigObject};
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

/// Where a file comes from. Ordered so each member cluster's files are contiguous, after
/// the config folder's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileKey {
    /// A file of the config folder: the mesh's own cluster.
    Dir(PathBuf),
    /// A file of a member cluster's registry: (cluster, name as its relay sent it).
    Registry(String, String),
}

impl FileKey {
    /// The member cluster a registry file belongs to; `None` for the config folder.
    pub fn cluster(&self) -> Option<&str> {
        match self {
            FileKey::Dir(_) => None,
            FileKey::Registry(c, _) => Some(c),
        }
    }
}

impl std::fmt::Display for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileKey::Dir(p) => write!(f, "{}", p.display()),
            FileKey::Registry(cluster, name) => f.write_str(&registry::display(cluster, name)),
        }
    }
}

/// A credential folder as last seen (see [`credentials`]).
#[derive(Debug, Default)]
struct CredentialState {
    seen: Option<u64>,
    good: Option<Arc<Credential>>,
    error: Option<ConfigError>,
}

/// A proposed change: per changed file its new objects (`None`: deleted), per changed
/// credential folder its new contents (`None`: deleted), and the member clusters as they
/// would be.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub files: BTreeMap<FileKey, Option<Arc<Vec<ConfigObject>>>>,
    pub credentials: BTreeMap<String, Option<Arc<Credential>>>,
    pub clusters: BTreeMap<String, ClusterMeta>,
    /// Files that did not parse or validate on their own: already recorded against their
    /// file (which keeps its last good version), reported here once.
    pub errors: Vec<ConfigError>,
}

impl Changes {
    /// Nothing to decide: no file changed and the member clusters are as they were.
    pub fn is_empty(&self, current: &BTreeMap<String, ClusterMeta>) -> bool {
        self.files.is_empty() && self.credentials.is_empty() && self.clusters == *current
    }

    /// The part of this change no mesh can reject (credentials and member clusters), to
    /// apply alone when the files of the change are held back.
    pub fn without_files(&self) -> Changes {
        Changes {
            credentials: self.credentials.clone(),
            clusters: self.clusters.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    files: BTreeMap<FileKey, FileState>,
    credentials: BTreeMap<String, CredentialState>,
    /// Member clusters with a registry, and where they run (in effect).
    clusters: BTreeMap<String, ClusterMeta>,
}

impl FileStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        let meta = std::fs::metadata(&dir).map_err(|source| StoreError::Unreadable {
            path: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory(dir));
        }
        Ok(FileStore {
            dir,
            files: BTreeMap::new(),
            credentials: BTreeMap::new(),
            clusters: BTreeMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Member clusters in effect.
    pub fn clusters(&self) -> &BTreeMap<String, ClusterMeta> {
        &self.clusters
    }

    /// The objects in effect of `key`'s file.
    pub fn good(&self, key: &FileKey) -> Option<&Arc<Vec<ConfigObject>>> {
        self.files.get(key).and_then(|f| f.good.as_ref())
    }

    /// Every file in effect with its objects, in [`FileKey`] order.
    pub fn in_effect(&self) -> impl Iterator<Item = (&FileKey, &Arc<Vec<ConfigObject>>)> {
        self.files
            .iter()
            .filter_map(|(k, f)| f.good.as_ref().map(|g| (k, g)))
    }

    /// The credentials in effect.
    pub fn credentials(&self) -> impl Iterator<Item = &Arc<Credential>> {
        self.credentials.values().filter_map(|c| c.good.as_ref())
    }

    /// Every error currently keeping a file from taking effect, each once (a cross-file
    /// error is held by every file of the batch it rejected).
    pub fn errors(&self) -> Vec<ConfigError> {
        let mut out: Vec<ConfigError> = Vec::new();
        let credentials = self.credentials.values().filter_map(|c| c.error.as_ref());
        for e in self
            .files
            .values()
            .flat_map(|f| f.errors.iter())
            .chain(credentials)
        {
            if !out.contains(e) {
                out.push(e.clone());
            }
        }
        out
    }

    fn list(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        let credentials = self.dir.join(CREDENTIALS_DIR);
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
                if p == credentials {
                    // TLS material, never config (see `scan_credentials`).
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

    /// Re-reads the folder into a proposed change. Only an unreadable folder is an error;
    /// a bad file is recorded (its last good version stays) and listed in
    /// [`Changes::errors`].
    pub fn scan(&mut self) -> Result<Changes, StoreError> {
        let paths = self.list()?;
        let mut changes = Changes {
            clusters: self.clusters.clone(),
            ..Default::default()
        };
        for p in &paths {
            let name = p.display().to_string();
            let text = match std::fs::read(p) {
                Ok(b) => b,
                Err(e) => {
                    // Likely deleted between listing and reading; the next event will tell.
                    tracing::debug!(file = %name, error = %e, "config file vanished while reading");
                    continue;
                }
            };
            let key = FileKey::Dir(p.clone());
            let hash = xxh3_64(&text);
            let state = self.files.entry(key.clone()).or_default();
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
                    changes.files.insert(key, Some(Arc::new(objs)));
                }
                Err(errs) => {
                    state.errors = errs.clone();
                    changes.errors.extend(errs);
                }
            }
        }
        for k in self.files.keys() {
            if matches!(k, FileKey::Dir(p) if !paths.contains(p)) {
                changes.files.insert(k.clone(), None);
            }
        }
        self.scan_credentials(&mut changes);
        Ok(changes)
    }

    /// Adds the credential folders that changed since the last scan to `changes`; a bad
    /// one is recorded against its folder (its last good version stays).
    fn scan_credentials(&mut self, changes: &mut Changes) {
        let folders = credentials::list(&self.dir);
        for (name, dir) in &folders {
            let seen = credentials::fingerprint(dir);
            let state = self.credentials.entry(name.clone()).or_default();
            if state.seen == Some(seen) {
                continue;
            }
            state.seen = Some(seen);
            match credentials::read(name, dir) {
                Ok(c) if state.good.as_deref() == Some(&c) => state.error = None,
                Ok(c) => {
                    changes.credentials.insert(name.clone(), Some(Arc::new(c)));
                }
                Err(e) => {
                    // The message names files, never their contents.
                    let err = ConfigError::file(&dir.display().to_string(), e.to_string());
                    state.error = Some(err.clone());
                    changes.errors.push(err);
                }
            }
        }
        self.credentials.retain(|name, state| {
            let present = folders.iter().any(|(n, _)| n == name);
            if !present && state.good.is_some() {
                changes.credentials.insert(name.clone(), None);
            }
            present || state.good.is_some()
        });
    }

    /// Puts `changes` into effect (the mesh they make was accepted).
    pub fn commit(&mut self, changes: Changes) {
        for (key, new) in changes.files {
            match new {
                Some(objs) => {
                    let state = self.files.entry(key).or_default();
                    state.good = Some(objs);
                    state.errors.clear();
                }
                None => {
                    self.files.remove(&key);
                }
            }
        }
        self.commit_credentials(changes.credentials);
        self.clusters = changes.clusters;
    }

    fn commit_credentials(&mut self, credentials: BTreeMap<String, Option<Arc<Credential>>>) {
        for (name, new) in credentials {
            match new {
                Some(c) => {
                    let state = self.credentials.entry(name).or_default();
                    state.good = Some(c);
                    state.error = None;
                }
                None => {
                    self.credentials.remove(&name);
                }
            }
        }
    }

    /// Keeps `changes`' files out of effect, each carrying `errors` (the mesh they make
    /// was rejected), so none of them looks accepted; they are retried at the next scan,
    /// since a change elsewhere may make them fit. A deleted file that others depend on
    /// keeps its objects in effect meanwhile.
    pub fn hold_back(&mut self, changes: &Changes, errors: &[ConfigError]) {
        let batch: Vec<String> = changes.files.keys().map(ToString::to_string).collect();
        for key in changes.files.keys() {
            let state = self.files.entry(key.clone()).or_default();
            state.seen = None;
            state.errors = errors
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    if !batch.iter().any(|c| **c == *e.file) {
                        e.message =
                            format!("{} (after changes to {})", e.message, batch.join(", "));
                    }
                    e
                })
                .collect();
        }
    }

    /// Puts only the credentials and member clusters of `changes` into effect: neither
    /// needs a file, so they still apply when the batch's files are held back.
    pub fn commit_without_files(&mut self, changes: Changes) {
        self.commit_credentials(changes.credentials);
        self.clusters = changes.clusters;
    }

    /// Registry files of `cluster`, in order.
    pub fn cluster_files(&self, cluster: &str) -> Vec<FileKey> {
        let start = FileKey::Registry(cluster.to_string(), String::new());
        self.files
            .range(start..)
            .take_while(|(k, _)| matches!(k, FileKey::Registry(c, _) if c == cluster))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Errors keeping `cluster`'s registry files from taking effect.
    pub fn cluster_errors(&self, cluster: &str) -> Vec<ConfigError> {
        self.cluster_files(cluster)
            .iter()
            .filter_map(|k| self.files.get(k))
            .flat_map(|f| f.errors.iter().cloned())
            .collect()
    }
}
