//! N simulated Envoys as tokio tasks, one HTTP/2 connection (tonic channel) and one ADS
//! stream each, with shared counters the scenarios read.
//!
//! Responses are received as raw bytes ([`RawCodec`]) and handed to the
//! [`crate::client::Envoy`] state machine; requests are pre-encoded bytes.

use crate::client::{Envoy, Kind, Mode, Scan};
use crate::mesh::client_address;
use anyhow::{bail, Result};
use bytes::{BufMut, Bytes};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// HTTP/2 receive windows of every client connection (hyper's defaults, set explicitly
/// so the floor's clients use the very same).
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONN_WINDOW: u32 = 5 << 20;
/// gRPC framing: compression flag + 4-byte length before every message.
pub const GRPC_HEADER: u64 = 5;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench started (never 0, which means "not yet").
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A codec that passes messages through as bytes: requests are encoded by the caller,
/// responses decoded lazily by [`crate::wire`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        use bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
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
    pub addr: SocketAddr,
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
        let cfg = Arc::new(cfg.clone());
        let probes = Arc::new(Probes::default());
        let mut tasks = JoinSet::new();
        let mut clients = Vec::with_capacity(range.len());
        for index in range {
            let stats = Arc::new(ClientStats {
                index,
                ..Default::default()
            });
            let endpoint = Endpoint::from_shared(format!("http://{}", cfg.addr))?
                .local_address(Some(IpAddr::V4(client_address(index))))
                .tcp_nodelay(true)
                .connect_timeout(cfg.connect_timeout)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW);
            tasks.spawn(run(cfg.clone(), endpoint, stats.clone(), probes.clone()));
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

    /// Polls until `pred` holds for every client; returns when it first did.
    pub async fn wait_all(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClientStats) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.clients.iter().filter(|c| !pred(c)).count();
            if missing == 0 {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
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
    cfg: Arc<FleetConfig>,
    endpoint: Endpoint,
    stats: Arc<ClientStats>,
    probes: Arc<Probes>,
) {
    stats.started_ns.store(now_ns(), Relaxed);
    let channel = endpoint.connect_lazy();
    let nack = (stats.index < cfg.nack_clients)
        .then_some(cfg.nack)
        .flatten();
    let mut envoy = Envoy::new(cfg.mode, stats.index, nack);
    let mut rng = (stats.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ns();
    let mut attempt: u32 = 0;
    for _ in 0..cfg.max_streams {
        match one_stream(&cfg, &channel, &mut envoy, &stats, &probes).await {
            Ok(true) => attempt = 0,
            Ok(false) => {}
            Err(e) => {
                stats.stream_failures.fetch_add(1, Relaxed);
                stats.set_error(format!("{e:#}"));
                tracing::debug!(client = stats.index, error = %e, "ADS stream ended");
            }
        }
        stats.synced.store(false, Relaxed);
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

/// One ADS stream until it ends; `Ok(true)` if it got at least one response.
async fn one_stream(
    cfg: &FleetConfig,
    channel: &Channel,
    envoy: &mut Envoy,
    stats: &ClientStats,
    probes: &Probes,
) -> Result<bool> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    for r in envoy.start_stream() {
        tx.send(r).await?;
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(usize::MAX);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static(match cfg.mode {
        Mode::Sotw => SOTW_PATH,
        Mode::Delta => DELTA_PATH,
    });
    let response = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await?;
    stats.stream_ns.store(now_ns(), Relaxed);
    stats.streams.fetch_add(1, Relaxed);
    let mut stream = response.into_inner();
    let mut got = false;
    while let Some(msg) = stream.message().await? {
        got = true;
        let out = envoy.on_message(&msg, probes.scan())?;
        for r in out.requests {
            tx.send(r).await?;
        }
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
    }
    Ok(got)
}
