//! Applies EnvoyFilter patches to translated resources, as istiod's `envoyfilter`
//! package does (listener_patch.go, rc_patch.go, cluster_patch.go): the same match
//! rules, the same operations per kind, the same order (all patches of one kind across
//! the selected filters, in filter order), and the same MERGE (`proto.Merge` with
//! Duration replaced rather than merged; a filter's typed config merged with the patch's
//! typed config as messages).
//!
//! Patching works on [`DynamicMessage`]s decoded from the encoded resources, so it sees
//! exactly what Envoy will, and a resource a patch leaves unchanged keeps its shared
//! encoding (same bytes, same `Resource`).

mod cluster;
mod listener;
mod route;

pub use cluster::patch_clusters;
pub use listener::patch_listeners;
pub use route::patch_routes;

use crate::cache::{Resource, TypeKind};
use crate::config::envoy_filter::PatchContext;
use crate::dump::pool;
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use std::sync::Arc;

/// `resource` decoded for patching (`None`: not decodable, left alone).
fn decode(r: &Resource) -> Option<DynamicMessage> {
    let name = r.kind.type_url().rsplit('/').next()?;
    let desc = pool().ok()?.get_message_by_name(name)?;
    DynamicMessage::decode(desc, r.body.clone()).ok()
}

/// The resource for a patched message: the original when the bytes did not change.
fn encode(kind: TypeKind, original: Option<&Arc<Resource>>, m: &DynamicMessage) -> Arc<Resource> {
    let mut body = Vec::new();
    encode_canonical(m, &mut body);
    match original {
        Some(o) if o.body[..] == body[..] => o.clone(),
        _ => Resource::from_body(kind, Arc::from(str_field(m, "name")), body.into()),
    }
}

/// Encodes `m` deterministically: fields in number order (as prost does), map entries
/// sorted by key, and the messages inside `Any`s encoded the same way. A resource's
/// version is the hash of its bytes, and `DynamicMessage` keeps maps in a `HashMap`.
fn encode_canonical(m: &DynamicMessage, buf: &mut Vec<u8>) {
    if m.descriptor().full_name() == "google.protobuf.Any" {
        let url = str_field(m, "type_url");
        if let Some(inner) = unpack(m, &url) {
            let mut value = Vec::new();
            encode_canonical(&inner, &mut value);
            let mut any = m.clone();
            any.set_field_by_name("value", Value::Bytes(value.into()));
            any.encode_raw(buf);
            return;
        }
    }
    for (fd, value) in m.fields() {
        match value {
            Value::Message(child) => nested(fd.number(), child, buf),
            Value::List(items) if matches!(fd.kind(), Kind::Message(_)) => {
                for item in items {
                    if let Value::Message(child) = item {
                        nested(fd.number(), child, buf);
                    }
                }
            }
            Value::Map(entries) => {
                let Kind::Message(entry_desc) = fd.kind() else {
                    continue;
                };
                let mut sorted: Vec<_> = entries.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in sorted {
                    let mut entry = DynamicMessage::new(entry_desc.clone());
                    entry.set_field_by_number(1, Value::from(k.clone()));
                    entry.set_field_by_number(2, v.clone());
                    nested(fd.number(), &entry, buf);
                }
            }
            _ => {
                let mut single = DynamicMessage::new(m.descriptor());
                single.set_field(&fd, value.clone());
                single.encode_raw(buf);
            }
        }
    }
}

fn nested(number: u32, m: &DynamicMessage, buf: &mut Vec<u8>) {
    let mut body = Vec::new();
    encode_canonical(m, &mut body);
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(body.len() as u64, buf);
    buf.extend_from_slice(&body);
}

fn str_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn has(m: &DynamicMessage, name: &str) -> bool {
    m.has_field_by_name(name)
}

fn msg_field(m: &DynamicMessage, name: &str) -> Option<DynamicMessage> {
    if !m.has_field_by_name(name) {
        return None;
    }
    m.get_field_by_name(name)
        .and_then(|v| v.as_message().cloned())
}

/// The messages of repeated field `name`, taken out (put them back with [`set_list`]).
fn take_list(m: &mut DynamicMessage, name: &str) -> Vec<DynamicMessage> {
    match m.take_field_by_name(name) {
        Some(Value::List(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::Message(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn set_list(m: &mut DynamicMessage, name: &str, items: Vec<DynamicMessage>) {
    if items.is_empty() {
        m.clear_field_by_name(name);
    } else {
        m.set_field_by_name(
            name,
            Value::List(items.into_iter().map(Value::Message).collect()),
        );
    }
}

/// Istio's `merge.Merge`: `proto.Merge` (repeated fields appended, maps and scalars
/// replaced, messages merged field by field), except that a Duration is replaced whole.
pub fn merge(dst: &mut DynamicMessage, src: &DynamicMessage) {
    for (fd, v) in src.fields() {
        match v {
            Value::List(items) => {
                if let Some(list) = dst.get_field_mut(&fd).as_list_mut() {
                    list.extend(items.iter().cloned());
                }
            }
            Value::Map(entries) => {
                if let Some(map) = dst.get_field_mut(&fd).as_map_mut() {
                    for (k, v) in entries {
                        map.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Message(m) => {
                let whole = matches!(fd.kind(), Kind::Message(d) if d.full_name() == "google.protobuf.Duration");
                match dst.get_field_mut(&fd).as_message_mut() {
                    Some(d) if !whole => merge(d, m),
                    _ => dst.set_field(&fd, v.clone()),
                }
            }
            _ => dst.set_field(&fd, v.clone()),
        }
    }
}

/// The message inside a `google.protobuf.Any`, decoded as `type_url` names
/// (`None`: a type Envoy's API does not have).
fn unpack(any: &DynamicMessage, type_url: &str) -> Option<DynamicMessage> {
    let name = type_url.rsplit('/').next()?;
    let desc = pool().ok()?.get_message_by_name(name)?;
    let value = any.get_field_by_name("value")?;
    DynamicMessage::decode(desc, value.as_bytes()?.clone()).ok()
}

fn pack(any: &mut DynamicMessage, m: &DynamicMessage) {
    any.set_field_by_name(
        "type_url",
        Value::String(format!(
            "type.googleapis.com/{}",
            m.descriptor().full_name()
        )),
    );
    any.set_field_by_name("value", Value::Bytes(m.encode_to_vec().into()));
}

/// Istio's `MergeAnyWithAny`: the patch's typed config merged into the existing one as
/// messages of the existing one's type (a patch written against another version of the
/// type is read as the existing type, as istiod does). `false`: not mergeable, left as is.
fn merge_any(dst: &mut DynamicMessage, src: &DynamicMessage) -> bool {
    let url = str_field(dst, "type_url");
    let (Some(mut existing), Some(patch)) = (unpack(dst, &url), unpack(src, &url)) else {
        return false;
    };
    merge(&mut existing, &patch);
    pack(dst, &existing);
    true
}

/// MERGE of a filter (network or HTTP): the name replaced if the patch sets one, the
/// typed configs merged as messages. A filter without a typed config is skipped, as
/// istiod skips it.
fn merge_filter(filter: &mut DynamicMessage, patch: &DynamicMessage) {
    let Some(mut tc) = msg_field(filter, "typed_config") else {
        return;
    };
    let name = str_field(patch, "name");
    if !name.is_empty() {
        filter.set_field_by_name("name", Value::String(name));
    }
    if let Some(p) = msg_field(patch, "typed_config") {
        if merge_any(&mut tc, &p) {
            filter.set_field_by_name("typed_config", Value::Message(tc));
        }
    }
}

/// Istio merges a patch's transport socket into an existing one of the same name as
/// typed configs (and then skips the plain merge); `true` if it did.
fn merge_transport_socket(target: &mut DynamicMessage, patch: &DynamicMessage) -> bool {
    let (Some(mut ts), Some(pts)) = (
        msg_field(target, "transport_socket"),
        msg_field(patch, "transport_socket"),
    ) else {
        return false;
    };
    if str_field(&ts, "name") != str_field(&pts, "name") {
        return false;
    }
    if let (Some(mut tc), Some(ptc)) = (
        msg_field(&ts, "typed_config"),
        msg_field(&pts, "typed_config"),
    ) {
        if merge_any(&mut tc, &ptc) {
            ts.set_field_by_name("typed_config", Value::Message(tc));
            target.set_field_by_name("transport_socket", Value::Message(ts));
        }
    }
    true
}

/// Inserts `value` before (`after == false`) or after the first item `matches` picks;
/// `false` if none did.
fn insert_at(
    items: &mut Vec<DynamicMessage>,
    value: &DynamicMessage,
    after: bool,
    matches: impl Fn(&DynamicMessage) -> bool,
) -> bool {
    match items.iter().position(matches) {
        Some(i) => {
            items.insert(if after { i + 1 } else { i }, value.clone());
            true
        }
        None => false,
    }
}

fn replace_first(
    items: &mut [DynamicMessage],
    value: &DynamicMessage,
    matches: impl Fn(&DynamicMessage) -> bool,
) {
    if let Some(item) = items.iter_mut().find(|i| matches(i)) {
        *item = value.clone();
    }
}

/// The context of a listener Trellis generated, from its traffic direction.
fn listener_context(l: &DynamicMessage) -> PatchContext {
    match l
        .get_field_by_name("traffic_direction")
        .and_then(|v| v.as_enum_number())
    {
        Some(1) => PatchContext::SidecarInbound,
        _ => PatchContext::SidecarOutbound,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::de::DeserializeSeed;

    fn msg(name: &str, json: serde_json::Value) -> DynamicMessage {
        let desc = pool().unwrap().get_message_by_name(name).unwrap();
        desc.deserialize(json).unwrap()
    }

    #[test]
    fn merge_appends_lists_merges_messages_and_replaces_durations() {
        let name = "envoy.config.cluster.v3.Cluster";
        let mut dst = msg(
            name,
            serde_json::json!({"name": "a", "connect_timeout": "1.5s",
                "circuit_breakers": {"thresholds": [{"max_connections": 1}]},
                "common_lb_config": {"healthy_panic_threshold": {"value": 10}}}),
        );
        let src = msg(
            name,
            serde_json::json!({"connect_timeout": "2s",
                "circuit_breakers": {"thresholds": [{"max_connections": 2}]},
                "common_lb_config": {"ignore_new_hosts_until_first_hc": true}}),
        );
        merge(&mut dst, &src);
        let json = serde_json::to_value(&dst).unwrap();
        assert_eq!(json["connectTimeout"], "2s");
        assert_eq!(
            json["circuitBreakers"]["thresholds"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            json["commonLbConfig"]["healthyPanicThreshold"]["value"],
            10.0
        );
        assert_eq!(json["commonLbConfig"]["ignoreNewHostsUntilFirstHc"], true);
        assert_eq!(json["name"], "a");
    }
}
