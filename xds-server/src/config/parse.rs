//! Splits a multi-document YAML file into typed, validated objects.
//!
//! A file is the unit of change: either every document in it is accepted, or the
//! file is rejected as a whole with errors that name the file, the document (1-based
//! index and starting line), the object and the field.

use super::model::*;
use super::validate;
use super::{ConfigError, ConfigObject, Object, Source};
use std::sync::Arc;

/// API groups whose objects share one schema per kind (Istio kept them wire-compatible).
const ISTIO_NETWORKING: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const TRELLIS: &str = "trellis.dev/v1alpha1";
/// Istio's security API group (v1beta1 is the same schema as v1).
const ISTIO_SECURITY: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Istio kinds a user may reasonably expect; rejected with a "not supported yet" message
/// rather than "unknown kind" so the error tells them it is a feature gap, not a typo.
const KNOWN_UNSUPPORTED: &[&str] = &[
    "Gateway",
    "Sidecar",
    "WorkloadGroup",
    "ProxyConfig",
    "Telemetry",
    "WasmPlugin",
];

pub fn parse_file(path: &str, text: &str) -> Result<Vec<ConfigObject>, Vec<ConfigError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for doc in parse_documents(path, text) {
        match doc {
            Ok(Some(obj)) => objects.push(obj),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// Every document of a file on its own: accepted (`Some`), empty (`None`) or rejected.
pub fn parse_documents(path: &str, text: &str) -> Vec<Result<Option<ConfigObject>, ConfigError>> {
    let file: Arc<str> = Arc::from(path);
    split_documents(text)
        .into_iter()
        .enumerate()
        .map(|(index, (line, doc))| {
            let source = Source {
                file: file.clone(),
                document: index + 1,
                line,
            };
            parse_document(&doc, &source).map_err(|e| *e)
        })
        .collect()
}

/// Returns (first line number, text) per document. Splitting by hand, rather than
/// letting the YAML parser iterate documents, keeps line numbers for every document
/// even when one of them is syntactically broken.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_separator {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    // Documents holding only comments or whitespace are not documents (kubectl agrees).
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#')
            })
        })
        .collect()
}

fn err(
    source: &Source,
    object: Option<String>,
    field: Option<String>,
    message: String,
) -> Box<ConfigError> {
    Box::new(ConfigError::new(source, object, field, message))
}

fn parse_document(text: &str, source: &Source) -> Result<Option<ConfigObject>, Box<ConfigError>> {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = match e.location() {
            Some(loc) => format!(
                "YAML syntax error at line {}: {}",
                source.line + loc.line().saturating_sub(1),
                strip_location(&e.to_string())
            ),
            None => format!("YAML syntax error: {e}"),
        };
        err(source, None, None, msg)
    })?;
    let serde_yaml_ng::Value::Mapping(map) = value else {
        if value.is_null() {
            return Ok(None);
        }
        return Err(err(source, None, None, "document is not a mapping".into()));
    };
    let get_str = |k: &str| map.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let api_version = get_str("apiVersion").ok_or_else(|| {
        err(
            source,
            None,
            Some("apiVersion".into()),
            "missing apiVersion".into(),
        )
    })?;
    let kind = get_str("kind")
        .ok_or_else(|| err(source, None, Some("kind".into()), "missing kind".into()))?;
    for key in map.keys() {
        let k = key.as_str().unwrap_or_default();
        if !matches!(k, "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            return Err(err(
                source,
                Some(kind.clone()),
                Some(k.to_string()),
                format!("unknown top-level field `{k}`"),
            ));
        }
    }
    let metadata: ObjectMeta = match map.get("metadata") {
        Some(m) => typed(m.clone(), source, &kind, "metadata")?,
        None => {
            return Err(err(
                source,
                Some(kind),
                Some("metadata".into()),
                "missing metadata".into(),
            ))
        }
    };
    let ns = metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let object_name = format!("{kind} {ns}/{}", metadata.name);
    validate::object_name(&metadata.name).map_err(|m| {
        err(
            source,
            Some(object_name.clone()),
            Some("metadata.name".into()),
            m,
        )
    })?;
    validate::object_name(&ns).map_err(|m| {
        err(
            source,
            Some(object_name.clone()),
            Some("metadata.namespace".into()),
            m,
        )
    })?;
    let spec = map
        .get("spec")
        .cloned()
        .unwrap_or(serde_yaml_ng::Value::Null);
    let spec = if spec.is_null() {
        serde_yaml_ng::Value::Mapping(Default::default())
    } else {
        spec
    };

    let is_istio = ISTIO_NETWORKING.contains(&api_version.as_str());
    fn make<T>(metadata: &ObjectMeta, ns: &str, source: &Source, spec: T) -> Object<T> {
        Object {
            name: metadata.name.clone(),
            namespace: ns.to_string(),
            labels: metadata.labels.clone(),
            annotations: metadata.annotations.clone(),
            source: source.clone(),
            spec,
        }
    }
    let obj = match (kind.as_str(), is_istio, api_version.as_str()) {
        ("ServiceEntry", true, _) => ConfigObject::ServiceEntry(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?)),
        ("WorkloadEntry", true, _) => ConfigObject::WorkloadEntry(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?)),
        ("VirtualService", true, _) => ConfigObject::VirtualService(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?)),
        ("DestinationRule", true, _) => {
            ConfigObject::DestinationRule(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?))
        }
        ("PeerAuthentication", _, api) if ISTIO_SECURITY.contains(&api) => {
            ConfigObject::PeerAuthentication(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?))
        }
        ("AuthorizationPolicy", _, api) if ISTIO_SECURITY.contains(&api) => {
            ConfigObject::AuthorizationPolicy(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?))
        }
        ("RequestAuthentication", _, api) if ISTIO_SECURITY.contains(&api) => {
            ConfigObject::RequestAuthentication(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?))
        }
        ("EnvoyFilter", true, _) => ConfigObject::EnvoyFilter(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?)),
        ("MeshConfig", _, TRELLIS) => ConfigObject::MeshConfig(make(&metadata, &ns, source, typed(spec, source, &object_name, "spec")?)),
        (k, _, api) if KNOWN_UNSUPPORTED.contains(&k) => {
            return Err(err(
                source,
                Some(object_name),
                Some("kind".into()),
                format!("kind {k} ({api}) is not supported yet"),
            ))
        }
        (k, true, api) | (k, _, api @ TRELLIS) => {
            return Err(err(source, Some(object_name), Some("kind".into()), format!("unknown kind {k} in {api}")))
        }
        (k, false, api) => {
            return Err(err(
                source,
                Some(object_name),
                Some("apiVersion".into()),
                format!("{k} ({api}) is not a mesh resource Trellis reads (networking.istio.io/v1, security.istio.io/v1, {TRELLIS})"),
            ))
        }
    };
    validate::object(&obj)
        .map_err(|(field, message)| err(source, Some(object_name), Some(field), message))?;
    Ok(Some(obj))
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
    source: &Source,
    object: &str,
    prefix: &str,
) -> Result<T, Box<ConfigError>> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        err(
            source,
            Some(object.to_string()),
            Some(field),
            strip_location(&e.into_inner().to_string()),
        )
    })
}

/// serde_yaml_ng appends "at line X column Y" relative to the document; the caller
/// already reports a file-level line, so the relative one would only mislead.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
