//! The secure port: who may stream what, and Istio's CA service. An in-process server
//! with its own CA in a temp dir, and gRPC clients over TLS that prove an identity with
//! a bootstrap token or a client certificate (or try not to).
#![allow(clippy::unwrap_used)]

use cert_authority::{Authority, CaOptions, SpiffeId, TokenKind};
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;
use xds_server::server::{SecureOptions, Server};

const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const REVIEWS_V1: &str = "sidecar~127.0.1.3~reviews-v1.default~default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(10);

struct Secure {
    _dir: tempfile::TempDir,
    server: Server,
    ca: Authority,
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

async fn start(workload_ttl: Option<Duration>) -> Secure {
    start_with(
        workload_ttl,
        include_str!("fixtures/protocol/workloads.yaml"),
    )
    .await
}

async fn start_with(workload_ttl: Option<Duration>, workloads: &str) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    for (file, text) in [
        ("mesh.yaml", include_str!("fixtures/protocol/mesh.yaml")),
        (
            "services.yaml",
            include_str!("fixtures/protocol/services.yaml"),
        ),
        ("workloads.yaml", workloads),
    ] {
        std::fs::write(config.join(file), text).unwrap();
    }
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let secure = SecureOptions {
        listener: bind().await.unwrap(),
        ca: CaOptions {
            dir: dir.path().join("ca"),
            ..CaOptions::default()
        },
        workload_ttl,
    };
    let server = Server::start_with(
        config,
        bind().await.unwrap(),
        bind().await.unwrap(),
        Some(secure),
    )
    .await
    .unwrap();
    let ca = server.authority.clone().unwrap();
    Secure {
        _dir: dir,
        server,
        ca,
    }
}

impl Secure {
    fn token(&self, sa: &str) -> String {
        self.ca
            .tokens()
            .create(
                &id(sa),
                TokenKind::Workload,
                Duration::from_secs(600),
                Default::default(),
            )
            .unwrap()
    }

    fn addr(&self) -> SocketAddr {
        self.server.secure_addr.unwrap()
    }

    async fn channel(&self, client: Option<(&str, &str)>) -> Channel {
        tls_channel(self.addr(), &self.ca.current().bundle_pem, client).await
    }
}

/// A gRPC channel over TLS to `addr` trusting `bundle`, optionally with a client cert.
async fn tls_channel(addr: SocketAddr, bundle: &str, client: Option<(&str, &str)>) -> Channel {
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

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

/// Opens an ADS stream (optionally with a bearer token), sends one SDS request for
/// `names`, and returns the first response or the stream's error.
async fn sds(
    channel: Channel,
    token: Option<&str>,
    node_id: &str,
    names: &[&str],
) -> Result<DiscoveryResponse, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node(node_id)),
        type_url: SDS.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
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

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("expected an inline string, got {other:?}"),
    }
}

fn leaf_uri_sans(chain_pem: &str) -> Vec<String> {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
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

fn csr_for(sa: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id(sa).uri().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key.serialize_pem())
}

#[tokio::test]
async fn without_credentials_the_secure_port_refuses_streams() {
    let s = start(None).await;
    let err = sds(s.channel(None).await, None, REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("token"), "{}", err.message());
    let metrics = s.server.metrics.render();
    assert!(
        metrics.contains(r#"trellis_secure_refused_total{code="unauthenticated"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn forged_and_expired_tokens_are_refused() {
    let s = start(None).await;
    // A token from another CA: well-formed, signed, but not by this control plane.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Authority::open(CaOptions {
        dir: other_dir.path().to_path_buf(),
        ..CaOptions::default()
    })
    .unwrap();
    let forged = other
        .tokens()
        .create(
            &id("bookinfo-reviews"),
            TokenKind::Workload,
            Duration::from_secs(600),
            Default::default(),
        )
        .unwrap();
    let err = sds(
        s.channel(None).await,
        Some(&forged),
        REVIEWS_V1,
        &["default"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("bearer token refused"),
        "{}",
        err.message()
    );

    let short =
        s.ca.tokens()
            .create(
                &id("bookinfo-reviews"),
                TokenKind::Workload,
                Duration::from_secs(1),
                Default::default(),
            )
            .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = sds(
        s.channel(None).await,
        Some(&short),
        REVIEWS_V1,
        &["default"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());

    let err = sds(
        s.channel(None).await,
        Some("not.a.token"),
        REVIEWS_V1,
        &["default"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn a_proxy_gets_its_own_secrets_and_nothing_else() {
    let s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let others = id("bookinfo-ratings").uri();
    let resp = sds(
        s.channel(None).await,
        Some(&token),
        REVIEWS_V1,
        &[
            "default",
            "ROOTCA",
            &others,
            "ratings",
            "kubernetes://bookinfo-ratings",
        ],
    )
    .await
    .unwrap();
    let got = secrets(&resp);
    let names: BTreeSet<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["ROOTCA", "default"]));
    for sec in &got {
        match &sec.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                let chain = inline(&t.certificate_chain);
                assert_eq!(leaf_uri_sans(&chain), vec![id("bookinfo-reviews").uri()]);
                assert!(inline(&t.private_key).contains("PRIVATE KEY"));
            }
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(inline(&v.trusted_ca), s.ca.current().bundle_pem);
            }
            other => panic!("unexpected secret {other:?}"),
        }
    }
    // The admin API shows the proxy's identity and certificate, never its key.
    let p = s.server.registry.find(REVIEWS_V1).unwrap();
    assert_eq!(p.identity(), Some(id("bookinfo-reviews").uri().as_str()));
    let view = serde_json::to_string(&p.view()).unwrap();
    assert!(!view.contains("PRIVATE KEY"), "{view}");
}

#[tokio::test]
async fn claiming_another_identitys_workload_is_permission_denied() {
    let s = start(None).await;
    let token = s.token("bookinfo-ratings");
    let err = sds(
        s.channel(None).await,
        Some(&token),
        REVIEWS_V1,
        &["default"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("may not claim workload reviews-v1.default"),
        "{}",
        err.message()
    );
    // Another namespace entirely.
    let err = sds(
        s.channel(None).await,
        Some(&token),
        "sidecar~127.0.9.9~x.prod~prod.svc.cluster.local",
        &["default"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn the_plaintext_port_serves_no_secrets() {
    let s = start(None).await;
    let ch = Endpoint::from_shared(format!("http://{}", s.server.xds_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = sds(ch, None, REVIEWS_V1, &["default", "ROOTCA"])
        .await
        .unwrap();
    assert!(resp.resources.is_empty(), "{resp:?}");
}

#[tokio::test]
async fn csr_for_someone_else_is_refused_and_own_csr_is_signed() {
    let s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let mut client = IstioCertificateServiceClient::new(s.channel(None).await);
    let ask = |csr: String| {
        let mut r = Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: None,
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let (csr, _) = csr_for("bookinfo-ratings");
    let err = client.create_certificate(ask(csr)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&id("bookinfo-ratings").uri()),
        "{}",
        err.message()
    );

    let (csr, key) = csr_for("bookinfo-reviews");
    let chain = client
        .create_certificate(ask(csr))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert!(chain.len() >= 2, "{chain:?}");
    assert_eq!(leaf_uri_sans(&chain[0]), vec![id("bookinfo-reviews").uri()]);
    assert_eq!(
        chain.last().unwrap().trim(),
        s.ca.current().roots[0].pem.trim()
    );

    let metrics = s.server.metrics.render();
    assert!(
        metrics.contains(r#"trellis_ca_certificates_issued_total{how="csr"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"trellis_secure_refused_total{code="permission_denied"} 1"#),
        "{metrics}"
    );
    // That certificate is a credential on its own: no token needed with it.
    let leaf_and_intermediates = chain[..chain.len() - 1].concat();
    let ch = s.channel(Some((&leaf_and_intermediates, &key))).await;
    let resp = sds(ch, None, REVIEWS_V1, &["default"]).await.unwrap();
    assert_eq!(secrets(&resp).len(), 1);
}

#[tokio::test]
async fn bootstrap_trust_bundle_file_matches_the_ca() {
    let s = start(None).await;
    let dir = s._dir.path().join("ca");
    let file = std::fs::read_to_string(dir.join(xds_server::identity::TRUST_BUNDLE_FILE)).unwrap();
    assert_eq!(file, s.ca.current().bundle_pem);
    let _ = Path::new(&dir);
}

#[tokio::test]
async fn a_workload_labelled_for_mtls_must_use_the_secure_port() {
    let labelled = include_str!("fixtures/protocol/workloads.yaml").replace(
        "labels: {app: reviews, version: v1}",
        "labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}",
    );
    let s = start_with(None, &labelled).await;
    let plain = Endpoint::from_shared(format!("http://{}", s.server.xds_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = sds(plain, None, REVIEWS_V1, &["default"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("connect on the secure port"),
        "{}",
        err.message()
    );
    // On the secure port it gets its certificate.
    let token = s.token("bookinfo-reviews");
    let resp = sds(
        s.channel(None).await,
        Some(&token),
        REVIEWS_V1,
        &["default"],
    )
    .await
    .unwrap();
    assert_eq!(secrets(&resp).len(), 1);
}

/// An open SDS stream whose ACKs the test controls.
struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    stream: tonic::Streaming<DiscoveryResponse>,
    names: Vec<String>,
}

impl SdsStream {
    async fn open(s: &Secure, token: &str, node_id: &str, names: &[&str]) -> SdsStream {
        let (tx, rx) = mpsc::channel(4);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        tx.send(DiscoveryRequest {
            node: Some(node(node_id)),
            type_url: SDS.into(),
            resource_names: names.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut req = Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut client = AggregatedDiscoveryServiceClient::new(s.channel(None).await);
        let stream = tokio::time::timeout(WAIT, client.stream_aggregated_resources(req))
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        SdsStream { tx, stream, names }
    }

    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(WAIT, self.stream.message())
            .await
            .expect("no SDS response within 10 s")
            .unwrap()
            .unwrap()
    }

    async fn ack(&self, resp: &DiscoveryResponse) {
        self.tx
            .send(DiscoveryRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                type_url: SDS.into(),
                resource_names: self.names.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn phase(ca: &Authority) -> Option<cert_authority::Phase> {
    ca.rotation().map(|r| r.phase)
}

/// Polls until `ok`, bounded by [`WAIT`].
async fn until(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn rotation_waits_for_every_proxy_and_resumes_after_a_restart() {
    let mut s = start(None).await;
    let token = s.token("bookinfo-reviews");
    let mut proxy = SdsStream::open(&s, &token, REVIEWS_V1, &["default", "ROOTCA"]).await;
    let first = proxy.next().await;
    proxy.ack(&first).await;
    let p = s.server.registry.find(REVIEWS_V1).unwrap();
    let epoch0 = s.ca.current().epoch;
    until("the proxy to ACK its secrets", || {
        p.secrets().epoch_acked == Some(epoch0)
    })
    .await;

    let old_root = s.ca.current().roots[0].fingerprint.clone();
    s.ca.start_rotation().unwrap();
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));
    // The new bundle reaches the proxy; without its ACK the rotation must not move on.
    let added = proxy.next().await;
    let bundle = secrets(&added)
        .into_iter()
        .find(|x| x.name == "ROOTCA")
        .unwrap();
    let Some(secret::Type::ValidationContext(v)) = bundle.r#type else {
        panic!("ROOTCA is not a validation context");
    };
    assert_eq!(
        CertificateDer::pem_slice_iter(inline(&v.trusted_ca).as_bytes()).count(),
        2,
        "both roots in the bundle"
    );
    // Ten checks of the rotation driver (200 ms apart) go by: it must still wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));
    let pending = xds_server::identity::rotation::pending(&s.server.registry, s.ca.current().epoch);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].node, REVIEWS_V1);

    // The server restarts mid-rotation: the phase is on disk, the proxy comes back.
    drop(proxy);
    let dir = s._dir.path().to_path_buf();
    s.server.stop();
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let server = Server::start_with(
        dir.join("config"),
        bind().await.unwrap(),
        bind().await.unwrap(),
        Some(SecureOptions {
            listener: bind().await.unwrap(),
            ca: CaOptions {
                dir: dir.join("ca"),
                ..CaOptions::default()
            },
            workload_ttl: None,
        }),
    )
    .await
    .unwrap();
    s.ca = server.authority.clone().unwrap();
    s.server = server;
    assert_eq!(phase(&s.ca), Some(cert_authority::Phase::AddNewRoot));

    // Now the proxy ACKs everything it gets: the rotation runs to the end.
    let mut proxy = SdsStream::open(&s, &token, REVIEWS_V1, &["default", "ROOTCA"]).await;
    let mut last = proxy.next().await;
    proxy.ack(&last).await;
    for _ in 0..20 {
        if s.ca.rotation().is_none() {
            break;
        }
        if let Ok(Ok(Some(r))) =
            tokio::time::timeout(Duration::from_millis(500), proxy.stream.message()).await
        {
            proxy.ack(&r).await;
            last = r;
        }
    }
    assert!(s.ca.rotation().is_none(), "rotation did not finish");
    let roots = s.ca.current().roots.clone();
    assert_eq!(roots.len(), 1);
    assert_ne!(roots[0].fingerprint, old_root);
    // What the proxy holds last: a certificate from the new root, and only the new root.
    for sec in secrets(&last) {
        match sec.r#type {
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(inline(&v.trusted_ca).trim(), roots[0].pem.trim())
            }
            Some(secret::Type::TlsCertificate(_)) => {
                let p = s.server.registry.find(REVIEWS_V1).unwrap();
                assert_eq!(
                    p.secrets().cert_root.as_deref(),
                    Some(roots[0].fingerprint.as_str())
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
