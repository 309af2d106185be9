//! Root rotation: the public view of its state machine. The transitions live with the
//! [`Authority`](crate::Authority) (see `authority/rotation.rs`).

/// Where a root rotation is. Each phase is published with its own epoch, and the server moves
/// to the next phase only once every proxy has ACKed the current epoch.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Bundle = old + new roots, certificates still signed under the old root: every proxy
    /// learns to trust the new root before any certificate chains to it.
    AddNewRoot,
    /// Bundle = old + new, certificates signed under the new root: every workload gets a
    /// certificate chaining to the new root while peers with old certificates are still trusted.
    Reissue,
    /// Bundle = new root only, signed under the new root: nothing depends on the old root any more.
    RemoveOldRoot,
}

/// A running rotation, as persisted in `rotation.json` and published in every `TrustState`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RotationStatus {
    pub phase: Phase,
    /// Epoch at which the current phase was published.
    pub epoch: u64,
    /// When the rotation started, unix seconds.
    pub started_at: u64,
    /// Fingerprint of the root being retired.
    pub old_root: String,
    /// Fingerprint of the root taking over.
    pub new_root: String,
}
