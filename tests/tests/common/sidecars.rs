//! Workloads of a test mesh and their sidecars: how a workload is defined, where its
//! addresses are, and what every fixture does with its sidecars ([`SidecarMesh`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{anyhow, ensure};
use serde_json::Value;
use trellis_tests::{
    envoy_stat, envoy_stat_sum, free_port, start_envoy_with, ChildGuard, EnvoyOptions, LoopbackNet,
};

use super::{check_proxy_synced, NAMESPACE, PORT, TRUST_DOMAIN};

/// One WorkloadEntry of a test mesh and how its sidecar runs. `C` says where it runs:
/// `()` with a single control plane, a member cluster in the multi-cluster fixture.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadDef<C = ()> {
    pub name: &'static str,
    /// Label `app`; the ServiceEntry of that name selects the workloads labelled with it.
    pub app: &'static str,
    /// Label `version`.
    pub version: &'static str,
    /// Its WorkloadEntry's `serviceAccount`: the identity of its certificate.
    pub service_account: &'static str,
    /// Host part base: inbound `.N`, app `.N+50`, outbound `.N+100`.
    pub host: u8,
    /// Whether an echo app runs behind the sidecar (a client only sends).
    pub has_app: bool,
    /// A TCP port of the service besides HTTP [`PORT`] (its own echo app listens there):
    /// a client sidecar's TCP proxy opens a new upstream connection for every connection
    /// it accepts, so with mutual TLS traffic there makes a TLS handshake per request.
    pub tcp_port: Option<u16>,
    /// Delta xDS instead of state of the world.
    pub delta: bool,
    /// Started with the mesh; `false`: it is in the config from the start, but the test
    /// starts its sidecar later.
    pub start: bool,
    /// Labelled `security.istio.io/tlsMode: istio`: its sidecar proves its identity with a
    /// workload token, gets its certificate over SDS and speaks mutual TLS with other
    /// labelled sidecars.
    pub mtls: bool,
    pub cluster: C,
}

impl WorkloadDef {
    /// A workload that only sends (service account = name).
    pub const fn client(name: &'static str, host: u8) -> Self {
        WorkloadDef {
            name,
            app: name,
            version: "v1",
            service_account: name,
            host,
            has_app: false,
            tcp_port: None,
            delta: false,
            start: true,
            mtls: false,
            cluster: (),
        }
    }

    /// A workload serving service `app` with an echo app (service account = app).
    pub const fn service(name: &'static str, app: &'static str, host: u8) -> Self {
        WorkloadDef {
            app,
            service_account: app,
            has_app: true,
            ..Self::client(name, host)
        }
    }

    pub const fn in_cluster<C>(self, cluster: C) -> WorkloadDef<C> {
        WorkloadDef {
            name: self.name,
            app: self.app,
            version: self.version,
            service_account: self.service_account,
            host: self.host,
            has_app: self.has_app,
            tcp_port: self.tcp_port,
            delta: self.delta,
            start: self.start,
            mtls: self.mtls,
            cluster,
        }
    }
}

impl<C> WorkloadDef<C> {
    pub const fn with_version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    pub const fn with_service_account(mut self, sa: &'static str) -> Self {
        self.service_account = sa;
        self
    }

    pub const fn with_tcp_port(mut self, port: u16) -> Self {
        self.tcp_port = Some(port);
        self
    }

    pub const fn delta(mut self) -> Self {
        self.delta = true;
        self
    }

    pub const fn deferred(mut self) -> Self {
        self.start = false;
        self
    }

    pub const fn mtls(mut self) -> Self {
        self.mtls = true;
        self
    }

    /// `name.namespace`, as `/debug/syncz` names the workload.
    pub fn workload_id(&self) -> String {
        format!("{}.{NAMESPACE}", self.name)
    }

    /// As AuthorizationPolicy `principals` name it.
    pub fn principal(&self) -> String {
        format!("{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{}", self.service_account)
    }

    /// The SPIFFE id of its certificate (meaningful with [`Self::mtls`]).
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}", self.principal())
    }

    /// Its xDS variant, as `/debug/syncz` reports it.
    pub fn mode(&self) -> &'static str {
        if self.delta {
            "delta"
        } else {
            "sotw"
        }
    }

    pub fn addrs(&self, net: &LoopbackNet) -> Addrs {
        Addrs {
            inbound: net.ip(self.host),
            app: net.ip(self.host + 50),
            outbound: net.ip(self.host + 100),
        }
    }
}

/// The addresses of one workload inside a test's loopback block.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub inbound: IpAddr,
    pub app: IpAddr,
    pub outbound: IpAddr,
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar<C = ()> {
    pub def: WorkloadDef<C>,
    pub addrs: Addrs,
    pub admin: SocketAddr,
    pub envoy: ChildGuard,
}

/// How the sidecars' Envoys drain connections when a listener changes, as Istio's agent
/// runs them: with Envoy's default (`gradual` over 600 s) a connection opened before a
/// policy change may go on serving requests under the old policy for minutes; with
/// `immediate`, every such connection is closed after its next response.
pub const SIDECAR_DRAIN_ARGS: [&str; 4] = ["--drain-strategy", "immediate", "--drain-time-s", "45"];

/// A fixture's workloads and their running sidecars; what is provided here is the same
/// in every fixture.
pub trait SidecarMesh {
    /// Where a workload runs (see [`WorkloadDef`]).
    type Cluster: Copy;

    /// Every workload, started or not.
    fn workloads(&self) -> &[WorkloadDef<Self::Cluster>];
    /// The running sidecars, in start order.
    fn sidecars(&self) -> &[Sidecar<Self::Cluster>];
    fn sidecars_mut(&mut self) -> &mut Vec<Sidecar<Self::Cluster>>;
    fn envoy_bin(&self) -> &Path;
    /// Where the processes write their logs (and Envoy its bootstrap).
    fn dir(&self) -> &Path;
    fn net(&self) -> &LoopbackNet;
    /// The bootstrap of `w`'s sidecar, its Envoy admin on `admin_port`.
    fn bootstrap(&self, w: &WorkloadDef<Self::Cluster>, admin_port: u16) -> anyhow::Result<String>;

    /// How the sidecars' Envoys run: draining as Istio's agent runs them.
    fn envoy_options(&self) -> EnvoyOptions {
        EnvoyOptions {
            extra_args: SIDECAR_DRAIN_ARGS.iter().map(|a| a.to_string()).collect(),
            ..EnvoyOptions::default()
        }
    }

    /// Starts the Envoy of `w`'s sidecar, its admin on a free port of its outbound
    /// address; returns once it is spawned (see [`trellis_tests::wait_envoy_live`]).
    fn spawn_sidecar(&mut self, w: &WorkloadDef<Self::Cluster>) -> anyhow::Result<()> {
        ensure!(
            self.sidecars().iter().all(|s| s.def.name != w.name),
            "{} already has a sidecar",
            w.name
        );
        let addrs = w.addrs(self.net());
        let admin = SocketAddr::new(addrs.outbound, free_port(addrs.outbound)?);
        let bootstrap = self.bootstrap(w, admin.port())?;
        let envoy = start_envoy_with(
            self.envoy_bin(),
            self.dir(),
            &format!("envoy-{}", w.name),
            &bootstrap,
            &self.envoy_options(),
        )?;
        self.sidecars_mut().push(Sidecar {
            def: *w,
            addrs,
            admin,
            envoy,
        });
        Ok(())
    }

    fn sidecar(&self, name: &str) -> &Sidecar<Self::Cluster> {
        self.sidecars()
            .iter()
            .find(|s| s.def.name == name)
            .unwrap_or_else(|| panic!("no sidecar {name}"))
    }

    fn def(&self, name: &str) -> WorkloadDef<Self::Cluster> {
        *self
            .workloads()
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// Where the app of a workload sends mesh traffic: its sidecar's outbound listener.
    fn outbound(&self, name: &str) -> SocketAddr {
        SocketAddr::new(self.sidecar(name).addrs.outbound, PORT)
    }

    /// The services (apps) of the mesh, sorted.
    fn services(&self) -> Vec<&'static str> {
        let mut apps: Vec<&'static str> = self
            .workloads()
            .iter()
            .filter(|w| w.has_app)
            .map(|w| w.app)
            .collect();
        apps.sort_unstable();
        apps.dedup();
        apps
    }

    /// The workloads of service `app`.
    fn workloads_of(&self, app: &str) -> Vec<WorkloadDef<Self::Cluster>> {
        self.workloads()
            .iter()
            .filter(|w| w.has_app && w.app == app)
            .copied()
            .collect()
    }

    /// A counter or gauge of a sidecar's Envoy (0 when absent).
    fn envoy_stat(&self, name: &str, stat: &str) -> anyhow::Result<u64> {
        envoy_stat(self.sidecar(name).admin, stat)
    }

    /// TLS handshakes `client`'s sidecar made with its cluster of service `app`'s `port`.
    fn tls_handshakes(&self, client: &str, port: u16, app: &str) -> anyhow::Result<u64> {
        envoy_stat_sum(
            self.sidecar(client).admin,
            &format!(
                "^cluster\\.outbound\\|{port}\\|\\|{app}\\.{NAMESPACE}\\..*\\.ssl\\.handshake$"
            ),
        )
    }

    /// The Envoys of the sidecars `which` selects all report their ADS stream `connected`
    /// (1) or not (0).
    fn check_control_plane_state(
        &self,
        connected: u64,
        which: impl Fn(&WorkloadDef<Self::Cluster>) -> bool,
    ) -> anyhow::Result<()> {
        for s in self.sidecars().iter().filter(|s| which(&s.def)) {
            let state = self.envoy_stat(s.def.name, "control_plane.connected_state")?;
            ensure!(
                state == connected,
                "{}: control_plane.connected_state is {state}, waiting for {connected}",
                s.def.name
            );
        }
        Ok(())
    }

    /// Every sidecar that `which` selects is connected once, and no other proxy is, as
    /// `proxies` (a `/debug/syncz` of `whose` by workload) says: in its mode, synced,
    /// with something sent of every type of `sent`, everything sent ACKed, and whatever
    /// `also` checks of its entry.
    fn check_synced(
        &self,
        whose: &str,
        proxies: &BTreeMap<String, Value>,
        sent: &[&str],
        which: impl Fn(&WorkloadDef<Self::Cluster>) -> bool,
        also: impl Fn(&Value, &WorkloadDef<Self::Cluster>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let sidecars: Vec<_> = self.sidecars().iter().filter(|s| which(&s.def)).collect();
        ensure!(
            proxies.len() == sidecars.len(),
            "{whose}: {} proxies connected, expected {}: {:?}",
            proxies.len(),
            sidecars.len(),
            proxies.keys()
        );
        for sidecar in sidecars {
            let w = &sidecar.def;
            let id = w.workload_id();
            let proxy = proxies
                .get(&id)
                .ok_or_else(|| anyhow!("{id} is not connected to {whose}"))?;
            check_proxy_synced(proxy, &id, w.mode(), sent)?;
            also(proxy, w)?;
        }
        Ok(())
    }

    /// Every sidecar's Envoy is still running (none crashed).
    #[track_caller]
    fn assert_sidecars_running(&mut self) {
        for sidecar in self.sidecars_mut() {
            assert!(
                sidecar.envoy.is_running(),
                "envoy of {} exited:\n{}",
                sidecar.def.name,
                sidecar.envoy.log_tail(30)
            );
        }
    }
}

/// The accessors [`SidecarMesh`] requires, for a fixture that keeps its workloads, running
/// sidecars, Envoy binary, test dir (a `TempDir`) and loopback block in fields named
/// `workloads`, `sidecars`, `envoy_bin`, `dir` and `net`, as every fixture does.
macro_rules! sidecar_mesh_fields {
    () => {
        fn workloads(&self) -> &[$crate::common::WorkloadDef<Self::Cluster>] {
            &self.workloads
        }

        fn sidecars(&self) -> &[$crate::common::Sidecar<Self::Cluster>] {
            &self.sidecars
        }

        fn sidecars_mut(&mut self) -> &mut Vec<$crate::common::Sidecar<Self::Cluster>> {
            &mut self.sidecars
        }

        fn envoy_bin(&self) -> &std::path::Path {
            &self.envoy_bin
        }

        fn dir(&self) -> &std::path::Path {
            self.dir.path()
        }

        fn net(&self) -> &trellis_tests::LoopbackNet {
            &self.net
        }
    };
}
pub(crate) use sidecar_mesh_fields;
