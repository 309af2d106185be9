//! The YAML of a multi-cluster test mesh: the MCPC's MeshConfig and ServiceEntries, and
//! the WorkloadEntries of the member clusters' registry folders.

use std::collections::BTreeSet;

use trellis_tests::LoopbackNet;

use super::{addrs, WorkloadDef, NAMESPACE, PORT};

/// The MCPC's MeshConfig: its own cluster is the default (`primary`).
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

/// A ServiceEntry per app, selecting the workloads labelled `app: APP` in every cluster.
pub fn services_yaml(workloads: &[WorkloadDef]) -> String {
    let apps: BTreeSet<&str> = workloads
        .iter()
        .filter(|w| w.has_app)
        .map(|w| w.app)
        .collect();
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

/// The file of a workload's WorkloadEntry in its cluster's registry folder.
pub fn registry_file(w: &WorkloadDef) -> String {
    format!("{}.yaml", w.name)
}

/// The label that marks a workload as having a sidecar with a mesh certificate.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// A member cluster's WorkloadEntry, no locality (the cluster's, from its join, applies);
/// labelled `security.istio.io/tlsMode: istio` for an [`WorkloadDef::mtls`] workload,
/// plaintext (no identity) otherwise.
pub fn workload_entry_yaml(net: &LoopbackNet, w: &WorkloadDef) -> String {
    let a = addrs(net, w);
    let tls_label = if w.mtls {
        format!("\n    {TLS_MODE_LABEL}: istio")
    } else {
        String::new()
    };
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
    version: v1{tls_label}
  serviceAccount: {service_account}
  ports:
    http: {PORT}
",
        name = w.name,
        app = w.app,
        service_account = w.service_account,
        app_ip = a.app,
        outbound_ip = a.outbound,
        inbound_ip = a.inbound,
    )
}
