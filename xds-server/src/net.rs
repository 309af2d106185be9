//! Bounded cost per connection on every port the control plane (and a relay) listens on.
//!
//! A [`Gate`] admits connections: open connections are counted (a metric per port) and
//! can be capped, in all and per source address. Every admitted connection is a
//! [`Guarded`] stream that closes itself when the peer
//! - has not sent the 24 bytes of an HTTP/2 preface (or a TLS hello) within
//!   [`NetLimits::handshake_timeout`] of connecting: a peer that connects and says
//!   nothing holds no descriptor for long;
//! - has had no ADS stream open for [`NetLimits::idle_timeout`] (streams register with the
//!   connection's [`ConnState`]): a connection that only keeps answering HTTP/2 PINGs
//!   costs a descriptor and a task for nothing.
//!
//! Request sizes and names per request are checked by the ADS streams themselves
//! ([`NetLimits::max_request_bytes`], [`NetLimits::max_names_per_request`]).

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;

/// Bytes of the HTTP/2 client preface: a peer that has not sent this many has not
/// started speaking (a TLS ClientHello is longer too).
const PREFACE_BYTES: u64 = 24;

/// The limits of one listening port; see the README's "Limits" table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLimits {
    /// Open connections at most (`None`: uncapped, still counted).
    pub max_connections: Option<usize>,
    /// Open connections per source IP at most (`None`: uncapped).
    pub max_connections_per_source: Option<usize>,
    /// Time to the first 24 bytes (HTTP/2 preface or TLS hello).
    pub handshake_timeout: Duration,
    /// A connection without an ADS stream for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// One gRPC request message at most, in bytes.
    pub max_request_bytes: usize,
    /// Resource names one xDS request may name (subscribe and unsubscribe together).
    pub max_names_per_request: usize,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_connections: None,
            max_connections_per_source: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            // A relay runs one stream per proxy class over its one connection.
            max_concurrent_streams: 4096,
            max_request_bytes: 4 * 1024 * 1024,
            max_names_per_request: 100_000,
        }
    }
}

/// Why a connection was refused or closed, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxPerSource,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxPerSource => "max_connections_per_source",
        }
    }
}

/// Admits connections to one port and counts them.
#[derive(Debug)]
pub struct Gate {
    pub limits: NetLimits,
    port: &'static str,
    open: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

impl Gate {
    pub fn new(port: &'static str, limits: NetLimits, metrics: Arc<Metrics>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            port,
            open: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `remote`, or says which limit it is past.
    pub fn admit(self: &Arc<Self>, remote: SocketAddr) -> Result<ConnGuard, Refusal> {
        let mut sources = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .limits
            .max_connections
            .is_some_and(|max| self.open() >= max)
        {
            return Err(self.refused(Refusal::MaxConnections, remote));
        }
        let n = sources.entry(remote.ip()).or_insert(0);
        if self
            .limits
            .max_connections_per_source
            .is_some_and(|max| *n >= max)
        {
            if *n == 0 {
                sources.remove(&remote.ip());
            }
            return Err(self.refused(Refusal::MaxPerSource, remote));
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.open_connections(self.port).inc();
        Ok(ConnGuard {
            gate: self.clone(),
            source: remote.ip(),
        })
    }

    fn refused(&self, why: Refusal, remote: SocketAddr) -> Refusal {
        self.metrics.connection_closed(self.port, why.label());
        tracing::warn!(port = self.port, %remote, limit = why.label(), open = self.open(), "connection refused");
        why
    }

    fn release(&self, source: IpAddr) {
        let mut sources = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = sources.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&source);
            }
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.open_connections(self.port).dec();
    }
}

/// One admitted connection; released on drop.
#[derive(Debug)]
pub struct ConnGuard {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gate.release(self.source);
    }
}

/// What the streams of a connection tell it: how many are open, since when none.
#[derive(Debug)]
pub struct ConnState {
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Arc<ConnState> {
        Arc::new(ConnState {
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// Registers a stream for as long as the guard lives.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// How long the connection has had no stream (`None`: it has one).
    fn idle_for(&self) -> Option<Duration> {
        if self.streams.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(since.elapsed())
    }
}

#[derive(Debug)]
pub struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// What a guarded connection tells the services on it (tonic's connect info).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

/// A connection that closes itself past its handshake or idle time (see the module).
pub struct Guarded<T> {
    inner: T,
    remote: Option<SocketAddr>,
    state: Arc<ConnState>,
    read: u64,
    deadline: Pin<Box<Sleep>>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    port: &'static str,
    _guard: ConnGuard,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, remote: Option<SocketAddr>, guard: ConnGuard) -> Guarded<T> {
        let limits = &guard.gate.limits;
        let (handshake_timeout, idle_timeout) = (limits.handshake_timeout, limits.idle_timeout);
        Guarded {
            inner,
            remote,
            state: ConnState::new(),
            read: 0,
            deadline: Box::pin(tokio::time::sleep(handshake_timeout)),
            handshake_timeout,
            idle_timeout,
            port: guard.gate.port,
            _guard: guard,
        }
    }

    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            remote: self.remote,
            state: self.state.clone(),
        }
    }

    /// Whether the connection is past a limit now; else arms the next check.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        while self.deadline.as_mut().poll(cx).is_ready() {
            if self.read < PREFACE_BYTES {
                let why = "handshake_timeout";
                self._guard.gate.metrics.connection_closed(self.port, why);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no HTTP/2 preface or TLS hello within {:?}",
                        self.handshake_timeout
                    ),
                ));
            }
            let next = match self.state.idle_for() {
                Some(idle) if idle >= self.idle_timeout => {
                    self._guard
                        .gate
                        .metrics
                        .connection_closed(self.port, "idle_timeout");
                    tracing::debug!(port = self.port, remote = ?self.remote, "closing a connection without streams");
                    return Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no stream for {:?}", self.idle_timeout),
                    ));
                }
                Some(idle) => self.idle_timeout - idle,
                None => self.idle_timeout,
            };
            self.deadline.as_mut().reset(Instant::now() + next);
        }
        None
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let was = self.read;
                self.read += (buf.filled().len() - before) as u64;
                if was < PREFACE_BYTES && self.read >= PREFACE_BYTES {
                    let next = Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info()
    }
}

/// Accepts from `listener` through `gate`: refused connections are closed at once.
pub fn accept(
    listener: TcpListener,
    gate: Arc<Gate>,
) -> ReceiverStream<io::Result<Guarded<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => return,
            };
            let Some((tcp, (remote, guard))) = accept_one(accepted, &gate) else {
                continue;
            };
            if tx
                .send(Ok(Guarded::new(tcp, Some(remote), guard)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// One accepted connection admitted by `gate` (`None`: refused or failed; the caller
/// goes on accepting).
pub fn accept_one(
    accepted: io::Result<(TcpStream, SocketAddr)>,
    gate: &Arc<Gate>,
) -> Option<(TcpStream, (SocketAddr, ConnGuard))> {
    let (tcp, remote) = match accepted {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "accept failed");
            return None;
        }
    };
    let guard = gate.admit(remote).ok()?;
    let _ = tcp.set_nodelay(true);
    Some((tcp, (remote, guard)))
}

/// An axum listener through a [`Gate`], for admin ports.
pub struct GatedListener {
    pub listener: TcpListener,
    pub gate: Arc<Gate>,
}

impl axum::serve::Listener for GatedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepted = self.listener.accept().await;
            if let Some((tcp, (remote, guard))) = accept_one(accepted, &self.gate) {
                return (Guarded::new(tcp, Some(remote), guard), remote);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The flags of [`NetLimits`], shared by `xds-server serve` and `relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Open connections per port at most (unset: uncapped; always counted in
    /// `trellis_open_connections`).
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections per source IP address and port at most (unset: uncapped).
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Time a new connection has to send its HTTP/2 preface or TLS hello.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection without an ADS stream for this long is closed.
    #[arg(long, default_value = "5m", value_parser = crate::config::parse_duration)]
    pub idle_timeout: Duration,
    /// HTTP/2 streams per connection.
    #[arg(long, default_value_t = 4096)]
    pub max_concurrent_streams: u32,
    /// Largest xDS request message, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Resource names one xDS request may carry.
    #[arg(long, default_value_t = 100_000)]
    pub max_names_per_request: usize,
}

impl From<NetArgs> for NetLimits {
    fn from(a: NetArgs) -> NetLimits {
        NetLimits {
            max_connections: a.max_connections,
            max_connections_per_source: a.max_connections_per_source,
            handshake_timeout: a.handshake_timeout,
            idle_timeout: a.idle_timeout,
            max_concurrent_streams: a.max_concurrent_streams,
            max_request_bytes: a.max_request_bytes,
            max_names_per_request: a.max_names_per_request,
        }
    }
}
