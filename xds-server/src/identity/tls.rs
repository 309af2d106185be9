//! TLS for the secure port. The rustls config is published through an [`ArcSwap`] and
//! rebuilt whenever the CA's trust state changes or the serving certificate reaches
//! half its life: every handshake picks up the current config, connections already up
//! keep theirs. If a rebuild fails the previous config stays (fail closed: never a
//! config without client verification).

use super::auth::PeerInfo;
use super::{server_identity, write_trust_bundle, IdentityError};
use crate::net::{Gate, Guarded};
use arc_swap::ArcSwap;
use cert_authority::{Authority, SpiffeId, TrustState};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// Lifetime of the serving certificate; renewed at half.
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

/// Builds the secure port's config for `trust`; returns it with the time its serving
/// certificate should be renewed.
pub fn build_config(
    authority: &Authority,
    trust: &TrustState,
    ips: &[IpAddr],
) -> Result<(Arc<ServerConfig>, SystemTime), IdentityError> {
    let id = server_identity(authority.trust_domain());
    let dns = vec![
        "localhost".to_string(),
        "xds-server.trellis-system.svc".to_string(),
    ];
    let (cert, key) = authority.server_certificate(&id, &dns, ips, SERVER_CERT_TTL)?;
    let config = server_config(&cert.chain_pem, key.pem(), &trust.bundle_pem)?;
    Ok((config, cert.renew_at(0.5)))
}

/// A serving config for an xDS port: this chain and key, client certificates optional
/// but verified against `bundle_pem` when presented, HTTP/2 only. Also what a relay
/// serves its sidecars with.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.map_err(tls_err)?).map_err(tls_err)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(tls_err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls_err)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The live config for the secure port, kept current by a background task (which also
/// keeps `ca_dir/trust-bundle.pem` current for `xds-server bootstrap`).
pub struct LiveTls {
    pub config: Arc<ArcSwap<ServerConfig>>,
    pub task: JoinHandle<()>,
}

pub fn live_config(
    authority: Authority,
    ips: Vec<IpAddr>,
    ca_dir: PathBuf,
) -> Result<LiveTls, IdentityError> {
    let mut trust_rx = authority.subscribe();
    let trust = trust_rx.borrow_and_update().clone();
    write_trust_bundle(&ca_dir, &trust.bundle_pem)?;
    let (config, mut renew_at) = build_config(&authority, &trust, &ips)?;
    let live = Arc::new(ArcSwap::new(config));
    let swap = live.clone();
    let task = tokio::spawn(async move {
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                changed = trust_rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
            let trust = trust_rx.borrow_and_update().clone();
            if let Err(e) = write_trust_bundle(&ca_dir, &trust.bundle_pem) {
                warn!(error = %e, "cannot update the trust bundle file");
            }
            match build_config(&authority, &trust, &ips) {
                Ok((config, next)) => {
                    swap.store(config);
                    renew_at = next;
                    info!(
                        epoch = trust.epoch,
                        roots = trust.roots.len(),
                        "secure port TLS config updated"
                    );
                }
                Err(e) => {
                    // Keep the last good config; try again shortly.
                    warn!(error = %e, "cannot rebuild the secure port's TLS config; keeping the previous one");
                    renew_at = SystemTime::now() + Duration::from_secs(5);
                }
            }
        }
    });
    Ok(LiveTls { config: live, task })
}

/// An accepted, handshaken connection and what the handshake proved.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<Guarded<TcpStream>>,
    peer: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
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

/// The SPIFFE id in a (verified) certificate's URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => SpiffeId::parse(u).ok(),
        _ => None,
    })
}

/// Accepts on `listener` and hands out connections whose handshake finished; each
/// handshake runs in its own task so one slow client never holds up the others.
///
/// Connections go through `gate` (counted, capped; see `crate::net`); a client that does
/// not finish its handshake within the gate's handshake timeout is dropped, so slow or
/// hostile clients cannot pile up half-open connections.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
    gate: Arc<Gate>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(1024);
    let handshake_timeout = gate.limits.handshake_timeout;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => return,
            };
            let Some((tcp, (remote, guard))) = crate::net::accept_one(accepted, &gate) else {
                continue;
            };
            let tcp = Guarded::new(tcp, Some(remote), guard);
            let conn = tcp.info().state;
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| spiffe_id_of(c));
                        let peer = PeerInfo {
                            remote: Some(remote),
                            identity,
                            conn: Some(conn),
                        };
                        let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
                    }
                    Ok(Err(e)) => debug!(remote = %remote, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(remote = %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Addresses the serving certificate names: the bind address unless it is a wildcard.
pub fn cert_ips(bind: SocketAddr) -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
    if !bind.ip().is_unspecified() && !ips.contains(&bind.ip()) {
        ips.push(bind.ip());
    }
    ips
}
