//! Istio's VirtualService chaining. A VirtualService without `hosts` is a delegate; a
//! root's `http` rule with `delegate` stands for the delegate's rules, each narrowed to
//! the root rule's match and filled in with the root rule's options:
//!
//! - matches are conjoined (root AND delegate); a delegate match that would widen the
//!   root's (another path prefix, a different exact value, any regex against a value)
//!   drops that delegate rule, as in Istio;
//! - the delegate rule's own options win; the root's fill in the ones it leaves unset
//!   (`headers`, `fault`, `corsPolicy`, and for rules with a `route`: `rewrite`,
//!   `timeout`, `retries`, `mirror`/`mirrorPercentage`/`mirrors`); names join as
//!   `root-delegate`;
//! - short hosts resolve in the namespace of the object that names them (as istiod
//!   resolves them before merging);
//! - a delegate that is missing, has hosts, or is not exported to the root's namespace
//!   drops the root rule; the rest of the root still applies.
//!
//! Everything Istio drops silently is a [`StageWarning`], not an error: the root and the
//! delegate usually belong to different teams, and a delegate may arrive after its root.

use super::http_route::http_rule;
use super::settings::Settings;
use super::stages::{Errors, StageWarning, Warnings};
use super::virtual_services::Refs;
use super::{exported_to, HttpRouteRule};
use crate::config::model::{
    Delegate, HttpMatchRequest, HttpRoute, StringMatch, VirtualServiceSpec,
};
use crate::config::Object;
use std::collections::{BTreeMap, BTreeSet};

type Vs = Object<VirtualServiceSpec>;

const KIND: &str = "VirtualService";

/// The delegates of a build, their own rules checked once (not once per root using them).
pub(super) struct Delegates<'a> {
    /// Every delegate by `namespace/name`, and whether its rules passed their checks.
    by_key: BTreeMap<String, (&'a Vs, bool)>,
    /// VirtualServices with hosts, to say why one named as a delegate is none.
    with_hosts: BTreeSet<String>,
}

impl<'a> Delegates<'a> {
    /// Splits out the delegates of `all` and checks their rules (errors name the delegate).
    pub fn new(all: &[&'a Vs], refs: &Refs<'_>, errs: &mut Errors) -> Self {
        let mut by_key = BTreeMap::new();
        let mut with_hosts = BTreeSet::new();
        for vs in all {
            if !vs.spec.hosts.is_empty() {
                with_hosts.insert(vs.key());
                continue;
            }
            let mut ok = true;
            for (j, r) in vs.spec.http.iter().enumerate() {
                ok &= http_rule(vs, j, r, refs, errs).is_some();
            }
            by_key.insert(vs.key(), (*vs, ok));
        }
        Self { by_key, with_hosts }
    }

    pub fn is_delegate(vs: &Vs) -> bool {
        vs.spec.hosts.is_empty()
    }

    /// Warns about every delegate no VirtualService of `all` names (whatever its gateways).
    pub fn warn_unused(&self, all: &[&Vs], warnings: &mut Warnings) {
        let named: BTreeSet<String> = all
            .iter()
            .flat_map(|vs| vs.spec.http.iter().map(move |r| (vs, r)))
            .filter_map(|(vs, r)| r.delegate.as_ref().map(|d| key_of(d, &vs.namespace)))
            .collect();
        for (key, (vs, _)) in &self.by_key {
            if !named.contains(key) {
                warnings.push(vs, KIND, "spec.hosts", StageWarning::UnusedDelegate);
            }
        }
    }

    /// The rules root rule `i` (`r`) stands for: none if it delegates to nothing; none,
    /// with a warning, when the delegate cannot be used; none when its rules have errors
    /// (already reported).
    pub fn expand(
        &self,
        (root, i, r): (&Vs, usize, &HttpRoute),
        refs: &Refs<'_>,
        errs: &mut Errors,
        warnings: &mut Warnings,
    ) -> Vec<HttpRouteRule> {
        let Some(d) = &r.delegate else {
            return Vec::new();
        };
        let key = key_of(d, &root.namespace);
        let field = format!("spec.http[{i}].delegate");
        let Some(&(delegate, checked)) = self.by_key.get(&key) else {
            let w = if self.with_hosts.contains(&key) {
                StageWarning::NotADelegate { delegate: key }
            } else {
                StageWarning::MissingDelegate { delegate: key }
            };
            warnings.push(root, KIND, field, w);
            return Vec::new();
        };
        if !exported_to(
            &delegate.spec.export_to,
            &delegate.namespace,
            &root.namespace,
        ) {
            let w = StageWarning::DelegateNotExported {
                delegate: key,
                namespace: root.namespace.clone(),
            };
            warnings.push(root, KIND, field, w);
            return Vec::new();
        }
        if !checked {
            return Vec::new();
        }
        let parent = qualified(r, &root.namespace, refs.settings);
        let mut out = Vec::new();
        for (j, leaf) in delegate.spec.http.iter().enumerate() {
            let leaf_q = qualified(leaf, &delegate.namespace, refs.settings);
            let Some(merged) = merge_rule(&parent, &leaf_q) else {
                let w = StageWarning::OutsideRootMatch {
                    root: root.key(),
                    rule: i,
                };
                warnings.push(delegate, KIND, format!("spec.http[{j}].match"), w);
                continue;
            };
            // Both halves passed their checks with these very hosts, so this cannot fail.
            out.extend(http_rule(delegate, j, &merged, refs, errs));
        }
        out
    }
}

fn key_of(d: &Delegate, root_namespace: &str) -> String {
    format!(
        "{}/{}",
        d.namespace.as_deref().unwrap_or(root_namespace),
        d.name
    )
}

/// `r` with the hosts of its destinations and mirrors as FQDNs of `namespace`, so the
/// merged rule means the same whichever object it sits in.
fn qualified(r: &HttpRoute, namespace: &str, settings: &Settings) -> HttpRoute {
    let mut r = r.clone();
    let resolve = |h: &mut String| *h = settings.resolve_host(h, namespace);
    r.route
        .iter_mut()
        .for_each(|d| resolve(&mut d.destination.host));
    if let Some(m) = &mut r.mirror {
        resolve(&mut m.host);
    }
    r.mirrors
        .iter_mut()
        .for_each(|m| resolve(&mut m.destination.host));
    r
}

/// `own`, else the root's.
fn or<T: Clone>(own: &Option<T>, root: &Option<T>) -> Option<T> {
    own.as_ref().or(root.as_ref()).cloned()
}

fn joined_name(root: &Option<String>, own: &Option<String>) -> Option<String> {
    match (root, own) {
        (Some(r), Some(o)) => Some(format!("{r}-{o}")),
        _ => or(own, root),
    }
}

/// Delegate rule `leaf` under root rule `root`; `None` when its match is not within the
/// root's.
fn merge_rule(root: &HttpRoute, leaf: &HttpRoute) -> Option<HttpRoute> {
    let matches = merge_matches(&root.matches, &leaf.matches)?;
    // Options that shape a route's action reach only delegate rules that route.
    let routes = !leaf.route.is_empty();
    fn route_only<T: Clone>(routes: bool, own: &Option<T>, root: &Option<T>) -> Option<T> {
        if routes {
            or(own, root)
        } else {
            own.clone()
        }
    }
    Some(HttpRoute {
        name: joined_name(&root.name, &leaf.name),
        matches,
        route: leaf.route.clone(),
        redirect: leaf.redirect.clone(),
        direct_response: leaf.direct_response.clone(),
        rewrite: route_only(routes, &leaf.rewrite, &root.rewrite),
        timeout: route_only(routes, &leaf.timeout, &root.timeout),
        retries: route_only(routes, &leaf.retries, &root.retries),
        fault: or(&leaf.fault, &root.fault),
        mirror: route_only(routes, &leaf.mirror, &root.mirror),
        mirror_percentage: route_only(routes, &leaf.mirror_percentage, &root.mirror_percentage),
        mirrors: if routes && leaf.mirrors.is_empty() {
            root.mirrors.clone()
        } else {
            leaf.mirrors.clone()
        },
        cors_policy: or(&leaf.cors_policy, &root.cors_policy),
        headers: or(&leaf.headers, &root.headers),
        delegate: None,
        websocket_upgrade: None,
    })
}

/// Root matches AND delegate matches: every delegate match conjoined with each root match
/// it lies within. `None` when a delegate match lies within none (Istio's conflict).
pub(super) fn merge_matches(
    root: &[HttpMatchRequest],
    leaf: &[HttpMatchRequest],
) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(leaf.to_vec());
    }
    if leaf.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for l in leaf {
        let before = out.len();
        out.extend(root.iter().filter_map(|r| conjoin(r, l)));
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

/// `leaf` narrowed by `root`, or `None` if `leaf` asks for something `root` excludes.
fn conjoin(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> Option<HttpMatchRequest> {
    let strings = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    let maps = [
        (&root.headers, &leaf.headers),
        (&root.without_headers, &leaf.without_headers),
        (&root.query_params, &leaf.query_params),
    ];
    let compatible = strings.iter().all(|(r, l)| within(r.as_ref(), l.as_ref()))
        && maps
            .iter()
            .all(|(r, l)| l.iter().all(|(k, lv)| within(r.get(k), Some(lv))))
        && root.ignore_uri_case == leaf.ignore_uri_case
        && !matches!((root.port, leaf.port), (Some(a), Some(b)) if a != b)
        && root
            .source_namespace
            .as_ref()
            .is_none_or(|ns| leaf.source_namespace.as_ref() == Some(ns))
        && leaf
            .source_labels
            .iter()
            .all(|(k, v)| root.source_labels.get(k).is_none_or(|rv| rv == v))
        && (root.gateways.is_empty()
            || leaf.gateways.is_empty()
            || leaf.gateways.iter().all(|g| root.gateways.contains(g)));
    if !compatible {
        return None;
    }
    Some(HttpMatchRequest {
        name: joined_name(&root.name, &leaf.name),
        uri: or(&leaf.uri, &root.uri),
        scheme: or(&leaf.scheme, &root.scheme),
        method: or(&leaf.method, &root.method),
        authority: or(&leaf.authority, &root.authority),
        headers: union(&root.headers, &leaf.headers),
        without_headers: union(&root.without_headers, &leaf.without_headers),
        query_params: union(&root.query_params, &leaf.query_params),
        ignore_uri_case: leaf.ignore_uri_case,
        port: leaf.port.or(root.port),
        source_labels: union(&root.source_labels, &leaf.source_labels),
        source_namespace: or(&leaf.source_namespace, &root.source_namespace),
        gateways: if leaf.gateways.is_empty() {
            root.gateways.clone()
        } else {
            leaf.gateways.clone()
        },
    })
}

/// `root`'s entries with `leaf`'s added (the leaf's win; they were checked to agree).
fn union<V: Clone>(root: &BTreeMap<String, V>, leaf: &BTreeMap<String, V>) -> BTreeMap<String, V> {
    let mut m = root.clone();
    m.extend(leaf.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}

/// Whether delegate condition `leaf` asks only for values root condition `root` allows
/// (either unset: yes). Regexes cannot be compared, so a regex on either side with a
/// condition on the other is a conflict, as in Istio.
fn within(root: Option<&StringMatch>, leaf: Option<&StringMatch>) -> bool {
    let (Some(r), Some(l)) = (root, leaf) else {
        return true;
    };
    if r.regex.is_some() || l.regex.is_some() {
        return false;
    }
    match (&r.exact, &r.prefix) {
        (Some(e), _) => l.exact.as_ref() == Some(e),
        (None, Some(p)) => l
            .exact
            .as_ref()
            .or(l.prefix.as_ref())
            .is_some_and(|v| v.starts_with(p.as_str())),
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn m(yaml: &str) -> HttpMatchRequest {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_delegate_match_must_lie_within_the_roots() {
        let root = [m("uri: {prefix: /reviews}")];
        let ok = merge_matches(&root, &[m("uri: {prefix: /reviews/v2}")]).unwrap();
        assert_eq!(ok, vec![m("uri: {prefix: /reviews/v2}")]);
        assert!(merge_matches(&root, &[m("uri: {prefix: /ratings}")]).is_none());
        assert!(merge_matches(&root, &[m("uri: {regex: /reviews.*}")]).is_none());
        let exact = [m("uri: {exact: /a}")];
        assert!(merge_matches(&exact, &[m("uri: {prefix: /a}")]).is_none());
        assert!(merge_matches(&exact, &[m("uri: {exact: /a}")]).is_some());
    }

    #[test]
    fn conditions_add_up_and_the_delegates_win_where_both_set_one() {
        let root = [m(
            "{name: r, uri: {prefix: /x}, headers: {a: {exact: '1'}}, port: 9080}",
        )];
        let leaf = [m(
            "{name: l, headers: {b: {exact: '2'}}, queryParams: {q: {exact: v}}}",
        )];
        let merged = merge_matches(&root, &leaf).unwrap();
        assert_eq!(
            merged,
            vec![m("{name: r-l, uri: {prefix: /x}, headers: {a: {exact: '1'}, b: {exact: '2'}}, queryParams: {q: {exact: v}}, port: 9080}")]
        );
        // The same header on both sides must agree.
        let clash = [m("headers: {a: {exact: '2'}}")];
        assert!(merge_matches(&root, &clash).is_none());
        assert!(merge_matches(&root, &[m("port: 9090")]).is_none());
    }

    #[test]
    fn each_delegate_match_pairs_with_every_root_match_it_fits() {
        let root = [
            m("uri: {prefix: /a}"),
            m("uri: {prefix: /a/b}"),
            m("uri: {prefix: /c}"),
        ];
        let merged = merge_matches(&root, &[m("uri: {prefix: /a/b/c}")]).unwrap();
        assert_eq!(merged.len(), 2);
        // One delegate match that fits no root match drops the whole delegate rule.
        assert!(merge_matches(&root, &[m("uri: {prefix: /a}"), m("uri: {prefix: /d}")]).is_none());
        assert_eq!(merge_matches(&[], &root).unwrap().len(), 3);
        assert_eq!(merge_matches(&root, &[]).unwrap().len(), 3);
    }

    #[test]
    fn source_conditions_of_the_root_bind_the_delegate() {
        let root = [m("sourceNamespace: web")];
        assert!(merge_matches(&root, &[m("uri: {prefix: /}")]).is_none());
        assert!(merge_matches(&root, &[m("sourceNamespace: web")]).is_some());
        let labels = [m("sourceLabels: {app: web}")];
        assert!(merge_matches(&labels, &[m("sourceLabels: {app: api}")]).is_none());
        let both = merge_matches(&labels, &[m("sourceLabels: {version: v1}")]).unwrap();
        assert_eq!(both, vec![m("sourceLabels: {app: web, version: v1}")]);
    }
}
