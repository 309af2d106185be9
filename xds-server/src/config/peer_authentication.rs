//! `PeerAuthentication` (security.istio.io/v1, v1beta1): which mutual TLS mode a
//! workload's sidecar accepts inbound, per workload and per port.
//!
//! The serde shape denies unknown fields like every other spec; modes are parsed into
//! [`MtlsMode`] here so that a misspelt mode is an error naming the field, not a string
//! translation has to second-guess.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Istio's `PeerAuthentication.MutualTLS.Mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum MtlsMode {
    /// Inherit from the parent level (port -> workload -> namespace -> mesh).
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    /// Plaintext only.
    #[serde(rename = "DISABLE")]
    Disable,
    /// Mutual TLS and plaintext on the same port (tls_inspector picks the chain).
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS only.
    #[serde(rename = "STRICT")]
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<PolicySelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Keyed by the workload's (target) port number, as in Istio.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<PortNumber, MutualTls>,
}

/// A map key that is a port number. YAML writes it bare (`8080:`), JSON and many
/// generated manifests quote it (`"8080":`); both mean the same port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortNumber(pub u32);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortNumber, E> {
                u32::try_from(v)
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("port {v} is out of range 1-65535")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortNumber, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range 1-65535")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortNumber, E> {
                v.parse::<u64>()
                    .map_err(|_| E::custom(format!("`{v}` is not a port number")))
                    .and_then(|n| self.visit_u64(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// Istio's `type.v1beta1.WorkloadSelector`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

impl PeerAuthenticationSpec {
    /// Labels a workload must carry; `None` for a namespace- or mesh-wide policy
    /// (Istio treats an empty `matchLabels` like no selector).
    pub fn match_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
    }
}

/// Per-document checks (Istio's own validation): port-level settings need a selector,
/// because a port number only means something for a known set of workloads.
pub fn validate(spec: &PeerAuthenticationSpec) -> Result<(), (String, String)> {
    if !spec.port_level_mtls.is_empty() && spec.match_labels().is_none() {
        return Err((
            "spec.portLevelMtls".into(),
            "portLevelMtls requires a selector with matchLabels (namespace- and mesh-wide policies cannot set port-level modes)".into(),
        ));
    }
    for PortNumber(port) in spec.port_level_mtls.keys() {
        if !(1..=65535).contains(port) {
            return Err((
                format!("spec.portLevelMtls.{port}"),
                format!("port {port} is out of range 1-65535"),
            ));
        }
    }
    if let Some(sel) = &spec.selector {
        for (k, v) in &sel.match_labels {
            if k.is_empty() {
                return Err((
                    "spec.selector.matchLabels".into(),
                    "label keys must not be empty".into(),
                ));
            }
            if v.contains('*') {
                return Err((
                    format!("spec.selector.matchLabels.{k}"),
                    "wildcards are not allowed in label values".into(),
                ));
            }
        }
    }
    Ok(())
}

/// One accepted policy, reduced to what resolution needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Policy {
    mode: MtlsMode,
    selector: BTreeMap<String, String>,
    ports: BTreeMap<u32, MtlsMode>,
}

/// Every PeerAuthentication of the mesh, indexed for Istio's resolution order:
/// workload-selector policy of the workload's namespace > namespace-wide policy >
/// mesh-wide policy (root namespace, no selector) > PERMISSIVE; `UNSET` inherits from
/// the next level, a port-level `UNSET` from the workload level.
///
/// Where Istio lets the oldest of several candidates win (by `creationTimestamp`),
/// Trellis takes the first by name: files carry no creation time, and Istio itself
/// falls back to name order for equal timestamps, so the result is the same for
/// manifests applied together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAuthentications {
    mesh: Option<MtlsMode>,
    namespaces: BTreeMap<String, MtlsMode>,
    /// Selector policies per namespace, in name order.
    selectors: BTreeMap<String, Vec<Policy>>,
}

impl PeerAuthentications {
    /// `policies` as (namespace, name, spec); selector policies in the root namespace
    /// must have been rejected by the caller (Istio ignores them, see `crate::mesh`).
    pub fn new<'a>(
        root_namespace: &str,
        policies: impl IntoIterator<Item = (&'a str, &'a str, &'a PeerAuthenticationSpec)>,
    ) -> PeerAuthentications {
        let mut sorted: Vec<_> = policies.into_iter().collect();
        sorted.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut out = PeerAuthentications::default();
        for (ns, _, spec) in sorted {
            let mode = spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
            match spec.match_labels() {
                None if ns == root_namespace => {
                    out.mesh.get_or_insert(mode);
                }
                None => {
                    out.namespaces.entry(ns.to_string()).or_insert(mode);
                }
                Some(_) if ns == root_namespace => {}
                Some(labels) => out
                    .selectors
                    .entry(ns.to_string())
                    .or_default()
                    .push(Policy {
                        mode,
                        selector: labels.clone(),
                        ports: spec
                            .port_level_mtls
                            .iter()
                            .map(|(p, m)| (p.0, m.mode))
                            .collect(),
                    }),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.mesh.is_none() && self.namespaces.is_empty() && self.selectors.is_empty()
    }

    /// The effective mode of a workload (namespace and labels) on one of its ports
    /// (the workload's target port): never `Unset`.
    pub fn mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u32) -> MtlsMode {
        fn over(parent: MtlsMode, m: MtlsMode) -> MtlsMode {
            if m == MtlsMode::Unset {
                parent
            } else {
                m
            }
        }
        let mut mode = over(MtlsMode::Permissive, self.mesh.unwrap_or_default());
        mode = over(
            mode,
            self.namespaces.get(namespace).copied().unwrap_or_default(),
        );
        let workload = self.selectors.get(namespace).and_then(|ps| {
            ps.iter()
                .find(|p| p.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        if let Some(p) = workload {
            mode = over(mode, p.mode);
            mode = over(mode, p.ports.get(&port).copied().unwrap_or_default());
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(yaml: &str) -> PeerAuthenticationSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policies(list: &[(&str, &str, &str)]) -> PeerAuthentications {
        let specs: Vec<(String, String, PeerAuthenticationSpec)> = list
            .iter()
            .map(|(ns, name, y)| (ns.to_string(), name.to_string(), spec(y)))
            .collect();
        PeerAuthentications::new(
            "istio-system",
            specs.iter().map(|(ns, n, s)| (ns.as_str(), n.as_str(), s)),
        )
    }

    use MtlsMode::*;

    #[test]
    fn default_is_permissive() {
        let p = policies(&[]);
        assert!(p.is_empty());
        assert_eq!(p.mode("a", &labels(&[]), 80), Permissive);
    }

    #[test]
    fn narrower_levels_win_and_unset_inherits() {
        let p = policies(&[
            ("istio-system", "default", "mtls: {mode: STRICT}"),
            ("a", "default", "mtls: {mode: DISABLE}"),
            ("b", "default", "mtls: {mode: UNSET}"),
            (
                "a",
                "web",
                "selector: {matchLabels: {app: web}}\nportLevelMtls: {8080: {mode: STRICT}, 9090: {mode: UNSET}}",
            ),
        ]);
        let web = labels(&[("app", "web"), ("v", "1")]);
        assert_eq!(p.mode("c", &web, 80), Strict, "mesh");
        assert_eq!(p.mode("b", &web, 80), Strict, "namespace UNSET -> mesh");
        assert_eq!(p.mode("a", &labels(&[]), 80), Disable, "namespace");
        assert_eq!(
            p.mode("a", &web, 80),
            Disable,
            "workload without mtls -> namespace"
        );
        assert_eq!(p.mode("a", &web, 8080), Strict, "port");
        assert_eq!(p.mode("a", &web, 9090), Disable, "port UNSET -> workload");
        // A selector policy only applies in its own namespace.
        assert_eq!(p.mode("b", &web, 8080), Strict);
    }

    #[test]
    fn first_by_name_wins_within_a_level() {
        let p = policies(&[
            (
                "a",
                "zz",
                "selector: {matchLabels: {app: web}}\nmtls: {mode: DISABLE}",
            ),
            (
                "a",
                "aa",
                "selector: {matchLabels: {v: '1'}}\nmtls: {mode: STRICT}",
            ),
            ("a", "ns-b", "mtls: {mode: STRICT}"),
            ("a", "ns-a", "mtls: {mode: DISABLE}"),
            ("istio-system", "m2", "mtls: {mode: DISABLE}"),
            ("istio-system", "m1", "mtls: {mode: STRICT}"),
        ]);
        let web = labels(&[("app", "web"), ("v", "1")]);
        assert_eq!(p.mode("a", &web, 80), Strict, "aa before zz");
        assert_eq!(p.mode("a", &labels(&[]), 80), Disable, "ns-a before ns-b");
        assert_eq!(p.mode("x", &labels(&[]), 80), Strict, "m1 before m2");
    }

    #[test]
    fn root_namespace_selector_policies_apply_nowhere() {
        let p = policies(&[(
            "istio-system",
            "sel",
            "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}",
        )]);
        let web = labels(&[("app", "web")]);
        assert_eq!(p.mode("istio-system", &web, 80), Permissive);
        assert_eq!(p.mode("a", &web, 80), Permissive);
    }

    #[test]
    fn validation() {
        assert!(validate(&spec("portLevelMtls: {80: {mode: STRICT}}")).is_err());
        assert!(validate(&spec(
            "selector: {matchLabels: {}}\nportLevelMtls: {80: {mode: STRICT}}"
        ))
        .is_err());
        assert!(validate(&spec(
            "selector: {matchLabels: {a: b}}\nportLevelMtls: {'80': {mode: STRICT}}"
        ))
        .is_ok());
        assert!(serde_yaml_ng::from_str::<PeerAuthenticationSpec>("mtls: {mode: strict}").is_err());
        assert!(serde_yaml_ng::from_str::<PeerAuthenticationSpec>(
            "portLevelMtls: {99999999999: {}}"
        )
        .is_err());
    }
}
