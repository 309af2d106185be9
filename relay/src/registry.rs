//! The cluster's registry: a folder of WorkloadEntry YAML, watched, reported upstream
//! whole on connect and on every change (`trellis.relay.v1.Registration/Report`). The
//! control plane validates and merges it; this side only reads files and, for each
//! workload it finds, asks the cache to prefetch that class, so a sidecar started while
//! the control plane is unreachable still finds its config here.

use crate::cache::{ClassKey, RelayCache};
use crate::upstream::backoff;
use crate::RelayError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use trellis_proto::trellis::relay::v1::registration_client::RegistrationClient;
use trellis_proto::trellis::relay::v1::{ClusterRegistry, RegistryFile};
use xds_server::config::ConfigObject;

/// Quiet time after the last file event before re-reading the folder.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the control plane said about the last report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReportStatus {
    pub revision: u64,
    pub acked_revision: u64,
    pub errors: Vec<String>,
    pub files: usize,
}

/// Reads every `*.yaml` / `*.yml` file below `dir` (hidden files skipped), sorted.
pub fn read_folder(dir: &Path) -> Result<Vec<RegistryFile>, RelayError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| RelayError::State {
            path: d.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if hidden {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                let yaml = std::fs::read_to_string(&p).map_err(|source| RelayError::State {
                    path: p.display().to_string(),
                    source,
                })?;
                let name = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
                files.push(RegistryFile { name, yaml });
            }
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The workloads the files declare (the files that parse; the control plane reports
/// the rest): their classes, and the service account each runs as.
pub fn workloads(files: &[RegistryFile]) -> Vec<(ClassKey, String)> {
    let mut out = Vec::new();
    for f in files {
        let Ok(objects) = xds_server::config::parse::parse_file(&f.name, &f.yaml) else {
            continue;
        };
        for o in objects {
            if let ConfigObject::WorkloadEntry(we) = o {
                let sa = we
                    .spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_string());
                let key = ClassKey {
                    workload: Some(format!("{}.{}", we.name, we.namespace)),
                    namespace: we.namespace.clone(),
                };
                out.push((key, sa));
            }
        }
    }
    out
}

pub fn classes(files: &[RegistryFile]) -> Vec<ClassKey> {
    workloads(files).into_iter().map(|(k, _)| k).collect()
}

/// The registry folder's files, as last read.
pub type Files = watch::Receiver<Arc<Vec<RegistryFile>>>;

/// Watches `dir` and publishes its files on every (debounced) change.
pub fn watch_folder(dir: PathBuf) -> Result<(Files, tokio::task::JoinHandle<()>), RelayError> {
    use notify::{RecursiveMode, Watcher};
    let initial = read_folder(&dir)?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if matches!(res, Ok(ref ev) if !ev.kind.is_access()) {
            let _ = ev_tx.send(());
        }
    })
    .map_err(|e| RelayError::Tls(format!("cannot watch {}: {e}", dir.display())))?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|e| RelayError::Tls(format!("cannot watch {}: {e}", dir.display())))?;
    let task = tokio::spawn(async move {
        let _watcher = watcher;
        while ev_rx.recv().await.is_some() {
            loop {
                tokio::select! {
                    more = ev_rx.recv() => if more.is_none() { return },
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                }
            }
            match read_folder(&dir) {
                Ok(files) => {
                    if **tx.borrow() != files {
                        tx.send_replace(Arc::new(files));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the registry folder; keeping the last state")
                }
            }
        }
    });
    Ok((rx, task))
}

/// Keeps reporting the registry upstream: a stream per connection, the whole registry
/// on connect and on every change, reconnecting with backoff.
pub async fn report_loop(
    channel: Channel,
    mut files: watch::Receiver<Arc<Vec<RegistryFile>>>,
    cache: Arc<RelayCache>,
    status: Arc<Mutex<ReportStatus>>,
) {
    let revision = AtomicU64::new(0);
    let mut attempt = 0u32;
    loop {
        let result = report_once(
            &channel,
            &mut files,
            &cache,
            &status,
            &revision,
            &mut attempt,
        )
        .await;
        if let Err(e) = result {
            warn!(error = %e, attempt, "registry report stream lost; retrying");
        }
        tokio::time::sleep(backoff(
            attempt,
            revision.load(Ordering::Relaxed) ^ 0x5bd1_e995,
        ))
        .await;
        attempt = attempt.saturating_add(1);
    }
}

async fn report_once(
    channel: &Channel,
    files: &mut watch::Receiver<Arc<Vec<RegistryFile>>>,
    cache: &RelayCache,
    status: &Mutex<ReportStatus>,
    revision: &AtomicU64,
    attempt: &mut u32,
) -> Result<(), RelayError> {
    let (tx, rx) = mpsc::channel::<ClusterRegistry>(4);
    let mut client = RegistrationClient::new(channel.clone());
    let send = |current: &Arc<Vec<RegistryFile>>| {
        let declared = workloads(current);
        cache.set_service_accounts(
            declared
                .iter()
                .filter_map(|(k, sa)| Some((k.workload.clone()?, sa.clone())))
                .collect(),
        );
        cache.pin(declared.into_iter().map(|(key, _)| key).collect());
        let rev = revision.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut s) = status.lock() {
            s.revision = rev;
            s.files = current.len();
        }
        ClusterRegistry {
            revision: rev,
            files: current.as_ref().clone(),
        }
    };
    let first = send(&files.borrow_and_update().clone());
    tx.send(first).await.map_err(|_| RelayError::Closed)?;
    let mut acks = client.report(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        tokio::select! {
            ack = acks.message() => {
                let Some(ack) = ack? else { return Ok(()) };
                *attempt = 0;
                if !ack.errors.is_empty() {
                    warn!(revision = ack.revision, errors = ?ack.errors, "the control plane refused part of the registry");
                } else {
                    debug!(revision = ack.revision, "registry accepted");
                }
                if let Ok(mut s) = status.lock() {
                    s.acked_revision = ack.revision;
                    s.errors = ack.errors;
                }
            }
            changed = files.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = files.borrow_and_update().clone();
                info!(files = current.len(), "registry changed; reporting");
                tx.send(send(&current)).await.map_err(|_| RelayError::Closed)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_files_and_finds_workload_classes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/reviews.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: reviews-v3, namespace: default}\nspec:\n  address: 127.0.5.1\n  labels: {app: reviews}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let files = read_folder(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].name, "sub/reviews.yaml");
        assert_eq!(
            classes(&files),
            vec![ClassKey {
                workload: Some("reviews-v3.default".into()),
                namespace: "default".into()
            }]
        );
    }
}
