//! The CA state folder on disk, and bringing it back to a consistent state at start.
//!
//! ```text
//! DIR/                      0700
//!   root-cert.pem           active self-signed root
//!   root-key.pem            its key, 0600
//!   token-key.pem           token signing key, 0600
//!   state.json              {"epoch": N, "digest": "..."}
//!   rotation.json           the running rotation, if any (its presence is the commit point)
//!   next/                   self-signed rotation: the new root and key (0600)
//!   prev/                   plugged rotation: copy of the previous plugged CA (key 0600)
//!   archive/root-FP.pem     retired roots (certificates only; retired keys are deleted)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::CaError;
use crate::fsutil;
use crate::material::{self, Material, ROOT_CERT, ROOT_KEY};
use crate::pem;
use crate::rotation::{Phase, RotationStatus};

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const ROTATION_FILE: &str = "rotation.json";
pub(crate) const NEXT_DIR: &str = "next";
pub(crate) const PREV_DIR: &str = "prev";
pub(crate) const ARCHIVE_DIR: &str = "archive";

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StateFile {
    pub(crate) epoch: u64,
    pub(crate) digest: String,
}

/// `rotation.json`: the public status plus which kind of CA is rotating, so a restart with a
/// different configuration is caught instead of mixing the two.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RotationFile {
    #[serde(flatten)]
    pub(crate) status: RotationStatus,
    pub(crate) plugged: bool,
}

/// A rotation in memory: its status and the material taking over.
#[derive(Clone)]
pub(crate) struct Rotating {
    pub(crate) status: RotationStatus,
    pub(crate) next: Arc<Material>,
}

/// What the folder (and the plugged folder) hold once loaded.
pub(crate) struct Loaded {
    pub(crate) active: Material,
    pub(crate) rotating: Option<(RotationStatus, Material)>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, CaError> {
    match fsutil::read_optional(path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CaError::State {
                path: path.to_path_buf(),
                reason: format!("does not parse: {e}"),
            }),
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), CaError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| CaError::State {
        path: path.to_path_buf(),
        reason: format!("cannot encode: {e}"),
    })?;
    fsutil::write_atomic(path, &json, fsutil::PUBLIC)
}

pub(crate) fn load_state(dir: &Path) -> Result<Option<StateFile>, CaError> {
    read_json(&dir.join(STATE_FILE))
}

pub(crate) fn save_state(dir: &Path, epoch: u64, digest: &str) -> Result<(), CaError> {
    write_json(
        &dir.join(STATE_FILE),
        &StateFile {
            epoch,
            digest: digest.to_string(),
        },
    )
}

pub(crate) fn load_rotation(dir: &Path) -> Result<Option<RotationFile>, CaError> {
    read_json(&dir.join(ROTATION_FILE))
}

pub(crate) fn save_rotation(
    dir: &Path,
    status: &RotationStatus,
    plugged: bool,
) -> Result<(), CaError> {
    write_json(
        &dir.join(ROTATION_FILE),
        &RotationFile {
            status: status.clone(),
            plugged,
        },
    )
}

fn state_error(dir: &Path, file: &str, reason: String) -> CaError {
    CaError::State {
        path: dir.join(file),
        reason,
    }
}

/// Fingerprint of the first certificate of `dir/root-cert.pem`, without touching the key.
fn root_cert_fingerprint(dir: &Path) -> Result<Option<String>, CaError> {
    let path = dir.join(ROOT_CERT);
    let Some(text) = fsutil::read_optional(&path)? else {
        return Ok(None);
    };
    let certs = pem::certificates(&path.display().to_string(), &text)?;
    Ok(certs.first().map(|der| pem::fingerprint(der)))
}

/// Self-signed mode: loads (or on first start generates) the root, and resumes, cleans up or
/// completes a rotation according to `rotation.json`.
pub(crate) fn load_self_signed(
    dir: &Path,
    trust_domain: &str,
    rotation: Option<RotationFile>,
    now: SystemTime,
) -> Result<Loaded, CaError> {
    let next_dir = dir.join(NEXT_DIR);
    let Some(file) = rotation else {
        if next_dir.exists() {
            // A rotation start that crashed before rotation.json was written: never published.
            tracing::warn!(path = %next_dir.display(), "removing the new root of a rotation that never started");
            fsutil::remove_dir(&next_dir)?;
        }
        let active = match material::load_root(dir)? {
            Some(m) => m,
            None => {
                let m = material::generate_root(trust_domain, now)?;
                material::write_root(dir, &m)?;
                tracing::info!(
                    target: "trellis::audit",
                    root = %m.anchor.fingerprint,
                    subject = %m.anchor.subject,
                    path = %dir.join(ROOT_CERT).display(),
                    "generated a self-signed root"
                );
                m
            }
        };
        return Ok(Loaded {
            active,
            rotating: None,
        });
    };
    if file.plugged {
        return Err(state_error(
            dir,
            ROTATION_FILE,
            "records a rotation of a plugged CA, but no plugged CA folder is configured; configure it again to finish the rotation".to_string(),
        ));
    }
    let status = file.status;
    let current = root_cert_fingerprint(dir)?;
    if current.as_deref() == Some(status.new_root.as_str()) && status.phase == Phase::RemoveOldRoot
    {
        // The end of the rotation was interrupted after the new root moved into place.
        finish_self_signed(dir, &status)?;
        tracing::info!(root = %status.new_root, "completed an interrupted root rotation");
        let active = material::load_root(dir)?.ok_or_else(|| {
            state_error(
                dir,
                ROOT_CERT,
                "missing after completing the rotation".to_string(),
            )
        })?;
        return Ok(Loaded {
            active,
            rotating: None,
        });
    }
    if current.as_deref() != Some(status.old_root.as_str()) {
        return Err(state_error(
            dir,
            ROTATION_FILE,
            format!(
                "records a rotation from root {} to {}, but {} holds neither",
                status.old_root,
                status.new_root,
                dir.join(ROOT_CERT).display()
            ),
        ));
    }
    let active = material::load_root(dir)?
        .ok_or_else(|| state_error(dir, ROOT_CERT, "missing".to_string()))?;
    let next = material::load_root(&next_dir)?.ok_or_else(|| {
        state_error(
            dir,
            ROTATION_FILE,
            format!(
                "records a rotation, but the new root is missing from {}",
                next_dir.display()
            ),
        )
    })?;
    if next.anchor.fingerprint != status.new_root {
        return Err(state_error(
            dir,
            ROTATION_FILE,
            format!(
                "records new root {}, but {} holds {}",
                status.new_root,
                next_dir.join(ROOT_CERT).display(),
                next.anchor.fingerprint
            ),
        ));
    }
    Ok(Loaded {
        active,
        rotating: Some((status, next)),
    })
}

/// Plugged mode: loads the plugged folder and, during a rotation, the copy of the previous CA.
pub(crate) fn load_plugged(
    dir: &Path,
    folder: &Path,
    rotation: Option<RotationFile>,
    now: SystemTime,
) -> Result<Loaded, CaError> {
    let prev_dir = dir.join(PREV_DIR);
    let current = material::load_plugged(folder, now)?;
    let Some(file) = rotation else {
        if prev_dir.exists() {
            tracing::warn!(path = %prev_dir.display(), "removing the copy of a plugged CA from a rotation that never started");
            fsutil::remove_dir(&prev_dir)?;
        }
        return Ok(Loaded {
            active: current,
            rotating: None,
        });
    };
    if !file.plugged {
        return Err(state_error(
            dir,
            ROTATION_FILE,
            "records a rotation of the self-signed root, but a plugged CA is configured; start without the plugged CA to finish that rotation first".to_string(),
        ));
    }
    let status = file.status;
    if current.anchor.fingerprint != status.new_root {
        return Err(CaError::Plugged(format!(
            "{} has root {}, but the rotation in progress ({}) moves from {} to {}; restore the files of the new root or finish the rotation first",
            folder.display(),
            current.anchor.fingerprint,
            dir.join(ROTATION_FILE).display(),
            status.old_root,
            status.new_root
        )));
    }
    if !prev_dir.join(material::CA_CERT).exists() {
        if status.phase == Phase::RemoveOldRoot {
            finish_plugged(dir, &status)?;
            tracing::info!(root = %status.new_root, "completed an interrupted root rotation");
            return Ok(Loaded {
                active: current,
                rotating: None,
            });
        }
        return Err(state_error(
            dir,
            ROTATION_FILE,
            format!(
                "records a rotation in phase {:?}, but the previous CA is missing from {}",
                status.phase,
                prev_dir.display()
            ),
        ));
    }
    let prev = material::load_plugged(&prev_dir, now)?;
    if prev.anchor.fingerprint != status.old_root {
        return Err(state_error(
            dir,
            ROTATION_FILE,
            format!(
                "records old root {}, but {} holds {}",
                status.old_root,
                prev_dir.display(),
                prev.anchor.fingerprint
            ),
        ));
    }
    Ok(Loaded {
        active: prev,
        rotating: Some((status, current)),
    })
}

fn archive_path(dir: &Path, fingerprint: &str) -> PathBuf {
    dir.join(ARCHIVE_DIR).join(format!(
        "root-{}.pem",
        &fingerprint[..fingerprint.len().min(16)]
    ))
}

fn archive(dir: &Path, fingerprint: &str, cert_pem: &str) -> Result<(), CaError> {
    fsutil::ensure_dir(&dir.join(ARCHIVE_DIR))?;
    fsutil::write_atomic(
        &archive_path(dir, fingerprint),
        cert_pem.as_bytes(),
        fsutil::PUBLIC,
    )
}

/// Ends a self-signed rotation on disk: the new root and key move into place, the old
/// certificate goes to `archive/`, the old key is replaced. Every step can be repeated, so
/// a crash half way is finished by the next start.
pub(crate) fn finish_self_signed(dir: &Path, status: &RotationStatus) -> Result<(), CaError> {
    let next_dir = dir.join(NEXT_DIR);
    let next_cert = next_dir.join(ROOT_CERT);
    let next_key = next_dir.join(ROOT_KEY);
    if next_cert.exists() {
        if let Some(old) = fsutil::read_optional(&dir.join(ROOT_CERT))? {
            archive(dir, &status.old_root, &old)?;
        }
        // Certificate first: a start that finds root-cert.pem = new root in phase
        // RemoveOldRoot knows the key still has to follow.
        fsutil::rename(&next_cert, &dir.join(ROOT_CERT))?;
    }
    if next_key.exists() {
        fsutil::rename(&next_key, &dir.join(ROOT_KEY))?;
    }
    fsutil::remove_dir(&next_dir)?;
    fsutil::remove_file(&dir.join(ROTATION_FILE))
}

/// Ends a plugged rotation on disk: the copy of the previous CA goes (its root to `archive/`).
pub(crate) fn finish_plugged(dir: &Path, status: &RotationStatus) -> Result<(), CaError> {
    let prev_dir = dir.join(PREV_DIR);
    if let Some(old) = fsutil::read_optional(&prev_dir.join(material::PLUGGED_ROOT))? {
        archive(dir, &status.old_root, &old)?;
    }
    fsutil::remove_dir(&prev_dir)?;
    fsutil::remove_file(&dir.join(ROTATION_FILE))
}
