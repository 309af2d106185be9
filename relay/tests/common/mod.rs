//! Fixtures of the relay's in-process tests: a control plane with its CA, a relay of
//! member cluster b joined to it, and scripted sidecars (ADS on the plaintext port, SDS
//! with a bootstrap token on the secure port).
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use cert_authority::{CaOptions, TokenKind};
pub use envoy_types::pb::envoy::config::core::v3::Node;
pub use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
pub use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
pub use relay::{Relay, RelayOptions};
pub use std::path::{Path, PathBuf};
pub use std::sync::atomic::Ordering;
pub use std::time::Duration;
pub use tokio::net::TcpListener;
pub use tokio::sync::mpsc;
pub use tokio_stream::wrappers::ReceiverStream;
pub use tonic::transport::Endpoint;
pub use xds_server::server::{SecureOptions, Server};
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../xds-server/tests/fixtures/protocol")
}

pub const MEMBER_WORKLOAD: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-b
  namespace: default
spec:
  address: 127.0.7.5
  labels: {app: ratings, version: v1}
  serviceAccount: bookinfo-ratings
  ports: {http: 9080}
";

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub server: Server,
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

pub async fn start_server(dir: &Path) -> Server {
    Server::start_with(
        dir.join("config"),
        bind().await,
        bind().await,
        Some(SecureOptions {
            listener: bind().await,
            ca: CaOptions {
                dir: dir.join("ca"),
                ..CaOptions::default()
            },
            workload_ttl: None,
        }),
    )
    .await
    .unwrap()
}

pub async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    for f in ["mesh.yaml", "services.yaml", "workloads.yaml"] {
        std::fs::copy(fixtures().join(f), config.join(f)).unwrap();
    }
    let registry = dir.path().join("registry-b");
    std::fs::create_dir(&registry).unwrap();
    std::fs::write(registry.join("ratings.yaml"), MEMBER_WORKLOAD).unwrap();
    let server = start_server(dir.path()).await;
    Mesh { dir, server }
}

impl Mesh {
    pub fn join_token(&self, cluster: &str) -> String {
        let ca = self.server.authority.as_ref().unwrap();
        let id = xds_server::clusters::relay_identity("cluster.local", cluster);
        ca.tokens()
            .create(
                &id,
                TokenKind::Join,
                Duration::from_secs(600),
                [("cluster".to_string(), cluster.to_string())].into(),
            )
            .unwrap()
    }

    pub async fn relay(
        &self,
        token: Option<String>,
        state: &str,
    ) -> Result<Relay, relay::RelayError> {
        self.relay_with(token, state, Duration::from_secs(600), 100)
            .await
    }

    pub async fn relay_with(
        &self,
        token: Option<String>,
        state: &str,
        idle_class_after: Duration,
        max_classes: usize,
    ) -> Result<Relay, relay::RelayError> {
        Relay::start(RelayOptions {
            cluster: "b".into(),
            upstream: self.server.secure_addr.unwrap(),
            trust_bundle_pem: self
                .server
                .authority
                .as_ref()
                .unwrap()
                .current()
                .bundle_pem
                .clone(),
            join_token: token,
            state_dir: self.dir.path().join(state),
            registry_dir: Some(self.dir.path().join("registry-b")),
            listen: bind().await,
            secure_listen: Some(bind().await),
            admin: bind().await,
            idle_class_after,
            max_classes,
            limits: Default::default(),
        })
        .await
    }
}

/// An outbound-only proxy of namespace default in cluster b.
pub fn node(id: &str) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    Node {
        id: id.into(),
        metadata: Some(Struct {
            fields: [("CLUSTER_ID".to_string(), s("b"))].into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// First CDS response for `node_id` from the ADS server at `addr`.
pub async fn cds(addr: std::net::SocketAddr, node_id: &str) -> DiscoveryResponse {
    try_cds(addr, node_id).await.unwrap()
}

/// [`cds`], or the status the stream was refused with.
pub async fn try_cds(
    addr: std::net::SocketAddr,
    node_id: &str,
) -> Result<DiscoveryResponse, tonic::Status> {
    tokio::time::timeout(WAIT, async move {
        let (tx, mut stream) = open_cds(addr, node_id).await?;
        let first = stream.message().await?;
        drop(tx);
        first.ok_or_else(|| tonic::Status::unknown("stream ended"))
    })
    .await
    .expect("no CDS response within 10 s")
}

/// A scripted proxy's open ADS stream: what it sends, what it receives.
pub type Held = (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
);

/// An ADS stream of `node_id` to `addr` that has asked for CDS.
async fn open_cds(addr: std::net::SocketAddr, node_id: &str) -> Result<Held, tonic::Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node(node_id)),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// A proxy that stays connected (until the returned guard is dropped).
pub async fn hold(addr: std::net::SocketAddr, node_id: &str) -> Held {
    let (tx, mut stream) = open_cds(addr, node_id).await.unwrap();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap();
    (tx, stream)
}

/// A bootstrap token for service account `sa` of namespace default, signed by `ca`.
pub fn workload_token(ca: &cert_authority::Authority, sa: &str) -> String {
    ca.tokens()
        .create(
            &cert_authority::SpiffeId::new("cluster.local", "default", sa),
            TokenKind::Workload,
            Duration::from_secs(600),
            Default::default(),
        )
        .unwrap()
}

pub async fn until(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Test-only: accepts the relay's serving certificate by its SPIFFE id (it has no DNS
/// name, which is all rustls's own verifier checks; Envoy matches the URI SAN instead).
#[derive(Debug)]
pub struct BySpiffeId(String);

impl rustls::client::danger::ServerCertVerifier for BySpiffeId {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match xds_server::identity::tls::spiffe_id_of(end_entity) {
            Some(id) if id.uri() == self.0 => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => Err(rustls::Error::General(format!(
                "unexpected server identity {other:?}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &rustls_pki_types::CertificateDer<'_>,
        _d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _m: &[u8],
        _c: &rustls_pki_types::CertificateDer<'_>,
        _d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The first SDS response of a sidecar of cluster b that proves itself with `token` on
/// the relay's secure port, or the stream's error.
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// An SDS stream to the relay's secure port, authenticated by `token`.
pub async fn relay_sds_stream(
    addr: std::net::SocketAddr,
    token: &str,
    node_id: &str,
) -> Result<Held, tonic::Status> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(BySpiffeId(
            "spiffe://cluster.local/ns/trellis-system/sa/relay-b".into(),
        )))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let channel = Endpoint::from_static("http://relay")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("relay").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node(node_id)),
        type_url: SDS.into(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let stream = client.stream_aggregated_resources(req).await?.into_inner();
    Ok((tx, stream))
}

pub async fn relay_sds(
    addr: std::net::SocketAddr,
    token: &str,
    node_id: &str,
) -> Result<DiscoveryResponse, tonic::Status> {
    tokio::time::timeout(WAIT, async move {
        let (tx, mut stream) = relay_sds_stream(addr, token, node_id).await?;
        let first = stream.message().await?;
        drop(tx);
        first.ok_or_else(|| tonic::Status::unknown("stream ended"))
    })
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no SDS response in 10 s")))
}

pub fn cert_identity(resp: &DiscoveryResponse) -> String {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
    use prost::Message;
    for any in &resp.resources {
        let s = Secret::decode(any.value.as_slice()).unwrap();
        if let Some(secret::Type::TlsCertificate(t)) = s.r#type {
            let Some(Specifier::InlineString(chain)) =
                t.certificate_chain.and_then(|c| c.specifier)
            else {
                panic!("no inline chain");
            };
            let der = rustls_pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes())
                .next()
                .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap())
                .unwrap();
            return xds_server::identity::tls::spiffe_id_of(&der).unwrap().uri();
        }
    }
    panic!("no default secret in {resp:?}");
}

pub fn secret_parts(resp: &DiscoveryResponse) -> (Option<String>, Option<String>) {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
    use prost::Message;
    let inline = |d: Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .and_then(|d| d.specifier)
    {
        Some(Specifier::InlineString(s)) => s,
        other => panic!("not inline: {other:?}"),
    };
    let (mut chain, mut bundle) = (None, None);
    for any in &resp.resources {
        match Secret::decode(any.value.as_slice()).unwrap().r#type {
            Some(secret::Type::TlsCertificate(t)) => chain = Some(inline(t.certificate_chain)),
            Some(secret::Type::ValidationContext(v)) => bundle = Some(inline(v.trusted_ca)),
            other => panic!("unexpected secret {other:?}"),
        }
    }
    (chain, bundle)
}

pub async fn next_sds(stream: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no SDS response within 10 s")
        .unwrap()
        .unwrap()
}

pub async fn ack(tx: &mpsc::Sender<DiscoveryRequest>, resp: &DiscoveryResponse) {
    tx.send(DiscoveryRequest {
        type_url: SDS.into(),
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}
