//! Loopback ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// `127.0.0.1`: tests only ever bind and send to loopback addresses.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A port that was free on `ip` a moment ago (bind `ip:0`, read the port, release it).
///
/// Another process may take it before the caller binds, so prefer letting the process
/// under test bind port 0 itself when it can report the port back.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `ip:<free port>`; see [`free_port`].
pub fn free_addr(ip: IpAddr) -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::new(ip, free_port(ip)?))
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn port_open(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port(LOCALHOST).expect("free port");
        assert_ne!(port, 0);
        let listener = TcpListener::bind((LOCALHOST, port)).expect("bind");
        assert!(port_open(
            listener.local_addr().expect("addr"),
            Duration::from_secs(1)
        ));
    }
}
