//! What the server's admin API and the sidecars' Envoy admin say: sync state, certificates
//! as the server has them on record and as the data plane holds them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{envoy_certs, http_get_json};

use super::SecureMesh;
use crate::common::{
    check_proxy_secrets, proxies_by_workload, Probe, SidecarMesh, CONVERGE_TIMEOUT, POLL,
};

/// The server, as convergence errors name it.
const SERVER: &str = "the xds-server";

impl SecureMesh {
    pub fn syncz(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr, "/debug/syncz")
    }

    /// `/debug/ca`.
    pub fn ca(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr, "/debug/ca")
    }

    /// `/debug/configz` errors, for failure messages.
    pub fn config_errors(&self) -> String {
        http_get_json(self.admin_addr, "/debug/configz")
            .map(|c| c["errors"].to_string())
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// The `/debug/syncz` entries of the connected proxies, by workload (`name.namespace`);
    /// an error if one is connected twice.
    pub fn proxies(&self) -> anyhow::Result<BTreeMap<String, Value>> {
        proxies_by_workload(&self.syncz()?, SERVER)
    }

    /// Every started sidecar connected once, in its mode, as its identity, synced, and
    /// holding secrets it ACKed, from a root the server has on record.
    pub fn check_converged(&self) -> anyhow::Result<()> {
        self.check_synced(
            SERVER,
            &self.proxies()?,
            &["cds", "lds"],
            |_| true,
            |proxy, w| {
                let id = w.workload_id();
                check_proxy_secrets(proxy, &id, &w.spiffe_id())?;
                let secrets = &proxy["secrets"];
                ensure!(
                    secrets["cert_root"].is_string(),
                    "{id}: no certificate root recorded: {secrets}"
                );
                Ok(())
            },
        )
    }

    /// Polls [`Self::check_converged`]; fails fast if the server exits meanwhile.
    pub fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut server = self.server.take().context("no server running")?;
        let result = server.wait_until(timeout, POLL, || self.check_converged());
        self.server = Some(server);
        result
    }

    /// Waits until `client` reaches every service over mutual TLS (see
    /// [`super::check_mtls`]), and its TCP port if it has one.
    pub fn wait_mtls_routing(&self, client: &str) -> anyhow::Result<()> {
        for app in self.services() {
            let mut targets = vec![self.target(client, app)];
            if self.workloads_of(app).iter().any(|w| w.tcp_port.is_some()) {
                targets.push(self.tcp_target(client, app));
            }
            for target in targets {
                trellis_tests::poll_until(CONVERGE_TIMEOUT, POLL, || target.request())
                    .map_err(|e| anyhow!("{} does not work: {e}", target.label()))?;
            }
        }
        Ok(())
    }

    /// The certificate each connected proxy holds according to `/debug/syncz`:
    /// workload -> (serial, not_after, root).
    pub fn certs(&self) -> anyhow::Result<BTreeMap<String, CertState>> {
        self.proxies()?
            .into_iter()
            .map(|(workload, p)| {
                let s = &p["secrets"];
                let cert = CertState {
                    serial: s["cert_serial"]
                        .as_str()
                        .ok_or_else(|| anyhow!("{workload}: no cert_serial: {s}"))?
                        .to_owned(),
                    not_after: s["cert_not_after"].as_u64(),
                    root: s["cert_root"].as_str().map(str::to_owned),
                    epoch_acked: s["epoch_acked"].as_u64(),
                };
                Ok((workload, cert))
            })
            .collect()
    }

    /// The serial numbers of the workload certificate(s) a sidecar's Envoy uses right
    /// now: what the data plane really holds.
    pub fn envoy_cert_serials(&self, name: &str) -> anyhow::Result<BTreeSet<String>> {
        let certs = envoy_certs(self.sidecar(name).admin)?;
        ensure!(
            !certs.chain.is_empty(),
            "{name}'s Envoy holds no workload certificate: {certs:?}"
        );
        Ok(certs.chain.into_iter().map(|c| c.serial).collect())
    }
}

/// A proxy's certificate as `/debug/syncz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertState {
    pub serial: String,
    pub not_after: Option<u64>,
    pub root: Option<String>,
    pub epoch_acked: Option<u64>,
}
