//! Reading `/debug/syncz`, which the xds-server and the relays serve alike: the proxies
//! connected, per type what was sent and ACKed, and their identity and secrets.

use std::collections::BTreeMap;

use anyhow::{ensure, Context as _};
use serde_json::Value;

/// The proxies of a `/debug/syncz` by workload (`name.namespace`); an error if one is
/// connected twice. `whose` names the server in errors.
pub fn proxies_by_workload(syncz: &Value, whose: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let proxies = syncz["proxies"]
        .as_array()
        .with_context(|| format!("{whose}: syncz.proxies is not an array: {syncz}"))?;
    let mut out = BTreeMap::new();
    for p in proxies {
        let workload = p["workload"].as_str().unwrap_or_default().to_owned();
        ensure!(
            out.insert(workload.clone(), p.clone()).is_none(),
            "{workload} is connected twice to {whose}: {syncz}"
        );
    }
    Ok(out)
}

/// A proxy's `/debug/syncz` entry: in `mode`, synced, something sent of every type of
/// `sent` (not merely "nothing pending"), and everything sent ACKed.
pub fn check_proxy_synced(
    proxy: &Value,
    id: &str,
    mode: &str,
    sent: &[&str],
) -> anyhow::Result<()> {
    ensure!(
        proxy["mode"] == mode,
        "{id} uses {} instead of {mode}",
        proxy["mode"]
    );
    ensure!(proxy["synced"] == true, "{id} not synced: {proxy}");
    let types = proxy["types"]
        .as_object()
        .context("types is not an object")?;
    for kind in sent {
        ensure!(
            types
                .get(*kind)
                .is_some_and(|t| !t["sent_version"].is_null()),
            "{id}: nothing sent for {kind} yet: {proxy}"
        );
    }
    for (kind, t) in types {
        ensure!(
            t["acked_version"] == t["sent_version"],
            "{id}: {kind} sent {} but acked {}: {proxy}",
            t["sent_version"],
            t["acked_version"]
        );
    }
    Ok(())
}

/// A proxy's `/debug/syncz` entry shows that it proved `spiffe_id`, was sent secrets and
/// ACKed them, and has a certificate on record.
pub fn check_proxy_secrets(proxy: &Value, id: &str, spiffe_id: &str) -> anyhow::Result<()> {
    ensure!(
        proxy["identity"] == spiffe_id,
        "{id}: identity {} instead of {spiffe_id}: {proxy}",
        proxy["identity"]
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
    Ok(())
}
