//! The relay's cache on disk (`<state-dir>/cache.pb`), so a relay restarted while the
//! control plane is out of reach still serves its cluster: existing sidecars reconnect
//! to config they already had, and new ones of known classes get theirs.
//!
//! Written whole (one protobuf `CacheFile`, renamed into place) at most every
//! [`SAVE_EVERY`] while the cache changes; read once at start. A file that cannot be
//! read is logged and ignored: the relay then starts empty, as it would without one.
//! When the control plane is reachable the restored classes are only a starting point:
//! their streams report the restored versions and the control plane sends what changed.

use crate::cache::{ClassKey, RelayCache};
use bytes::Bytes;
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use trellis_proto::trellis::relay::v1::{CacheFile, CachedClass, CachedResource};
use xds_server::cache::{Resource, TypeKind};

const FILE: &str = "cache.pb";
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// A class and its resources, as kept.
pub type Kept = Vec<(ClassKey, Vec<Arc<Resource>>)>;

pub fn encode(classes: &Kept) -> Vec<u8> {
    CacheFile {
        classes: classes
            .iter()
            .map(|(key, resources)| CachedClass {
                workload: key.workload.clone().unwrap_or_default(),
                namespace: key.namespace.clone(),
                resources: resources
                    .iter()
                    .map(|r| CachedResource {
                        type_url: r.kind.type_url().to_string(),
                        name: r.name.to_string(),
                        body: r.body.to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
    .encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<Kept, String> {
    let file = CacheFile::decode(bytes).map_err(|e| e.to_string())?;
    file.classes
        .into_iter()
        .map(|c| {
            let key = ClassKey {
                workload: (!c.workload.is_empty()).then_some(c.workload),
                namespace: c.namespace,
            };
            let resources = c
                .resources
                .into_iter()
                .map(|r| {
                    let kind = TypeKind::from_type_url(&r.type_url)
                        .ok_or_else(|| format!("unknown type {:?}", r.type_url))?;
                    Ok(Resource::from_body(
                        kind,
                        r.name.as_str().into(),
                        Bytes::from(r.body),
                    ))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok((key, resources))
        })
        .collect()
}

/// The kept cache, or nothing (no file, or one that cannot be read: logged).
pub fn load(state_dir: &Path) -> Kept {
    let path = state_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the kept cache; starting empty");
            return Vec::new();
        }
    };
    match decode(&bytes) {
        Ok(kept) => {
            info!(path = %path.display(), classes = kept.len(), "cache restored from the state dir");
            kept
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "kept cache unreadable; starting empty");
            Vec::new()
        }
    }
}

/// Writes the cache whenever it changed, at most every [`SAVE_EVERY`].
pub async fn save_loop(cache: Arc<RelayCache>, state_dir: PathBuf) {
    let mut changes = cache.subscribe();
    let mut saved = changes.borrow_and_update().generation();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SAVE_EVERY).await;
        let generation = changes.borrow_and_update().generation();
        if generation == saved {
            continue;
        }
        let kept = cache.export();
        let path = state_dir.join(FILE);
        let written = tokio::task::spawn_blocking(move || {
            cert_authority::write_atomic(&path, &encode(&kept), false)
        })
        .await;
        match written {
            Ok(Ok(())) => saved = generation,
            Ok(Err(e)) => warn!(error = %e, "cannot keep the cache in the state dir"),
            Err(e) => warn!(error = %e, "cannot keep the cache in the state dir"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_cache_round_trips_with_the_same_versions() {
        let r = Resource::from_body(
            TypeKind::Cluster,
            "outbound|9080||ratings.default.svc.cluster.local".into(),
            Bytes::from_static(b"\x0a\x05hello"),
        );
        let kept: Kept = vec![
            (
                ClassKey {
                    workload: Some("ratings-b.default".into()),
                    namespace: "default".into(),
                },
                vec![r.clone()],
            ),
            (
                ClassKey {
                    workload: None,
                    namespace: "default".into(),
                },
                vec![],
            ),
        ];
        let back = decode(&encode(&kept)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, kept[0].0);
        assert_eq!(back[1].0.workload, None);
        assert_eq!(back[0].1[0].version, r.version);
        assert_eq!(back[0].1[0].name, r.name);
        assert!(decode(b"\xff\xff\xff").is_err());
    }
}
