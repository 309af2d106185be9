//! The relay's side of TLS to the control plane: one lazily (re)connecting HTTP/2
//! channel whose handshakes use the current client identity and trust bundle, both
//! swappable (renewal, rotation) without touching open connections.

use crate::RelayError;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tonic::transport::{Channel, Endpoint};

/// The SAN the relay expects on the control plane's serving certificate.
pub const SERVER_NAME: &str = "xds-server.trellis-system.svc";

fn err(e: impl std::fmt::Display) -> RelayError {
    RelayError::Tls(e.to_string())
}

/// Client TLS config: trust `bundle_pem`, present `identity` (chain, key) if any.
pub fn client_config(
    bundle_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, RelayError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.map_err(err)?).map_err(err)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(err)?,
            )
            .map_err(err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The config every new connection uses; replaced on renewal.
pub type LiveConfig = Arc<RwLock<Arc<ClientConfig>>>;

/// A channel to `addr` that connects (and reconnects) on demand with the live config.
pub fn channel(addr: SocketAddr, live: LiveConfig) -> Channel {
    Endpoint::from_static("http://xds-server.trellis-system.svc")
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let config = live
                .read()
                .map(|c| c.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(SERVER_NAME)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
}
