//! Which sidecars a VirtualService reaches: `gateways` (one bound only to gateways is
//! accepted and reaches no sidecar, as in Istio), wildcard hosts (`*.example.com`: every
//! matching service, an exact host first; `*` only for gateways) and `exportTo` (`.`: only
//! proxies of its own namespace).
#![allow(clippy::unwrap_used)]

use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::parse::parse_file;
use xds_server::config::ConfigObject;
use xds_server::dump::resource_json;
use xds_server::mesh::MeshState;
use xds_server::translate::ProxyScope;

const SERVICES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [a.example.com, b.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
";

fn mesh(extra: &str) -> Result<MeshState, String> {
    let text = format!("{SERVICES}---\n{extra}");
    let objects: Vec<ConfigObject> = parse_file("vs.yaml", &text).map_err(|e| format!("{e:?}"))?;
    MeshState::build(&objects).map_err(|e| format!("{e:?}"))
}

/// The route names of the virtual host of `host` in route config 80, for proxies of `ns`.
fn routes_of(mesh: MeshState, ns: &str, host: &str) -> Vec<String> {
    let snap = Snapshot::build(1, std::sync::Arc::new(mesh));
    let view = snap.view(&ProxyScope::namespace(ns, "primary"));
    let rc = resource_json(view.get(TypeKind::Route, "80").unwrap())["resource"].clone();
    let vh = rc["virtualHosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == format!("{host}:80"))
        .cloned()
        .unwrap();
    vh["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn vs(name: &str, hosts: &str, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{hosts}]
{extra}  http:
  - name: {name}
    route:
    - destination: {{host: a.example.com}}
"
    )
}

#[test]
fn a_gateway_only_virtual_service_is_accepted_and_reaches_no_sidecar() {
    let m = mesh(&vs("gw", "\"*\"", "  gateways: [istio-system/ingress]\n")).unwrap();
    assert!(m.virtual_services.is_empty());
    assert_eq!(routes_of(m, "default", "a.example.com"), ["default"]);

    // Bound to both: sidecars get it.
    let m = mesh(&vs(
        "both",
        "a.example.com",
        "  gateways: [ingress, mesh]\n",
    ))
    .unwrap();
    assert_eq!(routes_of(m, "default", "a.example.com"), ["both"]);
}

#[test]
fn star_is_for_gateways_only() {
    let err = mesh(&vs("all", "\"*\"", "")).unwrap_err();
    assert!(
        err.contains("spec.hosts[0]") && err.contains("only for gateways"),
        "{err}"
    );
}

#[test]
fn a_wildcard_host_routes_every_matching_service_after_exact_ones() {
    let text = format!(
        "{}---\n{}",
        vs("wild", "\"*.example.com\"", ""),
        vs("exact", "b.example.com", "")
    );
    let m = mesh(&text).unwrap();
    assert_eq!(m.virtual_services["a.example.com"].key, "default/wild");
    assert_eq!(m.virtual_services["b.example.com"].key, "default/exact");

    let err = mesh(&vs("none", "\"*.nowhere.com\"", "")).unwrap_err();
    assert!(err.contains("*.nowhere.com"), "{err}");
}

#[test]
fn export_to_dot_keeps_routes_in_their_namespace() {
    let m = mesh(&vs("local", "a.example.com", "  exportTo: [\".\"]\n")).unwrap();
    assert_eq!(routes_of(m.clone(), "default", "a.example.com"), ["local"]);
    assert_eq!(routes_of(m, "other", "a.example.com"), ["default"]);

    let m = mesh(&vs("listed", "a.example.com", "  exportTo: [other]\n")).unwrap();
    assert_eq!(routes_of(m.clone(), "other", "a.example.com"), ["listed"]);
    assert_eq!(routes_of(m, "default", "a.example.com"), ["default"]);

    let err = mesh(&vs(
        "bad",
        "a.example.com",
        "  exportTo: [Not_A_Namespace]\n",
    ))
    .unwrap_err();
    assert!(err.contains("spec.exportTo[0]"), "{err}");
}
