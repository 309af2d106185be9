//! Member clusters: the clusters whose relays joined this mesh control plane with a
//! one-time join token (see docs/multicluster.md).
//!
//! A member cluster is named by a DNS label `NAME`; its relay proves the identity
//! `spiffe://TD/ns/trellis-system/sa/relay-NAME`. The records live in
//! `<ca-dir>/clusters.json`, next to the CA state whose join tokens created them, and are
//! replaced atomically (write, sync, rename) so a crash leaves the old or the new list.

use cert_authority::SpiffeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

/// The file in the CA dir.
pub const CLUSTERS_FILE: &str = "clusters.json";
/// Relays run as service accounts of this namespace.
pub const RELAY_NAMESPACE: &str = "trellis-system";
/// A relay's service account is this prefix and its cluster's name.
pub const RELAY_SA_PREFIX: &str = "relay-";
/// Join-token claims that describe the member cluster.
pub const CLAIM_CLUSTER: &str = "cluster";
pub const CLAIM_NETWORK: &str = "network";
pub const CLAIM_REGION: &str = "region";
pub const CLAIM_ZONE: &str = "zone";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "invalid cluster name {0:?}: a cluster name must be a DNS label (1-63 lowercase \
         letters, digits and '-', starting and ending with a letter or digit)"
    )]
    InvalidName(String),
    #[error(
        "invalid {what} {value:?}: 1-63 letters, digits, '-', '.' or '_', starting and \
         ending with a letter or digit"
    )]
    InvalidLabel { what: &'static str, value: String },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Write(#[from] cert_authority::CaError),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `name` is a DNS label (RFC 1123), as Kubernetes names are: it becomes part
/// of a service account name and of locality strings.
pub fn check_cluster_name(name: &str) -> Result<(), ClusterError> {
    crate::config::validate::dns_label(name)
        .map_err(|_| ClusterError::InvalidName(name.to_string()))
}

/// Networks, regions and zones follow Kubernetes label values (`topology.kubernetes.io/zone`
/// is one), minus the empty value: an empty one is simply not given.
pub fn check_label(what: &'static str, value: &str) -> Result<(), ClusterError> {
    crate::config::validate::label_value(value).map_err(|_| ClusterError::InvalidLabel {
        what,
        value: value.to_string(),
    })
}

/// The identity of cluster `name`'s relay.
pub fn relay_identity(trust_domain: &str, name: &str) -> SpiffeId {
    SpiffeId::new(
        trust_domain,
        RELAY_NAMESPACE,
        &format!("{RELAY_SA_PREFIX}{name}"),
    )
}

/// The cluster name in a relay identity's shape (`…/ns/trellis-system/sa/relay-NAME`),
/// whether or not that cluster joined.
pub fn relay_cluster_name(id: &SpiffeId) -> Option<&str> {
    if id.namespace != RELAY_NAMESPACE {
        return None;
    }
    id.service_account
        .strip_prefix(RELAY_SA_PREFIX)
        .filter(|n| check_cluster_name(n).is_ok())
}

/// One joined cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCluster {
    pub name: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The SPIFFE URI its relay authenticates as.
    pub relay_identity: String,
    /// When the relay joined (redeemed its join token), RFC 3339.
    pub joined_at: String,
}

#[derive(Default, Serialize, Deserialize)]
struct ClustersFile {
    clusters: Vec<MemberCluster>,
}

/// The member clusters, in memory and in `<ca-dir>/clusters.json`. Shared by the CA
/// service (which records joins) and the authenticator (which recognises relays).
#[derive(Debug)]
pub struct MemberClusters {
    path: PathBuf,
    clusters: RwLock<BTreeMap<String, MemberCluster>>,
    /// Held across the change and the write of a join, so two joins at once cannot write
    /// lists that each lack the other's cluster.
    writing: Mutex<()>,
}

impl MemberClusters {
    /// Loads `<ca_dir>/clusters.json`; a missing file is an empty list, a file that does
    /// not parse is an error (forgetting joined clusters silently would lock relays out).
    pub fn load(ca_dir: &Path) -> Result<MemberClusters, ClusterError> {
        let path = ca_dir.join(CLUSTERS_FILE);
        let file: ClustersFile = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ClusterError::File {
                path: path.clone(),
                reason: format!("not a list of member clusters: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClustersFile::default(),
            Err(source) => {
                return Err(ClusterError::Io {
                    action: "reading",
                    path,
                    source,
                })
            }
        };
        let clusters = file
            .clusters
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        Ok(MemberClusters {
            path,
            clusters: RwLock::new(clusters),
            writing: Mutex::new(()),
        })
    }

    pub fn get(&self, name: &str) -> Option<MemberCluster> {
        self.read().get(name).cloned()
    }

    /// Every member cluster, by name.
    pub fn all(&self) -> Vec<MemberCluster> {
        self.read().values().cloned().collect()
    }

    /// The joined cluster whose relay `id` is, if it is one.
    pub fn relay_of(&self, id: &SpiffeId) -> Option<String> {
        let name = relay_cluster_name(id)?;
        let clusters = self.read();
        let member = clusters.get(name)?;
        (member.relay_identity == id.uri()).then(|| member.name.clone())
    }

    /// Records a join, on disk first, then in memory. Joining a name that is already a
    /// member replaces its record (a relay reinstalled with a new token); the old record
    /// is returned.
    pub fn join(&self, member: MemberCluster) -> Result<Option<MemberCluster>, ClusterError> {
        let _held = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.read().clone();
        let previous = next.insert(member.name.clone(), member);
        self.save(&next)?;
        *self
            .clusters
            .write()
            .unwrap_or_else(PoisonError::into_inner) = next;
        Ok(previous)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, MemberCluster>> {
        self.clusters.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self, clusters: &BTreeMap<String, MemberCluster>) -> Result<(), ClusterError> {
        let file = ClustersFile {
            clusters: clusters.values().cloned().collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| ClusterError::File {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        // Private like the rest of the CA dir's state.
        Ok(cert_authority::write_atomic(&self.path, &json, true)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(name: &str, network: &str) -> MemberCluster {
        MemberCluster {
            name: name.into(),
            network: network.into(),
            region: Some("eu-west".into()),
            zone: None,
            relay_identity: relay_identity("cluster.local", name).uri(),
            joined_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn cluster_names_are_dns_labels() {
        for good in ["a", "east", "us-east-1", "0", &"x".repeat(63)] {
            check_cluster_name(good).unwrap();
        }
        for bad in ["", "East", "-a", "a-", "a.b", "a_b", "a b", &"x".repeat(64)] {
            let err = check_cluster_name(bad).unwrap_err();
            assert!(err.to_string().contains("DNS label"), "{err}");
        }
        check_label("zone", "us-east-1a").unwrap();
        check_label("network", "net.1_a").unwrap();
        assert!(check_label("zone", "-a").is_err());
        assert!(check_label("zone", "a/b").is_err());
    }

    #[test]
    fn relay_identities_map_to_cluster_names() {
        let id = relay_identity("cluster.local", "east");
        assert_eq!(
            id.uri(),
            "spiffe://cluster.local/ns/trellis-system/sa/relay-east"
        );
        assert_eq!(relay_cluster_name(&id), Some("east"));
        let workload = SpiffeId::new("cluster.local", "default", "relay-east");
        assert_eq!(relay_cluster_name(&workload), None);
        let server = SpiffeId::new("cluster.local", "trellis-system", "xds-server");
        assert_eq!(relay_cluster_name(&server), None);
    }

    #[test]
    fn joins_are_saved_replaced_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let clusters = MemberClusters::load(dir.path()).unwrap();
        assert!(clusters.all().is_empty());
        assert_eq!(clusters.join(member("east", "east")).unwrap(), None);
        assert_eq!(clusters.join(member("west", "net-w")).unwrap(), None);
        let replaced = clusters.join(member("east", "net-e2")).unwrap();
        assert_eq!(replaced.map(|m| m.network), Some("east".to_string()));

        let again = MemberClusters::load(dir.path()).unwrap();
        let names: Vec<_> = again.all().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["east", "west"]);
        assert_eq!(again.get("east").unwrap().network, "net-e2");
        assert_eq!(
            again.relay_of(&relay_identity("cluster.local", "west")),
            Some("west".to_string())
        );
        assert_eq!(
            again.relay_of(&relay_identity("cluster.local", "north")),
            None
        );
        // Same name, another trust domain: not that cluster's relay.
        assert_eq!(again.relay_of(&relay_identity("other.td", "west")), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(CLUSTERS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CLUSTERS_FILE), "[oops").unwrap();
        let err = MemberClusters::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains(CLUSTERS_FILE), "{err}");
    }
}
