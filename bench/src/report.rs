//! Figures of a scenario run: the printed table and the JSON file.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Per-client latencies, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub sorted_ms: Vec<f64>,
}

impl Latencies {
    pub fn from_ms(mut v: Vec<f64>) -> Latencies {
        v.sort_by(f64::total_cmp);
        Latencies { sorted_ms: v }
    }
    pub fn p(&self, q: f64) -> f64 {
        percentile_ms(&self.sorted_ms, q)
    }
    pub fn max(&self) -> f64 {
        self.sorted_ms.last().copied().unwrap_or(0.0)
    }
    pub fn min(&self) -> f64 {
        self.sorted_ms.first().copied().unwrap_or(0.0)
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile_ms(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Memory figures of a churn run.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnFigures {
    pub rate_per_s: f64,
    pub duration_s: f64,
    pub changes: u64,
    /// EDS responses a client received during the run (the server coalesces changes).
    pub pushes_per_client: f64,
    pub server_rss_start_bytes: u64,
    pub server_rss_end_bytes: u64,
    pub server_rss_max_bytes: u64,
    pub server_rss_growth_bytes: i64,
}

/// Figures of an `envoy-convergence` run (real Envoy sidecars).
#[derive(Debug, Clone, Serialize)]
pub struct EnvoyFigures {
    pub envoys: usize,
    pub envoy_version: String,
    /// How often each Envoy's admin `/config_dump` was polled after the change.
    pub poll_interval_ms: f64,
    /// Polls made, all Envoys together.
    pub polls: u64,
    /// From starting the Envoys until the last one had its routes.
    pub start_all_ms: f64,
    /// CPU of all Envoys in the measured window (the polls included).
    pub envoy_cpu_s: f64,
    pub envoy_rss_mean_bytes: u64,
    /// From the write until the server saw each Envoy ACK the version it shows
    /// (`/debug/syncz`, wall clock, 1 ms resolution); null without a Trellis admin port.
    pub ack_p50_ms: Option<f64>,
    pub ack_max_ms: Option<f64>,
}

/// Figures of the `relay` scenario's rows (clients through relay processes).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayFigures {
    pub relays: usize,
    /// Proxies connected to the server whose node id starts with `relay~` (its
    /// `/debug/syncz`): the relays' upstream streams, one per proxy class per relay.
    pub upstream_streams: usize,
    /// Every proxy connected to the server.
    pub server_proxies: usize,
    /// Proxies connected to the relays (their `/debug/syncz`, summed).
    pub relay_proxies: usize,
    /// All relay processes: CPU seconds in the measured window, VmRSS and VmHWM after it.
    pub relay_cpu_s: f64,
    pub relay_rss_bytes: u64,
    pub relay_peak_rss_bytes: u64,
    /// The change: mean `trellis_xds_push_latency_seconds` (EDS) over the relays'
    /// downstream pushes (relay state published to response handed to the transport).
    pub relay_push_latency_mean_ms: Option<f64>,
    /// The change: the same change with the clients connected to a fresh server directly.
    pub direct_all_ms: Option<f64>,
    pub direct_server_cpu_s: Option<f64>,
    pub direct_server_rss_bytes: Option<u64>,
}

/// One scenario's figures. Every key is always present; `null` means not measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub mode: &'static str,
    pub clients: usize,
    pub services: usize,
    pub endpoints: usize,
    pub server: String,
    /// Per-client latency percentiles: storm and reconnect from the client's start (or
    /// the restart) to fully synced; changes from the file write to the client's ACK.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From the scenario's start (or the change) until the last client had it.
    pub all_ms: f64,
    /// Until the first client had it (for changes: debounce + reload + first send).
    pub first_ms: f64,
    /// `all_ms - first_ms`: the fan-out alone.
    pub fanout_ms: f64,
    /// Storm and reconnect: until the client's ADS stream was open (TCP, HTTP/2, response
    /// headers): the part of the latency that is connection setup.
    pub connect_p50_ms: Option<f64>,
    pub connect_max_ms: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub pushes: u64,
    pub server_cpu_per_push_s: Option<f64>,
    pub client_cpu_s: f64,
    pub server_rss_bytes: Option<u64>,
    pub server_peak_rss_bytes: Option<u64>,
    pub rss_per_proxy_bytes: Option<f64>,
    pub rss_at_clients: Option<usize>,
    /// Mean gRPC bytes (messages + 5-byte headers) a client received in the measured window.
    pub bytes_per_client: f64,
    pub server_push_latency_mean_ms: Option<f64>,
    pub floor_ms: Option<f64>,
    pub floor_p50_ms: Option<f64>,
    pub floor_ratio: Option<f64>,
    /// `fanout_ms / floor_ms`: the server's fan-out against the floor, without debounce.
    pub floor_fanout_ratio: Option<f64>,
    pub floor_server_cpu_s: Option<f64>,
    pub floor_bytes_per_client: Option<u64>,
    pub nacks: u64,
    /// ADS streams that ended in an error, summed over clients, during the scenario.
    pub stream_failures: u64,
    pub churn: Option<ChurnFigures>,
    pub envoy: Option<EnvoyFigures>,
    pub relay: Option<RelayFigures>,
    pub notes: Vec<String>,
}

impl ScenarioResult {
    pub fn set_latencies(&mut self, l: &Latencies, all_ms: f64, first_ms: f64) {
        self.p50_ms = l.p(50.0);
        self.p99_ms = l.p(99.0);
        self.max_ms = l.max();
        self.all_ms = all_ms;
        self.first_ms = first_ms;
        self.fanout_ms = (all_ms - first_ms).max(0.0);
    }

    pub fn set_floor(&mut self, floor_ms: f64, p50_ms: f64, cpu_s: f64, bytes: u64) {
        self.floor_ms = Some(floor_ms);
        self.floor_p50_ms = Some(p50_ms);
        self.floor_server_cpu_s = Some(cpu_s);
        self.floor_bytes_per_client = Some(bytes);
        if floor_ms > 0.0 {
            self.floor_ratio = Some(self.all_ms / floor_ms);
            self.floor_fanout_ratio = Some(self.fanout_ms / floor_ms);
        }
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1}", b as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "-".into())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// The table of results, one row per scenario, then each scenario's notes.
pub fn table(results: &[ScenarioResult]) -> String {
    let header = [
        "scenario",
        "mode",
        "clients",
        "mesh",
        "p50 ms",
        "p99 ms",
        "max ms",
        "all ms",
        "fanout ms",
        "floor ms",
        "x floor",
        "srv cpu s",
        "cli cpu s",
        "srv rss MiB",
        "peak MiB",
        "rss/proxy KiB",
        "B/client",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.scenario.clone(),
                r.mode.to_string(),
                r.clients.to_string(),
                format!("{}x{}", r.services, r.endpoints),
                format!("{:.1}", r.p50_ms),
                format!("{:.1}", r.p99_ms),
                format!("{:.1}", r.max_ms),
                format!("{:.1}", r.all_ms),
                format!("{:.1}", r.fanout_ms),
                opt(r.floor_ms, 1),
                opt(r.floor_ratio, 1),
                opt(r.server_cpu_s, 3),
                format!("{:.3}", r.client_cpu_s),
                mib(r.server_rss_bytes),
                mib(r.server_peak_rss_bytes),
                opt(r.rss_per_proxy_bytes.map(|b| b / 1024.0), 1),
                format!("{:.0}", r.bytes_per_client),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    for r in results {
        if let Some(c) = &r.churn {
            out.push_str(&format!(
                "{} {}: {} changes in {:.0} s, {:.1} pushes per client; server RSS {} -> {} MiB (max {})\n",
                r.scenario,
                r.mode,
                c.changes,
                c.duration_s,
                c.pushes_per_client,
                mib(Some(c.server_rss_start_bytes)),
                mib(Some(c.server_rss_end_bytes)),
                mib(Some(c.server_rss_max_bytes)),
            ));
        }
        if let Some(rl) = &r.relay {
            out.push_str(&format!(
                "{} {}: {} relays; at the server {} upstream streams (relay~) of {} proxies, for {} clients ({} at the relays); relays: CPU {:.3} s, RSS {} MiB (peak {})\n",
                r.scenario,
                r.mode,
                rl.relays,
                rl.upstream_streams,
                rl.server_proxies,
                r.clients,
                rl.relay_proxies,
                rl.relay_cpu_s,
                mib(Some(rl.relay_rss_bytes)),
                mib(Some(rl.relay_peak_rss_bytes)),
            ));
        }
        for n in &r.notes {
            out.push_str(&format!("{} {}: {n}\n", r.scenario, r.mode));
        }
    }
    out
}

/// Writes one scenario as an object, several as an array.
pub fn write_json(path: &Path, results: &[ScenarioResult]) -> Result<()> {
    let text = if results.len() == 1 {
        serde_json::to_string_pretty(&results[0])?
    } else {
        serde_json::to_string_pretty(results)?
    };
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latencies::from_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(l.p(50.0), 2.0);
        assert_eq!(l.p(99.0), 4.0);
        assert_eq!(l.p(0.0), 1.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }
}
