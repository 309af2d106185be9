//! The config a test mesh's control plane reads, as Istio-style YAML: MeshConfig,
//! ServiceEntries and WorkloadEntries for every fixture, and the plaintext mesh's reviews
//! routing (DestinationRule + VirtualService).

use std::collections::BTreeMap;

use trellis_tests::LoopbackNet;

use super::{WorkloadDef, NAMESPACE, PORT, WORKLOADS};

/// The file names of a generated config folder.
pub const MESH_FILE: &str = "mesh.yaml";
pub const SERVICES_FILE: &str = "services.yaml";
pub const WORKLOADS_FILE: &str = "workloads.yaml";
pub const DESTINATION_RULE_FILE: &str = "reviews-destination-rule.yaml";
pub const VIRTUAL_SERVICE_FILE: &str = "reviews-virtual-service.yaml";
/// The label that marks a workload as an mTLS-capable sidecar (as Istio's injector sets it).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Every file of the plaintext mesh's initial config, with its contents.
pub fn initial_files(net: &LoopbackNet) -> Vec<(&'static str, String)> {
    vec![
        (MESH_FILE, mesh_yaml()),
        (SERVICES_FILE, services_yaml_for(&["reviews", "ratings"])),
        (WORKLOADS_FILE, workloads_yaml(net, &WORKLOADS)),
        (DESTINATION_RULE_FILE, destination_rule_yaml()),
        (VIRTUAL_SERVICE_FILE, virtual_service_yaml()),
    ]
}

pub fn mesh_yaml() -> String {
    "apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
  namespace: trellis-system
spec:
  trustDomain: cluster.local
  connectTimeout: 1s
"
    .to_owned()
}

/// The ServiceEntry of `app`, selecting the workloads labelled `app: APP` (in every
/// cluster): HTTP on [`PORT`], and TCP on `tcp_port`.
pub fn service_entry_yaml(app: &str, tcp_port: Option<u16>) -> String {
    let tcp = tcp_port
        .map(|p| format!("  - {{number: {p}, name: tcp, protocol: TCP}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {app}
  namespace: {NAMESPACE}
spec:
  hosts: [{app}.{NAMESPACE}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {PORT}, name: http, protocol: HTTP}}
{tcp}  workloadSelector:
    labels: {{app: {app}}}
"
    )
}

/// An HTTP-only ServiceEntry per app.
pub fn services_yaml_for(apps: &[&str]) -> String {
    apps.iter()
        .map(|app| service_entry_yaml(app, None))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A ServiceEntry per app of `workloads`, with a TCP port if one of its workloads has one.
pub fn services_yaml<C>(workloads: &[WorkloadDef<C>]) -> String {
    let mut services: BTreeMap<&str, Option<u16>> = BTreeMap::new();
    for w in workloads.iter().filter(|w| w.has_app) {
        let tcp = services.entry(w.app).or_default();
        *tcp = tcp.or(w.tcp_port);
    }
    services
        .iter()
        .map(|(app, tcp)| service_entry_yaml(app, *tcp))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The WorkloadEntry of `w`, no locality (in a member cluster, the cluster's applies);
/// labelled `security.istio.io/tlsMode: istio` for an [`WorkloadDef::mtls`] workload.
pub fn workload_entry_yaml<C>(net: &LoopbackNet, w: &WorkloadDef<C>) -> String {
    let a = w.addrs(net);
    let tls_label = if w.mtls {
        format!("\n    {TLS_MODE_LABEL}: istio")
    } else {
        String::new()
    };
    let tcp = w
        .tcp_port
        .map(|p| format!("    tcp: {p}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {NAMESPACE}
  annotations:
    sidecar.trellis.dev/app-address: \"{app_ip}\"
    sidecar.trellis.dev/outbound-address: \"{outbound_ip}\"
spec:
  address: \"{inbound_ip}\"
  labels:
    app: {app}
    version: {version}{tls_label}
  serviceAccount: {service_account}
  ports:
    http: {PORT}
{tcp}",
        name = w.name,
        app = w.app,
        version = w.version,
        service_account = w.service_account,
        app_ip = a.app,
        outbound_ip = a.outbound,
        inbound_ip = a.inbound,
    )
}

/// The WorkloadEntries of `workloads`, in one file.
pub fn workloads_yaml<C>(net: &LoopbackNet, workloads: &[WorkloadDef<C>]) -> String {
    workloads
        .iter()
        .map(|w| workload_entry_yaml(net, w))
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn destination_rule_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: {NAMESPACE}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"
    )
}

/// The `/beta` match of [`virtual_service_yaml`], for tests that replace it.
pub const BETA_MATCH: &str = "uri: {prefix: /beta}";
/// The first weight of the default split of [`virtual_service_yaml`].
pub const V1_WEIGHT: &str = "weight: 80";

/// The VirtualService `reviews` with `http`, its list of routes.
pub fn reviews_virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: {NAMESPACE}
spec:
  hosts: [reviews]
  http:
{http}"
    )
}

/// reviews: `end-user: jason` -> v2, `/beta...` -> v2, everything else 80/20 v1/v2.
pub fn virtual_service_yaml() -> String {
    reviews_virtual_service(&format!(
        "  - name: jason
    match:
    - headers:
        end-user: {{exact: jason}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: beta
    match:
    - {BETA_MATCH}
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: split
    route:
    - destination: {{host: reviews, subset: v1}}
      {V1_WEIGHT}
    - destination: {{host: reviews, subset: v2}}
      weight: 20
"
    ))
}

/// reviews: every request to `subset`.
pub fn virtual_service_all_to(subset: &str) -> String {
    reviews_virtual_service(&format!(
        "  - name: all-{subset}
    route:
    - destination: {{host: reviews, subset: {subset}}}
"
    ))
}

/// `text` with `from` replaced by `to`; panics if `from` does not occur, so a test edit
/// can never silently be a no-op.
#[track_caller]
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "expected exactly one `{from}` in:\n{text}"
    );
    text.replacen(from, to, 1)
}
