//! Prometheus metrics, served on the admin port at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabel {
    pub how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortReasonLabel {
    pub port: &'static str,
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub connected: Family<ModeLabel, Gauge>,
    pub pushes: Family<TypeLabel, Counter>,
    pub push_bytes: Family<TypeLabel, Counter>,
    pub acks: Family<TypeLabel, Counter>,
    pub nacks: Family<TypeLabel, Counter>,
    /// From a snapshot being published to a response built from it being handed to the transport.
    pub push_latency: Family<TypeLabel, Histogram>,
    /// From a snapshot being published to the proxy ACKing a response built from it.
    pub ack_latency: Family<TypeLabel, Histogram>,
    pub config_errors: Gauge,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub snapshot_generation: Gauge,
    /// Certificates issued, by how: `proxy_key` (the server made the key), `csr`, or `join`
    /// (a relay's CSR with a join token).
    pub ca_issued: Family<HowLabel, Counter>,
    /// Streams and CA calls refused on the secure port, by gRPC code.
    pub secure_refused: Family<CodeLabel, Counter>,
    pub ca_trust_epoch: Gauge,
    /// 0: no rotation; 1 add_new_root, 2 reissue, 3 remove_old_root.
    pub ca_rotation_phase: Gauge,
    /// Open connections per listening port (`xds`, `secure`, `admin`, relay ports).
    pub connections: Family<PortLabel, Gauge>,
    /// Connections refused or closed by a limit, per port and limit.
    pub connections_closed: Family<PortReasonLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let connected = Family::<ModeLabel, Gauge>::default();
        let pushes = Family::<TypeLabel, Counter>::default();
        let push_bytes = Family::<TypeLabel, Counter>::default();
        let acks = Family::<TypeLabel, Counter>::default();
        let nacks = Family::<TypeLabel, Counter>::default();
        let push_latency = Family::<TypeLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let ack_latency = Family::<TypeLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let config_errors = Gauge::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        let snapshot_generation = Gauge::default();
        let ca_issued = Family::<HowLabel, Counter>::default();
        let secure_refused = Family::<CodeLabel, Counter>::default();
        let ca_trust_epoch = Gauge::default();
        let ca_rotation_phase = Gauge::default();
        let connections = Family::<PortLabel, Gauge>::default();
        let connections_closed = Family::<PortReasonLabel, Counter>::default();
        registry.register(
            "open_connections",
            "Open connections per listening port",
            connections.clone(),
        );
        registry.register(
            "connections_limited",
            "Connections refused or closed by a limit (see the README's Limits), by port and limit",
            connections_closed.clone(),
        );
        registry.register(
            "ca_certificates_issued",
            "Workload certificates issued, by how the key was made",
            ca_issued.clone(),
        );
        registry.register(
            "secure_refused",
            "Streams and CA calls refused on the secure port, by gRPC code",
            secure_refused.clone(),
        );
        registry.register(
            "ca_trust_epoch",
            "The CA's trust epoch (bumps on every bundle or signer change)",
            ca_trust_epoch.clone(),
        );
        registry.register(
            "ca_rotation_phase",
            "Root rotation phase: 0 none, 1 add_new_root, 2 reissue, 3 remove_old_root",
            ca_rotation_phase.clone(),
        );
        registry.register(
            "xds_connected_proxies",
            "Proxies with an open ADS stream",
            connected.clone(),
        );
        registry.register("xds_pushes", "xDS responses sent", pushes.clone());
        registry.register(
            "xds_push_bytes",
            "Bytes of xDS responses sent",
            push_bytes.clone(),
        );
        registry.register("xds_acks", "xDS responses ACKed", acks.clone());
        registry.register(
            "xds_nacks",
            "xDS responses rejected by proxies",
            nacks.clone(),
        );
        registry.register(
            "xds_push_latency_seconds",
            "Config change to response sent",
            push_latency.clone(),
        );
        registry.register(
            "xds_ack_latency_seconds",
            "Config change to response ACKed",
            ack_latency.clone(),
        );
        registry.register(
            "config_errors",
            "Config files currently rejected",
            config_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            config_reloads.clone(),
        );
        registry.register(
            "snapshot_generation",
            "Generation of the newest snapshot",
            snapshot_generation.clone(),
        );
        Metrics {
            registry,
            connected,
            pushes,
            push_bytes,
            acks,
            nacks,
            push_latency,
            ack_latency,
            config_errors,
            config_reloads,
            snapshot_generation,
            ca_issued,
            secure_refused,
            ca_trust_epoch,
            ca_rotation_phase,
            connections,
            connections_closed,
        }
    }
}

impl Metrics {
    pub fn open_connections(&self, port: &'static str) -> Gauge {
        self.connections.get_or_create(&PortLabel { port }).clone()
    }

    pub fn connection_closed(&self, port: &'static str, reason: &'static str) {
        self.connections_closed
            .get_or_create(&PortReasonLabel { port, reason })
            .inc();
    }

    pub fn refused(&self, code: tonic::Code) {
        let code = match code {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::InvalidArgument => "invalid_argument",
            _ => "other",
        };
        self.secure_refused.get_or_create(&CodeLabel { code }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
