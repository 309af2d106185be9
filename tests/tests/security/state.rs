//! What the server's admin API and the sidecars' Envoy admin say: sync state, certificates,
//! TLS handshake and stat counters.

use super::*;

impl SecureMesh {
    pub fn syncz(&self) -> anyhow::Result<Value> {
        self.admin_json("/debug/syncz")
    }

    /// `/debug/ca`.
    pub fn ca(&self) -> anyhow::Result<Value> {
        self.admin_json("/debug/ca")
    }

    /// `/debug/configz` errors, for failure messages.
    pub fn config_errors(&self) -> String {
        self.admin_json("/debug/configz")
            .map(|c| c["errors"].to_string())
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// The `/debug/syncz` entries of the connected proxies, by workload (`name.namespace`);
    /// an error if one is connected twice.
    pub fn proxies(&self) -> anyhow::Result<BTreeMap<String, Value>> {
        let syncz = self.syncz()?;
        let proxies = syncz["proxies"]
            .as_array()
            .context("syncz.proxies is not an array")?;
        let mut out = BTreeMap::new();
        for p in proxies {
            let workload = p["workload"].as_str().unwrap_or_default().to_owned();
            ensure!(
                out.insert(workload.clone(), p.clone()).is_none(),
                "{workload} is connected twice: {syncz}"
            );
        }
        Ok(out)
    }

    /// Every started sidecar connected once, in its mode, as its identity, synced, and
    /// holding secrets it ACKed.
    pub fn check_converged(&self) -> anyhow::Result<()> {
        let proxies = self.proxies()?;
        ensure!(
            proxies.len() == self.sidecars.len(),
            "{} proxies connected, expected {}: {:?}",
            proxies.len(),
            self.sidecars.len(),
            proxies.keys()
        );
        for sidecar in &self.sidecars {
            let w = &sidecar.def;
            let id = w.workload_id();
            let proxy = proxies
                .get(&id)
                .ok_or_else(|| anyhow!("{id} is not connected: {:?}", proxies.keys()))?;
            ensure!(
                proxy["mode"] == w.mode(),
                "{id} uses {} instead of {}",
                proxy["mode"],
                w.mode()
            );
            ensure!(
                proxy["identity"] == w.spiffe_id().as_str(),
                "{id}: identity {} instead of {}: {proxy}",
                proxy["identity"],
                w.spiffe_id()
            );
            ensure!(proxy["synced"] == true, "{id} not synced: {proxy}");
            let types = proxy["types"]
                .as_object()
                .context("types is not an object")?;
            for kind in ["cds", "lds"] {
                ensure!(
                    types
                        .get(kind)
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
            let secrets = &proxy["secrets"];
            ensure!(
                !secrets["epoch_sent"].is_null() && secrets["epoch_acked"] == secrets["epoch_sent"],
                "{id}: secrets not sent or not ACKed: {secrets}"
            );
            ensure!(
                secrets["cert_serial"].is_string() && secrets["cert_root"].is_string(),
                "{id}: no certificate recorded: {secrets}"
            );
        }
        Ok(())
    }

    /// Polls [`Self::check_converged`]; fails fast if the server exits meanwhile.
    pub fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut server = self.server.take().context("no server running")?;
        let result = server.wait_until(timeout, POLL, || self.check_converged());
        self.server = Some(server);
        result
    }

    /// Waits until `client` reaches every service over mutual TLS (see [`check_mtls`]),
    /// and its TCP port if it has one.
    pub fn wait_mtls_routing(&self, client: &str) -> anyhow::Result<()> {
        for app in self.services() {
            let mut targets = vec![self.target(client, app)];
            if self
                .workloads
                .iter()
                .any(|w| w.app == app && w.tcp_port.is_some())
            {
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
    /// now (Envoy's `/certs`, `cert_chain` entries): what the data plane really holds.
    pub fn envoy_cert_serials(&self, name: &str) -> anyhow::Result<BTreeSet<String>> {
        let certs = envoy_admin_get(self.sidecar(name).admin, "/certs")?.json()?;
        let mut serials = BTreeSet::new();
        for context in certs["certificates"].as_array().into_iter().flatten() {
            for cert in context["cert_chain"].as_array().into_iter().flatten() {
                if let Some(serial) = cert["serial_number"].as_str() {
                    serials.insert(serial.to_owned());
                }
            }
        }
        ensure!(
            !serials.is_empty(),
            "{name}'s Envoy holds no workload certificate: {certs}"
        );
        Ok(serials)
    }

    /// A counter from a sidecar's Envoy `/stats` (0 when absent).
    pub fn envoy_stat(&self, name: &str, stat: &str) -> anyhow::Result<u64> {
        let stats = envoy_admin_get(
            self.sidecar(name).admin,
            &format!(
                "/stats?filter={}",
                url_encode(&format!("^{}$", regex_escape(stat)))
            ),
        )?
        .text();
        Ok(stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// The sum of the counters of a sidecar's Envoy whose names match `regex` (Envoy's
    /// `/stats?filter=`), e.g. every cluster's `ssl.handshake` towards one service.
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

    /// TLS handshakes `client`'s sidecar made with the cluster of service `app`'s `port`.
    pub fn tls_handshakes(&self, client: &str, port: u16, app: &str) -> anyhow::Result<u64> {
        self.envoy_stat_sum(
            client,
            &format!("^cluster\\.outbound\\|{port}\\|\\|{app}\\..*\\.ssl\\.handshake$"),
        )
    }

    /// Every sidecar's Envoy is still the one started (none crashed).
    #[track_caller]
    pub fn assert_sidecars_running(&mut self) {
        for sidecar in &mut self.sidecars {
            assert!(
                sidecar.envoy.is_running(),
                "envoy of {} exited:\n{}",
                sidecar.def.name,
                sidecar.envoy.log_tail(30)
            );
        }
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

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}
