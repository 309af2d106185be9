//! The relay in-process against an in-process control plane: joining (once), serving
//! sidecars from one upstream stream per class, reporting its registry, and serving on
//! when the control plane is gone.
#![allow(clippy::unwrap_used)]

use cert_authority::{CaOptions, TokenKind};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use relay::{Relay, RelayOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use xds_server::server::{SecureOptions, Server};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const WAIT: Duration = Duration::from_secs(10);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../xds-server/tests/fixtures/protocol")
}

const MEMBER_WORKLOAD: &str = "apiVersion: networking.istio.io/v1
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

struct Mesh {
    dir: tempfile::TempDir,
    server: Server,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start_server(dir: &Path) -> Server {
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

async fn mesh() -> Mesh {
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
    fn join_token(&self, cluster: &str) -> String {
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

    async fn relay(&self, token: Option<String>, state: &str) -> Result<Relay, relay::RelayError> {
        self.relay_with(token, state, Duration::from_secs(600), 100)
            .await
    }

    async fn relay_with(
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
        })
        .await
    }
}

/// An outbound-only proxy of namespace default in cluster b.
fn node(id: &str) -> Node {
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
async fn cds(addr: std::net::SocketAddr, node_id: &str) -> DiscoveryResponse {
    try_cds(addr, node_id).await.unwrap()
}

/// [`cds`], or the status the stream was refused with.
async fn try_cds(
    addr: std::net::SocketAddr,
    node_id: &str,
) -> Result<DiscoveryResponse, tonic::Status> {
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
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    tokio::time::timeout(WAIT, async move {
        let mut stream = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = stream.message().await?;
        drop(tx);
        first.ok_or_else(|| tonic::Status::unknown("stream ended"))
    })
    .await
    .expect("no CDS response within 10 s")
}

/// A proxy that stays connected (until the returned guard is dropped).
async fn hold(
    addr: std::net::SocketAddr,
    node_id: &str,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
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
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap();
    (tx, stream)
}

/// A bootstrap token for service account `sa` of namespace default, signed by `ca`.
fn workload_token(ca: &cert_authority::Authority, sa: &str) -> String {
    ca.tokens()
        .create(
            &cert_authority::SpiffeId::new("cluster.local", "default", sa),
            TokenKind::Workload,
            Duration::from_secs(600),
            Default::default(),
        )
        .unwrap()
}

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
async fn a_relay_joins_once_serves_its_sidecars_and_keeps_serving_without_the_control_plane() {
    let mut m = mesh().await;
    let token = m.join_token("b");
    let relay = m.relay(Some(token.clone()), "relay-b").await.unwrap();
    // The control plane recorded the member cluster, and merged its registry.
    assert!(m.server.clusters.as_ref().unwrap().get("b").is_some());
    let controller = m.server.controller.clone();
    until("cluster b's workload in the mesh", || {
        controller
            .snapshot()
            .mesh
            .workload("ratings-b.default", Some("b"))
            .is_some()
    })
    .await;

    // Two proxies of one class through the relay: the same CDS as straight from the
    // control plane (same content, same version), from one upstream stream for the class.
    let direct = cds(m.server.xds_addr, "direct~1").await;
    let a = cds(relay.xds_addr, "sidecar-1").await;
    let b = cds(relay.xds_addr, "sidecar-2").await;
    assert!(!a.resources.is_empty());
    assert_eq!(a.version_info, direct.version_info);
    assert_eq!(b.version_info, direct.version_info);
    // Classes: namespace default (the two sidecars) and ratings-b (prefetched from the
    // registry): two upstream streams, not one per sidecar.
    until("two upstream streams", || {
        relay.upstream.streams.load(Ordering::Relaxed) == 2
    })
    .await;

    // The control plane's admin lists the sidecars behind the relay (one that stays).
    let held = hold(relay.xds_addr, "sidecar-held").await;
    let reported = m.server.relay_proxies.clone().unwrap();
    until("the relay to report its sidecar", || {
        reported
            .get("b")
            .is_some_and(|r| r.connected && r.proxies.iter().any(|p| p["id"] == "sidecar-held"))
    })
    .await;
    drop(held);

    // The token was used up: another relay cannot join with it.
    let err = m.relay(Some(token), "relay-b-again").await.unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");

    // The control plane goes away: the relay serves a new sidecar from its cache.
    m.server.stop();
    let c = cds(relay.xds_addr, "sidecar-3").await;
    assert_eq!(c.version_info, direct.version_info);

    // The control plane comes back on the same CA: a relay restart needs no token (its
    // state dir holds its certificate).
    drop(relay);
    let dir = m.dir.path().to_path_buf();
    m.server = start_server(&dir).await;
    let relay = m.relay(None, "relay-b").await.unwrap();
    let d = cds(relay.xds_addr, "sidecar-4").await;
    assert!(!d.resources.is_empty());
}

/// Test-only: accepts the relay's serving certificate by its SPIFFE id (it has no DNS
/// name, which is all rustls's own verifier checks; Envoy matches the URI SAN instead).
#[derive(Debug)]
struct BySpiffeId(String);

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
const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// An SDS stream to the relay's secure port, authenticated by `token`.
async fn relay_sds_stream(
    addr: std::net::SocketAddr,
    token: &str,
    node_id: &str,
) -> Result<
    (
        mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
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

async fn relay_sds(
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

fn cert_identity(resp: &DiscoveryResponse) -> String {
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

#[tokio::test]
async fn sidecars_get_their_own_certificate_through_the_relay_also_offline() {
    let mut m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let secure = relay.secure_addr.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let token = |sa: &str| workload_token(&ca, sa);
    // The certificate is signed upstream for the identity the sidecar's token proves.
    let resp = relay_sds(secure, &token("bookinfo-ratings"), "sidecar-r1")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
    // Another identity gets its own, never the first one's.
    let resp = relay_sds(secure, &token("bookinfo-details"), "sidecar-d1")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-details"
    );
    // A workload of the registry runs as one service account: another identity may not
    // claim it (the relay learns the accounts from its registry folder).
    let ratings_b = "sidecar~127.0.7.5~ratings-b.default~default.svc.cluster.local";
    let mut refused = None;
    for _ in 0..50 {
        match relay_sds(secure, &token("bookinfo-details"), ratings_b).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let err = refused.expect("claiming ratings-b as bookinfo-details was never refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("runs as service account"),
        "{}",
        err.message()
    );

    // Tokens the control plane did not sign are refused by the relay itself.
    let other = tempfile::tempdir().unwrap();
    let foreign = cert_authority::Authority::open(CaOptions {
        dir: other.path().to_path_buf(),
        ..CaOptions::default()
    })
    .unwrap();
    let foreign = workload_token(&foreign, "bookinfo-ratings");
    let err = relay_sds(secure, &foreign, "sidecar-x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Offline: the control plane is gone; a new sidecar of a known identity is still
    // authenticated (kept token keys) and served the cached certificate.
    m.server.stop();
    let resp = relay_sds(secure, &token("bookinfo-ratings"), "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&resp),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
}

fn secret_parts(resp: &DiscoveryResponse) -> (Option<String>, Option<String>) {
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

async fn next_sds(stream: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no SDS response within 10 s")
        .unwrap()
        .unwrap()
}

async fn ack(tx: &mpsc::Sender<DiscoveryRequest>, resp: &DiscoveryResponse) {
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

#[tokio::test]
async fn a_root_rotation_reaches_sidecars_behind_a_relay_and_waits_for_them() {
    let m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let relays = m.server.relay_proxies.clone().unwrap();
    let token = workload_token(&ca, "bookinfo-ratings");
    let (tx, mut stream) = relay_sds_stream(relay.secure_addr.unwrap(), &token, "sidecar-r1")
        .await
        .unwrap();
    let first = next_sds(&mut stream).await;
    ack(&tx, &first).await;
    // The relay hears the trust state and reports itself and its sidecar at it.
    let epoch0 = ca.current().epoch;
    for _ in 0..100 {
        if relays.get("b").is_some_and(|r| r.trust_epoch == epoch0)
            && relays.pending(epoch0).0.is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relays.get("b").map(|r| r.trust_epoch), Some(epoch0));

    let old_root = ca.current().roots[0].fingerprint.clone();
    ca.start_rotation().unwrap();
    // Both roots reach the sidecar; until it ACKs, the rotation waits for it.
    let mut last = next_sds(&mut stream).await;
    let (_, bundle) = secret_parts(&last);
    let roots = <rustls_pki_types::CertificateDer<'static> as rustls_pki_types::pem::PemObject>::pem_slice_iter(
        bundle.unwrap().as_bytes(),
    )
    .count();
    assert_eq!(roots, 2, "both roots in the sidecar's bundle");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ca.rotation().map(|r| r.phase),
        Some(cert_authority::Phase::AddNewRoot),
        "the rotation moved on without the sidecar behind the relay"
    );
    let (pending, _) = relays.pending(ca.current().epoch);
    assert!(
        pending.iter().any(|p| p.node == "b/sidecar-r1"),
        "{pending:?}"
    );

    // The sidecar ACKs whatever it gets: the rotation runs to the end.
    ack(&tx, &last).await;
    for _ in 0..120 {
        if ca.rotation().is_none() {
            break;
        }
        if let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .map(Result::transpose)
        {
            ack(&tx, &r).await;
            last = r;
        }
    }
    assert!(ca.rotation().is_none(), "the rotation did not finish");
    let trust = ca.current();
    assert_eq!(trust.roots.len(), 1);
    assert_ne!(trust.roots[0].fingerprint, old_root);
    // Whatever came last: the new root only, and a certificate under it.
    while let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .map(Result::transpose)
    {
        ack(&tx, &r).await;
        last = r;
    }
    let (chain, bundle) = secret_parts(&last);
    assert_eq!(bundle.unwrap().trim(), trust.roots[0].pem.trim());
    let p = relay.registry.find("sidecar-r1").unwrap();
    assert_eq!(
        p.secrets().cert_root.as_deref(),
        Some(trust.signer.as_str()),
        "the sidecar's certificate is not under the new root"
    );
    assert!(chain.is_some());
    // The relay itself: its certificate under the new root, its trust files on the new
    // bundle only (sidecars' bootstraps watch them).
    let id = relay.identity.read().unwrap().clone();
    assert_eq!(id.anchor.as_deref(), Some(trust.signer.as_str()));
    let kept =
        std::fs::read_to_string(m.dir.path().join("relay-b").join("trust-bundle.pem")).unwrap();
    assert_eq!(kept.trim(), trust.roots[0].pem.trim());
    // And it still reaches the control plane (its new certificate, the new root).
    let again = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(
        cert_identity(&again),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
}

#[tokio::test]
async fn a_class_no_sidecar_uses_any_more_is_retired_and_comes_back_when_needed() {
    let m = mesh().await;
    let relay = m
        .relay_with(
            Some(m.join_token("b")),
            "relay-b",
            Duration::from_secs(2),
            100,
        )
        .await
        .unwrap();
    let streams = || relay.upstream.streams.load(Ordering::Relaxed);
    // ratings-b (a workload of the registry folder) is kept ready: one stream.
    until("the registry workload's stream", || streams() == 1).await;
    let held = hold(relay.xds_addr, "sidecar-held").await;
    until("a second stream for namespace default", || streams() == 2).await;
    // While its sidecar is connected the class stays, however long that is.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(streams(), 2, "a class in use was retired");
    drop(held);
    until("the idle class to be retired", || {
        streams() == 1 && relay.cache.classes().len() == 1
    })
    .await;
    // The registry workload's class survived; a new sidecar of the retired class has it
    // fetched again and gets its config.
    let classes = relay.cache.classes();
    assert_eq!(classes[0].0.workload.as_deref(), Some("ratings-b.default"));
    let again = cds(relay.xds_addr, "sidecar-new").await;
    assert!(!again.resources.is_empty());
}

#[tokio::test]
async fn a_relay_restarted_while_the_control_plane_is_away_serves_from_its_state_dir() {
    let mut m = mesh().await;
    let relay = m.relay(Some(m.join_token("b")), "relay-b").await.unwrap();
    let ca = m.server.authority.clone().unwrap();
    let token = workload_token(&ca, "bookinfo-ratings");
    let before = cds(relay.xds_addr, "sidecar-1").await;
    let sds = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r1")
        .await
        .unwrap();
    let chain = secret_parts(&sds).0.unwrap();
    // The cache goes to disk within a couple of seconds of changing.
    let state = m.dir.path().join("relay-b");
    for _ in 0..100 {
        let kept = std::fs::read(state.join("cache.pb")).unwrap_or_default();
        if relay::persist::decode(&kept).is_ok_and(|k| k.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        relay::persist::decode(&std::fs::read(state.join("cache.pb")).unwrap())
            .unwrap()
            .len(),
        2,
        "namespace default and ratings-b kept"
    );

    // The control plane goes away, then the relay restarts.
    m.server.stop();
    drop(relay);
    let relay = m.relay(None, "relay-b").await.unwrap();
    let after = cds(relay.xds_addr, "sidecar-2").await;
    assert_eq!(after.version_info, before.version_info);
    assert_eq!(after.resources.len(), before.resources.len());
    // A sidecar of a known identity gets the kept certificate (the relay cannot get a
    // new one signed now), and only its own.
    let sds = relay_sds(relay.secure_addr.unwrap(), &token, "sidecar-r2")
        .await
        .unwrap();
    assert_eq!(secret_parts(&sds).0.unwrap(), chain);
    assert_eq!(
        cert_identity(&sds),
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
    let kept = state
        .join("identities")
        .join("default.bookinfo-ratings.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(kept).unwrap().permissions().mode() & 0o777,
        0o600,
        "a kept key is private"
    );
}

#[tokio::test]
async fn a_relay_refuses_a_proxy_class_beyond_its_limit_with_the_reason() {
    let m = mesh().await;
    let relay = m
        .relay_with(
            Some(m.join_token("b")),
            "relay-b",
            Duration::from_secs(600),
            2,
        )
        .await
        .unwrap();
    // ratings-b (the registry's workload) and namespace default's outbound-only proxies:
    // two classes, the limit.
    let ok = cds(relay.xds_addr, "sidecar-1").await;
    assert!(!ok.resources.is_empty());
    until("both classes' streams", || {
        relay.upstream.streams.load(Ordering::Relaxed) == 2
    })
    .await;
    let other = "sidecar~127.0.9.9~other.default~default.svc.cluster.local";
    let err = try_cds(relay.xds_addr, other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("at most 2 proxy classes"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("other.default"), "{}", err.message());
    assert_eq!(relay.upstream.streams.load(Ordering::Relaxed), 2);
    // Classes it has are still served.
    let again = cds(relay.xds_addr, "sidecar-2").await;
    assert_eq!(again.version_info, ok.version_info);
}
