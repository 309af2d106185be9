//! Root rotation and plugged CA reloads: the transitions of the trust state.

use std::sync::Arc;
use std::time::SystemTime;

use super::layout::{self, Rotating, NEXT_DIR, PREV_DIR};
use super::{Authority, Current};
use crate::error::CaError;
use crate::material;
use crate::pem;
use crate::rotation::{Phase, RotationStatus};

impl Authority {
    /// Starts rotating a self-signed root: generates the new root (on disk in `next/` before
    /// anything is published) and enters [`Phase::AddNewRoot`].
    pub fn start_rotation(&self) -> Result<RotationStatus, CaError> {
        let inner = &self.inner;
        let changes = inner.lock_changes();
        if let Some(folder) = &inner.opts.plugged {
            return Err(CaError::Plugged(format!(
                "the CA is plugged in from {}: rotate it by replacing the files there with the new CA; the new root is picked up by the next reload",
                folder.display()
            )));
        }
        let cur = inner.read();
        if let Some(r) = &cur.rotating {
            return Err(CaError::RotationInProgress {
                phase: r.status.phase,
                new_root: r.status.new_root.clone(),
            });
        }
        let now = SystemTime::now();
        let next = material::generate_root(&inner.opts.trust_domain, now)?;
        material::write_root(&inner.opts.dir.join(NEXT_DIR), &next)?;
        let status = RotationStatus {
            phase: Phase::AddNewRoot,
            epoch: cur.epoch + 1,
            started_at: pem::system_to_unix(now),
            old_root: cur.active.anchor.fingerprint.clone(),
            new_root: next.anchor.fingerprint.clone(),
        };
        let next_state = Current {
            epoch: status.epoch,
            active: Arc::clone(&cur.active),
            rotating: Some(Rotating {
                status: status.clone(),
                next: Arc::new(next),
            }),
        };
        inner.commit(&changes, next_state, || {
            layout::save_rotation(&inner.opts.dir, &status, false)
        })?;
        log_phase(&status, "root rotation started");
        Ok(status)
    }

    /// Moves the rotation one phase on: AddNewRoot -> Reissue -> RemoveOldRoot -> done
    /// (`None`). Each step is persisted, then published with the next epoch. The server calls
    /// this only once every proxy has ACKed the current epoch.
    pub fn advance_rotation(&self) -> Result<Option<RotationStatus>, CaError> {
        let inner = &self.inner;
        let changes = inner.lock_changes();
        let cur = inner.read();
        let rotating = cur.rotating.clone().ok_or(CaError::NoRotation)?;
        let epoch = cur.epoch + 1;
        let plugged = inner.opts.plugged.is_some();
        let phase = match rotating.status.phase {
            Phase::AddNewRoot => Phase::Reissue,
            Phase::Reissue => Phase::RemoveOldRoot,
            Phase::RemoveOldRoot => {
                let done = Current {
                    epoch,
                    active: Arc::clone(&rotating.next),
                    rotating: None,
                };
                let dir = &inner.opts.dir;
                inner.commit(&changes, done, || {
                    if plugged {
                        layout::finish_plugged(dir, &rotating.status)
                    } else {
                        layout::finish_self_signed(dir, &rotating.status)
                    }
                })?;
                tracing::info!(
                    target: "trellis::audit",
                    epoch,
                    root = %rotating.status.new_root,
                    retired = %rotating.status.old_root,
                    "root rotation finished"
                );
                return Ok(None);
            }
        };
        let status = RotationStatus {
            phase,
            epoch,
            ..rotating.status.clone()
        };
        let next_state = Current {
            epoch,
            active: Arc::clone(&cur.active),
            rotating: Some(Rotating {
                status: status.clone(),
                next: Arc::clone(&rotating.next),
            }),
        };
        inner.commit(&changes, next_state, || {
            layout::save_rotation(&inner.opts.dir, &status, plugged)
        })?;
        log_phase(&status, "root rotation advanced");
        Ok(Some(status))
    }

    /// Re-reads the plugged folder (a file watcher calls this). Returns whether anything
    /// changed. Same root with a new signer or chain: used from now on, epoch + 1. A new root:
    /// a rotation to it starts (AddNewRoot first). Invalid files: an error, and the current CA
    /// keeps signing.
    pub fn reload_plugged(&self) -> Result<bool, CaError> {
        let inner = &self.inner;
        let changes = inner.lock_changes();
        let Some(folder) = &inner.opts.plugged else {
            return Err(CaError::Plugged(
                "no plugged CA folder is configured; the CA uses its self-signed root".to_string(),
            ));
        };
        let fresh = match material::load_plugged(folder, SystemTime::now()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    folder = %folder.display(),
                    error = %e,
                    "plugged CA files are invalid; the current CA keeps signing"
                );
                return Err(e);
            }
        };
        let cur = inner.read();
        let epoch = cur.epoch + 1;
        let next_state = match &cur.rotating {
            None if fresh.anchor.fingerprint == cur.active.anchor.fingerprint => {
                if fresh.same_as(&cur.active) {
                    return Ok(false);
                }
                let signer = fresh.signer_fingerprint.clone();
                inner.commit(
                    &changes,
                    Current {
                        epoch,
                        active: Arc::new(fresh),
                        rotating: None,
                    },
                    || Ok(()),
                )?;
                tracing::info!(
                    target: "trellis::audit",
                    epoch,
                    signing_cert = %signer,
                    "plugged CA reloaded: new signing certificate under the same root"
                );
                return Ok(true);
            }
            None => {
                // Keep a copy of the CA being replaced: the operator's files are gone, yet
                // it must sign through AddNewRoot and stay trusted until RemoveOldRoot.
                material::write_plugged(&inner.opts.dir.join(PREV_DIR), &cur.active)?;
                let status = RotationStatus {
                    phase: Phase::AddNewRoot,
                    epoch,
                    started_at: pem::system_to_unix(SystemTime::now()),
                    old_root: cur.active.anchor.fingerprint.clone(),
                    new_root: fresh.anchor.fingerprint.clone(),
                };
                Current {
                    epoch,
                    active: Arc::clone(&cur.active),
                    rotating: Some(Rotating {
                        status,
                        next: Arc::new(fresh),
                    }),
                }
            }
            Some(r) if fresh.anchor.fingerprint == r.next.anchor.fingerprint => {
                if fresh.same_as(&r.next) {
                    return Ok(false);
                }
                Current {
                    epoch,
                    active: Arc::clone(&cur.active),
                    rotating: Some(Rotating {
                        status: r.status.clone(),
                        next: Arc::new(fresh),
                    }),
                }
            }
            Some(r) => {
                tracing::warn!(
                    folder = %folder.display(),
                    root = %fresh.anchor.fingerprint,
                    rotating_to = %r.status.new_root,
                    "plugged CA has yet another root while a rotation runs; ignored until it ends"
                );
                return Err(CaError::RotationInProgress {
                    phase: r.status.phase,
                    new_root: r.status.new_root.clone(),
                });
            }
        };
        let started = cur.rotating.is_none();
        let status = next_state.rotating.as_ref().map(|r| r.status.clone());
        inner.commit(&changes, next_state, || match &status {
            Some(s) if started => layout::save_rotation(&inner.opts.dir, s, true),
            _ => Ok(()),
        })?;
        if let Some(s) = &status {
            if started {
                log_phase(s, "plugged CA has a new root: root rotation started");
            } else {
                tracing::info!(
                    target: "trellis::audit",
                    epoch,
                    "plugged CA reloaded: new signing certificate under the incoming root"
                );
            }
        }
        Ok(true)
    }
}

fn log_phase(status: &RotationStatus, message: &'static str) {
    tracing::info!(
        target: "trellis::audit",
        phase = ?status.phase,
        epoch = status.epoch,
        old_root = %status.old_root,
        new_root = %status.new_root,
        "{message}"
    );
}
