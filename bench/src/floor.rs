//! The floor: how fast the same bytes reach the same number of HTTP/2 streams when the
//! server does nothing but write pre-built gRPC frames (h2 crate, no xDS, no protobuf).
//!
//! The floor server runs as a child process (`xds-bench floor-serve`, like the real
//! server: its own CPU, its own file descriptors). Each client is a plain h2 connection
//! with one stream that reads until it has the expected number of bytes. Two shapes:
//! - storm: the server writes the frames as soon as a stream arrives; the clock runs
//!   from the moment all clients start connecting (like the `storm` scenario);
//! - push: all clients connect first; the clock runs from the trigger (a line on the
//!   server's stdin) until the last client has everything.
//!
//! The floor server listens with the largest accept queue the kernel allows, so a
//! connection storm against it shows what a server could do; a server listening with
//! the std/mio default of 128 drops SYNs in a storm of more than that (clients retry
//! after 1 s), and the storm's floor ratio shows it.

use crate::fleet::{now_ns, CONN_WINDOW, GRPC_HEADER, STREAM_WINDOW};
use crate::mesh::client_address;
use crate::report::Latencies;
use crate::server::{proc_stats, ChildGuard};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// gRPC frames (5-byte header + zero payload) for messages of these sizes, back to back.
pub fn frames(message_sizes: &[u64]) -> Bytes {
    let total: u64 = message_sizes.iter().map(|m| m + GRPC_HEADER).sum();
    let mut b = BytesMut::with_capacity(total as usize);
    for &m in message_sizes {
        b.put_u8(0);
        b.put_u32(m as u32);
        b.put_bytes(0, m as usize);
    }
    b.freeze()
}

/// Listen backlog of the floor server.
const LISTEN_BACKLOG: u32 = 65_535;

/// Connection attempts per floor client.
const CLIENT_ATTEMPTS: u32 = 5;

type Streams = Arc<Mutex<Vec<h2::SendStream<Bytes>>>>;

/// The child process: `xds-bench floor-serve --frames SIZES [--on-accept]`.
/// Prints `listening ADDR`; on `push` (stdin) writes the frames to every stream and
/// prints `pushed`; exits at EOF.
pub async fn serve_main(message_sizes: &[u64], on_accept: bool) -> Result<()> {
    let payload = frames(message_sizes);
    // The kernel's largest accept queue (net.core.somaxconn caps it), not the 128 that
    // std/mio use by default: the floor is what a server could do.
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener: TcpListener = socket.listen(LISTEN_BACKLOG)?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let streams: Streams = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = accepted?;
                tokio::spawn(connection(tcp, streams.clone(), on_accept.then(|| payload.clone())));
            }
            line = rx.recv() => match line.as_deref() {
                Some("push") => {
                    let mut n = 0;
                    if let Ok(mut all) = streams.lock() {
                        for s in all.iter_mut() {
                            if s.send_data(payload.clone(), false).is_ok() {
                                n += 1;
                            }
                        }
                    }
                    println!("pushed {n}");
                    std::io::stdout().flush()?;
                }
                Some(_) => {}
                None => return Ok(()),
            }
        }
    }
}

async fn connection(tcp: TcpStream, streams: Streams, payload: Option<Bytes>) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((_req, mut respond))) = conn.accept().await {
        let resp = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(());
        let Ok(resp) = resp else { continue };
        let Ok(mut send) = respond.send_response(resp, false) else {
            continue;
        };
        if let Some(p) = &payload {
            let _ = send.send_data(p.clone(), false);
        }
        if let Ok(mut all) = streams.lock() {
            all.push(send);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Storm,
    Push,
}

#[derive(Debug, Clone)]
pub struct FloorResult {
    /// Per client: from its own start (storm) or the trigger (push).
    pub p50_ms: f64,
    /// From the start (storm) or trigger (push) until the last client had everything.
    pub all_ms: f64,
    pub server_cpu_s: f64,
    pub bytes_per_client: u64,
}

/// Runs the floor for `clients` streams receiving messages of `message_sizes`.
pub async fn measure(
    clients: usize,
    message_sizes: &[u64],
    shape: Shape,
    timeout: Duration,
) -> Result<FloorResult> {
    if message_sizes.is_empty() {
        bail!("the floor needs at least one message size");
    }
    let exe = std::env::current_exe().context("cannot find the xds-bench executable")?;
    let (mut child, addr) = start_server(&exe, message_sizes, shape)?;
    let expected: u64 = message_sizes.iter().map(|m| m + GRPC_HEADER).sum();
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new((0..clients).map(|_| AtomicBool::new(false)).collect());
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let cpu0 = proc_stats(child.pid)?.cpu_s;
    let t0_storm = now_ns();
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let (ready, done, started) = (ready.clone(), done.clone(), started.clone());
        tasks.spawn(async move {
            started[i].store(now_ns(), Relaxed);
            // A connect can fail under a SYN flood (a SYN cookie the kernel rejects);
            // xDS clients retry too, so the floor retries at once, a bounded number of times.
            for attempt in 0..CLIENT_ATTEMPTS {
                match client(i, addr, expected, &ready[i], &done[i]).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(client = i, attempt, error = %e, "floor client failed")
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + timeout;
    let wait = |cond: &dyn Fn() -> bool, what: &str| -> Result<bool> {
        if cond() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("floor: {what} not reached after {timeout:?}");
        }
        Ok(false)
    };
    let t0 = match shape {
        Shape::Storm => t0_storm,
        Shape::Push => {
            while !wait(
                &|| ready.iter().all(|r| r.load(Relaxed)),
                "all streams open",
            )? {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let t0 = now_ns();
            let stdin = child
                .child_mut()
                .and_then(|c| c.stdin.as_mut())
                .ok_or_else(|| anyhow!("floor server has no stdin"))?;
            stdin.write_all(b"push\n")?;
            stdin.flush()?;
            t0
        }
    };
    let all_done = || done.iter().all(|d| d.load(Relaxed) != 0);
    while !wait(&all_done, "all bytes received")? {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu1 = proc_stats(child.pid)?.cpu_s;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    child.kill();
    let last = done.iter().map(|d| d.load(Relaxed)).max().unwrap_or(t0);
    let per_client: Vec<f64> = done
        .iter()
        .zip(started.iter())
        .map(|(d, s)| {
            let from = if shape == Shape::Storm {
                s.load(Relaxed)
            } else {
                t0
            };
            d.load(Relaxed).saturating_sub(from) as f64 / 1e6
        })
        .collect();
    Ok(FloorResult {
        p50_ms: Latencies::from_ms(per_client).p(50.0),
        all_ms: last.saturating_sub(t0) as f64 / 1e6,
        server_cpu_s: cpu1 - cpu0,
        bytes_per_client: expected,
    })
}

fn start_server(exe: &Path, sizes: &[u64], shape: Shape) -> Result<(ChildGuard, SocketAddr)> {
    let mut cmd = Command::new(exe);
    cmd.arg("floor-serve")
        .arg("--frames")
        .arg(
            sizes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if shape == Shape::Storm {
        cmd.arg("--on-accept");
    }
    let mut guard = ChildGuard::spawn(cmd, "the floor server")?;
    let stdout = guard
        .child_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| anyhow!("floor server has no stdout"))?;
    // One line, read on a thread so a hung child cannot hang the bench.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = String::new();
        while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the floor server did not start"))?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("unexpected floor server output: {line:?}"))?;
    Ok((guard, addr))
}

async fn client(
    i: usize,
    addr: SocketAddr,
    expected: u64,
    ready: &AtomicBool,
    done: &AtomicU64,
) -> Result<()> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(client_address(i).into(), 0))?;
    sock.set_nodelay(true)?;
    let tcp = sock.connect(addr).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await?;
    let work = async move {
        let mut send = send.ready().await?;
        let req = http::Request::post(format!("http://{addr}/floor"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (resp, _request_body) = send.send_request(req, false)?;
        let resp = resp.await?;
        ready.store(true, Relaxed);
        let mut body = resp.into_body();
        let mut got: u64 = 0;
        while got < expected {
            match body.data().await {
                Some(Ok(chunk)) => {
                    got += chunk.len() as u64;
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Some(Err(e)) => return Err(e.into()),
                None => bail!("floor stream ended after {got} of {expected} bytes"),
            }
        }
        done.store(now_ns(), Relaxed);
        // Hold the stream open until the measurement ends (the task is aborted).
        std::future::pending::<()>().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = conn => r.map_err(anyhow::Error::from),
        r = work => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_grpc_framed() {
        let f = frames(&[3, 0]);
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
