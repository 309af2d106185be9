//! The test DNS server (`dns` binary): lets Envoy resolve the hosts of `resolution: DNS`
//! ServiceEntries and remote JWKS URIs to loopback addresses.

use crate::{cargo_bin, free_port, ChildGuard};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

/// Starts the DNS server on a free port of `ip`, answering each `(name, address)` of
/// `records`; returns it with the address to give `MeshConfig.dnsResolvers`. Its log (every
/// query) is in `dir`.
pub fn start_dns(
    dir: &Path,
    ip: IpAddr,
    records: &[(&str, IpAddr)],
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let addr = SocketAddr::new(ip, free_port(ip)?);
    let mut command = Command::new(cargo_bin("dns"));
    command.arg("--listen").arg(addr.to_string());
    for (name, target) in records {
        command.arg("--record").arg(format!("{name}={target}"));
    }
    let dns = ChildGuard::spawn("dns", command, dir)?;
    Ok((dns, addr))
}
