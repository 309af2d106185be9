//! A member cluster's registry through the running server: `Controller::set_cluster_registry`
//! publishes a snapshot, and a sidecar of that cluster (node metadata `CLUSTER_ID`) gets
//! its own cluster's endpoints at priority 0 over ADS, its workload's listeners, pushes
//! when the registry changes, and the primary cluster's endpoints alone once the cluster
//! is removed. Errors in a report come back in its outcome and in the config status.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{address, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use prost::Message;
use std::sync::Arc;
use xds_server::config::store::RegistryOutcome;
use xds_server::controller::Controller;
use xds_server::mesh::ClusterMeta;

const REVIEWS_B: &str = "\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: reviews-v1
  namespace: default
  annotations:
    sidecar.trellis.dev/app-address: 127.0.12.3
    sidecar.trellis.dev/outbound-address: 127.0.13.3
spec:
  address: 127.0.11.3
  labels: {app: reviews, version: v1}
  ports: {http: 9080}
";

/// The sidecar of reviews-v1 in cluster b: the same node id as primary's reviews-v1
/// but for the address; the cluster comes from the metadata.
const NODE_B: &str = "sidecar~127.0.11.3~reviews-v1.default~default.svc.cluster.local";

fn meta_b() -> ClusterMeta {
    ClusterMeta {
        network: String::new(),
        region: Some("eu-west".into()),
        zone: Some("eu-west-1".into()),
    }
}

fn node_in(cluster: &str) -> Option<Node> {
    Some(Node {
        metadata: Some(Struct {
            fields: [(
                "CLUSTER_ID".to_string(),
                Value {
                    kind: Some(Kind::StringValue(cluster.into())),
                },
            )]
            .into(),
        }),
        ..node(NODE_B).unwrap()
    })
}

async fn report(c: &Arc<Controller>, files: &[(&str, &str)]) -> RegistryOutcome {
    let c = c.clone();
    let files = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || c.set_cluster_registry("b", meta_b(), files))
        .await
        .unwrap()
        .unwrap()
}

/// Endpoint addresses by priority of the single ClusterLoadAssignment in `resp`.
fn by_priority(resp: &DiscoveryResponse) -> Vec<(u32, String, Vec<String>)> {
    assert_eq!(resp.resources.len(), 1);
    let cla = ClusterLoadAssignment::decode(resp.resources[0].value.as_slice()).unwrap();
    cla.endpoints
        .iter()
        .map(|l| {
            let addrs = l
                .lb_endpoints
                .iter()
                .filter_map(|e| match &e.host_identifier {
                    Some(HostIdentifier::Endpoint(ep)) => match &ep.address.as_ref()?.address {
                        Some(address::Address::SocketAddress(s)) => Some(s.address.clone()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            let zone = l.locality.as_ref().map(|l| l.sub_zone.clone());
            (l.priority, zone.unwrap_or_default(), addrs)
        })
        .collect()
}

fn group(priority: u32, cluster: &str, addrs: &[&str]) -> (u32, String, Vec<String>) {
    (
        priority,
        cluster.into(),
        addrs.iter().map(|s| s.to_string()).collect(),
    )
}

#[tokio::test]
async fn a_member_clusters_sidecar_gets_its_own_endpoints_first() {
    let mesh = Mesh::start().await;
    let controller = mesh.server.controller.clone();
    let before = controller.snapshot().generation;
    let outcome = report(&controller, &[("registry/reviews.yaml", REVIEWS_B)]).await;
    assert!(outcome.changed && outcome.errors.is_empty(), "{outcome:?}");
    assert_eq!(outcome.generation, before + 1);
    assert_eq!(outcome.workloads, 1);
    let status = controller.status();
    assert_eq!(status.generation, before + 1);
    assert_eq!(status.cluster, "primary");
    assert_eq!(
        (
            status.clusters[0].name.as_str(),
            status.clusters[0].workloads
        ),
        ("b", 1)
    );

    let reviews = outbound("reviews");
    let mut first = first_request(NODE_B, EDS, &[&reviews]);
    first.node = node_in("b");
    let mut ads = mesh.sotw(first).await;
    let eds = ads.recv().await;
    assert_eq!(
        by_priority(&eds),
        [
            group(0, "b", &["127.0.11.3"]),
            group(1, "primary", &["127.0.1.3", "127.0.1.4"])
        ]
    );
    ads.send(ack(&eds, &[&reviews])).await;
    // Its own workload, found in cluster b: the inbound listener on b's address.
    ads.send(request(LDS, &[])).await;
    let lds = ads.recv().await;
    assert!(names(&lds).contains("127.0.11.3_9080"), "{:?}", names(&lds));
    ads.send(ack(&lds, &[])).await;

    // The relay reports a change: pushed at once, no file watcher involved.
    let moved = REVIEWS_B.replace("address: 127.0.11.3", "address: 127.0.11.33");
    let outcome = report(&controller, &[("registry/reviews.yaml", &moved)]).await;
    assert!(outcome.changed);
    let eds = ads.recv().await;
    assert_eq!(eds.type_url, EDS);
    assert_eq!(by_priority(&eds)[0], group(0, "b", &["127.0.11.33"]));
    ads.send(ack(&eds, &[&reviews])).await;

    // A bad file is reported back and keeps its last good version: nothing is pushed
    // to this proxy's endpoints.
    let bad = moved.replace("kind: WorkloadEntry", "kind: VirtualService");
    let outcome = report(&controller, &[("registry/reviews.yaml", &bad)]).await;
    assert!(!outcome.changed);
    assert_eq!(outcome.generation, before + 2);
    let error = outcome.errors[0].to_string();
    assert!(
        error.starts_with("cluster b: registry/reviews.yaml: document 1 (line 1): VirtualService"),
        "{error}"
    );
    let status = controller.status();
    assert_eq!(status.errors.len(), 1);
    assert_eq!(
        &*status.errors[0].error.file,
        "cluster b: registry/reviews.yaml"
    );
    assert_eq!(status.errors[0].message, error);

    // The cluster leaves: its endpoints are gone, the rest are priority 0 for everyone.
    let c = controller.clone();
    let outcome = tokio::task::spawn_blocking(move || c.remove_cluster_registry("b"))
        .await
        .unwrap();
    assert!(outcome.changed);
    // Its listeners change too (its workload is gone); wait for EDS.
    let eds = loop {
        let resp = ads.recv().await;
        if resp.type_url == EDS {
            break resp;
        }
        ads.send(ack(&resp, &[])).await;
    };
    assert_eq!(
        by_priority(&eds),
        [group(0, "primary", &["127.0.1.3", "127.0.1.4"])]
    );
    assert!(controller.status().clusters.is_empty());
    assert!(controller.status().errors.is_empty());
}
