//! TLS material named by `credentialName`: `<config-dir>/credentials/NAME/`, one folder
//! per Kubernetes secret, with the secret's key names as file names: `tls.crt`, `tls.key`
//! and `ca.crt` (a TLS secret) or `cert`, `key` and `cacert` (a generic secret), as
//! Istio reads them. A CA may also come alone from a folder `NAME-cacert`, as Istio's
//! separate CA secret does.
//!
//! Folders are read with the rest of the config folder and checked before they take
//! effect (certificates parse, the key belongs to the chain, sizes bounded); a bad folder
//! keeps its last good version, like a bad YAML file. Key material never appears in a
//! `Debug` print, a log line or an error: errors name the file, never its contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3;

/// The folder below the config folder holding credentials.
pub const CREDENTIALS_DIR: &str = "credentials";
/// No credential file is larger: a chain of a few certificates is a few KiB.
pub const MAX_CREDENTIAL_FILE: u64 = 256 * 1024;
/// No more credential folders are read.
pub const MAX_CREDENTIALS: usize = 4096;

/// File names per part, TLS secret first.
const CHAIN_FILES: [&str; 2] = ["tls.crt", "cert"];
const KEY_FILES: [&str; 2] = ["tls.key", "key"];
const CA_FILES: [&str; 2] = ["ca.crt", "cacert"];

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the limit of {limit} for a credential file")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path} is not UTF-8 PEM")]
    NotUtf8 { path: PathBuf },
    #[error("{dir} holds none of tls.crt, tls.key, ca.crt (or cert, key, cacert)")]
    Empty { dir: PathBuf },
    #[error("{dir} holds both {first} and {second}: keep one")]
    Ambiguous {
        dir: PathBuf,
        first: &'static str,
        second: &'static str,
    },
    #[error("credential `{name}` is not a valid name (a Kubernetes secret name: lowercase letters, digits, '-' and '.')")]
    BadName { name: String },
    #[error(transparent)]
    Invalid(#[from] cert_authority::CaError),
}

/// Private key PEM: shown nowhere.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPem(Arc<str>);

impl KeyPem {
    pub fn pem(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPem(<redacted>)")
    }
}

/// One checked credential folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    /// Certificate chain and its key: both or neither.
    pub chain: Option<Arc<str>>,
    pub key: Option<KeyPem>,
    /// Certificates to verify the peer with.
    pub ca: Option<Arc<str>>,
    /// When the chain's first certificate expires (unix seconds).
    pub not_after: Option<u64>,
    /// Hash of every file's bytes: what a reload compares.
    pub fingerprint: u64,
}

/// Kubernetes secret names: DNS subdomain rules.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// The credential folders below `config_dir`, sorted by name (none when there is no
/// `credentials` folder). Hidden entries and plain files are ignored.
pub fn list(config_dir: &Path) -> Vec<(String, PathBuf)> {
    let dir = config_dir.join(CREDENTIALS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            (!name.starts_with('.')).then(|| (name, e.path()))
        })
        .collect();
    out.sort();
    out.truncate(MAX_CREDENTIALS);
    out
}

/// Reads one part: the first of `names` present in `dir`, bounded in size.
fn read_part(
    dir: &Path,
    names: [&'static str; 2],
) -> Result<Option<(PathBuf, String)>, CredentialError> {
    let mut found: Option<(&'static str, PathBuf)> = None;
    for n in names {
        let p = dir.join(n);
        if p.is_file() {
            if let Some((first, _)) = found {
                return Err(CredentialError::Ambiguous {
                    dir: dir.to_path_buf(),
                    first,
                    second: n,
                });
            }
            found = Some((n, p));
        }
    }
    let Some((_, path)) = found else {
        return Ok(None);
    };
    let unreadable = |source| CredentialError::Unreadable {
        path: path.clone(),
        source,
    };
    let size = std::fs::metadata(&path).map_err(unreadable)?.len();
    if size > MAX_CREDENTIAL_FILE {
        return Err(CredentialError::TooLarge {
            path,
            size,
            limit: MAX_CREDENTIAL_FILE,
        });
    }
    let bytes = std::fs::read(&path).map_err(unreadable)?;
    let text =
        String::from_utf8(bytes).map_err(|_| CredentialError::NotUtf8 { path: path.clone() })?;
    Ok(Some((path, text)))
}

/// Hash of a folder's files as they are now, to skip re-checking an unchanged folder.
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = Xxh3::new();
    for n in CHAIN_FILES.iter().chain(&KEY_FILES).chain(&CA_FILES) {
        h.update(n.as_bytes());
        let p = dir.join(n);
        // Bounded like `read_part`: an oversized file is hashed by its size only.
        match std::fs::metadata(&p) {
            Ok(m) if m.len() <= MAX_CREDENTIAL_FILE => {
                if let Ok(b) = std::fs::read(&p) {
                    h.update(&b);
                }
            }
            Ok(m) => h.update(&m.len().to_le_bytes()),
            Err(_) => h.update(&[0xff]),
        }
    }
    h.digest()
}

/// Reads and checks the credential folder `dir` named `name`.
pub fn read(name: &str, dir: &Path) -> Result<Credential, CredentialError> {
    if !valid_name(name) {
        return Err(CredentialError::BadName {
            name: name.to_string(),
        });
    }
    let fingerprint = fingerprint(dir);
    let chain = read_part(dir, CHAIN_FILES)?;
    let key = read_part(dir, KEY_FILES)?;
    let ca = read_part(dir, CA_FILES)?;
    if chain.is_none() && key.is_none() && ca.is_none() {
        return Err(CredentialError::Empty {
            dir: dir.to_path_buf(),
        });
    }
    let names = |p: &Option<(PathBuf, String)>| p.as_ref().map(|(p, _)| p.display().to_string());
    let (chain_name, key_name, ca_name) = (names(&chain), names(&key), names(&ca));
    let pair = |n: &Option<String>, p: &Option<(PathBuf, String)>| -> Option<(String, String)> {
        n.clone().zip(p.as_ref().map(|(_, t)| t.clone()))
    };
    let (c, k, a) = (
        pair(&chain_name, &chain),
        pair(&key_name, &key),
        pair(&ca_name, &ca),
    );
    let facts = cert_authority::check_tls_files(
        c.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        k.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        a.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    )?;
    Ok(Credential {
        name: name.to_string(),
        chain: chain.map(|(_, t)| Arc::from(t)),
        key: key.map(|(_, t)| KeyPem(Arc::from(t))),
        ca: ca.map(|(_, t)| Arc::from(t)),
        not_after: facts.not_after,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_rules() {
        assert!(valid_name("client-credential"));
        assert!(valid_name("a.b-1"));
        assert!(!valid_name("Client"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("x_y"));
        assert!(!valid_name(""));
    }

    #[test]
    fn key_is_redacted_in_debug() {
        let k = KeyPem(Arc::from("-----BEGIN PRIVATE KEY-----\nsecret\n"));
        assert_eq!(format!("{k:?}"), "KeyPem(<redacted>)");
    }
}
