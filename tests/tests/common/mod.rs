//! What the end-to-end fixtures share, and the plaintext mesh of the routing tests.
//!
//! Three fixtures run real processes: the plaintext [`Mesh`] (one `xds-server`, a client
//! and reviews/ratings workloads, routing config), the security mesh (`security/`: the
//! server's secure port and CA, sidecars with certificates) and the multi-cluster mesh
//! (`multicluster/`: an MCPC, relays, member clusters). They have in common, written once
//! here:
//!
//! - workloads and their sidecars: [`WorkloadDef`], [`Addrs`], [`Sidecar`], and what every
//!   fixture does with them ([`SidecarMesh`]: starting a sidecar, lookups, Envoy stats,
//!   convergence as `/debug/syncz` reports it);
//! - the Istio-style YAML the control plane reads ([`mesh_yaml`], [`services_yaml`],
//!   [`workloads_yaml`]);
//! - the Trellis processes: `xds-server serve` until ready, the CLI commands, stopping;
//! - requests through a sidecar and what the echo app answered ([`call`],
//!   [`served_version`]), and continuous traffic while something changes ([`Traffic`]).
//!
//! Addresses: every test gets its own loopback block `127.0.X.0/24` ([`LoopbackNet`]); a
//! workload with host part N has its sidecar's inbound listener on `127.0.X.N`, its echo
//! app on `.N+50` and its sidecar's outbound listener and Envoy admin on `.N+100`. The
//! control plane listens on `127.0.X.1`.
//!
//! [`LoopbackNet`]: trellis_tests::LoopbackNet
// Each test binary uses a different part of this module.
#![allow(dead_code)]

mod certs;
mod config;
mod continuous;
mod mesh;
mod processes;
mod sidecars;
mod syncz;
mod traffic;

// Each test binary uses some of these; the others would be unused imports there.
#[allow(unused_imports)]
pub use self::{
    certs::*, config::*, continuous::*, mesh::*, processes::*, sidecars::*, syncz::*, traffic::*,
};
pub(crate) use sidecars::sidecar_mesh_fields;

use std::time::Duration;

pub const NAMESPACE: &str = "default";
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Every service (and so every outbound listener and every inbound port) uses this port.
pub const PORT: u16 = 9080;
pub const POLL: Duration = Duration::from_millis(100);
/// Bound on a single control plane converging (every sidecar connected and ACKing), a
/// routing change reaching the data plane, and reconnection after a server restart.
/// Generous for a loaded 2-core machine; the usual time is well under a second or two.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request deadline of checks and traffic loops through the sidecars: requests take
/// milliseconds, a request still open after this counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
