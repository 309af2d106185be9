//! The test mesh's config folder, as Istio-style YAML: WorkloadEntries labelled as
//! mTLS-capable sidecars, ServiceEntries (HTTP and TCP ports), PeerAuthentication.

use std::collections::BTreeMap;

use trellis_tests::LoopbackNet;

use super::{addrs, WorkloadDef, TLS_MODE_LABEL};
use crate::common::{NAMESPACE, PORT};

/// WorkloadEntries of `workloads`, each labelled as an mTLS-capable sidecar.
pub fn workloads_yaml(net: &LoopbackNet, workloads: &[WorkloadDef]) -> String {
    workloads
        .iter()
        .map(|w| {
            let a = addrs(net, w);
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
    version: v1
    {TLS_MODE_LABEL}: istio
  serviceAccount: {sa}
  ports:
    http: {PORT}
{tcp}",
                tcp = w
                    .tcp_port
                    .map(|p| format!("    tcp: {p}\n"))
                    .unwrap_or_default(),
                name = w.name,
                app = w.app,
                sa = w.service_account,
                app_ip = a.app,
                outbound_ip = a.outbound,
                inbound_ip = a.inbound,
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A ServiceEntry per app, selecting the workloads labelled `app: APP`: HTTP on
/// [`PORT`] and TCP on the app's `tcp_port`, if any.
pub fn services_yaml(workloads: &[WorkloadDef]) -> String {
    let mut services: BTreeMap<&str, Option<u16>> = BTreeMap::new();
    for w in workloads.iter().filter(|w| w.has_app) {
        let tcp = services.entry(w.app).or_default();
        *tcp = tcp.or(w.tcp_port);
    }
    services
        .iter()
        .map(|(app, tcp)| {
            let tcp = tcp
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
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// PeerAuthentication for the whole namespace.
pub fn peer_authentication_yaml(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: {mode}
"
    )
}
