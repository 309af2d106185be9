//! N simulated Envoys as tokio tasks, one HTTP/2 connection (the `h2` crate, no tonic or
//! hyper) and one ADS stream each, with shared counters the scenarios read.
//!
//! Each client is one task that drives its connection and its stream: it writes
//! gRPC-framed requests (assembled by [`crate::client::Envoy`] straight into one send
//! buffer per client), reads DATA frames, releases their flow-control capacity as it
//! consumes them, and hands each gRPC message to the state machine: a slice of the
//! received frame when the message lies within one, else a copy in the thread's
//! reassembly buffer (see [`Assembler`]).

use crate::client::{Envoy, Kind, Mode, Scan};
use crate::mesh::client_address;
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// HTTP/2 receive windows of every client connection: Envoy's defaults for its gRPC
/// (xDS) connections (`Http2ProtocolOptions.initial_stream_window_size` and
/// `initial_connection_window_size`: 256 MiB each), so the server is never held back
/// by flow control more than by a real Envoy. The floor's clients use the same.
pub const STREAM_WINDOW: u32 = 256 << 20;
pub const CONN_WINDOW: u32 = 256 << 20;
/// gRPC framing: compression flag + 4-byte length before every message.
pub const GRPC_HEADER: u64 = crate::client::GRPC_HEADER as u64;

/// `CLOCK_MONOTONIC` in nanoseconds (never 0, which means "not yet"): one clock for the
/// bench and its fleet shards (child processes, see [`crate::shard`]).
pub fn now_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
        .max(1)
}

/// Splits the DATA frames of a stream into gRPC messages. A message that lies within
/// one frame is handed on as a slice of it; one spread over several frames is kept as
/// the frames' slices (no copy) and, once complete, copied into a buffer of the thread
/// that is reused for every client: ten thousand clients hold no reassembly buffers,
/// and the copy goes to memory that is warm in the cache.
#[derive(Debug, Default)]
pub struct Assembler {
    /// A gRPC header cut by a frame boundary.
    head: [u8; GRPC_HEADER as usize],
    head_len: usize,
    /// The message being read: its length (None: reading a header) and its parts so far.
    need: Option<usize>,
    parts: Vec<Bytes>,
    have: usize,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Assembler {
    /// Feeds the next DATA frame's payload; calls `on` for every complete message.
    pub fn feed(&mut self, mut data: Bytes, mut on: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        const H: usize = GRPC_HEADER as usize;
        loop {
            let need = match self.need {
                Some(n) => n,
                None => {
                    let head: [u8; H] = if self.head_len == 0 && data.len() >= H {
                        let h = [data[0], data[1], data[2], data[3], data[4]];
                        bytes::Buf::advance(&mut data, H);
                        h
                    } else {
                        let take = (H - self.head_len).min(data.len());
                        self.head[self.head_len..self.head_len + take]
                            .copy_from_slice(&data[..take]);
                        self.head_len += take;
                        bytes::Buf::advance(&mut data, take);
                        if self.head_len < H {
                            return Ok(());
                        }
                        self.head_len = 0;
                        self.head
                    };
                    if head[0] != 0 {
                        bail!("compressed gRPC messages are not supported");
                    }
                    let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    self.need = Some(n);
                    n
                }
            };
            if self.parts.is_empty() && data.len() >= need {
                // The common case: the whole message in this frame.
                on(&data[..need])?;
                bytes::Buf::advance(&mut data, need);
                self.need = None;
                continue;
            }
            if data.is_empty() {
                return Ok(());
            }
            let take = (need - self.have).min(data.len());
            self.parts.push(data.split_to(take));
            self.have += take;
            if self.have < need {
                return Ok(());
            }
            let r = SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.clear();
                for p in &self.parts {
                    s.extend_from_slice(p);
                }
                on(&s)
            });
            self.parts.clear();
            self.have = 0;
            self.need = None;
            r?;
        }
    }

    /// Nothing half-read.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.need.is_none() && self.head_len == 0
    }
}

/// Change numbers a client has seen (see [`crate::mesh`] markers), with when.
#[derive(Debug, Default)]
pub struct MarkerLog {
    pub max: AtomicU64,
    pub log: Mutex<Vec<(u64, u64)>>,
}

impl MarkerLog {
    fn record(&self, seq: u64, at: u64) {
        if seq > self.max.load(Relaxed) {
            self.max.store(seq, Relaxed);
            if let Ok(mut l) = self.log.lock() {
                l.push((seq, at));
            }
        }
    }

    /// When the client first saw a change numbered `seq` or later.
    pub fn first_at_least(&self, seq: u64) -> Option<u64> {
        let l = self.log.lock().ok()?;
        l.iter().find(|(s, _)| *s >= seq).map(|(_, at)| *at)
    }
}

/// What one client has done, readable by the scenarios.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub index: usize,
    pub started_ns: AtomicU64,
    pub synced: AtomicBool,
    /// Last transition to synced.
    pub synced_ns: AtomicU64,
    /// Streams that got response headers.
    pub streams: AtomicU64,
    /// When the last stream got its response headers (connection and stream open).
    pub stream_ns: AtomicU64,
    pub stream_failures: AtomicU64,
    pub responses: [AtomicU64; 4],
    /// gRPC bytes (message + 5-byte header) received, per type.
    pub bytes: [AtomicU64; 4],
    pub nacks: AtomicU64,
    /// Clusters the client holds.
    pub clusters: AtomicU64,
    /// EDS (0) and RDS (1) change markers.
    pub markers: [MarkerLog; 2],
    pub last_error: Mutex<Option<String>>,
}

impl ClientStats {
    pub fn bytes_of(&self, k: Kind) -> u64 {
        self.bytes[k.idx()].load(Relaxed)
    }

    fn set_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Where clients connect: client `i` to `addrs[i % addrs.len()]` (the server, or
    /// the relays in the relay scenario).
    pub addrs: Vec<SocketAddr>,
    /// 0: every client is a sidecar of its own (unknown) workload, in the control
    /// plane's cluster. `k > 0`: client `i` is an outbound-only proxy of namespace
    /// `bench` in member cluster `r{i % k}` (node metadata `CLUSTER_ID`), the cluster of
    /// the relay at `addrs[i % addrs.len()]` when there are `k` relays.
    pub clusters: usize,
    pub mode: Mode,
    /// Clients with an index below `nack_clients` NACK every response of `nack`.
    pub nack: Option<Kind>,
    pub nack_clients: usize,
    /// Envoy's ADS retry: jittered exponential backoff (500 ms base, 30 s cap).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Streams one client opens at most (bounds reconnect loops).
    pub max_streams: u32,
    pub connect_timeout: Duration,
}

/// Which change markers the clients look for right now (scanning costs CPU).
#[derive(Debug, Default)]
pub struct Probes {
    pub eds: AtomicBool,
    pub rds: AtomicBool,
}

impl Probes {
    fn scan(&self) -> Scan {
        Scan {
            eds: self.eds.load(Relaxed),
            rds: self.rds.load(Relaxed),
        }
    }
}

pub struct Fleet {
    pub clients: Vec<Arc<ClientStats>>,
    pub probes: Arc<Probes>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts clients `range` (their indexes pick node ids and source addresses) at once.
    pub fn spawn(cfg: &FleetConfig, range: Range<usize>) -> Result<Fleet> {
        let path = match cfg.mode {
            Mode::Sotw => SOTW_PATH,
            Mode::Delta => DELTA_PATH,
        };
        if cfg.addrs.is_empty() {
            bail!("no server address");
        }
        let uris = cfg
            .addrs
            .iter()
            .map(|a| format!("http://{a}{path}").parse::<http::Uri>())
            .collect::<Result<Vec<_>, _>>()
            .context("bad server address")?;
        let cfg = Arc::new((cfg.clone(), uris));
        let probes = Arc::new(Probes::default());
        let mut tasks = JoinSet::new();
        let mut clients = Vec::with_capacity(range.len());
        for index in range {
            let stats = Arc::new(ClientStats {
                index,
                ..Default::default()
            });
            tasks.spawn(run(cfg.clone(), stats.clone(), probes.clone()));
            clients.push(stats);
        }
        Ok(Fleet {
            clients,
            probes,
            tasks,
        })
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Polls until `pred` holds for every client; returns when it first did. Each poll
    /// resumes at the first client that was missing (a full pass confirms the end), so
    /// waiting on ten thousand clients costs little.
    pub async fn wait_all(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClientStats) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut from = 0;
        loop {
            match self.clients[from..].iter().position(|c| !pred(c)) {
                Some(i) => from += i,
                None if from == 0 => return Ok(Instant::now()),
                // Everyone from `from` on: confirm the ones before (a client can fall
                // back, e.g. on a reconnect).
                None => {
                    from = 0;
                    continue;
                }
            }
            if Instant::now() > deadline {
                let missing = self.clients.iter().filter(|c| !pred(c)).count();
                let err = self
                    .clients
                    .iter()
                    .filter(|c| !pred(c))
                    .find_map(|c| c.last_error.lock().ok().and_then(|e| e.clone()));
                bail!(
                    "{what}: {missing} of {} clients not there after {timeout:?}{}",
                    self.clients.len(),
                    err.map(|e| format!(" (a client's last error: {e})"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn wait_synced(&self, timeout: Duration) -> Result<Instant> {
        self.wait_all("sync", timeout, |c| c.synced.load(Relaxed))
            .await
    }

    /// Stops every client (their connections close).
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}

/// The name of member cluster `k` (and of its relay) in the relay scenario.
pub fn member_cluster(k: usize) -> String {
    format!("r{k}")
}

/// xorshift64*: jitter without a dependency.
fn next_rand(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

async fn run(
    cfg: Arc<(FleetConfig, Vec<http::Uri>)>,
    stats: Arc<ClientStats>,
    probes: Arc<Probes>,
) {
    let (cfg, uris) = (&cfg.0, &cfg.1);
    stats.started_ns.store(now_ns(), Relaxed);
    let nack = (stats.index < cfg.nack_clients)
        .then_some(cfg.nack)
        .flatten();
    let target = stats.index % cfg.addrs.len();
    let (addr, uri) = (cfg.addrs[target], &uris[target]);
    let node = match cfg.clusters {
        0 => crate::client::node(stats.index),
        k => crate::client::member_node(stats.index, &member_cluster(stats.index % k)),
    };
    let mut envoy = Envoy::with_node(cfg.mode, node, nack);
    let mut rng = (stats.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ns();
    let mut attempt: u32 = 0;
    let mut bufs = Buffers::default();
    for _ in 0..cfg.max_streams {
        match one_stream(cfg, addr, uri, &mut envoy, &stats, &probes, &mut bufs).await {
            Ok(true) => attempt = 0,
            Ok(false) => {}
            Err(e) => {
                stats.stream_failures.fetch_add(1, Relaxed);
                stats.set_error(format!("{e:#}"));
                tracing::debug!(client = stats.index, error = %e, "ADS stream ended");
            }
        }
        stats.synced.store(false, Relaxed);
        bufs = Buffers::default();
        // Envoy: a random delay below min(base * 2^attempt, max).
        let ceiling = cfg
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(cfg.backoff_max)
            .as_millis()
            .max(1) as u64;
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(next_rand(&mut rng) % ceiling)).await;
    }
}

/// A client's buffers, kept across the messages of a stream.
#[derive(Default)]
struct Buffers {
    /// Requests to send (gRPC-framed), handed to h2 as one chunk per response.
    send: BytesMut,
    /// Messages split over DATA frames.
    assembler: Assembler,
}

/// One connection and ADS stream until it ends; `Ok(true)` if it got at least one response.
async fn one_stream(
    cfg: &FleetConfig,
    addr: SocketAddr,
    uri: &http::Uri,
    envoy: &mut Envoy,
    stats: &ClientStats,
    probes: &Probes,
    bufs: &mut Buffers,
) -> Result<bool> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(client_address(stats.index).into(), 0))?;
    sock.set_nodelay(true)?;
    let tcp = tokio::time::timeout(cfg.connect_timeout, sock.connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let (client, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp)
        .await?;
    // One task drives both: the stream's work, and the connection (reads, writes,
    // window updates) whenever the stream waits.
    let work = stream(client, uri, envoy, stats, probes, bufs);
    tokio::select! {
        biased;
        r = work => r,
        r = &mut conn => {
            r?;
            bail!("the server closed the connection")
        }
    }
}

async fn stream(
    client: h2::client::SendRequest<Bytes>,
    uri: &http::Uri,
    envoy: &mut Envoy,
    stats: &ClientStats,
    probes: &Probes,
    bufs: &mut Buffers,
) -> Result<bool> {
    let mut client = client.ready().await?;
    let req = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())?;
    let (response, mut tx) = client.send_request(req, false)?;
    envoy.start_stream(&mut bufs.send);
    tx.send_data(bufs.send.split().freeze(), false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("HTTP status {}", response.status());
    }
    // A trailers-only response: the stream failed at once.
    grpc_status(response.headers())?;
    stats.stream_ns.store(now_ns(), Relaxed);
    stats.streams.fetch_add(1, Relaxed);
    let mut body = response.into_body();
    let mut got = false;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        let send = &mut bufs.send;
        bufs.assembler.feed(chunk, |msg| {
            got = true;
            on_message(msg, envoy, stats, probes, send)
        })?;
        let _ = body.flow_control().release_capacity(n);
        if !bufs.send.is_empty() {
            tx.send_data(bufs.send.split().freeze(), false)?;
        }
    }
    if let Some(trailers) = body.trailers().await? {
        grpc_status(&trailers)?;
    }
    Ok(got)
}

/// Fails on a `grpc-status` other than 0 (OK).
fn grpc_status(headers: &http::HeaderMap) -> Result<()> {
    match headers.get("grpc-status").map(|v| v.as_bytes()) {
        None | Some(b"0") => Ok(()),
        Some(code) => {
            let message = headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).to_string())
                .unwrap_or_default();
            bail!("grpc-status {}: {message}", String::from_utf8_lossy(code))
        }
    }
}

/// One response: the state machine answers into `send`; the counters follow.
fn on_message(
    msg: &[u8],
    envoy: &mut Envoy,
    stats: &ClientStats,
    probes: &Probes,
    send: &mut BytesMut,
) -> Result<()> {
    let out = envoy.on_message(msg, probes.scan(), send)?;
    let now = now_ns();
    let k = out.kind.idx();
    stats.responses[k].fetch_add(1, Relaxed);
    stats.bytes[k].fetch_add(msg.len() as u64 + GRPC_HEADER, Relaxed);
    if out.nacked {
        stats.nacks.fetch_add(1, Relaxed);
    }
    if let Some(m) = out.marker {
        let slot = if out.kind == Kind::Eds { 0 } else { 1 };
        stats.markers[slot].record(m, now);
    }
    stats.clusters.store(envoy.cluster_count() as u64, Relaxed);
    let synced = envoy.is_synced();
    if synced && !stats.synced.load(Relaxed) {
        stats.synced_ns.store(now, Relaxed);
    }
    stats.synced.store(synced, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn assembler_reassembles_messages_across_any_split() {
        let big = vec![7u8; 100_000];
        let msgs: Vec<&[u8]> = vec![b"a", b"", b"hello", &big, b"z"];
        let wire = Bytes::from(framed(&msgs));
        for chunk in [1, 2, 3, 4, 5, 6, 7, 16_384, wire.len()] {
            let mut a = Assembler::default();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let end = (at + chunk).min(wire.len());
                a.feed(wire.slice(at..end), |m| {
                    got.push(m.to_vec());
                    Ok(())
                })
                .unwrap();
                at = end;
            }
            assert!(a.is_idle(), "chunk {chunk}");
            assert_eq!(got.len(), msgs.len(), "chunk {chunk}");
            for (g, m) in got.iter().zip(&msgs) {
                assert_eq!(g.as_slice(), *m, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn assembler_rejects_compressed_messages() {
        let mut a = Assembler::default();
        let r = a.feed(Bytes::from_static(&[1, 0, 0, 0, 1, 9]), |_| Ok(()));
        assert!(r.is_err());
    }
}
