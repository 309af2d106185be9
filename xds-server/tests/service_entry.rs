//! ServiceEntry beyond STATIC: DNS resolution, passthrough (NONE), HTTPS and TLS routed by
//! SNI, wildcard hosts, VIPs, named endpoints and subjectAltNames. Golden files of what a
//! sidecar gets for `fixtures/egress/`, checked by `envoy --mode validate`, and the
//! validation errors of what Istio does not allow either.
#![allow(clippy::unwrap_used)]

mod translated;

use translated::{ads_bootstrap, check_dump, fixture, inline_endpoints, open_store, resources};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::parse::parse_file;
use xds_server::translate::ProxyScope;

fn snapshot() -> Snapshot {
    Snapshot::build(1, open_store(&fixture("egress")).mesh())
}

fn client() -> ProxyScope {
    ProxyScope::Workload("client.default".into())
}

#[test]
fn golden_config_of_a_sidecar_with_external_services() {
    let snap = snapshot();
    check_dump("egress.clusters", &snap, &client(), TypeKind::Cluster);
    check_dump("egress.listeners", &snap, &client(), TypeKind::Listener);
    check_dump("egress.routes", &snap, &client(), TypeKind::Route);
}

#[test]
fn dns_services_have_no_eds_and_none_has_no_listener() {
    let snap = snapshot();
    let view = snap.view(&client());
    let names: Vec<String> = view
        .iter(TypeKind::Endpoint)
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(
        names,
        ["outbound|9080||client.default.svc.cluster.local"],
        "only STATIC services go over EDS"
    );
    // The wildcard passthrough has its cluster but no SNI chain (explicit mode).
    assert!(view
        .get(TypeKind::Cluster, "outbound|443||*.wild.test")
        .is_some());
    let listeners = translated::dump(&snap, &client(), TypeKind::Listener).to_string();
    assert!(listeners.contains("secure.test"), "{listeners}");
    assert!(!listeners.contains("wild.test"), "{listeners}");
}

#[test]
fn envoy_accepts_the_generated_config() {
    let Some(envoy) = trellis_tests::require_envoy() else {
        return;
    };
    let snap = snapshot();
    let mut clusters = resources(&snap, &client(), TypeKind::Cluster);
    let endpoints = resources(&snap, &client(), TypeKind::Endpoint);
    inline_endpoints(&mut clusters, &endpoints);
    let listeners = resources(&snap, &client(), TypeKind::Listener);
    let bootstrap = ads_bootstrap(
        "sidecar~127.0.1.1~client.default~default.svc.cluster.local",
        "egress-validate",
        listeners,
        clusters,
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = serde_json::to_string_pretty(&bootstrap).unwrap();
    trellis_tests::envoy_validate(&envoy, dir.path(), "egress", &yaml).unwrap();
}

const SE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [HOSTS]
  location: MESH_EXTERNAL
  resolution: RESOLUTION
  ports: [{number: 443, name: tls, protocol: TLS}]
";

/// The one error of a ServiceEntry with `hosts`, `resolution` and `extra` spec lines.
fn error(hosts: &str, resolution: &str, extra: &str) -> (String, String) {
    let text = SE.replace("HOSTS", hosts).replace("RESOLUTION", resolution) + extra;
    let errs = parse_file("se.yaml", &text).expect_err("must be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = &errs[0];
    assert_eq!(e.object.as_deref(), Some("ServiceEntry default/ext"), "{e}");
    (e.field.clone().unwrap_or_default(), e.message.clone())
}

#[test]
fn what_istio_does_not_allow_is_an_error_naming_the_field() {
    let (f, m) = error("\"*.example.com\"", "STATIC", "");
    assert_eq!(f, "spec.resolution");
    assert!(m.contains("wildcard"), "{m}");

    let (f, m) = error("\"*.example.com\"", "DNS", "");
    assert_eq!(f, "spec.resolution");
    assert!(m.contains("needs endpoints"), "{m}");

    let (f, m) = error("\"*\"", "NONE", "");
    assert_eq!(f, "spec.hosts[0]");
    assert!(m.contains("`*` alone"), "{m}");

    let (f, m) = error(
        "a.example.com",
        "NONE",
        "  endpoints: [{address: 10.0.0.1}]\n",
    );
    assert_eq!(f, "spec.endpoints");
    assert!(m.contains("takes no endpoints"), "{m}");

    let (f, m) = error(
        "a.example.com",
        "DNS_ROUND_ROBIN",
        "  endpoints: [{address: a.example.net}, {address: b.example.net}]\n",
    );
    assert_eq!(f, "spec.endpoints");
    assert!(m.contains("at most one endpoint"), "{m}");

    let (f, m) = error(
        "a.example.com",
        "STATIC",
        "  endpoints: [{address: a.example.net}]\n",
    );
    assert_eq!(f, "spec.endpoints[0].address");
    assert!(m.contains("resolution DNS"), "{m}");

    let (f, _) = error("a.example.com", "NONE", "  addresses: [10.0.0.0/33]\n");
    assert_eq!(f, "spec.addresses[0]");

    let (f, m) = error("a.example.com", "DNS", "  endpoints: [{address: -bad-}]\n");
    assert_eq!(f, "spec.endpoints[0].address");
    assert!(m.contains("not a valid DNS host name"), "{m}");

    let mesh = "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec:\n  dnsResolvers: [\"dns.example.com:53\"]\n";
    let errs = parse_file("mesh.yaml", mesh).expect_err("rejected");
    assert_eq!(errs[0].field.as_deref(), Some("spec.dnsResolvers[0]"));
}

#[test]
fn the_resolutions_istio_users_write_are_accepted() {
    for (hosts, resolution, extra) in [
        ("\"*.example.com\"", "NONE", ""),
        ("a.example.com", "DNS", ""),
        ("a.example.com", "DNS_ROUND_ROBIN", ""),
        (
            "a.example.com",
            "DNS",
            "  endpoints: [{address: a.example.net}, {address: 10.0.0.2}]\n",
        ),
        (
            "a.example.com",
            "STATIC",
            "  endpoints: [{address: 10.0.0.1}]\n",
        ),
        (
            "a.example.com",
            "NONE",
            "  addresses: [10.0.0.0/24, 10.1.0.1]\n",
        ),
    ] {
        let text = SE.replace("HOSTS", hosts).replace("RESOLUTION", resolution) + extra;
        if let Err(e) = parse_file("se.yaml", &text) {
            panic!("{hosts} {resolution}: {e:?}");
        }
    }
}
