//! `xds-server ca ...`: talks to a running server's admin API (plain HTTP/1.1 on
//! loopback, so a few lines of std networking instead of an HTTP client dependency).

use super::CaCommand;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!("cannot reach the admin API at {addr} (is xds-server running?)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .with_context(|| format!("cannot read the answer of {addr}{path}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer from {addr}{path}"))?;
    // axum answers small bodies with Content-Length, never chunked.
    Ok((status, body.to_string()))
}

fn status_json(addr: SocketAddr) -> Result<serde_json::Value> {
    let (code, body) = request(addr, "GET", "/debug/ca")?;
    if code != 200 {
        bail!("{}", body.trim());
    }
    serde_json::from_str(&body)
        .context("the admin API answered /debug/ca with something other than JSON")
}

fn progress_line(v: &serde_json::Value) -> String {
    let phase = v["rotation"]["phase"].as_str().unwrap_or("done");
    let pending = v["pending"].as_array().map_or(0, Vec::len);
    let with = v["proxies_with_secrets"].as_u64().unwrap_or(0);
    format!(
        "phase {phase:<16} epoch {:<4} proxies acked {}/{with}",
        v["epoch"],
        with.saturating_sub(pending as u64)
    )
}

pub fn ca_command(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Status { admin_addr } => {
            let v = status_json(admin_addr)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        CaCommand::RotateRoot {
            admin_addr,
            no_wait,
            timeout,
        } => {
            let (code, body) = request(admin_addr, "POST", "/ca/rotate-root")?;
            if code != 202 {
                bail!("rotation refused: {}", body.trim());
            }
            let started: serde_json::Value = serde_json::from_str(&body)?;
            println!(
                "root rotation started: new root {} replaces {}",
                started["new_root"].as_str().unwrap_or("?"),
                started["old_root"].as_str().unwrap_or("?")
            );
            if no_wait {
                return Ok(());
            }
            let deadline = Instant::now() + timeout;
            let mut last = String::new();
            loop {
                let v = status_json(admin_addr)?;
                let line = progress_line(&v);
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if v["rotation"].is_null() {
                    println!("root rotation complete");
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "still rotating after {timeout:?} (the rotation goes on; `xds-server ca status` shows which proxies have not ACKed)"
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}
