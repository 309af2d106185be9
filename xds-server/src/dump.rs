//! Renders encoded Envoy resources as proto3 JSON, the form Envoy's own config_dump uses,
//! from the descriptor set that ships with `envoy-types`.

use crate::cache::{Resource, TypeKind};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use std::sync::OnceLock;

static DESCRIPTORS: &[u8] = include_bytes!(env!("ENVOY_TYPES_DESCRIPTORS"));

/// Envoy's API (every message and extension config), for rendering and for checking
/// EnvoyFilter patches.
pub(crate) fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(DESCRIPTORS).map_err(|e| format!("Envoy descriptors: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Decodes `body` as the message `kind` names and renders it as JSON.
pub fn to_json(kind: TypeKind, body: &[u8]) -> Result<serde_json::Value, String> {
    let name = kind.type_url().rsplit('/').next().unwrap_or_default();
    let desc = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("no descriptor for {name}"))?;
    let msg = DynamicMessage::decode(desc, body).map_err(|e| format!("decoding {name}: {e}"))?;
    let opts = SerializeOptions::new().skip_default_fields(true);
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| format!("rendering {name}: {e}"))
}

pub fn resource_json(r: &Resource) -> serde_json::Value {
    let rendered = match to_json(r.kind, &r.body) {
        Ok(v) => v,
        Err(e) => serde_json::json!({ "error": e }),
    };
    serde_json::json!({ "name": &*r.name, "version": &*r.version, "resource": rendered })
}
