//! The generated mesh: a config folder of Istio-style YAML that `xds-server` (or any
//! control plane reading the same files) serves to the simulated clients.
//!
//! Layout (one file per service, so an edit re-parses one small file):
//! - `mesh.yaml`: the MeshConfig;
//! - `svc-N.yaml`: ServiceEntry `svc-N` (namespace `bench`, port 8080 HTTP, selecting
//!   `app: svc-N`) and its E WorkloadEntries `svc-N-M` on `127.x.y.z` addresses (never
//!   dialed: they are only data);
//! - `policy-svc-N.yaml` for every tenth service: a DestinationRule with subsets v1/v2 and a
//!   VirtualService splitting traffic between them.
//!
//! Scenarios change the mesh through [`Mesh::change_endpoint`] and [`Mesh::change_policy`],
//! which plant a marker the clients can spot without decoding resources: endpoint
//! address `127.254.H.L` (change number `H*256+L`), route name `bench-seq-N`.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub const NAMESPACE: &str = "bench";
pub const PORT: u16 = 8080;
/// Every `POLICY_EVERY`th service (starting with `svc-0`) has a DestinationRule and a
/// VirtualService.
pub const POLICY_EVERY: usize = 10;
/// Endpoint markers: `127.254.H.L`.
pub const ENDPOINT_MARKER: &[u8] = b"127.254.";
/// Route markers: `bench-seq-N` (the VirtualService http route name).
pub const ROUTE_MARKER: &[u8] = b"bench-seq-";
/// Largest change number a marker address can carry.
const MAX_SEQ: u64 = 65_535;

/// `127.10.0.0` upward: workload addresses.
pub fn workload_address(i: usize) -> Ipv4Addr {
    let i = i as u32;
    Ipv4Addr::new(127, 10 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// `127.1.0.1` upward: one source address (and node id) per simulated client, so ten
/// thousand clients never run out of ephemeral ports on one destination.
pub fn client_address(j: usize) -> Ipv4Addr {
    let j = j as u32 + 1;
    Ipv4Addr::new(127, 1 + (j >> 16) as u8, (j >> 8) as u8, j as u8)
}

/// Real Envoy sidecars (`envoy-convergence`): at most this many per run.
pub const MAX_SIDECARS: usize = 2000;
/// Blocks of sidecar addresses, so that concurrent bench runs on one machine do not
/// collide: block `b` uses `127.9.(24b .. 24b+23).*`.
pub const SIDECAR_BLOCKS: u8 = 10;

/// What a sidecar address is for: the three addresses of one WorkloadEntry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarRole {
    /// The workload address (inbound listeners; none here: no service selects it).
    Workload = 0,
    /// `sidecar.trellis.dev/app-address`.
    App = 1,
    /// `sidecar.trellis.dev/outbound-address`: outbound listeners and Envoy's admin.
    Outbound = 2,
}

/// `127.9.X.Y`: sidecar `i` of address block `block` in `role`. Below the workload
/// addresses (`127.10.0.0` up) and above the simulated clients' (`127.1.0.1` up, which
/// reach `127.9.0.0` only past half a million clients).
pub fn sidecar_address(block: u8, role: SidecarRole, i: usize) -> Ipv4Addr {
    let j = (i % MAX_SIDECARS) as u32 + 1;
    let third = u32::from(block % SIDECAR_BLOCKS) * 24 + role as u32 * 8 + (j >> 8);
    Ipv4Addr::new(127, 9, third as u8, j as u8)
}

/// The address whose listening socket marks a sidecar block as taken (`.0` of the
/// block's first third octet: no sidecar uses it).
pub fn sidecar_block_lock(block: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 9, (block % SIDECAR_BLOCKS) * 24, 0)
}

/// The name of sidecar `i`'s WorkloadEntry (namespace [`NAMESPACE`]).
pub fn sidecar_name(i: usize) -> String {
    format!("sidecar-{i}")
}

pub fn marker_address(seq: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 254, (seq >> 8) as u8, seq as u8)
}

pub fn service_host(s: usize) -> String {
    format!("svc-{s}.{NAMESPACE}.svc.cluster.local")
}

#[derive(Debug, Clone, Copy)]
pub struct MeshSpec {
    pub services: usize,
    pub endpoints: usize,
}

impl MeshSpec {
    pub fn validate(&self) -> Result<()> {
        if self.services == 0 || self.endpoints == 0 {
            bail!("--services and --endpoints must be at least 1");
        }
        // Workload addresses live in 127.10.0.0 - 127.253.255.255.
        if self.services.saturating_mul(self.endpoints) > 244 * 65_536 {
            bail!("services x endpoints must stay below {}", 244 * 65_536);
        }
        Ok(())
    }

    pub fn policy_services(&self) -> usize {
        self.services.div_ceil(POLICY_EVERY)
    }

    /// Clusters a proxy of this mesh gets: one per service, plus v1/v2 subsets for
    /// services with a DestinationRule.
    pub fn clusters(&self) -> usize {
        self.services + 2 * self.policy_services()
    }
}

/// The config folder and the scenario edits applied to it so far.
#[derive(Debug)]
pub struct Mesh {
    dir: PathBuf,
    pub spec: MeshSpec,
    seq: u64,
    /// Per service, the current marker address of its first endpoint (if changed).
    endpoint_override: Vec<Option<Ipv4Addr>>,
    /// The route marker of svc-0's VirtualService.
    policy_seq: u64,
    /// Real Envoy sidecars: (count, address block); written to `sidecars.yaml`.
    sidecars: Option<(usize, u8)>,
}

impl Mesh {
    pub fn new(dir: impl Into<PathBuf>, spec: MeshSpec) -> Result<Mesh> {
        spec.validate()?;
        Ok(Mesh {
            dir: dir.into(),
            spec,
            seq: 0,
            endpoint_override: vec![None; spec.services],
            policy_seq: 0,
            sidecars: None,
        })
    }

    /// Adds `count` WorkloadEntries for real Envoy sidecars (`sidecar-N` in namespace
    /// `bench`, addresses of `block`), written by [`Mesh::write_all`].
    pub fn with_sidecars(mut self, count: usize, block: u8) -> Result<Mesh> {
        if count > MAX_SIDECARS {
            bail!("at most {MAX_SIDECARS} Envoy sidecars");
        }
        self.sidecars = Some((count, block));
        Ok(self)
    }

    /// The config folder.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes every file of the mesh.
    pub fn write_all(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        self.write("mesh.yaml", &mesh_config())?;
        for s in 0..self.spec.services {
            self.write(&format!("svc-{s}.yaml"), &self.service_yaml(s))?;
            if s.is_multiple_of(POLICY_EVERY) {
                self.write(&format!("policy-svc-{s}.yaml"), &self.policy_yaml(s))?;
            }
        }
        if let Some((count, block)) = self.sidecars {
            self.write("sidecars.yaml", &sidecars_yaml(count, block))?;
        }
        Ok(())
    }

    fn next_seq(&mut self) -> Result<u64> {
        if self.seq >= MAX_SEQ {
            bail!("more than {MAX_SEQ} mesh changes in one run");
        }
        self.seq += 1;
        Ok(self.seq)
    }

    /// Moves the first endpoint of `svc-{service}` to a new marker address and returns
    /// the change number. The file is replaced atomically (written aside, renamed).
    pub fn change_endpoint(&mut self, service: usize) -> Result<u64> {
        let s = service % self.spec.services;
        let seq = self.next_seq()?;
        self.endpoint_override[s] = Some(marker_address(seq));
        self.write(&format!("svc-{s}.yaml"), &self.service_yaml(s))?;
        Ok(seq)
    }

    /// Changes svc-0's VirtualService (route name and weights) and returns the change number.
    pub fn change_policy(&mut self) -> Result<u64> {
        let seq = self.next_seq()?;
        self.policy_seq = seq;
        self.write("policy-svc-0.yaml", &self.policy_yaml(0))?;
        Ok(seq)
    }

    fn write(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let path = self.dir.join(name);
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} into place", path.display()))
    }

    fn service_yaml(&self, s: usize) -> String {
        let mut y = String::with_capacity(400 + 330 * self.spec.endpoints);
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-{s}
  namespace: {NAMESPACE}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {PORT}, name: http, protocol: HTTP}}
  workloadSelector:
    labels: {{app: svc-{s}}}
",
            host = service_host(s)
        );
        for e in 0..self.spec.endpoints {
            let address = match (e, self.endpoint_override[s]) {
                (0, Some(a)) => a,
                _ => workload_address(s * self.spec.endpoints + e),
            };
            let version = if e.is_multiple_of(2) { "v1" } else { "v2" };
            let _ = write!(
                y,
                "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: svc-{s}-{e}
  namespace: {NAMESPACE}
spec:
  address: {address}
  labels: {{app: svc-{s}, version: {version}}}
  serviceAccount: svc-{s}
  ports: {{http: {PORT}}}
"
            );
        }
        y
    }

    fn policy_yaml(&self, s: usize) -> String {
        let seq = if s == 0 { self.policy_seq } else { 0 };
        // Alternate weights so every change is a real content change.
        let v1 = if seq.is_multiple_of(2) { 90 } else { 80 };
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: svc-{s}
  namespace: {NAMESPACE}
spec:
  host: svc-{s}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc-{s}
  namespace: {NAMESPACE}
spec:
  hosts: [svc-{s}]
  http:
  - name: bench-seq-{seq}
    route:
    - destination: {{host: svc-{s}, subset: v1}}
      weight: {v1}
    - destination: {{host: svc-{s}, subset: v2}}
      weight: {v2}
    timeout: 5s
",
            v2 = 100 - v1
        )
    }
}

/// WorkloadEntries for real Envoy sidecars. No service selects them (label
/// `app: bench-sidecar`, no ports), so each gets what the simulated clients get: the
/// mesh's outbound listeners (on its own outbound address), clusters, endpoints, routes.
fn sidecars_yaml(count: usize, block: u8) -> String {
    let mut y = String::with_capacity(400 * count);
    for i in 0..count {
        let _ = write!(
            y,
            "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {NAMESPACE}
  annotations:
    sidecar.trellis.dev/app-address: {app}
    sidecar.trellis.dev/outbound-address: {outbound}
spec:
  address: {address}
  labels: {{app: bench-sidecar}}
  serviceAccount: bench-sidecar
",
            name = sidecar_name(i),
            app = sidecar_address(block, SidecarRole::App, i),
            outbound = sidecar_address(block, SidecarRole::Outbound, i),
            address = sidecar_address(block, SidecarRole::Workload, i),
        );
    }
    y
}

fn mesh_config() -> String {
    "apiVersion: trellis.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
  namespace: trellis-system
spec:
  trustDomain: cluster.local
  connectTimeout: 2s
"
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_loopback() {
        assert_eq!(workload_address(0), Ipv4Addr::new(127, 10, 0, 0));
        assert_eq!(workload_address(65_537), Ipv4Addr::new(127, 11, 0, 1));
        assert_eq!(client_address(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(client_address(65_535), Ipv4Addr::new(127, 2, 0, 0));
        assert_eq!(marker_address(258), Ipv4Addr::new(127, 254, 1, 2));
        assert_eq!(
            sidecar_address(0, SidecarRole::Workload, 0),
            Ipv4Addr::new(127, 9, 0, 1)
        );
        assert_eq!(
            sidecar_address(1, SidecarRole::Outbound, 255),
            Ipv4Addr::new(127, 9, 24 + 16 + 1, 0)
        );
        let mut seen = std::collections::HashSet::new();
        for block in 0..SIDECAR_BLOCKS {
            assert!(seen.insert(sidecar_block_lock(block)));
            for role in [
                SidecarRole::Workload,
                SidecarRole::App,
                SidecarRole::Outbound,
            ] {
                for i in [0, 1, 254, 255, 256, MAX_SIDECARS - 1] {
                    assert!(
                        seen.insert(sidecar_address(block, role, i)),
                        "{block} {role:?} {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn writes_and_changes_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mesh::new(
            dir.path(),
            MeshSpec {
                services: 11,
                endpoints: 2,
            },
        )
        .unwrap();
        m.write_all().unwrap();
        assert!(dir.path().join("svc-10.yaml").exists());
        assert!(dir.path().join("policy-svc-10.yaml").exists());
        assert!(!dir.path().join("policy-svc-1.yaml").exists());
        assert_eq!(m.spec.clusters(), 11 + 4);
        let seq = m.change_endpoint(3).unwrap();
        let text = std::fs::read_to_string(dir.path().join("svc-3.yaml")).unwrap();
        assert!(text.contains(&format!("address: {}", marker_address(seq))));
        let seq = m.change_policy().unwrap();
        let text = std::fs::read_to_string(dir.path().join("policy-svc-0.yaml")).unwrap();
        assert!(text.contains(&format!("name: bench-seq-{seq}")));
        assert!(text.contains(if seq.is_multiple_of(2) {
            "weight: 90"
        } else {
            "weight: 80"
        }));
        // No temporary files left behind.
        let hidden = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(hidden, 0);
    }
}
