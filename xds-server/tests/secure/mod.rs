//! Shared by the secure-port tests: an in-process server with its own CA in a temp dir,
//! gRPC clients over TLS that prove an identity with a bootstrap token or a client
//! certificate (or try not to), scripted SDS streams whose ACKs a test controls, and a
//! CA in Istio's `cacerts` layout. Every wait is bounded.
// Each test binary uses its own part of these helpers.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use cert_authority::{Authority, CaOptions, SpiffeId, TokenKind};
pub use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, Node};
pub use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
pub use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
pub use prost::Message;
pub use rustls_pki_types::pem::PemObject;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
pub use std::collections::BTreeSet;
pub use std::net::SocketAddr;
pub use std::path::{Path, PathBuf};
pub use std::sync::Arc;
pub use std::time::Duration;
pub use tokio::sync::mpsc;
pub use tokio_stream::wrappers::ReceiverStream;
pub use tonic::transport::{Channel, Endpoint};
pub use tonic::{Code, Request};
pub use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
pub use trellis_proto::istio::v1::auth::IstioCertificateRequest;
pub use xds_server::server::{SecureOptions, Server};

pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const REVIEWS_V1: &str = "sidecar~127.0.1.3~reviews-v1.default~default.svc.cluster.local";
pub const WAIT: Duration = Duration::from_secs(10);
pub const WORKLOADS: &str = include_str!("../fixtures/protocol/workloads.yaml");

pub struct Secure {
    pub _dir: tempfile::TempDir,
    pub server: Server,
    pub ca: Authority,
}

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

pub async fn start(workload_ttl: Option<Duration>) -> Secure {
    start_with(workload_ttl, WORKLOADS).await
}

pub async fn start_with(workload_ttl: Option<Duration>, workloads: &str) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), workloads);
    let ca = CaOptions {
        dir: dir.path().join("ca"),
        ..CaOptions::default()
    };
    let server = start_server(config, ca, workload_ttl).await;
    Secure::new(dir, server)
}

/// `dir/config` with the protocol mesh's mesh and services and the given workloads.
pub fn write_config(dir: &Path, workloads: &str) -> PathBuf {
    let config = dir.join("config");
    std::fs::create_dir(&config).unwrap();
    for (file, text) in [
        ("mesh.yaml", include_str!("../fixtures/protocol/mesh.yaml")),
        (
            "services.yaml",
            include_str!("../fixtures/protocol/services.yaml"),
        ),
        ("workloads.yaml", workloads),
    ] {
        std::fs::write(config.join(file), text).unwrap();
    }
    config
}

/// A server with the secure port and a CA of `ca`, every port free on loopback.
pub async fn start_server(
    config: PathBuf,
    ca: CaOptions,
    workload_ttl: Option<Duration>,
) -> Server {
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let secure = SecureOptions {
        listener: bind().await.unwrap(),
        ca,
        workload_ttl,
    };
    Server::start_with(
        config,
        bind().await.unwrap(),
        bind().await.unwrap(),
        Some(secure),
    )
    .await
    .unwrap()
}

/// A token of `ca` for `identity`, with extra `claims`.
pub fn mint(
    ca: &Authority,
    identity: &SpiffeId,
    kind: TokenKind,
    ttl: Duration,
    claims: &[(&str, &str)],
) -> String {
    let claims = claims
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ca.tokens().create(identity, kind, ttl, claims).unwrap()
}

/// A well-formed, signed token from a CA that is not the server's.
pub fn foreign_token(
    identity: &SpiffeId,
    kind: TokenKind,
    ttl: Duration,
    claims: &[(&str, &str)],
) -> String {
    let other_dir = tempfile::tempdir().unwrap();
    let other = Authority::open(CaOptions {
        dir: other_dir.path().to_path_buf(),
        ..CaOptions::default()
    })
    .unwrap();
    mint(&other, identity, kind, ttl, claims)
}

impl Secure {
    pub fn new(dir: tempfile::TempDir, server: Server) -> Secure {
        let ca = server.authority.clone().unwrap();
        Secure {
            _dir: dir,
            server,
            ca,
        }
    }

    pub fn token(&self, sa: &str) -> String {
        self.workload_token(&id(sa), Duration::from_secs(600))
    }

    pub fn workload_token(&self, identity: &SpiffeId, ttl: Duration) -> String {
        mint(&self.ca, identity, TokenKind::Workload, ttl, &[])
    }

    /// A join token for member cluster `cluster` with extra `claims` (the CLI always sets
    /// `cluster` and `network`; tests may leave them out).
    pub fn join_token(&self, cluster: &str, claims: &[(&str, &str)], ttl: Duration) -> String {
        mint(&self.ca, &relay_id(cluster), TokenKind::Join, ttl, claims)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.secure_addr.unwrap()
    }

    pub async fn channel(&self, client: Option<(&str, &str)>) -> Channel {
        tls_channel(self.addr(), &self.ca.current().bundle_pem, client).await
    }

    /// The server's metrics include `line` (`name{labels} value`).
    pub fn assert_metric(&self, line: &str) {
        let metrics = self.server.metrics.render();
        assert!(metrics.contains(line), "{metrics}");
    }

    /// A channel to the plaintext xDS port.
    pub async fn plaintext_channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.server.xds_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// [`sds`] on the secure port without a client certificate.
    pub async fn sds(
        &self,
        token: Option<&str>,
        node_id: &str,
        names: &[&str],
    ) -> Result<DiscoveryResponse, tonic::Status> {
        sds(self.channel(None).await, token, node_id, names).await
    }

    /// [`create_certificate`] on the secure port without a client certificate.
    pub async fn create_certificate(
        &self,
        token: Option<&str>,
        csr: &str,
    ) -> Result<Vec<String>, tonic::Status> {
        create_certificate(self.channel(None).await, token, csr).await
    }
}

/// The call was refused with `code`, saying `what`.
#[track_caller]
pub fn assert_refused(err: &tonic::Status, code: Code, what: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(what), "{}", err.message());
}

/// A gRPC channel over TLS to `addr` trusting `bundle`, optionally with a client cert.
pub async fn tls_channel(addr: SocketAddr, bundle: &str, client: Option<(&str, &str)>) -> Channel {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

pub fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

/// `message`, with the bearer token as gRPC metadata when there is one.
pub fn with_bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

fn sds_request(names: &[String]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: SDS.into(),
        resource_names: names.to_vec(),
        ..Default::default()
    }
}

fn sds_first_request(node_id: &str, names: &[String]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node(node_id)),
        ..sds_request(names)
    }
}

/// Opens an ADS stream (optionally with a bearer token), sends one SDS request for
/// `names`, and returns the first response or the stream's error.
pub async fn sds(
    channel: Channel,
    token: Option<&str>,
    node_id: &str,
    names: &[&str],
) -> Result<DiscoveryResponse, tonic::Status> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let (tx, rx) = mpsc::channel(4);
    tx.send(sds_first_request(node_id, &names)).await.unwrap();
    let req = with_bearer(ReceiverStream::new(rx), token);
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let result = tokio::time::timeout(WAIT, async move {
        let mut stream = client.stream_aggregated_resources(req).await?.into_inner();
        let first = stream.message().await?;
        drop(tx);
        first.ok_or_else(|| tonic::Status::unknown("stream ended without a response"))
    })
    .await;
    result.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(
            "no SDS response within 10 s",
        ))
    })
}

pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

pub fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("expected an inline string, got {other:?}"),
    }
}

/// The first certificate of a PEM chain: the leaf.
pub fn leaf_der(chain_pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

pub fn leaf_uri_sans(chain_pem: &str) -> Vec<String> {
    let der = leaf_der(chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

pub fn csr_for(sa: &str) -> (String, String) {
    csr_for_id(&id(sa))
}

/// A CSR (PEM) asking for `identity`, and its key (PEM).
pub fn csr_for_id(identity: &SpiffeId) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.uri().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

/// The identity of member cluster `cluster`'s relay.
pub fn relay_id(cluster: &str) -> SpiffeId {
    SpiffeId::new(
        "cluster.local",
        "trellis-system",
        &format!("relay-{cluster}"),
    )
}

pub fn certificate_request(csr: &str) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: 3600,
        metadata: None,
    }
}

/// Istio's `CreateCertificate` over `channel`, with an optional bearer token; the chain
/// (leaf first, root last) or the call's status.
pub async fn create_certificate(
    channel: Channel,
    token: Option<&str>,
    csr: &str,
) -> Result<Vec<String>, tonic::Status> {
    let req = with_bearer(certificate_request(csr), token);
    let mut client = IstioCertificateServiceClient::new(channel);
    tokio::time::timeout(WAIT, client.create_certificate(req))
        .await
        .expect("no CreateCertificate answer within 10 s")
        .map(|r| r.into_inner().cert_chain)
}

/// `GET path` on the admin API: status code and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("no admin answer within 10 s");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// An open SDS stream whose ACKs the test controls.
pub struct SdsStream {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub stream: tonic::Streaming<DiscoveryResponse>,
    pub names: Vec<String>,
}

impl SdsStream {
    pub async fn open(s: &Secure, token: &str, node_id: &str, names: &[&str]) -> SdsStream {
        let (tx, rx) = mpsc::channel(4);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        tx.send(sds_first_request(node_id, &names)).await.unwrap();
        let req = with_bearer(ReceiverStream::new(rx), Some(token));
        let mut client = AggregatedDiscoveryServiceClient::new(s.channel(None).await);
        let stream = tokio::time::timeout(WAIT, client.stream_aggregated_resources(req))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        SdsStream { tx, stream, names }
    }

    pub async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.stream.message())
            .await
            .expect("no SDS response within 10 s")
            .unwrap()
            .unwrap()
    }

    pub async fn ack(&self, resp: &DiscoveryResponse) {
        self.tx
            .send(DiscoveryRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                ..sds_request(&self.names)
            })
            .await
            .unwrap();
    }
}

pub fn phase(ca: &Authority) -> Option<cert_authority::Phase> {
    ca.rotation().map(|r| r.phase)
}

/// Polls until `ok`, bounded by [`WAIT`].
pub async fn until(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A CA in Istio's `cacerts` layout: a root and an intermediate that signs.
pub fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p
}

pub fn write_cacerts(
    dir: &Path,
    root: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    intermediate: &str,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca_params(intermediate).signed_by(&key, root).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let root_pem = root.pem();
    // As an operator's tooling would: each file renamed into place.
    for (name, text) in [
        ("ca-key.pem", key.serialize_pem()),
        ("ca-cert.pem", cert.pem()),
        ("cert-chain.pem", format!("{}{root_pem}", cert.pem())),
        ("root-cert.pem", root_pem.clone()),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

pub fn issuer_cn(chain_pem: &str) -> String {
    let der = leaf_der(chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

pub async fn default_chain(s: &Secure, token: &str) -> String {
    let resp = s.sds(Some(token), REVIEWS_V1, &["default"]).await.unwrap();
    match secrets(&resp).remove(0).r#type {
        Some(secret::Type::TlsCertificate(t)) => inline(&t.certificate_chain),
        other => panic!("unexpected {other:?}"),
    }
}
