//! Shared by the ADS protocol tests (`ads_sotw.rs`, `ads_delta.rs`, and the scripted
//! parts of `cluster_update.rs` and `multicluster_ads.rs`): an in-process server
//! on a temp config dir (copies of the examples mesh in `fixtures/protocol/`) and a
//! scripted ADS client that speaks SotW or Delta the way Envoy does. Config changes are
//! written to the dir and applied with a synchronous `Controller::reload`, so nothing
//! depends on the file watcher's timing. Every wait is bounded.
// Each test binary uses its own part of these helpers.
#![allow(dead_code, clippy::unwrap_used)]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route::Action, RouteConfiguration};
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use xds_server::ads::status::TypeStatus;
use xds_server::cache::TypeKind;
use xds_server::controller::Controller;
use xds_server::server::Server;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Upper bound for anything we wait for.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing is sent" is watched for.
pub const QUIET: Duration = Duration::from_millis(300);

/// The sidecar of WorkloadEntry reviews-v1: inbound + outbound config.
pub const REVIEWS_V1: &str = "sidecar~127.0.1.3~reviews-v1.default~default.svc.cluster.local";

pub const MESH: &str = include_str!("../fixtures/protocol/mesh.yaml");
pub const SERVICES: &str = include_str!("../fixtures/protocol/services.yaml");
pub const WORKLOADS: &str = include_str!("../fixtures/protocol/workloads.yaml");
pub const ROUTING: &str = include_str!("../fixtures/protocol/routing.yaml");

/// The config folder of the protocol mesh: file name and text.
pub const CONFIG_FILES: [(&str, &str); 4] = [
    ("mesh.yaml", MESH),
    ("services.yaml", SERVICES),
    ("workloads.yaml", WORKLOADS),
    ("routing.yaml", ROUTING),
];

/// An edit that updates ratings' cluster (its load balancer) but not its endpoints: Envoy
/// rebuilds such a cluster and waits for its assignment again.
pub const RATINGS_LEAST_REQUEST: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
";

pub fn outbound(svc: &str) -> String {
    format!("outbound|9080||{svc}.default.svc.cluster.local")
}

pub fn reviews_subset(subset: &str) -> String {
    format!("outbound|9080|{subset}|reviews.default.svc.cluster.local")
}

/// Clusters (and so EDS names) every proxy of namespace default gets.
pub fn outbound_clusters() -> BTreeSet<String> {
    let mut s: BTreeSet<String> = ["productpage", "details", "reviews", "ratings"]
        .iter()
        .map(|s| outbound(s))
        .collect();
    s.insert(reviews_subset("v1"));
    s.insert(reviews_subset("v2"));
    s
}

pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `services.yaml` without the ServiceEntry `name`.
pub fn services_without(name: &str) -> String {
    let marker = format!("  name: {name}\n");
    let docs: Vec<&str> = SERVICES
        .split("\n---\n")
        .filter(|d| !d.contains(&marker))
        .collect();
    assert_eq!(docs.len(), 3, "fixture services.yaml changed shape");
    docs.join("\n---\n")
}

/// Replaces exactly one occurrence, so a fixture edit cannot silently do nothing.
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} must occur once");
    text.replace(from, to)
}

// ---------------------------------------------------------------------------------------
// The server under test

pub struct Mesh {
    dir: tempfile::TempDir,
    pub server: Server,
}

impl Mesh {
    pub async fn start() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in CONFIG_FILES {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let server = start_server(dir.path().to_path_buf()).await;
        Mesh { dir, server }
    }

    /// Replaces a config file (atomically) and reloads; the change must take effect.
    pub async fn apply(&self, file: &str, text: &str) {
        let controller = self.server.controller.clone();
        let dir = self.dir.path().to_path_buf();
        let (file, text) = (file.to_string(), text.to_string());
        let reload = move || write_and_reload(&controller, &dir, &file, &text);
        // A reload blocks; re-raising its panic keeps the assertion's own message.
        if let Err(e) = tokio::task::spawn_blocking(reload).await {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// A SotW stream to this server; it must open.
    pub async fn sotw(&self, first: DiscoveryRequest) -> SotwStream {
        open_sotw(self.server.xds_addr, first).await.unwrap()
    }

    /// A Delta stream to this server; it must open.
    pub async fn delta(&self, first: DeltaDiscoveryRequest) -> DeltaStream {
        open_delta(self.server.xds_addr, first).await.unwrap()
    }

    pub fn status(&self, node: &str, kind: TypeKind) -> TypeStatus {
        type_status(&self.server, node, kind)
    }

    /// Polls the registry until `ok` holds for (node, kind); bounded by [`WAIT`].
    pub async fn wait_status(
        &self,
        node: &str,
        kind: TypeKind,
        ok: impl Fn(&TypeStatus) -> bool,
    ) -> TypeStatus {
        let mut last = TypeStatus::default();
        for _ in 0..1000 {
            last = self.status(node, kind);
            if ok(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{node} {kind:?}: status never reached the expected state; last: {last:?}");
    }
}

/// A server on `config_dir`, with xDS and admin on free loopback ports.
pub async fn start_server(config_dir: PathBuf) -> Server {
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Server::start(config_dir, xds, admin).await.unwrap()
}

/// Replaces `file` in `dir` (atomically) and reloads synchronously; the mesh must change.
pub fn write_and_reload(controller: &Controller, dir: &Path, file: &str, text: &str) {
    // Read first: the file watcher may reload before this does.
    let before = controller.snapshot().generation;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
    controller.reload();
    let after = controller.snapshot().generation;
    assert!(
        after > before,
        "{file}: the edit did not change the mesh (errors: {:?})",
        controller.status().errors
    );
}

/// What `server` recorded for `node`'s stream of `kind` (default before its first request).
pub fn type_status(server: &Server, node: &str, kind: TypeKind) -> TypeStatus {
    server
        .registry
        .find(node)
        .and_then(|p| p.type_status(kind))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The scripted client

/// One ADS stream: requests go in through `tx`, responses come out of `rx`.
pub struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
}

pub type SotwStream = Ads<DiscoveryRequest, DiscoveryResponse>;
pub type DeltaStream = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

pub async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<Channel> {
    timeout(
        WAIT,
        AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")),
    )
    .await
    .expect("connect timed out")
    .unwrap()
}

impl<Req, Resp: Message + Default + Debug> Ads<Req, Resp> {
    pub async fn send(&self, req: Req) {
        self.tx
            .send(req)
            .await
            .map_err(|_| "request stream closed")
            .unwrap();
    }

    /// The next response, or the stream's error status.
    pub async fn try_recv(&mut self) -> Result<Resp, tonic::Status> {
        match timeout(WAIT, self.rx.message())
            .await
            .expect("no response within 10 s")
        {
            Ok(Some(r)) => Ok(r),
            Ok(None) => panic!("the server ended the stream"),
            Err(e) => Err(e),
        }
    }

    pub async fn recv(&mut self) -> Resp {
        self.try_recv().await.unwrap()
    }

    /// Asserts that the server sends nothing for a short while.
    pub async fn expect_silence(&mut self) {
        if let Ok(m) = timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {m:?}");
        }
    }
}

/// The status a stream fails with, at open or instead of its first response; `served`
/// says what went wrong if it answers.
pub async fn stream_error<Req, Resp: Message + Default + Debug>(
    opened: Result<Ads<Req, Resp>, tonic::Status>,
    served: &str,
) -> tonic::Status {
    match opened {
        Ok(mut ads) => ads.try_recv().await.expect_err(served),
        Err(e) => e,
    }
}

/// Opens a SotW stream whose first request is `first` (carrying the node, or not).
pub async fn open_sotw(
    addr: SocketAddr,
    first: DiscoveryRequest,
) -> Result<SotwStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut c = client(addr).await;
    let rx = timeout(WAIT, c.stream_aggregated_resources(ReceiverStream::new(rx)))
        .await
        .expect("stream open timed out")?
        .into_inner();
    Ok(Ads { tx, rx })
}

pub async fn open_delta(
    addr: SocketAddr,
    first: DeltaDiscoveryRequest,
) -> Result<DeltaStream, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut c = client(addr).await;
    let rx = timeout(WAIT, c.delta_aggregated_resources(ReceiverStream::new(rx)))
        .await
        .expect("stream open timed out")?
        .into_inner();
    Ok(Ads { tx, rx })
}

pub fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        cluster: "test".into(),
        ..Default::default()
    })
}

pub fn request(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn first_request(id: &str, type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(id),
        ..request(type_url, names)
    }
}

/// What Envoy sends after accepting `resp` (keeping its subscription `names`).
pub fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..request(&resp.type_url, names)
    }
}

/// What Envoy sends after rejecting `resp`: its last accepted version, the nonce, the error.
pub fn nack(
    resp: &DiscoveryResponse,
    accepted: &str,
    names: &[&str],
    error: &str,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: accepted.into(),
        error_detail: Some(RpcStatus {
            code: Code::InvalidArgument as i32,
            message: error.into(),
            details: vec![],
        }),
        ..ack(resp, names)
    }
}

pub fn delta_request(type_url: &str, subscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn delta_first_request(id: &str, type_url: &str, subscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(id),
        ..delta_request(type_url, subscribe)
    }
}

pub fn delta_ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        response_nonce: resp.nonce.clone(),
        ..delta_request(&resp.type_url, &[])
    }
}

/// The name a resource carries inside itself, checking the Any's type on the way.
pub fn resource_name(type_url: &str, any: &Any) -> String {
    assert_eq!(
        any.type_url, type_url,
        "resource type differs from the response type"
    );
    let v = any.value.as_slice();
    match type_url {
        CDS => Cluster::decode(v).unwrap().name,
        EDS => ClusterLoadAssignment::decode(v).unwrap().cluster_name,
        LDS => Listener::decode(v).unwrap().name,
        RDS => RouteConfiguration::decode(v).unwrap().name,
        t => panic!("unexpected type {t}"),
    }
}

pub fn names(resp: &DiscoveryResponse) -> BTreeSet<String> {
    resp.resources
        .iter()
        .map(|a| resource_name(&resp.type_url, a))
        .collect()
}

/// name -> version of a delta response, checking each name against the resource body.
pub fn delta_versions(resp: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    resp.resources
        .iter()
        .map(|r| {
            assert_eq!(
                resource_name(&resp.type_url, r.resource.as_ref().unwrap()),
                r.name
            );
            assert!(!r.version.is_empty(), "{}: no version", r.name);
            (r.name.clone(), r.version.clone())
        })
        .collect()
}

/// Endpoint addresses ("ip:port") per ClusterLoadAssignment in an EDS response.
pub fn endpoints(resources: impl IntoIterator<Item = Any>) -> BTreeMap<String, BTreeSet<String>> {
    resources
        .into_iter()
        .map(|a| {
            let cla = ClusterLoadAssignment::decode(a.value.as_slice()).unwrap();
            let addrs = cla
                .endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .filter_map(|e| match &e.host_identifier {
                    Some(HostIdentifier::Endpoint(ep)) => match &ep.address.as_ref()?.address {
                        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                            Some(PortSpecifier::PortValue(p)) => Some(format!("{}:{p}", s.address)),
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            (cla.cluster_name, addrs)
        })
        .collect()
}

pub fn route_configs(resp: &DiscoveryResponse) -> Vec<RouteConfiguration> {
    resp.resources
        .iter()
        .map(|a| RouteConfiguration::decode(a.value.as_slice()).unwrap())
        .collect()
}

/// Timeouts (seconds) of every route of a RouteConfiguration response.
pub fn route_timeouts(resp: &DiscoveryResponse) -> BTreeSet<i64> {
    route_configs(resp)
        .into_iter()
        .flat_map(|rc| rc.virtual_hosts)
        .flat_map(|vh| vh.routes)
        .filter_map(|r| match r.action {
            Some(Action::Route(a)) => a.timeout.map(|t| t.seconds),
            _ => None,
        })
        .collect()
}

/// Subscribes a fresh SotW stream to CDS, EDS (every cluster), LDS and RDS "9080" the
/// way Envoy does, ACKing each; returns the stream and the accepted responses by type.
pub async fn sotw_subscribe_all(
    addr: SocketAddr,
    id: &str,
    versions: &HashMap<String, String>,
) -> (SotwStream, HashMap<String, DiscoveryResponse>) {
    let with_version = |mut r: DiscoveryRequest| {
        r.version_info = versions.get(&r.type_url).cloned().unwrap_or_default();
        r
    };
    let mut ads = open_sotw(addr, with_version(first_request(id, CDS, &[])))
        .await
        .unwrap();
    let mut got = HashMap::new();
    let cds = ads.recv().await;
    assert_eq!(cds.type_url, CDS);
    ads.send(ack(&cds, &[])).await;
    let clusters: Vec<String> = names(&cds)
        .into_iter()
        .filter(|n| n.starts_with("outbound|"))
        .collect();
    let clusters: Vec<&str> = clusters.iter().map(String::as_str).collect();
    got.insert(CDS.to_string(), cds);
    for (type_url, subscription) in [(EDS, clusters.as_slice()), (LDS, &[]), (RDS, &["9080"])] {
        ads.send(with_version(request(type_url, subscription)))
            .await;
        let resp = ads.recv().await;
        assert_eq!(
            resp.type_url, type_url,
            "responses must answer the request just made"
        );
        assert!(!resp.resources.is_empty(), "{type_url}: empty");
        ads.send(ack(&resp, subscription)).await;
        got.insert(type_url.to_string(), resp);
    }
    ads.expect_silence().await;
    (ads, got)
}
