use super::*;
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager, Rds,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Name;

/// What one response produced, the requests split back into messages.
struct Out {
    requests: Vec<Bytes>,
    nacked: bool,
    marker: Option<u64>,
}

/// The gRPC-framed messages of a send buffer.
fn split(mut b: Bytes) -> Vec<Bytes> {
    use bytes::Buf;
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(b.get_u8(), 0, "uncompressed");
        let len = b.get_u32() as usize;
        out.push(b.split_to(len));
    }
    out
}

trait Drive {
    fn on(&mut self, msg: &[u8], scan: Scan) -> Result<Out>;
    fn start(&mut self) -> Vec<Bytes>;
}

impl Drive for Envoy {
    fn on(&mut self, msg: &[u8], scan: Scan) -> Result<Out> {
        let mut buf = BytesMut::new();
        let o = self.on_message(msg, scan, &mut buf)?;
        Ok(Out {
            requests: split(buf.freeze()),
            nacked: o.nacked,
            marker: o.marker,
        })
    }

    fn start(&mut self) -> Vec<Bytes> {
        let mut buf = BytesMut::new();
        let n = self.start_stream(&mut buf);
        let requests = split(buf.freeze());
        assert_eq!(requests.len(), n);
        requests
    }
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn clusters() -> Vec<Any> {
    let eds = |n: &str| Cluster {
        name: n.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    };
    vec![
        any(&eds("outbound|8080||a")),
        any(&eds("outbound|8080||b")),
        any(&Cluster {
            name: "static".into(),
            ..Default::default()
        }),
    ]
}

fn cla(name: &str, marker: Option<&str>) -> Any {
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address, Address, SocketAddress,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        lb_endpoint, Endpoint, LbEndpoint, LocalityLbEndpoints,
    };
    let eps = marker
        .map(|ip| LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: ip.into(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        })
        .into_iter()
        .collect();
    any(&ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: eps,
        ..Default::default()
    })
}

fn listener() -> Any {
    let hcm = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: "8080".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    any(&Listener {
        name: "127.0.0.1_8080".into(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "hcm".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn route() -> Any {
    any(&RouteConfiguration {
        name: "8080".into(),
        ..Default::default()
    })
}

fn sotw(kind: Kind, version: &str, nonce: &str, resources: Vec<Any>) -> Vec<u8> {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn req(b: &Bytes) -> DiscoveryRequest {
    DiscoveryRequest::decode(b.clone()).unwrap()
}

fn dreq(b: &Bytes) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest::decode(b.clone()).unwrap()
}

#[test]
fn sotw_follows_envoy_ordering_and_acks() {
    let mut e = Envoy::new(Mode::Sotw, 0, None);
    let first = e.start();
    assert_eq!(first.len(), 1);
    let r = req(&first[0]);
    assert_eq!(r.type_url, Kind::Cds.type_url());
    assert!(r
        .node
        .unwrap()
        .id
        .starts_with("sidecar~127.1.0.1~bench-0.bench~"));

    let out = e
        .on(&sotw(Kind::Cds, "c1", "1", clusters()), Scan::default())
        .unwrap();
    assert_eq!(out.requests.len(), 2);
    let ack = req(&out.requests[0]);
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("c1", "1")
    );
    assert!(ack.node.is_none());
    let eds = req(&out.requests[1]);
    assert_eq!(eds.type_url, Kind::Eds.type_url());
    assert_eq!(
        eds.resource_names,
        vec!["outbound|8080||a", "outbound|8080||b"]
    );
    assert!(!e.is_synced());

    let out = e
        .on(
            &sotw(
                Kind::Eds,
                "e1",
                "2",
                vec![cla("outbound|8080||a", None), cla("outbound|8080||b", None)],
            ),
            Scan::default(),
        )
        .unwrap();
    assert_eq!(req(&out.requests[1]).type_url, Kind::Lds.type_url());

    let out = e
        .on(
            &sotw(Kind::Lds, "l1", "3", vec![listener()]),
            Scan::default(),
        )
        .unwrap();
    let rds = req(&out.requests[1]);
    assert_eq!(rds.type_url, Kind::Rds.type_url());
    assert_eq!(rds.resource_names, vec!["8080"]);
    assert!(!e.is_synced());

    let out = e
        .on(&sotw(Kind::Rds, "r1", "4", vec![route()]), Scan::default())
        .unwrap();
    assert_eq!(out.requests.len(), 1);
    assert!(e.is_synced());

    // An endpoint change carrying a marker.
    let out = e
        .on(
            &sotw(
                Kind::Eds,
                "e2",
                "5",
                vec![
                    cla("outbound|8080||a", Some("127.254.0.7")),
                    cla("outbound|8080||b", None),
                ],
            ),
            Scan {
                eds: true,
                rds: false,
            },
        )
        .unwrap();
    assert_eq!(out.marker, Some(7));
    assert!(e.is_synced());

    // Reconnect: every subscription again, with the accepted versions and no nonce.
    let again = e.start();
    let kinds: Vec<_> = again.iter().map(|b| req(b).type_url).collect();
    assert_eq!(kinds, Kind::ALL.map(|k| k.type_url().to_string()).to_vec());
    let eds = req(&again[1]);
    assert_eq!(eds.version_info, "e2");
    assert!(eds.response_nonce.is_empty());
    assert!(req(&again[0]).node.is_some());
    assert!(!e.is_synced());
}

#[test]
fn sotw_nack_keeps_the_last_accepted_version() {
    let mut e = Envoy::new(Mode::Sotw, 1, Some(Kind::Cds));
    e.start();
    let out = e
        .on(&sotw(Kind::Cds, "c1", "1", clusters()), Scan::default())
        .unwrap();
    assert!(out.nacked);
    let nack = req(&out.requests[0]);
    assert_eq!(nack.version_info, "");
    assert_eq!(nack.response_nonce, "1");
    assert!(nack.error_detail.is_some());
}

fn delta(
    kind: Kind,
    nonce: &str,
    resources: Vec<(&str, &str, Any)>,
    removed: Vec<&str>,
) -> Vec<u8> {
    DeltaDiscoveryResponse {
        system_version_info: "1".into(),
        resources: resources
            .into_iter()
            .map(|(name, version, a)| Resource {
                name: name.into(),
                version: version.into(),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        removed_resources: removed.into_iter().map(String::from).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn delta_subscribes_by_difference_and_resumes_with_versions() {
    let mut e = Envoy::new(Mode::Delta, 2, None);
    let first = e.start();
    let r = dreq(&first[0]);
    assert_eq!(r.type_url, Kind::Cds.type_url());
    assert!(r.resource_names_subscribe.is_empty());

    let cs = clusters();
    let out = e
        .on(
            &delta(
                Kind::Cds,
                "1",
                vec![
                    ("outbound|8080||a", "va", cs[0].clone()),
                    ("outbound|8080||b", "vb", cs[1].clone()),
                    ("static", "vs", cs[2].clone()),
                ],
                vec![],
            ),
            Scan::default(),
        )
        .unwrap();
    assert_eq!(dreq(&out.requests[0]).response_nonce, "1");
    let sub = dreq(&out.requests[1]);
    assert_eq!(
        sub.resource_names_subscribe,
        vec!["outbound|8080||a", "outbound|8080||b"]
    );

    // Only one endpoint set arrives: still pending.
    let out = e
        .on(
            &delta(
                Kind::Eds,
                "2",
                vec![("outbound|8080||a", "ea", cla("outbound|8080||a", None))],
                vec![],
            ),
            Scan::default(),
        )
        .unwrap();
    assert_eq!(out.requests.len(), 2, "ACK + LDS");
    e.on(
        &delta(Kind::Lds, "3", vec![("l", "vl", listener())], vec![]),
        Scan::default(),
    )
    .unwrap();
    e.on(
        &delta(Kind::Rds, "4", vec![("8080", "vr", route())], vec![]),
        Scan::default(),
    )
    .unwrap();
    assert!(!e.is_synced(), "b is still pending");
    e.on(
        &delta(Kind::Eds, "5", vec![], vec!["outbound|8080||b"]),
        Scan::default(),
    )
    .unwrap();
    assert!(e.is_synced());

    // Cluster b goes away: EDS unsubscribes it.
    let out = e
        .on(
            &delta(Kind::Cds, "6", vec![], vec!["outbound|8080||b"]),
            Scan::default(),
        )
        .unwrap();
    let unsub = dreq(&out.requests[1]);
    assert_eq!(unsub.resource_names_unsubscribe, vec!["outbound|8080||b"]);

    let again = e.start();
    assert_eq!(again.len(), 4);
    let cds = dreq(&again[0]);
    assert!(cds.node.is_some());
    assert_eq!(
        cds.initial_resource_versions
            .get("outbound|8080||a")
            .map(String::as_str),
        Some("va")
    );
    let eds = dreq(&again[1]);
    assert_eq!(eds.resource_names_subscribe, vec!["outbound|8080||a"]);
    assert_eq!(
        eds.initial_resource_versions
            .get("outbound|8080||a")
            .map(String::as_str),
        Some("ea")
    );
}

#[test]
fn clients_of_a_thread_share_what_they_derive_from_the_same_response() {
    let cds = sotw(Kind::Cds, "c1", "1", clusters());
    let mut a = Envoy::new(Mode::Sotw, 10, None);
    let mut b = Envoy::new(Mode::Sotw, 11, None);
    a.start();
    b.start();
    let ra = a.on(&cds, Scan::default()).unwrap();
    let rb = b.on(&cds, Scan::default()).unwrap();
    assert!(
        Arc::ptr_eq(&a.clusters, &b.clusters),
        "the second client reuses the digest"
    );
    assert_eq!(ra.requests[1], rb.requests[1], "the same EDS subscription");
    assert_eq!(b.cluster_count(), 3);
    // Different bytes: a new digest.
    let other = sotw(Kind::Cds, "c2", "2", clusters()[..1].to_vec());
    let rc = b.on(&other, Scan::default()).unwrap();
    assert_eq!(b.cluster_count(), 1);
    assert_eq!(
        req(&rc.requests[1]).resource_names,
        vec!["outbound|8080||a"]
    );
}

#[test]
fn eds_answers_the_subscription_in_any_order() {
    let mut e = Envoy::new(Mode::Sotw, 12, None);
    e.start();
    e.on(&sotw(Kind::Cds, "c1", "1", clusters()), Scan::default())
        .unwrap();
    // b before a: not the subscription's order, still every name.
    e.on(
        &sotw(
            Kind::Eds,
            "e1",
            "2",
            vec![cla("outbound|8080||b", None), cla("outbound|8080||a", None)],
        ),
        Scan::default(),
    )
    .unwrap();
    assert!(e.types[Kind::Eds.idx()].answered);
    // A first response with one name missing does not answer it.
    let mut f = Envoy::new(Mode::Sotw, 13, None);
    f.start();
    f.on(&sotw(Kind::Cds, "c1", "1", clusters()), Scan::default())
        .unwrap();
    f.on(
        &sotw(Kind::Eds, "e1", "2", vec![cla("outbound|8080||a", None)]),
        Scan::default(),
    )
    .unwrap();
    assert!(!f.types[Kind::Eds.idx()].answered);
}

#[test]
fn member_nodes_name_their_cluster_and_no_workload() {
    let n = member_node(7, "r3");
    let meta = |k: &str| match n.metadata.as_ref().unwrap().fields[k].kind.as_ref() {
        Some(value::Kind::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(meta("CLUSTER_ID"), "r3");
    assert_eq!(meta("NAMESPACE"), NAMESPACE);
    // Istio's id form, but the third part is no `NAME.NAMESPACE`: an outbound-only proxy
    // of the namespace, one proxy class for every client of a relay.
    let parts: Vec<&str> = n.id.split('~').collect();
    assert_eq!(parts.len(), 4, "{}", n.id);
    assert!(!parts[2].ends_with(&format!(".{NAMESPACE}")), "{}", n.id);
    assert_eq!(parts[3], format!("{NAMESPACE}.svc.cluster.local"));
    assert_ne!(member_node(8, "r3").id, n.id);
}
