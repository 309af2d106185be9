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
//! Requests are written gRPC-framed (5-byte header, then the message) straight into the
//! caller's send buffer: the ACKs of a push allocate nothing. What a client derives from
//! a CDS or LDS response (its clusters or listeners, the EDS or RDS names to subscribe
//! to) is shared by every client of a thread that received the same bytes: in a storm,
//! ten thousand clients parse the same cluster list once per thread, not once each.

use crate::mesh::{client_address, ENDPOINT_MARKER, NAMESPACE, ROUTE_MARKER};
use crate::wire;
use anyhow::{anyhow, Result};
use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::google::protobuf::{value, Struct, Value};
use envoy_types::pb::google::rpc::Status;
use memchr::memmem::Finder;
use prost::Message;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

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

/// The Envoy node of simulated client `index` in member cluster `cluster`: an
/// outbound-only proxy of namespace `bench` (the id names no workload, so every client of
/// a relay is one proxy class there: one upstream stream per relay), with node metadata
/// `CLUSTER_ID` as Istio sets it.
pub fn member_node(index: usize, cluster: &str) -> Node {
    let ip = client_address(index);
    let s = |v: &str| Value {
        kind: Some(value::Kind::StringValue(v.into())),
    };
    let fields = [
        ("NAMESPACE".to_string(), s(NAMESPACE)),
        ("CLUSTER_ID".to_string(), s(cluster)),
    ];
    Node {
        id: format!("sidecar~{ip}~bench-{index}~{NAMESPACE}.svc.cluster.local"),
        cluster: format!("bench.{NAMESPACE}"),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        user_agent_name: "envoy".into(),
        ..Default::default()
    }
}

/// A by-name subscription: the names, and their encoding as
/// `DiscoveryRequest.resource_names` (field 3) for SotW requests. Shared, not copied.
#[derive(Debug, Default, Clone)]
struct Names {
    set: Arc<BTreeSet<String>>,
    field: Bytes,
}

impl Names {
    fn new(set: BTreeSet<String>) -> Names {
        let mut buf = BytesMut::new();
        for n in &set {
            put_str(&mut buf, 3, n);
        }
        Names {
            set: Arc::new(set),
            field: buf.freeze(),
        }
    }

    fn same(&self, other: &Names) -> bool {
        Arc::ptr_eq(&self.set, &other.set) || self.set == other.set
    }
}

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    /// Explicit subscription (EDS, RDS); empty for wildcard types.
    names: Names,
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

/// gRPC framing: compression flag + 4-byte big-endian length before every message.
pub const GRPC_HEADER: usize = 5;

/// Appends one gRPC-framed message that `write` encodes into `out`.
pub fn framed(out: &mut BytesMut, write: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_bytes(0, GRPC_HEADER);
    write(out);
    let len = (out.len() - start - GRPC_HEADER) as u32;
    out[start + 1..start + GRPC_HEADER].copy_from_slice(&len.to_be_bytes());
}

fn framed_message(out: &mut BytesMut, m: &impl Message) {
    framed(out, |b| {
        b.reserve(m.encoded_len());
        // Cannot fail: the buffer grows as needed.
        let _ = m.encode(b);
    });
}

fn put_message(buf: &mut BytesMut, tag: u32, m: &impl Message) {
    use prost::encoding::{encode_key, WireType};
    encode_key(tag, WireType::LengthDelimited, buf);
    // Cannot fail: the buffer grows as needed.
    let _ = m.encode_length_delimited(buf);
}

/// A SotW request: `DiscoveryRequest { version_info = 1; node = 2; resource_names = 3;
/// type_url = 4; response_nonce = 5; error_detail = 6; }`, the names pre-encoded
/// (protobuf fields may come in any order; these come in order).
fn sotw_request(
    out: &mut BytesMut,
    version: &str,
    node: Option<&Node>,
    names: &Names,
    kind: Kind,
    nonce: &str,
    error: Option<&Status>,
) {
    out.reserve(
        GRPC_HEADER + names.field.len() + version.len() + nonce.len() + kind.type_url().len() + 16,
    );
    framed(out, |b| {
        put_str(b, 1, version);
        if let Some(n) = node {
            put_message(b, 2, n);
        }
        b.extend_from_slice(&names.field);
        put_str(b, 4, kind.type_url());
        put_str(b, 5, nonce);
        if let Some(e) = error {
            put_message(b, 6, e);
        }
    });
}

/// A Delta ACK: `DeltaDiscoveryRequest { type_url = 2; response_nonce = 6; }`.
fn delta_ack(kind: Kind, nonce: &str, out: &mut BytesMut) {
    out.reserve(GRPC_HEADER + kind.type_url().len() + nonce.len() + 8);
    framed(out, |b| {
        put_str(b, 2, kind.type_url());
        put_str(b, 6, nonce);
    });
}

/// `s = v` without a new allocation when `s` has the room.
fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

fn put_str(buf: &mut BytesMut, tag: u32, s: &str) {
    use prost::encoding::{encode_key, encode_varint, WireType};
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }
}

type Clusters = Arc<BTreeMap<String, bool>>;
type Listeners = Arc<BTreeMap<String, Vec<String>>>;

/// What a SotW CDS or LDS response means to a client, kept for the next client of the
/// thread that receives the very same bytes.
#[derive(Debug)]
struct Digest {
    msg: Vec<u8>,
    clusters: Clusters,
    listeners: Listeners,
    /// The EDS (CDS) or RDS (LDS) names to subscribe to.
    wanted: Names,
}

thread_local! {
    /// The last CDS (0) and LDS (1) digest of this thread.
    static DIGESTS: RefCell<[Option<Arc<Digest>>; 2]> = const { RefCell::new([None, None]) };
}

/// The digest of `msg`: the thread's last one if it was made from the same bytes.
fn digest(slot: usize, msg: &[u8], make: impl FnOnce() -> Result<Digest>) -> Result<Arc<Digest>> {
    let hit = DIGESTS.with(|d| d.borrow()[slot].as_ref().filter(|d| d.msg == msg).cloned());
    if let Some(d) = hit {
        return Ok(d);
    }
    let d = Arc::new(make()?);
    DIGESTS.with(|c| c.borrow_mut()[slot] = Some(d.clone()));
    Ok(d)
}

/// EDS names of a cluster map.
fn eds_names(clusters: &BTreeMap<String, bool>) -> Names {
    Names::new(
        clusters
            .iter()
            .filter(|(_, eds)| **eds)
            .map(|(n, _)| n.clone())
            .collect(),
    )
}

/// RDS names of a listener map.
fn rds_names(listeners: &BTreeMap<String, Vec<String>>) -> Names {
    Names::new(listeners.values().flatten().cloned().collect())
}

/// What handling one response produced.
#[derive(Debug)]
pub struct Outcome {
    pub kind: Kind,
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
    clusters: Clusters,
    /// Listener name → RDS names it references.
    listeners: Listeners,
    /// The EDS names of `clusters`, the RDS names of `listeners` (kept with the maps).
    eds_wanted: Names,
    rds_wanted: Names,
}

impl Envoy {
    #[cfg(test)]
    pub fn new(mode: Mode, index: usize, nack: Option<Kind>) -> Envoy {
        Envoy::with_node(mode, node(index), nack)
    }

    pub fn with_node(mode: Mode, node: Node, nack: Option<Kind>) -> Envoy {
        Envoy {
            mode,
            node,
            nack,
            types: Default::default(),
            node_sent: false,
            clusters: Default::default(),
            listeners: Default::default(),
            eds_wanted: Names::default(),
            rds_wanted: Names::default(),
        }
    }

    /// Requests that open a new stream, appended gRPC-framed to `out`: CDS on the first
    /// stream, every existing subscription (in CDS, EDS, LDS, RDS order) on a reconnect.
    /// Returns how many.
    pub fn start_stream(&mut self, out: &mut BytesMut) -> usize {
        self.node_sent = false;
        for st in &mut self.types {
            st.nonce.clear();
            st.answered = false;
            st.responses_since_change = 0;
        }
        if !self.types[Kind::Cds.idx()].subscribed {
            self.types[Kind::Cds.idx()].subscribed = true;
            self.initial_request(Kind::Cds, out);
            return 1;
        }
        let mut n = 0;
        for k in Kind::ALL {
            if self.types[k.idx()].subscribed {
                self.initial_request(k, out);
                n += 1;
            }
        }
        n
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
            // Some cluster uses EDS; some listener references RDS.
            Kind::Eds => !self.eds_wanted.set.is_empty(),
            Kind::Rds => !self.rds_wanted.set.is_empty(),
        }
    }

    /// True once per stream: the first request carries the node.
    fn take_node(&mut self) -> bool {
        !std::mem::replace(&mut self.node_sent, true)
    }

    fn initial_request(&mut self, kind: Kind, out: &mut BytesMut) {
        let with_node = self.take_node();
        let node = with_node.then_some(&self.node);
        let st = &mut self.types[kind.idx()];
        match self.mode {
            Mode::Sotw => sotw_request(out, &st.version, node, &st.names, kind, "", None),
            Mode::Delta => {
                st.pending = st
                    .names
                    .set
                    .iter()
                    .filter(|n| !st.known.contains_key(*n))
                    .cloned()
                    .collect();
                framed_message(
                    out,
                    &DeltaDiscoveryRequest {
                        node: node.cloned(),
                        type_url: kind.type_url().into(),
                        resource_names_subscribe: st.names.set.iter().cloned().collect(),
                        initial_resource_versions: st
                            .known
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        ..Default::default()
                    },
                )
            }
        }
    }

    /// Handles one response; appends what to send back (gRPC-framed) to `out`: the
    /// ACK/NACK first, then subscription changes.
    pub fn on_message(&mut self, msg: &[u8], scan: Scan, out: &mut BytesMut) -> Result<Outcome> {
        match self.mode {
            Mode::Sotw => self.on_sotw(msg, scan, out),
            Mode::Delta => self.on_delta(msg, scan, out),
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

    fn on_sotw(&mut self, msg: &[u8], scan: Scan, out: &mut BytesMut) -> Result<Outcome> {
        let r = wire::sotw_response(msg)?;
        let kind = Kind::from_type_url(r.type_url)
            .ok_or_else(|| anyhow!("response for unexpected type {}", r.type_url))?;
        // The markers are searched in the whole message: no need to walk the resources.
        let marker = Self::marker_scan(kind, scan, std::iter::once(msg));
        let nacked = self.nack == Some(kind);
        let st = &self.types[kind.idx()];
        let check_names = !kind.wildcard() && !st.answered && st.responses_since_change < 1;
        let mut all_received = false;
        if !nacked {
            match kind {
                Kind::Cds => {
                    let d = digest(0, msg, || {
                        let mut clusters = BTreeMap::new();
                        for body in r.resources() {
                            let (name, eds) = wire::cluster_summary(body?)?;
                            clusters.insert(name.to_string(), eds);
                        }
                        let wanted = eds_names(&clusters);
                        Ok(Digest {
                            msg: msg.to_vec(),
                            clusters: Arc::new(clusters),
                            listeners: Listeners::default(),
                            wanted,
                        })
                    })?;
                    self.clusters = d.clusters.clone();
                    self.eds_wanted = d.wanted.clone();
                }
                Kind::Lds => {
                    let d = digest(1, msg, || {
                        let mut listeners = BTreeMap::new();
                        for body in r.resources() {
                            let body = body?;
                            let name = wire::resource_name(body)?.to_string();
                            listeners.insert(name, wire::listener_rds_names(body)?);
                        }
                        let wanted = rds_names(&listeners);
                        Ok(Digest {
                            msg: msg.to_vec(),
                            clusters: Clusters::default(),
                            listeners: Arc::new(listeners),
                            wanted,
                        })
                    })?;
                    self.listeners = d.listeners.clone();
                    self.rds_wanted = d.wanted.clone();
                }
                Kind::Eds | Kind::Rds if check_names => {
                    all_received = holds_all(&r, &st.names.set)?;
                }
                Kind::Eds | Kind::Rds => {}
            }
        }
        let with_node = self.take_node();
        let node = with_node.then_some(&self.node);
        let st = &mut self.types[kind.idx()];
        set(&mut st.nonce, r.nonce);
        if !nacked {
            set(&mut st.version, r.version);
        }
        st.responses_since_change += 1;
        // A response answers the current subscription if it holds every subscribed name,
        // or if the server has already seen our ACK carrying that subscription.
        st.answered = st.answered
            || kind.wildcard()
            || nacked
            || all_received
            || st.responses_since_change >= 2;
        // The common case, thousands of times per push, copies the subscription's
        // pre-encoded names instead of encoding them.
        let error = nacked.then(|| Self::nack_status(kind));
        sotw_request(
            out,
            &st.version,
            node,
            &st.names,
            kind,
            &st.nonce,
            error.as_ref(),
        );
        self.follow_up(kind, out);
        Ok(Outcome {
            kind,
            nacked,
            marker,
        })
    }

    fn on_delta(&mut self, msg: &[u8], scan: Scan, out: &mut BytesMut) -> Result<Outcome> {
        let r = wire::delta_response(msg)?;
        let kind = Kind::from_type_url(r.type_url)
            .ok_or_else(|| anyhow!("response for unexpected type {}", r.type_url))?;
        let marker = Self::marker_scan(kind, scan, r.resources.iter().map(|x| x.body));
        let nacked = self.nack == Some(kind);
        if !nacked {
            match kind {
                Kind::Cds => {
                    let clusters = Arc::make_mut(&mut self.clusters);
                    for res in &r.resources {
                        let (_, eds) = wire::cluster_summary(res.body)?;
                        clusters.insert(res.name.to_string(), eds);
                    }
                    for name in &r.removed {
                        clusters.remove(*name);
                    }
                    self.eds_wanted = eds_names(&self.clusters);
                }
                Kind::Lds => {
                    let listeners = Arc::make_mut(&mut self.listeners);
                    for res in &r.resources {
                        listeners.insert(res.name.to_string(), wire::listener_rds_names(res.body)?);
                    }
                    for name in &r.removed {
                        listeners.remove(*name);
                    }
                    self.rds_wanted = rds_names(&self.listeners);
                }
                Kind::Eds | Kind::Rds => {}
            }
        }
        let with_node = self.take_node();
        let st = &mut self.types[kind.idx()];
        set(&mut st.nonce, r.nonce);
        if !nacked {
            for res in &r.resources {
                if !st.pending.is_empty() {
                    st.pending.remove(res.name);
                }
                match st.known.get_mut(res.name) {
                    Some(v) => set(v, res.version),
                    None => {
                        st.known
                            .insert(res.name.to_string(), res.version.to_string());
                    }
                }
            }
            for name in &r.removed {
                st.pending.remove(*name);
                st.known.remove(*name);
            }
        }
        st.answered = true;
        if !with_node && !nacked {
            delta_ack(kind, &st.nonce, out);
        } else {
            framed_message(
                out,
                &DeltaDiscoveryRequest {
                    node: with_node.then(|| self.node.clone()),
                    type_url: kind.type_url().into(),
                    response_nonce: st.nonce.clone(),
                    error_detail: nacked.then(|| Self::nack_status(kind)),
                    ..Default::default()
                },
            );
        }
        self.follow_up(kind, out);
        Ok(Outcome {
            kind,
            nacked,
            marker,
        })
    }

    /// Envoy's ordering: clusters → endpoints of EDS clusters → listeners → their routes.
    /// Appends the subscription changes to `out`; returns how many.
    fn follow_up(&mut self, kind: Kind, out: &mut BytesMut) -> usize {
        match kind {
            Kind::Cds => {
                let wanted = self.eds_wanted.clone();
                let empty = wanted.set.is_empty();
                let mut n = usize::from(self.resubscribe(Kind::Eds, wanted, out));
                if empty {
                    n += usize::from(self.subscribe_wildcard(Kind::Lds, out));
                }
                n
            }
            Kind::Eds => usize::from(self.subscribe_wildcard(Kind::Lds, out)),
            Kind::Lds => {
                let wanted = self.rds_wanted.clone();
                usize::from(self.resubscribe(Kind::Rds, wanted, out))
            }
            Kind::Rds => 0,
        }
    }

    fn subscribe_wildcard(&mut self, kind: Kind, out: &mut BytesMut) -> bool {
        if self.types[kind.idx()].subscribed {
            return false;
        }
        self.types[kind.idx()].subscribed = true;
        self.initial_request(kind, out);
        true
    }

    /// Changes the subscription of a by-name type; `false` if nothing changes.
    fn resubscribe(&mut self, kind: Kind, wanted: Names, out: &mut BytesMut) -> bool {
        let st = &self.types[kind.idx()];
        if st.names.same(&wanted) && (st.subscribed || wanted.set.is_empty()) {
            return false;
        }
        if !st.subscribed {
            let st = &mut self.types[kind.idx()];
            st.subscribed = true;
            st.names = wanted;
            st.answered = false;
            st.responses_since_change = 0;
            self.initial_request(kind, out);
            return true;
        }
        let with_node = self.take_node();
        let node = with_node.then_some(&self.node);
        let st = &mut self.types[kind.idx()];
        st.answered = false;
        st.responses_since_change = 0;
        match self.mode {
            Mode::Sotw => {
                st.names = wanted;
                sotw_request(out, &st.version, node, &st.names, kind, &st.nonce, None);
            }
            Mode::Delta => {
                let subscribe: Vec<String> =
                    wanted.set.difference(&st.names.set).cloned().collect();
                let unsubscribe: Vec<String> =
                    st.names.set.difference(&wanted.set).cloned().collect();
                for n in &unsubscribe {
                    st.pending.remove(n);
                    st.known.remove(n);
                }
                st.pending.extend(subscribe.iter().cloned());
                st.names = wanted;
                framed_message(
                    out,
                    &DeltaDiscoveryRequest {
                        node: node.cloned(),
                        type_url: kind.type_url().into(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    },
                );
            }
        }
        true
    }
}

/// Whether a SotW response holds every name of `wanted`. Without allocating when the
/// response lists exactly those names in the same (sorted) order, as servers do.
fn holds_all(r: &wire::SotwResponse<'_>, wanted: &BTreeSet<String>) -> Result<bool> {
    let mut expected = wanted.iter();
    let mut count = 0;
    let mut in_order = true;
    for body in r.resources() {
        let name = wire::resource_name(body?)?;
        count += 1;
        if expected.next().map(String::as_str) != Some(name) {
            in_order = false;
            break;
        }
    }
    if in_order && count == wanted.len() {
        return Ok(true);
    }
    let mut received = BTreeSet::new();
    for body in r.resources() {
        received.insert(wire::resource_name(body?)?);
    }
    Ok(wanted.iter().all(|n| received.contains(n.as_str())))
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
