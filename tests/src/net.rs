//! Loopback ports.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// `127.0.0.1`: tests only ever bind and send to loopback addresses.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A port that was free on `ip` a moment ago (bind `ip:0`, read the port, release it).
///
/// Another process may take it before the caller binds, so prefer letting the process
/// under test bind port 0 itself when it can report the port back.
///
/// Within this process a port is handed out once: the kernel may give a released port
/// out again at once, and a test asking for two ports in a row (xDS, admin) must not get
/// the same one twice.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<(IpAddr, u16)>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    // Holding every candidate until the end keeps the kernel from offering it again.
    let mut held = Vec::new();
    for _ in 0..64 {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
        let port = listener.local_addr()?.port();
        if !handed_out.contains(&(ip, port)) {
            handed_out.push((ip, port));
            return Ok(port);
        }
        held.push(listener);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no port on {ip} that this process has not handed out already"),
    ))
}

/// `ip:<free port>`; see [`free_port`].
pub fn free_addr(ip: IpAddr) -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::new(ip, free_port(ip)?))
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn port_open(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

/// Third octets that [`LoopbackNet::reserve`] hands out. `127.0.1.x`-`127.0.3.x` (the
/// examples' demo mesh) and other low blocks stay free for people running things by hand.
const LOOPBACK_NET_OCTETS: std::ops::RangeInclusive<u8> = 100..=250;

/// Host part and port of the lock socket that marks a block as taken.
const LOOPBACK_NET_LOCK: (u8, u16) = (254, 15999);

/// A block `127.0.X.0/24` of loopback addresses reserved for one test, so that tests whose
/// processes bind fixed ports (e.g. every sidecar on `:9080`) on their own addresses do not
/// collide with each other, with other test processes or with a demo on the machine.
///
/// The reservation is a listening socket on `127.0.X.254:15999`, held while this value
/// lives: a second `reserve` anywhere on the machine sees that bind fail and moves on to
/// the next block. Every address of the block other than `.254` is free for the test.
#[derive(Debug)]
pub struct LoopbackNet {
    octet: u8,
    _lock: TcpListener,
}

impl LoopbackNet {
    /// Reserves a free block, starting the search at one derived from `seed` (e.g. the test
    /// name) and this process id, so concurrent tests usually get distinct blocks at once.
    pub fn reserve(seed: &str) -> std::io::Result<Self> {
        let mut hasher = DefaultHasher::new();
        seed.hash(&mut hasher);
        std::process::id().hash(&mut hasher);
        let (first, last) = (*LOOPBACK_NET_OCTETS.start(), *LOOPBACK_NET_OCTETS.end());
        let span = u64::from(last - first) + 1;
        let start = hasher.finish() % span;
        let mut last_err = None;
        for i in 0..span {
            let octet = first + u8::try_from((start + i) % span).unwrap_or(0);
            let lock = SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, octet, LOOPBACK_NET_LOCK.0)),
                LOOPBACK_NET_LOCK.1,
            );
            match TcpListener::bind(lock) {
                Ok(listener) => {
                    return Ok(Self {
                        octet,
                        _lock: listener,
                    })
                }
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("no loopback block free")))
    }

    /// The `X` of `127.0.X.0/24`.
    pub fn octet(&self) -> u8 {
        self.octet
    }

    /// `127.0.X.host`.
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, self.octet, host))
    }
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

    #[test]
    fn loopback_nets_are_exclusive() {
        let a = LoopbackNet::reserve("same-seed").expect("reserve");
        let b = LoopbackNet::reserve("same-seed").expect("reserve");
        assert_ne!(a.octet(), b.octet());
        assert!(LOOPBACK_NET_OCTETS.contains(&a.octet()));
        let ip = a.ip(7);
        assert_eq!(ip.to_string(), format!("127.0.{}.7", a.octet()));
        // The block's addresses are bindable.
        TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind in block");
    }
}
