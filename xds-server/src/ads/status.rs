//! Per (proxy, type) bookkeeping: what was sent, what was ACKed, what was NACKed and why.
//! This is what `/debug/syncz` and the NACK metrics show.

use super::node::NodeInfo;
use crate::cache::TypeKind;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub sent_at_ms: Option<u64>,
    pub acked_version: Option<String>,
    pub acked_at_ms: Option<u64>,
    pub nacked_version: Option<String>,
    pub nack_error: Option<String>,
    pub resources: usize,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
}

impl TypeStatus {
    /// The proxy has accepted the latest response sent to it.
    pub fn synced(&self) -> bool {
        self.sent_version.is_none() || self.sent_version == self.acked_version
    }
}

#[derive(Debug, Serialize)]
pub struct ProxyStatus {
    pub conn_id: u64,
    pub node: NodeInfo,
    pub mode: &'static str,
    pub connected_at_ms: u64,
    types: Mutex<BTreeMap<TypeKind, TypeStatus>>,
    /// The SPIFFE identity the proxy proved on the secure port (`None` on plaintext xDS).
    #[serde(skip)]
    identity: OnceLock<String>,
    #[serde(skip)]
    secrets: Mutex<SecretsStatus>,
}

/// Which trust epoch (see `cert_authority::TrustState::epoch`) a proxy's secrets were
/// sent and ACKed at: root rotation moves on only when every proxy holding secrets
/// ACKed the current one.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SecretsStatus {
    pub epoch_sent: Option<u64>,
    pub epoch_acked: Option<u64>,
    /// The workload certificate in use: serial, expiry, and which root anchors it.
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<u64>,
    pub cert_root: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ProxyStatusView {
    pub id: String,
    pub workload: Option<String>,
    pub namespace: String,
    pub mode: &'static str,
    pub connected_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsStatus>,
    pub synced: bool,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl ProxyStatus {
    fn with<R>(&self, kind: TypeKind, f: impl FnOnce(&mut TypeStatus) -> R) -> R {
        let mut m = self.types.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(kind).or_default())
    }

    pub fn sent(&self, kind: TypeKind, version: &str, nonce: &str, resources: usize) {
        self.with(kind, |t| {
            t.sent_version = Some(version.to_string());
            t.sent_nonce = Some(nonce.to_string());
            t.sent_at_ms = Some(now_ms());
            t.resources = resources;
            t.pushes += 1;
        })
    }

    pub fn acked(&self, kind: TypeKind, version: &str) {
        self.with(kind, |t| {
            t.acked_version = Some(version.to_string());
            t.acked_at_ms = Some(now_ms());
            t.acks += 1;
        })
    }

    pub fn nacked(&self, kind: TypeKind, version: &str, error: &str) {
        self.with(kind, |t| {
            t.nacked_version = Some(version.to_string());
            t.nack_error = Some(error.to_string());
            t.nacks += 1;
        })
    }

    pub fn type_status(&self, kind: TypeKind) -> Option<TypeStatus> {
        self.types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .cloned()
    }

    pub fn set_identity(&self, uri: String) {
        let _ = self.identity.set(uri);
    }

    pub fn identity(&self) -> Option<&str> {
        self.identity.get().map(String::as_str)
    }

    pub fn secrets(&self) -> SecretsStatus {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_secrets(&self, f: impl FnOnce(&mut SecretsStatus)) {
        f(&mut self.secrets.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Whether this proxy holds secrets that have not caught up with trust epoch `epoch`.
    pub fn behind_epoch(&self, epoch: u64) -> bool {
        let s = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        s.epoch_sent.is_some() && s.epoch_acked.is_none_or(|a| a < epoch)
    }

    pub fn view(&self) -> ProxyStatusView {
        let types: BTreeMap<&'static str, TypeStatus> = self
            .types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.short(), v.clone()))
            .collect();
        ProxyStatusView {
            id: self.node.id.clone(),
            workload: self.node.workload.clone(),
            namespace: self.node.namespace.clone(),
            mode: self.mode,
            connected_at_ms: self.connected_at_ms,
            identity: self.identity.get().cloned(),
            secrets: self.identity.get().map(|_| self.secrets()),
            synced: types.values().all(TypeStatus::synced),
            types,
        }
    }
}

/// Every connected proxy. Entries are removed by the stream's [`Registration`] guard,
/// so a stream that ends in any way (error, panic, disconnect) leaves no ghost behind.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    next: AtomicU64,
    proxies: Mutex<BTreeMap<u64, Arc<ProxyStatus>>>,
}

pub struct Registration {
    registry: Arc<ProxyRegistry>,
    pub status: Arc<ProxyStatus>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.status.conn_id);
    }
}

impl ProxyRegistry {
    pub fn register(self: &Arc<Self>, node: NodeInfo, mode: &'static str) -> Registration {
        let conn_id = self.next.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(ProxyStatus {
            conn_id,
            node,
            mode,
            connected_at_ms: now_ms(),
            types: Mutex::default(),
            identity: OnceLock::new(),
            secrets: Mutex::default(),
        });
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id, status.clone());
        Registration {
            registry: self.clone(),
            status,
        }
    }

    pub fn all(&self) -> Vec<Arc<ProxyStatus>> {
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Finds a proxy by full node id, or by workload `name.namespace`.
    pub fn find(&self, id: &str) -> Option<Arc<ProxyStatus>> {
        let all = self.all();
        all.iter()
            .rev()
            .find(|p| p.node.id == id)
            .or_else(|| {
                all.iter()
                    .rev()
                    .find(|p| p.node.workload.as_deref() == Some(id))
            })
            .cloned()
    }
}
