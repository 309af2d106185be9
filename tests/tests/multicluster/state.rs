//! What the admin APIs say: the MCPC's (`/debug/clusters`, `/debug/syncz`), the relays'
//! (`/debug/relay`, `/debug/syncz`) and the sidecars' Envoy admin (endpoints with their
//! priority, locality and health, outlier detection, stats), and the convergence checks
//! built on them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{envoy_admin_get, http_get_json};

use super::{check_proxy_secrets, MultiMesh, CLUSTERS, CONVERGE_TIMEOUT};
use crate::common::{proxies_by_workload, SidecarMesh, NAMESPACE, PORT};

/// One endpoint of an Envoy cluster, as the sidecar's Envoy holds it (`/clusters`).
#[derive(Debug, Clone)]
pub struct HostState {
    pub ip: IpAddr,
    pub priority: u64,
    pub locality: Value,
    pub health: Value,
}

impl HostState {
    /// Ejected by outlier detection.
    pub fn ejected(&self) -> bool {
        self.health["failed_outlier_check"] == true
    }
}

/// A proxy's per-type state at a relay: `(proxy, type)` -> (sent version, pushes).
pub type SentState = BTreeMap<(String, String), (Value, u64)>;

/// What differs between two [`SentState`]s of one relay, one line per proxy and type.
pub fn sent_changes(before: &SentState, after: &SentState) -> Vec<String> {
    let keys: std::collections::BTreeSet<_> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (b, a) = (before.get(key), after.get(key));
            (b != a).then(|| {
                let show = |s: Option<&(Value, u64)>| {
                    s.map_or("-".to_owned(), |(v, p)| {
                        format!("version {v} after {p} pushes")
                    })
                };
                format!("{} {}: {} -> {}", key.0, key.1, show(b), show(a))
            })
        })
        .collect()
}

/// The Envoy cluster of service `app`'s HTTP port.
pub fn outbound_cluster(app: &str) -> String {
    format!("outbound|{PORT}||{app}.{NAMESPACE}.svc.cluster.local")
}

impl MultiMesh {
    pub fn mcpc_json(&self, path: &str) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr, path)
    }

    pub fn relay_json(&self, cluster: &str, path: &str) -> anyhow::Result<Value> {
        http_get_json(self.relay(cluster).admin_addr, path)
    }

    /// The MCPC's `/debug/clusters` records (a list; or the `clusters` of an object).
    pub fn member_clusters(&self) -> anyhow::Result<Vec<Value>> {
        let v = self.mcpc_json("/debug/clusters")?;
        let list = v.as_array().or_else(|| v["clusters"].as_array());
        list.cloned()
            .ok_or_else(|| anyhow!("/debug/clusters is not a list: {v}"))
    }

    pub fn member_cluster(&self, name: &str) -> anyhow::Result<Value> {
        self.member_clusters()?
            .into_iter()
            .find(|c| c["name"] == name)
            .ok_or_else(|| anyhow!("cluster {name} not in /debug/clusters"))
    }

    /// A relay's `/debug/relay`.
    pub fn relay_status(&self, cluster: &str) -> anyhow::Result<Value> {
        self.relay_json(cluster, "/debug/relay")
    }

    /// The proxies connected to a relay (its `/debug/syncz`), by workload; an error if one
    /// is connected twice.
    pub fn relay_proxies(&self, cluster: &str) -> anyhow::Result<BTreeMap<String, Value>> {
        proxies_by_workload(
            &self.relay_json(cluster, "/debug/syncz")?,
            &format!("relay {cluster}"),
        )
    }

    /// Every started sidecar of `cluster` connected once to its relay, in its mode,
    /// synced, with CDS and LDS sent and everything sent ACKed; a sidecar of an
    /// [`super::WorkloadDef::mtls`] workload also as its identity, holding ACKed secrets
    /// (see [`check_proxy_secrets`]).
    pub fn check_relay_converged(&self, cluster: &str) -> anyhow::Result<()> {
        self.check_synced(
            &format!("relay {cluster}"),
            &self.relay_proxies(cluster)?,
            &["cds", "lds"],
            |w| w.cluster.name == cluster,
            |proxy, w| {
                if w.mtls {
                    check_proxy_secrets(proxy, w).with_context(|| format!("relay {cluster}"))?;
                }
                Ok(())
            },
        )
    }

    /// Both relays converged, and every started client's Envoy holds an endpoint for
    /// every workload of every service, in whichever cluster it is registered.
    pub fn check_converged(&self) -> anyhow::Result<()> {
        for def in CLUSTERS {
            self.check_relay_converged(def.name)?;
        }
        for client in self.sidecars.iter().filter(|s| !s.def.has_app) {
            for app in self.services() {
                let hosts = self.hosts(client.def.name, app)?;
                for w in self.workloads_of(app) {
                    let ip = self.inbound_ip(w.name);
                    ensure!(
                        hosts.iter().any(|h| h.ip == ip),
                        "{}'s Envoy has no endpoint {ip} ({} in cluster {}) for {app}: {hosts:?}",
                        client.def.name,
                        w.name,
                        w.cluster.name
                    );
                }
            }
        }
        Ok(())
    }

    pub fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait("mesh converged", timeout, |m| m.check_converged())
    }

    /// A relay's registry report was accepted: the MCPC ACKed its latest revision without
    /// errors, and it covers every file of the registry folder.
    pub fn check_registry_acked(&self, cluster: &str) -> anyhow::Result<()> {
        let status = self.relay_status(cluster)?;
        let registry = &status["registry"];
        let files = std::fs::read_dir(&self.relay(cluster).registry_dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
            .count();
        ensure!(
            registry["revision"].as_u64().unwrap_or(0) > 0
                && registry["acked_revision"] == registry["revision"],
            "relay {cluster}: registry not acked by the MCPC: {registry}"
        );
        ensure!(
            registry["errors"].as_array().is_some_and(Vec::is_empty),
            "relay {cluster}: the MCPC refused part of the registry: {registry}"
        );
        ensure!(
            registry["files"].as_u64() == u64::try_from(files).ok(),
            "relay {cluster}: registry reports {} files, the folder has {files}: {registry}",
            registry["files"]
        );
        Ok(())
    }

    pub fn wait_registries_acked(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.wait("registries acked", timeout, |m| {
            CLUSTERS
                .iter()
                .try_for_each(|d| m.check_registry_acked(d.name))
        })
    }

    /// The MCPC's `/debug/syncz` entries of a relay's upstream streams (node ids
    /// `relay~CLUSTER~...`).
    pub fn mcpc_relay_streams(&self, cluster: &str) -> anyhow::Result<Vec<Value>> {
        let syncz = self.mcpc_json("/debug/syncz")?;
        let prefix = format!("relay~{cluster}~");
        Ok(syncz["proxies"]
            .as_array()
            .context("MCPC syncz.proxies is not an array")?
            .iter()
            .filter(|p| p["id"].as_str().is_some_and(|id| id.starts_with(&prefix)))
            .cloned()
            .collect())
    }

    /// Every relay has its class streams up (as many as it has classes), the MCPC lists
    /// each of them as a synced proxy, and the relay's registry is acked.
    pub fn check_relays_connected(&self) -> anyhow::Result<()> {
        for def in CLUSTERS {
            let cluster = def.name;
            let status = self.relay_status(cluster)?;
            let classes = status["classes"].as_array().map_or(0, Vec::len);
            ensure!(classes > 0, "relay {cluster} has no classes: {status}");
            ensure!(
                status["upstream_streams"].as_u64() == u64::try_from(classes).ok(),
                "relay {cluster}: {} upstream streams for {classes} classes",
                status["upstream_streams"]
            );
            let streams = self.mcpc_relay_streams(cluster)?;
            ensure!(
                streams.len() == classes,
                "the MCPC lists {} streams of relay {cluster}, which has {classes} classes: {:?}",
                streams.len(),
                streams.iter().map(|s| &s["id"]).collect::<Vec<_>>()
            );
            for s in &streams {
                ensure!(s["synced"] == true, "relay stream not synced: {s}");
            }
            self.check_registry_acked(cluster)?;
        }
        Ok(())
    }

    /// What a relay sent each of its proxies, per type: version and number of pushes.
    pub fn relay_sent(&self, cluster: &str) -> anyhow::Result<SentState> {
        let mut out = SentState::new();
        for (workload, proxy) in self.relay_proxies(cluster)? {
            let types = proxy["types"]
                .as_object()
                .with_context(|| format!("{workload}: types is not an object"))?;
            for (kind, t) in types {
                out.insert(
                    (workload.clone(), kind.clone()),
                    (t["sent_version"].clone(), t["pushes"].as_u64().unwrap_or(0)),
                );
            }
        }
        Ok(out)
    }

    /// The endpoints of service `app` in a sidecar's Envoy.
    pub fn hosts(&self, sidecar: &str, app: &str) -> anyhow::Result<Vec<HostState>> {
        let clusters = envoy_admin_get(self.sidecar(sidecar).admin, "/clusters?format=json")?;
        let clusters = clusters.json()?;
        let name = outbound_cluster(app);
        let Some(cluster) = clusters["cluster_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name.as_str())
        else {
            return Ok(Vec::new());
        };
        cluster["host_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                let ip = h["address"]["socket_address"]["address"]
                    .as_str()
                    .ok_or_else(|| anyhow!("host without a socket address: {h}"))?
                    .parse()?;
                Ok(HostState {
                    ip,
                    priority: h["priority"].as_u64().unwrap_or(0),
                    locality: h["locality"].clone(),
                    health: h["health_status"].clone(),
                })
            })
            .collect()
    }

    /// The endpoint of workload `name` in `sidecar`'s Envoy cluster of service `app`.
    pub fn host_of(&self, sidecar: &str, app: &str, name: &str) -> anyhow::Result<HostState> {
        let ip = self.inbound_ip(name);
        let hosts = self.hosts(sidecar, app)?;
        hosts.iter().find(|h| h.ip == ip).cloned().ok_or_else(|| {
            anyhow!("{sidecar}'s Envoy has no endpoint {ip} ({name}) for {app}: {hosts:?}")
        })
    }

    /// The `outlier_detection` of a sidecar's Envoy cluster of service `app` (null if none).
    pub fn outlier_detection(&self, sidecar: &str, app: &str) -> anyhow::Result<Value> {
        let dump = envoy_admin_get(
            self.sidecar(sidecar).admin,
            "/config_dump?resource=dynamic_active_clusters",
        )?
        .json()?;
        let name = outbound_cluster(app);
        let cluster = dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| &c["cluster"])
            .find(|c| c["name"] == name.as_str())
            .ok_or_else(|| anyhow!("{sidecar}'s Envoy has no cluster {name}"))?;
        Ok(cluster["outlier_detection"].clone())
    }

    /// Waits until the Envoys of every started sidecar of `cluster` report their ADS
    /// stream `connected` (1) or not (0).
    pub fn wait_control_plane_state(
        &mut self,
        cluster: &str,
        connected: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait(
            &format!("sidecars of {cluster} with control_plane.connected_state {connected}"),
            timeout,
            |m| m.check_control_plane_state(connected, |w| w.cluster.name == cluster),
        )
    }

    /// What every relay sent its proxies (see [`Self::relay_sent`]), in [`CLUSTERS`] order.
    pub fn relays_sent(&self) -> anyhow::Result<Vec<SentState>> {
        CLUSTERS.iter().map(|d| self.relay_sent(d.name)).collect()
    }

    /// Asserts that no relay pushed anything to its sidecars since `before` (what
    /// [`Self::relays_sent`] said then) across `what`, which changed nothing: the same
    /// versions, and not even a transient change (pushes are counted per sidecar stream).
    #[track_caller]
    pub fn assert_no_downstream_pushes(&self, before: Vec<SentState>, what: &str) {
        let churn: Vec<String> = CLUSTERS
            .iter()
            .zip(before)
            .flat_map(|(def, before)| {
                let after = self.relay_sent(def.name).expect("relay syncz");
                sent_changes(&before, &after)
                    .into_iter()
                    .map(move |c| format!("relay {}: {c}", def.name))
            })
            .collect();
        eprintln!(
            "downstream pushes across {what}: {}",
            if churn.is_empty() {
                "none".to_owned()
            } else {
                churn.join("; ")
            }
        );
        assert!(
            churn.is_empty(),
            "the relays pushed to their sidecars across {what}, which changed nothing:\n{}",
            churn.join("\n")
        );
    }

    /// Waits until the relay of deferred workload `name` prefetched its class: config
    /// for it is ready before its sidecar connects.
    pub fn wait_prefetched(&mut self, name: &str) -> anyhow::Result<()> {
        let w = self.def(name);
        let cluster = w.cluster.name;
        self.wait(
            &format!("relay {cluster} prefetched {name}"),
            CONVERGE_TIMEOUT,
            |m| {
                let status = m.relay_status(cluster)?;
                ensure!(
                    status["classes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["workload"] == w.workload_id().as_str()
                            && c["resources"].as_u64() > Some(0)),
                    "no class with resources for {name}: {status}"
                );
                Ok(())
            },
        )
    }
}
