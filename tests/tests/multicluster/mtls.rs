//! Mutual TLS through the relays: what the echo app saw of the caller
//! (`x-forwarded-client-cert`), what a relay's `/debug/syncz` says about a sidecar's
//! secrets, which certificate a sidecar's Envoy really holds (`/certs`), and TLS stats.

use std::collections::BTreeSet;

use anyhow::{anyhow, ensure, Context as _};
use serde_json::Value;
use trellis_tests::{envoy_admin_get, HttpResponse};

use super::{MultiMesh, WorkloadDef, NAMESPACE, PORT};

/// The `URI=` elements of the `x-forwarded-client-cert` header the echo app received
/// (elements are `,`-separated, fields `;`-separated).
pub fn xfcc_uris(body: &Value) -> Vec<String> {
    body["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default()
        .split([',', ';'])
        .filter_map(|field| field.trim().strip_prefix("URI="))
        .map(|uri| uri.trim_matches('"').to_owned())
        .collect()
}

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

/// A certificate serial as one string whatever the source: lowercase hex without `:`
/// separators or leading zeros (the relay reports `0a:1b:...`, Envoy `a1b...`).
pub fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// A relay's `/debug/syncz` entry of the sidecar of [`WorkloadDef::mtls`] workload `w`:
/// it proved `w`'s identity, was sent secrets over SDS and ACKed them, and has a
/// certificate on record.
pub fn check_proxy_secrets(proxy: &Value, w: &WorkloadDef) -> anyhow::Result<()> {
    let id = w.workload_id();
    ensure!(
        proxy["identity"] == w.spiffe_id().as_str(),
        "{id}: identity {} instead of {}: {proxy}",
        proxy["identity"],
        w.spiffe_id()
    );
    let secrets = &proxy["secrets"];
    ensure!(
        !secrets["epoch_sent"].is_null() && secrets["epoch_acked"] == secrets["epoch_sent"],
        "{id}: secrets not sent or not ACKed: {secrets}"
    );
    ensure!(
        secrets["cert_serial"].is_string(),
        "{id}: no certificate on record: {secrets}"
    );
    let sds = &proxy["types"]["sds"];
    ensure!(
        !sds["sent_version"].is_null() && sds["acked_version"] == sds["sent_version"],
        "{id}: SDS not sent or not ACKed: {proxy}"
    );
    Ok(())
}

/// One workload certificate a sidecar's Envoy uses (a `cert_chain` entry of `/certs`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EnvoyCert {
    /// See [`normalize_serial`].
    pub serial: String,
    /// Its URI SANs.
    pub uris: Vec<String>,
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl MultiMesh {
    /// The workload certificates a sidecar's Envoy uses right now (`/certs`, every TLS
    /// context's `cert_chain`, deduplicated) and how many trust anchors (`ca_cert`) it
    /// validates peers with: what the data plane really holds.
    pub fn envoy_certs(&self, name: &str) -> anyhow::Result<(BTreeSet<EnvoyCert>, usize)> {
        let certs = envoy_admin_get(self.sidecar(name).admin, "/certs")?.json()?;
        let mut chain = BTreeSet::new();
        let mut anchors = BTreeSet::new();
        for context in certs["certificates"].as_array().into_iter().flatten() {
            for cert in context["cert_chain"].as_array().into_iter().flatten() {
                let serial = cert["serial_number"]
                    .as_str()
                    .ok_or_else(|| anyhow!("{name}: a certificate without serial: {cert}"))?;
                let uris = cert["subject_alt_names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|san| san["uri"].as_str().map(str::to_owned))
                    .collect();
                chain.insert(EnvoyCert {
                    serial: normalize_serial(serial),
                    uris,
                });
            }
            for ca in context["ca_cert"].as_array().into_iter().flatten() {
                if let Some(serial) = ca["serial_number"].as_str() {
                    anchors.insert(normalize_serial(serial));
                }
            }
        }
        Ok((chain, anchors.len()))
    }

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
        let (chain, anchors) = self.envoy_certs(name)?;
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

    /// The sum of a sidecar's Envoy counters whose names match `regex` (Envoy's
    /// `/stats?filter=`).
    pub fn envoy_stat_sum(&self, name: &str, regex: &str) -> anyhow::Result<u64> {
        let stats = envoy_admin_get(
            self.sidecar(name).admin,
            &format!("/stats?filter={}", url_encode(regex)),
        )?
        .text();
        Ok(stats
            .lines()
            .filter_map(|l| l.rsplit_once(": "))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum())
    }

    /// TLS handshakes `client`'s sidecar made with its cluster of service `app`.
    pub fn tls_handshakes(&self, client: &str, app: &str) -> anyhow::Result<u64> {
        self.envoy_stat_sum(
            client,
            &format!(
                "^cluster\\.outbound\\|{PORT}\\|\\|{app}\\.{NAMESPACE}\\..*\\.ssl\\.handshake$"
            ),
        )
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
