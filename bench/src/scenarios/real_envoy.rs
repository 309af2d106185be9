//! `envoy-convergence`: the same policy change as `policy-change`, timed through real
//! Envoys' admin `/config_dump`.

use super::*;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `/debug/syncz` says about the sidecars' RDS: workload → (acked version, when
/// in wall-clock ms), and whether every sidecar is connected and synced.
async fn sidecar_syncz(
    admin: SocketAddr,
    sidecars: &[Sidecar],
) -> Result<(Vec<Option<(String, u64)>>, bool)> {
    let (status, body) = http_get(admin, "/debug/syncz", Duration::from_secs(5)).await?;
    if status != 200 {
        bail!("/debug/syncz answered {status}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("/debug/syncz: not JSON")?;
    let proxies = v
        .get("proxies")
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    let mut all_synced = true;
    let mut out = Vec::with_capacity(sidecars.len());
    for sc in sidecars {
        let p = proxies
            .iter()
            .find(|p| p.get("workload").and_then(|w| w.as_str()) == Some(sc.workload.as_str()));
        let Some(p) = p else {
            all_synced = false;
            out.push(None);
            continue;
        };
        all_synced &= p.get("synced").and_then(|s| s.as_bool()) == Some(true);
        let rds = p.pointer("/types/rds");
        let version = rds
            .and_then(|r| r.get("acked_version"))
            .and_then(|v| v.as_str());
        let at = rds
            .and_then(|r| r.get("acked_at_ms"))
            .and_then(|v| v.as_u64());
        out.push(version.zip(at).map(|(v, at)| (v.to_string(), at)));
    }
    Ok((out, all_synced))
}

/// Received bytes on each sidecar's xDS connection (Envoy's own counter).
async fn sidecar_rx_bytes(clients: &mut [AdminClient]) -> Option<Vec<u64>> {
    const STAT: &str = "cluster.xds-grpc.upstream_cx_rx_bytes_total";
    let path = format!("/stats?filter={STAT}");
    let mut out = Vec::with_capacity(clients.len());
    for c in clients.iter_mut() {
        let (200, body) = c.get(&path, Duration::from_secs(5)).await.ok()? else {
            return None;
        };
        out.push(envoy::stat_value(&String::from_utf8_lossy(&body), STAT)?);
    }
    Some(out)
}

/// Polls one sidecar's route version until it differs from `old`; (when, new version,
/// polls made).
async fn poll_new_version(
    client: &mut AdminClient,
    old: &str,
    every: Duration,
    deadline: Instant,
) -> Result<(u64, String, u64)> {
    let path = envoy::version_path();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() > deadline {
            bail!("still at route version {old} after {polls} polls");
        }
        polls += 1;
        let (status, body) = client.get(&path, Duration::from_secs(5)).await?;
        if status != 200 {
            bail!("config dump answered {status}");
        }
        if let Some(v) = envoy::route_version(&body)? {
            if v != old {
                return Ok((now_ns(), v, polls));
            }
        }
    }
}

/// Real Envoys: N sidecars synced, svc-0's VirtualService changes, per Envoy the time
/// until its admin `/config_dump` shows the new RDS `version_info`.
pub(super) async fn envoy_convergence(
    s: &Settings,
    t: &mut Target,
    r: &mut ScenarioResult,
) -> Result<()> {
    let n = s.envoys;
    if n == 0 {
        bail!("--envoys must be at least 1");
    }
    let envoy_bin = s
        .envoy_bin
        .clone()
        .ok_or_else(|| anyhow!("no Envoy binary (--envoy-bin)"))?;
    let bootstrap_bin = s
        .bootstrap_bin
        .clone()
        .ok_or_else(|| anyhow!("no xds-server binary for `xds-server bootstrap` (--server-bin)"))?;
    let block = t
        .block
        .as_ref()
        .map(|b| b.block)
        .ok_or_else(|| anyhow!("no sidecar address block"))?;
    let config_dir = t
        .mesh
        .as_ref()
        .map(|m| m.dir().to_path_buf())
        .ok_or_else(|| anyhow!("no mesh"))?;
    r.clients = n;
    let tmp = tempfile::Builder::new()
        .prefix("xds-bench-envoy-")
        .tempdir()?;
    let spec = SidecarSpec {
        envoy: &envoy_bin,
        bootstrap_bin: &bootstrap_bin,
        config_dir: &config_dir,
        xds: t.xds,
        delta: s.mode == Mode::Delta,
        block,
        dir: tmp.path(),
    };
    // One admin port for all: each Envoy binds it on its own outbound address.
    let admin_port = free_port()?.port();
    let t_spawn = now_ns();
    // Dropped on every way out (error, panic, Ctrl-C): the Envoys are killed.
    let mut sidecars: Vec<Sidecar> = Vec::with_capacity(n);
    for i in 0..n {
        sidecars.push(envoy::start(&spec, i, admin_port)?);
    }
    let mut clients: Vec<AdminClient> =
        sidecars.iter().map(|c| AdminClient::new(c.admin)).collect();

    // Every Envoy has the routes (and, with a Trellis admin port, the server sees every
    // one of them synced).
    let deadline = Instant::now() + s.timeout;
    let mut old: Vec<Option<String>> = vec![None; n];
    let mut ready_ns = vec![0u64; n];
    let path = envoy::version_path();
    loop {
        for (i, sc) in sidecars.iter_mut().enumerate() {
            if old[i].is_some() {
                continue;
            }
            sc.check_running()?;
            if let Ok((200, body)) = clients[i].get(&path, Duration::from_secs(2)).await {
                if let Some(v) = envoy::route_version(&body)? {
                    old[i] = Some(v);
                    ready_ns[i] = now_ns();
                }
            }
        }
        let missing = old.iter().filter(|v| v.is_none()).count();
        let synced = match (missing, t.admin) {
            (0, Some(admin)) => sidecar_syncz(admin, &sidecars).await?.1,
            (0, None) => true,
            _ => false,
        };
        if synced {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {n} Envoys have no routes (or the server does not see them synced) after {:?}; logs in {}",
                s.timeout,
                tmp.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start_all_ms = ms_between(t_spawn, ready_ns.iter().copied().max().unwrap_or(t_spawn));
    info!(envoys = n, start_all_ms, "Envoys have their routes");
    // Let the Envoys and the server settle (Envoy's own stats flush, the storm of ACKs).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rx0 = sidecar_rx_bytes(&mut clients).await;
    let metrics0 = t.metrics().await;
    let srv0 = t.stats();
    let (env0, _) = envoy::cpu_and_rss(&sidecars);
    let cli0 = client_cpu();

    let deadline = Instant::now() + s.timeout;
    let mut pollers = JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let old = old[i].clone().unwrap_or_default();
        let every = s.envoy_poll;
        pollers.spawn(async move {
            let r = poll_new_version(&mut client, &old, every, deadline).await;
            (i, client, r)
        });
    }
    let Some(mesh) = t.mesh.as_mut() else {
        bail!("no mesh to edit");
    };
    let seq = mesh.change_policy()?;
    let t0 = now_ns();
    let wall0 = wall_ms();
    let mut seen: Vec<Option<u64>> = vec![None; n];
    let mut back: Vec<Option<AdminClient>> = (0..n).map(|_| None).collect();
    let mut polls = 0u64;
    while let Some(joined) = pollers.join_next().await {
        let (i, client, res) = joined.context("an Envoy poller panicked")?;
        let (at, _version, p) = res.with_context(|| sidecars[i].workload.clone())?;
        seen[i] = Some(at);
        back[i] = Some(client);
        polls += p;
    }
    let srv1 = t.stats();
    let (env1, rss) = envoy::cpu_and_rss(&sidecars);
    r.client_cpu_s = client_cpu() - cli0;
    let mut clients: Vec<AdminClient> = back
        .into_iter()
        .zip(&sidecars)
        .map(|(c, sc)| c.unwrap_or_else(|| AdminClient::new(sc.admin)))
        .collect();

    // What the new version holds: the changed route, on every Envoy.
    let marker = format!("{}{seq}", String::from_utf8_lossy(ROUTE_MARKER));
    for (i, c) in clients.iter_mut().enumerate() {
        let (_, body) = c.get(&envoy::routes_path(), Duration::from_secs(5)).await?;
        let text = String::from_utf8_lossy(&body);
        if !text.contains(&format!("\"{marker}\"")) {
            bail!(
                "{} shows a new route version but not the changed route {marker}",
                sidecars[i].workload
            );
        }
    }
    let times: Vec<f64> = seen
        .iter()
        .map(|at| at.map_or(0.0, |at| ms_between(t0, at)))
        .collect();
    let l = Latencies::from_ms(times);
    r.set_latencies(&l, l.max(), l.min());
    set_one_push_figures(r, srv0, srv1);
    r.server_push_latency_mean_ms = push_latency_ms(metrics0, t.metrics().await, Kind::Rds);
    // The server's view: when it saw each Envoy's RDS ACK after the write (one push).
    let mut ack_ms: Vec<f64> = Vec::new();
    if let Some(admin) = t.admin {
        if let Ok((acks, _)) = sidecar_syncz(admin, &sidecars).await {
            ack_ms = acks
                .iter()
                .filter_map(|a| a.as_ref().map(|(_, at)| *at))
                .filter(|at| *at >= wall0)
                .map(|at| (at - wall0) as f64)
                .collect();
        }
    }
    let acks = Latencies::from_ms(ack_ms);
    if let (Some(a), Some(b)) = (rx0, sidecar_rx_bytes(&mut clients).await) {
        let total: u64 = a.iter().zip(&b).map(|(a, b)| b.saturating_sub(*a)).sum();
        r.bytes_per_client = total as f64 / n as f64;
    }
    let envoy_cpu_s = env1 - env0;
    let rss_mean = if rss.is_empty() {
        0
    } else {
        rss.iter().sum::<u64>() / rss.len() as u64
    };
    let version = envoy::version(&envoy_bin);
    r.envoy = Some(EnvoyFigures {
        envoys: n,
        envoy_version: version.clone(),
        poll_interval_ms: s.envoy_poll.as_secs_f64() * 1e3,
        polls,
        start_all_ms,
        envoy_cpu_s,
        envoy_rss_mean_bytes: rss_mean,
        ack_p50_ms: (acks.sorted_ms.len() == n).then(|| acks.p(50.0)),
        ack_max_ms: (acks.sorted_ms.len() == n).then(|| acks.max()),
    });
    r.notes.push(format!(
        "{n} Envoy {version} sidecars (--concurrency 1), started and synced in {start_all_ms:.0} ms; per Envoy from the file write until its admin /config_dump (polled every {:.0} ms, {polls} polls) showed the new RDS version_info",
        s.envoy_poll.as_secs_f64() * 1e3
    ));
    r.notes.push(format!(
        "Envoys used {envoy_cpu_s:.3} s CPU in the window (polls included), RSS {:.1} MiB each; bytes_per_client is Envoy's upstream_cx_rx_bytes_total on the xDS connection (HTTP/2 framing included)",
        rss_mean as f64 / (1 << 20) as f64
    ));
    if let (Some(p50), Some(max)) = (
        r.envoy.as_ref().and_then(|e| e.ack_p50_ms),
        r.envoy.as_ref().and_then(|e| e.ack_max_ms),
    ) {
        r.notes.push(format!(
            "the server's /debug/syncz saw the ACKs of the new version at p50 {p50:.0} ms, max {max:.0} ms (wall clock, 1 ms resolution)"
        ));
    }
    drop(sidecars);
    t.stop();
    Ok(())
}
