//! File handling for the CA state folder: private modes from the first byte, and
//! write-then-rename so a crash leaves either the old or the new file, never half of one.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::error::CaError;

/// Mode of private keys and of anything else secret.
pub(crate) const PRIVATE: u32 = 0o600;
/// Mode of certificates and state files: public material.
pub(crate) const PUBLIC: u32 = 0o644;

/// Creates `dir` (and parents) with mode 0700 if missing; an existing folder is left as it is.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| CaError::io("creating folder", dir, e))
}

/// Writes `bytes` to `path` through a temporary file in the same folder that is created with
/// `mode` (so a key is never readable by others, not even for an instant), synced, then renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options
            .open(&tmp)
            .map_err(|e| CaError::io("creating", &tmp, e))?;
        // A stale temporary file from a crashed run keeps its old mode: force ours.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| CaError::io("setting the mode of", &tmp, e))?;
        }
        file.write_all(bytes)
            .map_err(|e| CaError::io("writing", &tmp, e))?;
        file.sync_all()
            .map_err(|e| CaError::io("syncing", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| CaError::io("renaming into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(dir);
    Ok(())
}

/// Renames within the state folder, then syncs the folder so the rename survives a crash.
pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), CaError> {
    fs::rename(from, to).map_err(|e| CaError::io("renaming into place", to, e))?;
    if let Some(dir) = to.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Reads a whole text file, naming it in the error.
pub(crate) fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|e| CaError::io("reading", path, e))
}

/// Reads a file if it exists.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CaError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::io("reading", path, e)),
    }
}

/// Removes a file; a missing one is fine.
pub(crate) fn remove_file(path: &Path) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CaError::io("removing", path, e)),
    }
}

/// Removes a folder and what is in it; a missing one is fine.
pub(crate) fn remove_dir(path: &Path) -> Result<(), CaError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CaError::io("removing folder", path, e)),
    }
}

fn sync_dir(dir: &Path) {
    // Best effort: not every filesystem lets a folder be opened and synced.
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn private_files_get_0600_and_folders_0700() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key = dir.join("k.pem");
        write_atomic(&key, b"secret", PRIVATE).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&key, b"secret2", PRIVATE).unwrap();
        assert_eq!(read(&key).unwrap(), "secret2");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
