//! Turns config folder changes and member clusters' registry reports into published
//! snapshots.
//!
//! File events are debounced (a burst of saves becomes one reload); a registry report
//! ([`Controller::set_cluster_registry`]) is one event by itself. The store decides what
//! takes effect, and a new [`Snapshot`] is published on a `watch` channel only when the
//! mesh actually changed. Every ADS stream watches that channel. Changes are applied and
//! published one at a time (under the store's lock), so generations never go backwards.

use crate::ads::source::ConfigSource;
use crate::cache::Snapshot;
use crate::config::store::{ClusterStatus, RegistryError, RegistryOutcome, StoreError};
use crate::config::ConfigError;
use crate::mesh::{ClusterMeta, MeshState, MeshStore};
use crate::metrics::{Metrics, ResultLabel};
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// Quiet time after the last file event before reloading, and the longest a steady
/// stream of events can postpone a reload.
pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(30);
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    pub dir: String,
    pub generation: u64,
    /// Config folder reloads and registry reports taken.
    pub reloads: u64,
    pub objects: std::collections::BTreeMap<&'static str, usize>,
    /// The cluster of the config folder's workloads (`MeshConfig.clusterName`).
    pub cluster: String,
    /// Member clusters whose relays reported a registry.
    pub clusters: Vec<ClusterStatus>,
    /// Errors of the config folder's files and of member clusters' registry files
    /// (named `cluster NAME: FILE`).
    pub errors: Vec<ConfigErrorView>,
    /// Credentials DestinationRules name (`credentialName`), each with whether it can be
    /// used (its folder may be missing still). Never their contents.
    pub credentials: Vec<crate::translate::credentials::CredentialUse>,
    /// Config in effect that routes nothing (e.g. a rule naming a delegate VirtualService
    /// that does not exist); nothing is held back for them.
    pub warnings: Vec<ConfigErrorView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigErrorView {
    pub message: String,
    #[serde(flatten)]
    pub error: ConfigError,
}

#[derive(Debug)]
pub struct Controller {
    store: Mutex<MeshStore>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// The same snapshots as ADS streams see them (as a [`ConfigSource`]).
    sources: watch::Sender<Arc<dyn ConfigSource>>,
    status: ArcSwap<ConfigStatus>,
    metrics: Arc<Metrics>,
}

impl Controller {
    pub fn open(
        dir: impl Into<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Controller>, StoreError> {
        let (store, outcome) = MeshStore::open(dir)?;
        for e in &outcome.new_errors {
            error!(error = %e, "config rejected");
        }
        let snapshot = Arc::new(Snapshot::build(1, store.mesh()));
        let (sources, _) = watch::channel(snapshot.clone() as Arc<dyn ConfigSource>);
        let (tx, _) = watch::channel(snapshot);
        let c = Arc::new(Controller {
            store: Mutex::new(store),
            snapshots: tx,
            sources,
            status: ArcSwap::from_pointee(ConfigStatus::default()),
            metrics,
        });
        c.update_status(&c.lock_store(), 0);
        Ok(c)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    /// Snapshots for ADS streams.
    pub fn sources(&self) -> watch::Receiver<Arc<dyn ConfigSource>> {
        self.sources.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn status(&self) -> Arc<ConfigStatus> {
        self.status.load_full()
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, MeshStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with the store locked, so statuses are stored in the order of changes.
    fn update_status(&self, store: &MeshStore, reloads: u64) {
        let snap = self.snapshot();
        let view = |e: ConfigError| ConfigErrorView {
            message: e.to_string(),
            error: e,
        };
        let errors: Vec<ConfigErrorView> = store.errors().into_iter().map(view).collect();
        let warnings: Vec<ConfigErrorView> =
            store.mesh().warnings.iter().cloned().map(view).collect();
        let before = self.status();
        for w in warnings
            .iter()
            .filter(|w| !before.warnings.iter().any(|b| b.message == w.message))
        {
            warn!(warning = %w.message, "config takes effect but routes nothing");
        }
        self.metrics.config_errors.set(errors.len() as i64);
        self.metrics.snapshot_generation.set(snap.generation as i64);
        self.status.store(Arc::new(ConfigStatus {
            dir: store.dir().display().to_string(),
            generation: snap.generation,
            reloads,
            objects: snap.mesh.counts.clone(),
            cluster: snap.mesh.cluster_name.clone(),
            clusters: store.cluster_status(),
            errors,
            credentials: crate::translate::credentials::uses(&snap.mesh),
            warnings,
        }));
    }

    fn count_reload(&self, errors: &[ConfigError]) {
        let result = if errors.is_empty() { "ok" } else { "rejected" };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Builds and publishes the snapshot of `mesh`; called with the store locked.
    fn publish(&self, mesh: Arc<MeshState>, started: std::time::Instant, cause: &str) {
        let generation = self.snapshot().generation + 1;
        let building = std::time::Instant::now();
        let snap = Arc::new(Snapshot::build_from(
            generation,
            mesh,
            Some(&self.snapshot()),
        ));
        info!(
            version = generation,
            cause,
            load_ms = (building - started).as_millis() as u64,
            build_ms = building.elapsed().as_millis() as u64,
            "config changed; publishing snapshot"
        );
        self.snapshots.send_replace(snap.clone());
        self.sources.send_replace(snap);
    }

    /// Re-reads the folder and publishes a snapshot if the mesh changed.
    pub fn reload(&self) {
        let reload_started = std::time::Instant::now();
        let mut store = self.lock_store();
        let reloads = self.status().reloads + 1;
        let outcome = match store.reload() {
            Ok(o) => o,
            Err(e) => {
                error!(error = %e, "config dir unreadable; keeping the current config");
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                self.update_status(&store, reloads);
                return;
            }
        };
        for e in &outcome.new_errors {
            error!(error = %e, "config rejected; the last good version stays in effect");
        }
        self.count_reload(&outcome.new_errors);
        if outcome.changed {
            self.publish(store.mesh(), reload_started, "config folder");
        }
        self.update_status(&store, reloads);
    }

    /// Takes member cluster `cluster`'s report: where it runs and its registry folder's
    /// files as (name, YAML text), the whole set each time (see
    /// [`MeshStore::set_cluster_registry`]). Publishes a snapshot if the mesh changed.
    /// Blocking (it translates the mesh): call it from `spawn_blocking` in async code.
    pub fn set_cluster_registry(
        &self,
        cluster: &str,
        meta: ClusterMeta,
        files: Vec<(String, String)>,
    ) -> Result<RegistryOutcome, RegistryError> {
        let started = std::time::Instant::now();
        let mut store = self.lock_store();
        let mut outcome = store.set_cluster_registry(cluster, meta, files)?;
        for e in &outcome.new_errors {
            error!(cluster, error = %e, "registry file rejected; its last good version stays in effect");
        }
        self.count_reload(&outcome.new_errors);
        if outcome.changed {
            self.publish(
                store.mesh(),
                started,
                &format!("registry of cluster {cluster}"),
            );
        }
        outcome.generation = self.snapshot().generation;
        self.update_status(&store, self.status().reloads + 1);
        Ok(outcome)
    }

    /// Drops member cluster `cluster`'s workloads; publishes a snapshot if it had any.
    pub fn remove_cluster_registry(&self, cluster: &str) -> RegistryOutcome {
        let started = std::time::Instant::now();
        let mut store = self.lock_store();
        let mut outcome = store.remove_cluster_registry(cluster);
        if outcome.changed {
            self.publish(store.mesh(), started, &format!("cluster {cluster} removed"));
        }
        outcome.generation = self.snapshot().generation;
        self.update_status(&store, self.status().reloads);
        outcome
    }

    /// Watches the folder until the returned handle is dropped or aborted.
    pub fn watch(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if !ev.kind.is_access() => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "config watch error"),
            })?;
        let dir = self.lock_store().dir().to_path_buf();
        watcher.watch(&dir, RecursiveMode::Recursive)?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            // The watcher lives as long as this task.
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                let deadline = tokio::time::Instant::now() + DEBOUNCE_MAX;
                loop {
                    let quiet = tokio::time::sleep(DEBOUNCE_QUIET);
                    tokio::select! {
                        more = rx.recv() => if more.is_none() { return },
                        _ = quiet => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                let c = this.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || c.reload()).await {
                    error!(error = %e, "config reload panicked");
                }
            }
        }))
    }
}
