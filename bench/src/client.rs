//! The simulated Envoy: the ADS protocol state machine of one sidecar, free of I/O.
//!
//! It behaves like Envoy on an ADS stream: CDS (wildcard) first; EDS for the clusters
//! whose type is EDS once clusters arrive; LDS (wildcard) once endpoints arrive; RDS for
//! the route configurations the listeners reference. Every response is ACKed at once
//! (or NACKed on demand, keeping the last accepted version), subscriptions follow the
//! resources, and a new stream resumes every subscription (SotW: with the last accepted
//! versions; Delta: with `initial_resource_versions`).
//!
//! Responses are read with [`crate::wire`]: type, version, nonce and names only.

use crate::mesh::{client_address, ENDPOINT_MARKER, NAMESPACE, ROUTE_MARKER};
use crate::wire;
use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{value, Struct, Value};
use envoy_types::pb::google::rpc::Status;
use memchr::memmem::Finder;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// The four xDS types a sidecar needs, in Envoy's (make-before-break) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Kind {
    Cds,
    Eds,
    Lds,
    Rds,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Cds, Kind::Eds, Kind::Lds, Kind::Rds];

    pub fn idx(self) -> usize {
        self as usize
    }

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cds => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Eds => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            Kind::Lds => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Rds => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// CDS and LDS are subscribed as wildcard, EDS and RDS by name.
    fn wildcard(self) -> bool {
        matches!(self, Kind::Cds | Kind::Lds)
    }
}

/// The Envoy node of simulated client `index`: Istio's sidecar id form with a workload
/// name the mesh does not know, so the server treats it as an outbound-only proxy of
/// namespace `bench`.
pub fn node(index: usize) -> Node {
    let ip = client_address(index);
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "NAMESPACE".to_string(),
        Value {
            kind: Some(value::Kind::StringValue(NAMESPACE.into())),
        },
    );
    Node {
        id: format!("sidecar~{ip}~bench-{index}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"),
        cluster: format!("bench-{index}.{NAMESPACE}"),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        user_agent_name: "envoy".into(),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    /// Explicit subscription (EDS, RDS); empty for wildcard types.
    names: BTreeSet<String>,
    /// `names` encoded as DiscoveryRequest.resource_names (field 3), for SotW ACKs.
    names_field: Bytes,
    /// SotW: the last accepted version.
    version: String,
    /// The nonce of the last response on this stream.
    nonce: String,
    /// A response arrived since the subscription last changed.
    answered: bool,
    responses_since_change: u32,
    /// Delta: what the client holds, name → version.
    known: HashMap<String, String>,
    /// Delta: subscribed names not received (nor announced missing) yet.
    pending: BTreeSet<String>,
}

impl TypeState {
    fn set_names(&mut self, names: BTreeSet<String>) {
        let mut buf = BytesMut::new();
        for n in &names {
            put_str(&mut buf, 3, n);
        }
        self.names_field = buf.freeze();
        self.names = names;
    }
}

/// A SotW ACK: `DiscoveryRequest { version_info = 1; resource_names = 3; type_url = 4;
/// response_nonce = 5; }` (protobuf fields may come in any order; these come in order).
fn sotw_ack(st: &TypeState, kind: Kind) -> Bytes {
    let mut buf = BytesMut::with_capacity(
        st.names_field.len() + st.version.len() + st.nonce.len() + kind.type_url().len() + 16,
    );
    put_str(&mut buf, 1, &st.version);
    buf.extend_from_slice(&st.names_field);
    put_str(&mut buf, 4, kind.type_url());
    put_str(&mut buf, 5, &st.nonce);
    buf.freeze()
}

fn put_str(buf: &mut BytesMut, tag: u32, s: &str) {
    use prost::encoding::{encode_key, encode_varint, WireType};
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }
}

/// What handling one response produced.
#[derive(Debug)]
pub struct Outcome {
    pub kind: Kind,
    /// Requests to send, in order: the ACK/NACK first, then subscription changes.
    pub requests: Vec<Bytes>,
    pub nacked: bool,
    /// The largest scenario marker found in the response, if scanning was asked for.
    pub marker: Option<u64>,
}

/// Which markers to look for (only while a scenario measures a change: scanning costs CPU).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scan {
    pub eds: bool,
    pub rds: bool,
}

#[derive(Debug)]
pub struct Envoy {
    mode: Mode,
    node: Node,
    /// NACK every response of this type (NACK on demand).
    nack: Option<Kind>,
    types: [TypeState; 4],
    node_sent: bool,
    /// Cluster name → uses EDS.
    clusters: BTreeMap<String, bool>,
    /// Listener name → RDS names it references.
    listeners: BTreeMap<String, Vec<String>>,
}

impl Envoy {
    pub fn new(mode: Mode, index: usize, nack: Option<Kind>) -> Envoy {
        Envoy {
            mode,
            node: node(index),
            nack,
            types: Default::default(),
            node_sent: false,
            clusters: BTreeMap::new(),
            listeners: BTreeMap::new(),
        }
    }

    /// Requests that open a new stream: CDS on the first stream, every existing
    /// subscription (in CDS, EDS, LDS, RDS order) on a reconnect.
    pub fn start_stream(&mut self) -> Vec<Bytes> {
        self.node_sent = false;
        for st in &mut self.types {
            st.nonce.clear();
            st.answered = false;
            st.responses_since_change = 0;
        }
        if !self.types[Kind::Cds.idx()].subscribed {
            self.types[Kind::Cds.idx()].subscribed = true;
            return vec![self.initial_request(Kind::Cds)];
        }
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| self.types[k.idx()].subscribed)
            .collect();
        kinds.into_iter().map(|k| self.initial_request(k)).collect()
    }

    /// Clusters the client holds.
    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Fully synced: every type the client needs has been answered since its
    /// subscription last changed, and (Delta) every subscribed name has arrived.
    pub fn is_synced(&self) -> bool {
        Kind::ALL.into_iter().all(|k| {
            let st = &self.types[k.idx()];
            if !self.needed(k) {
                return true;
            }
            st.subscribed && st.answered && st.pending.is_empty()
        })
    }

    fn needed(&self, k: Kind) -> bool {
        match k {
            Kind::Cds | Kind::Lds => true,
            Kind::Eds => self.clusters.values().any(|eds| *eds),
            Kind::Rds => self.listeners.values().any(|r| !r.is_empty()),
        }
    }

    fn take_node(&mut self) -> Option<Node> {
        if self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        }
    }

    fn initial_request(&mut self, kind: Kind) -> Bytes {
        let node = self.take_node();
        let st = &mut self.types[kind.idx()];
        let names: Vec<String> = st.names.iter().cloned().collect();
        let msg = match self.mode {
            Mode::Sotw => DiscoveryRequest {
                version_info: st.version.clone(),
                node,
                resource_names: names,
                type_url: kind.type_url().into(),
                ..Default::default()
            }
            .encode_to_vec(),
            Mode::Delta => {
                st.pending = st
                    .names
                    .iter()
                    .filter(|n| !st.known.contains_key(*n))
                    .cloned()
                    .collect();
                DeltaDiscoveryRequest {
                    node,
                    type_url: kind.type_url().into(),
                    resource_names_subscribe: names,
                    initial_resource_versions: st
                        .known
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    ..Default::default()
                }
                .encode_to_vec()
            }
        };
        Bytes::from(msg)
    }

    /// Handles one response and returns what to send back.
    pub fn on_message(&mut self, msg: &[u8], scan: Scan) -> Result<Outcome> {
        match self.mode {
            Mode::Sotw => self.on_sotw(msg, scan),
            Mode::Delta => self.on_delta(msg, scan),
        }
    }

    fn marker_scan<'a>(
        kind: Kind,
        scan: Scan,
        bodies: impl Iterator<Item = &'a [u8]>,
    ) -> Option<u64> {
        static FINDERS: OnceLock<[Finder<'static>; 2]> = OnceLock::new();
        let [eds, rds] =
            FINDERS.get_or_init(|| [Finder::new(ENDPOINT_MARKER), Finder::new(ROUTE_MARKER)]);
        let (finder, dotted) = match kind {
            Kind::Eds if scan.eds => (eds, true),
            Kind::Rds if scan.rds => (rds, false),
            _ => return None,
        };
        bodies
            .filter_map(|b| wire::max_marker(b, finder, dotted))
            .max()
    }

    fn nack_status(kind: Kind) -> Status {
        Status {
            code: 3, // INVALID_ARGUMENT, as Envoy reports a rejected config
            message: format!("xds-bench: {kind:?} rejected on demand"),
            details: Vec::new(),
        }
    }

    fn on_sotw(&mut self, msg: &[u8], scan: Scan) -> Result<Outcome> {
        let r = wire::sotw_response(msg)?;
        let kind = Kind::from_type_url(r.type_url)
            .ok_or_else(|| anyhow!("response for unexpected type {}", r.type_url))?;
        let marker = Self::marker_scan(kind, scan, r.resources.iter().copied());
        let nacked = self.nack == Some(kind);
        let mut received = BTreeSet::new();
        let st = &self.types[kind.idx()];
        let check_names = !kind.wildcard() && !st.answered && st.responses_since_change < 1;
        if !nacked {
            match kind {
                Kind::Cds => {
                    self.clusters.clear();
                    for body in &r.resources {
                        let (name, eds) = wire::cluster_summary(body)?;
                        self.clusters.insert(name.to_string(), eds);
                    }
                }
                Kind::Lds => {
                    self.listeners.clear();
                    for body in &r.resources {
                        let name = wire::resource_name(body)?.to_string();
                        self.listeners.insert(name, wire::listener_rds_names(body)?);
                    }
                }
                Kind::Eds | Kind::Rds if check_names => {
                    for body in &r.resources {
                        received.insert(wire::resource_name(body)?);
                    }
                }
                Kind::Eds | Kind::Rds => {}
            }
        }
        let node = self.take_node();
        let st = &mut self.types[kind.idx()];
        st.nonce = r.nonce.to_string();
        if !nacked {
            st.version = r.version.to_string();
        }
        st.responses_since_change += 1;
        // A response answers the current subscription if it holds every subscribed name,
        // or if the server has already seen our ACK carrying that subscription.
        st.answered = st.answered
            || kind.wildcard()
            || nacked
            || (check_names && st.names.iter().all(|n| received.contains(n.as_str())))
            || st.responses_since_change >= 2;
        let ack = if node.is_none() && !nacked {
            // The common case, thousands of times per push: the ACK is assembled from the
            // subscription's pre-encoded names instead of cloning and encoding them.
            sotw_ack(st, kind)
        } else {
            Bytes::from(
                DiscoveryRequest {
                    version_info: st.version.clone(),
                    node,
                    resource_names: st.names.iter().cloned().collect(),
                    type_url: kind.type_url().into(),
                    response_nonce: st.nonce.clone(),
                    error_detail: nacked.then(|| Self::nack_status(kind)),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        let mut requests = vec![ack];
        self.follow_up(kind, &mut requests);
        Ok(Outcome {
            kind,
            requests,
            nacked,
            marker,
        })
    }

    fn on_delta(&mut self, msg: &[u8], scan: Scan) -> Result<Outcome> {
        let r = wire::delta_response(msg)?;
        let kind = Kind::from_type_url(r.type_url)
            .ok_or_else(|| anyhow!("response for unexpected type {}", r.type_url))?;
        let marker = Self::marker_scan(kind, scan, r.resources.iter().map(|x| x.body));
        let nacked = self.nack == Some(kind);
        if !nacked {
            for res in &r.resources {
                match kind {
                    Kind::Cds => {
                        let (_, eds) = wire::cluster_summary(res.body)?;
                        self.clusters.insert(res.name.to_string(), eds);
                    }
                    Kind::Lds => {
                        self.listeners
                            .insert(res.name.to_string(), wire::listener_rds_names(res.body)?);
                    }
                    Kind::Eds | Kind::Rds => {}
                }
            }
            for name in &r.removed {
                match kind {
                    Kind::Cds => {
                        self.clusters.remove(*name);
                    }
                    Kind::Lds => {
                        self.listeners.remove(*name);
                    }
                    Kind::Eds | Kind::Rds => {}
                }
            }
        }
        let node = self.take_node();
        let st = &mut self.types[kind.idx()];
        st.nonce = r.nonce.to_string();
        if !nacked {
            for res in &r.resources {
                st.pending.remove(res.name);
                st.known
                    .insert(res.name.to_string(), res.version.to_string());
            }
            for name in &r.removed {
                st.pending.remove(*name);
                st.known.remove(*name);
            }
        }
        st.answered = true;
        let ack = DeltaDiscoveryRequest {
            node,
            type_url: kind.type_url().into(),
            response_nonce: st.nonce.clone(),
            error_detail: nacked.then(|| Self::nack_status(kind)),
            ..Default::default()
        };
        let mut requests = vec![Bytes::from(ack.encode_to_vec())];
        self.follow_up(kind, &mut requests);
        Ok(Outcome {
            kind,
            requests,
            nacked,
            marker,
        })
    }

    /// Envoy's ordering: clusters → endpoints of EDS clusters → listeners → their routes.
    fn follow_up(&mut self, kind: Kind, requests: &mut Vec<Bytes>) {
        match kind {
            Kind::Cds => {
                let wanted: BTreeSet<String> = self
                    .clusters
                    .iter()
                    .filter(|(_, eds)| **eds)
                    .map(|(n, _)| n.clone())
                    .collect();
                requests.extend(self.resubscribe(Kind::Eds, wanted.clone()));
                if wanted.is_empty() {
                    requests.extend(self.subscribe_wildcard(Kind::Lds));
                }
            }
            Kind::Eds => requests.extend(self.subscribe_wildcard(Kind::Lds)),
            Kind::Lds => {
                let wanted: BTreeSet<String> = self.listeners.values().flatten().cloned().collect();
                requests.extend(self.resubscribe(Kind::Rds, wanted));
            }
            Kind::Rds => {}
        }
    }

    fn subscribe_wildcard(&mut self, kind: Kind) -> Option<Bytes> {
        if self.types[kind.idx()].subscribed {
            return None;
        }
        self.types[kind.idx()].subscribed = true;
        Some(self.initial_request(kind))
    }

    /// Changes the subscription of a by-name type; `None` if nothing changes.
    fn resubscribe(&mut self, kind: Kind, wanted: BTreeSet<String>) -> Option<Bytes> {
        let st = &self.types[kind.idx()];
        if st.names == wanted && (st.subscribed || wanted.is_empty()) {
            return None;
        }
        if !st.subscribed {
            let st = &mut self.types[kind.idx()];
            st.subscribed = true;
            st.set_names(wanted);
            st.answered = false;
            st.responses_since_change = 0;
            return Some(self.initial_request(kind));
        }
        let node = self.take_node();
        let st = &mut self.types[kind.idx()];
        st.answered = false;
        st.responses_since_change = 0;
        let msg = match self.mode {
            Mode::Sotw => {
                st.set_names(wanted);
                DiscoveryRequest {
                    version_info: st.version.clone(),
                    node,
                    resource_names: st.names.iter().cloned().collect(),
                    type_url: kind.type_url().into(),
                    response_nonce: st.nonce.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            }
            Mode::Delta => {
                let subscribe: Vec<String> = wanted.difference(&st.names).cloned().collect();
                let unsubscribe: Vec<String> = st.names.difference(&wanted).cloned().collect();
                for n in &unsubscribe {
                    st.pending.remove(n);
                    st.known.remove(n);
                }
                st.pending.extend(subscribe.iter().cloned());
                st.set_names(wanted);
                DeltaDiscoveryRequest {
                    node,
                    type_url: kind.type_url().into(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    ..Default::default()
                }
                .encode_to_vec()
            }
        };
        Some(Bytes::from(msg))
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
