//! Mutual TLS through the relays: what the echo app saw of the caller
//! (`x-forwarded-client-cert`), what a relay's `/debug/syncz` says about a sidecar's
//! secrets, which certificate a sidecar's Envoy really holds (`/certs`), and what the
//! MCPC signed.

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{envoy_certs, normalize_serial, HttpResponse};

use super::{MultiMesh, WorkloadDef};
use crate::common::{self, xfcc_uris, SidecarMesh};

/// The echo app saw exactly the caller `id` in `x-forwarded-client-cert`: the sidecar in
/// front of it terminated mutual TLS and the client presented `id`'s certificate.
pub fn check_xfcc(response: &HttpResponse, id: &str) -> anyhow::Result<()> {
    let body = response.json()?;
    let uris = xfcc_uris(&body);
    ensure!(
        uris == [id],
        "the app did not see (only) {id} in x-forwarded-client-cert (URIs {uris:?}); \
         headers: {}",
        body["headers"]
    );
    Ok(())
}

/// A relay's `/debug/syncz` entry of the sidecar of [`WorkloadDef::mtls`] workload `w`:
/// it proved `w`'s identity, was sent secrets over SDS and ACKed them, and has a
/// certificate on record.
pub fn check_proxy_secrets(proxy: &Value, w: &WorkloadDef) -> anyhow::Result<()> {
    let id = w.workload_id();
    common::check_proxy_secrets(proxy, &id, &w.spiffe_id())?;
    let sds = &proxy["types"]["sds"];
    ensure!(
        !sds["sent_version"].is_null() && sds["acked_version"] == sds["sent_version"],
        "{id}: SDS not sent or not ACKed: {proxy}"
    );
    Ok(())
}

impl MultiMesh {
    /// The certificate serial a sidecar's relay reports for it (its `/debug/syncz`).
    pub fn relay_cert_serial(&self, name: &str) -> anyhow::Result<String> {
        let w = self.def(name);
        let proxies = self.relay_proxies(w.cluster.name)?;
        let proxy = proxies
            .get(&w.workload_id())
            .ok_or_else(|| anyhow!("{name} is not connected to relay {}", w.cluster.name))?;
        check_proxy_secrets(proxy, &w)?;
        proxy["secrets"]["cert_serial"]
            .as_str()
            .map(normalize_serial)
            .context("no cert_serial")
    }

    /// The sidecar of [`WorkloadDef::mtls`] workload `name` uses exactly one workload
    /// certificate, for its own SPIFFE id, the one its relay reports having sent it, and
    /// validates peers with at least one trust anchor. Returns its serial.
    pub fn check_envoy_cert(&self, name: &str) -> anyhow::Result<String> {
        let w = self.def(name);
        let certs = envoy_certs(self.sidecar(name).admin)?;
        let (chain, anchors) = (certs.chain, certs.anchors.len());
        let own = [w.spiffe_id()];
        ensure!(
            chain.len() == 1 && chain.iter().all(|c| c.uris == own),
            "{name}'s Envoy must use one certificate for {}, it uses {chain:?}",
            own[0]
        );
        ensure!(anchors > 0, "{name}'s Envoy has no trust anchor (ROOTCA)");
        let serial = chain
            .iter()
            .next()
            .map(|c| c.serial.clone())
            .unwrap_or_default();
        let at_relay = self.relay_cert_serial(name)?;
        ensure!(
            serial == at_relay,
            "{name}'s Envoy uses certificate {serial}, relay {} sent it {at_relay}",
            w.cluster.name
        );
        Ok(serial)
    }

    /// The MCPC's `/debug/syncz` proxies that are not relay streams (node ids other than
    /// `relay~...`): sidecars of member clusters never connect to the MCPC themselves.
    pub fn mcpc_non_relay_proxies(&self) -> anyhow::Result<Vec<String>> {
        let syncz = self.mcpc_json("/debug/syncz")?;
        Ok(syncz["proxies"]
            .as_array()
            .context("MCPC syncz.proxies is not an array")?
            .iter()
            .filter_map(|p| p["id"].as_str())
            .filter(|id| !id.starts_with("relay~"))
            .map(str::to_owned)
            .collect())
    }

    /// The MCPC's log says it signed a certificate for `id` asked by the relay of
    /// `cluster` (its audit line `... via the relay of cluster NAME ...`).
    pub fn check_signed_via_relay(&self, id: &str, cluster: &str) -> anyhow::Result<()> {
        let server = self.server.as_ref().context("no MCPC running")?;
        let needle = format!("{id} via the relay of cluster {cluster}");
        ensure!(
            server.log().contains(&needle),
            "the MCPC's log has no `{needle}`:\n{}",
            server.log_tail(30)
        );
        Ok(())
    }
}
