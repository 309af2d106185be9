//! The test mesh's config folder, as Istio-style YAML: services reviews (v1, v2) and
//! ratings, a client workload, and reviews routing (DestinationRule + VirtualService).

use trellis_tests::LoopbackNet;

use super::{workload_addrs, NAMESPACE, PORT, WORKLOADS};

/// The file names of the generated config folder.
pub const MESH_FILE: &str = "mesh.yaml";
pub const SERVICES_FILE: &str = "services.yaml";
pub const WORKLOADS_FILE: &str = "workloads.yaml";
pub const DESTINATION_RULE_FILE: &str = "reviews-destination-rule.yaml";
pub const VIRTUAL_SERVICE_FILE: &str = "reviews-virtual-service.yaml";

/// Every file of the initial config, with its contents.
pub fn initial_files(net: &LoopbackNet) -> Vec<(&'static str, String)> {
    vec![
        (MESH_FILE, mesh_yaml()),
        (SERVICES_FILE, services_yaml()),
        (WORKLOADS_FILE, workloads_yaml(net)),
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

/// ServiceEntries reviews and ratings.
pub fn services_yaml() -> String {
    services_yaml_for(&["reviews", "ratings"])
}

/// A ServiceEntry per app, selecting the workloads labelled `app: APP`.
pub fn services_yaml_for(apps: &[&str]) -> String {
    apps.iter()
        .map(|app| {
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
  workloadSelector:
    labels: {{app: {app}}}
"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn workloads_yaml(net: &LoopbackNet) -> String {
    WORKLOADS
        .iter()
        .map(|w| {
            let a = workload_addrs(net, w);
            format!(
                "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {NAMESPACE}
  annotations:
    sidecar.trellis.dev/app-address: {app_ip}
    sidecar.trellis.dev/outbound-address: {outbound_ip}
spec:
  address: {inbound_ip}
  labels: {{app: {app}, version: {version}}}
  serviceAccount: {app}
  ports: {{http: {PORT}}}
",
                name = w.name,
                app = w.app,
                version = w.version,
                app_ip = a.app,
                outbound_ip = a.outbound,
                inbound_ip = a.inbound,
            )
        })
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

/// reviews: `end-user: jason` -> v2, `/beta...` -> v2, everything else 80/20 v1/v2.
pub fn virtual_service_yaml() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: {NAMESPACE}
spec:
  hosts: [reviews]
  http:
  - name: jason
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
    )
}

/// reviews: every request to `subset`.
pub fn virtual_service_all_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: {NAMESPACE}
spec:
  hosts: [reviews]
  http:
  - name: all-{subset}
    route:
    - destination: {{host: reviews, subset: {subset}}}
"
    )
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
