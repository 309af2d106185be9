//! `dns`: a tiny authoritative DNS server for tests, so Envoy can resolve the external
//! hosts of `resolution: DNS` ServiceEntries to loopback addresses.
//!
//! `dns --listen 127.0.0.1:PORT --record httpbin.test=127.0.5.1 [--record ...]` answers A
//! queries (UDP) for its records, NODATA for other types of a known name, and NXDOMAIN for
//! anything else. Names match case-insensitively; a record `*.example.test` answers every
//! name below `example.test`. Every query is logged, so a test can see who asked what.

use anyhow::{bail, Context as _};
use clap::Parser;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::UdpSocket;

#[derive(Debug, Parser)]
#[command(name = "dns", about = "Answers A queries for a fixed set of names")]
struct Args {
    /// UDP address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// NAME=IPV4, repeatable.
    #[arg(long = "record", value_parser = parse_record)]
    records: Vec<(String, Ipv4Addr)>,
}

fn parse_record(s: &str) -> Result<(String, Ipv4Addr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=IPV4"))?;
    let ip = ip
        .parse()
        .map_err(|e| format!("`{ip}` is not an IPv4 address: {e}"))?;
    Ok((name.trim_end_matches('.').to_ascii_lowercase(), ip))
}

/// A query's id, name, type and the end of its question section.
struct Question {
    name: String,
    qtype: u16,
    end: usize,
}

/// Reads the question of a query; `None` for anything malformed (dropped, as servers do).
fn question(packet: &[u8]) -> Option<Question> {
    if packet.len() < 12 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    // At most 127 labels fit a 255-byte name: bound the loop by that, not by the input.
    for _ in 0..128 {
        let len = usize::from(*packet.get(i)?);
        i += 1;
        if len == 0 {
            let qtype = u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]);
            return Some(Question {
                name: labels.join(".").to_ascii_lowercase(),
                qtype,
                end: i + 4,
            });
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(packet.get(i..i + len)?).into_owned());
        i += len;
    }
    None
}

fn lookup(records: &BTreeMap<String, Ipv4Addr>, name: &str) -> Option<Ipv4Addr> {
    if let Some(ip) = records.get(name) {
        return Some(*ip);
    }
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some(ip) = records.get(&format!("*.{parent}")) {
            return Some(*ip);
        }
        rest = parent;
    }
    None
}

fn answer(query: &[u8], q: &Question, found: Option<Ipv4Addr>, known: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&query[..2]);
    // QR, opcode copied, AA, RD copied; RA; rcode NXDOMAIN when the name is unknown.
    out.push(0x84 | (query[2] & 0x79));
    out.push(0x80 | if known { 0 } else { 3 });
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&[0, u8::from(found.is_some())]);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..q.end]);
    if let Some(ip) = found {
        // The name as a pointer to the question, type A, class IN, TTL 5 s, 4 bytes.
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.records.is_empty() {
        bail!("no --record given");
    }
    let records: BTreeMap<String, Ipv4Addr> = args.records.into_iter().collect();
    let socket = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("dns: listening on {}", socket.local_addr()?);
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        let query = &buf[..n];
        let Some(q) = question(query) else {
            eprintln!("dns: malformed query from {peer} dropped");
            continue;
        };
        let ip = lookup(&records, &q.name);
        let found = ip.filter(|_| q.qtype == 1);
        eprintln!("dns: {peer} asked {} type {}: {found:?}", q.name, q.qtype);
        let reply = answer(query, &q, found, ip.is_some());
        if let Err(e) = socket.send_to(&reply, peer).await {
            eprintln!("dns: cannot answer {peer}: {e}");
        }
    }
}
