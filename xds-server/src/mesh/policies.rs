//! The policy stages: PeerAuthentication (mutual TLS modes), and AuthorizationPolicy with
//! RequestAuthentication (inbound RBAC and JWT).

use super::inputs::KindStore;
use super::settings::Settings;
use super::stages::{unique, Errors, StageError};
use crate::config::peer_authentication::{PeerAuthenticationSpec, PeerAuthentications};
use crate::config::request_authentication::RequestAuthenticationSpec;
use crate::config::security::{AuthorizationPolicySpec, Named, SecurityPolicies};
use crate::config::Object;

pub fn peer_authentication(
    store: &KindStore<PeerAuthenticationSpec>,
    settings: &Settings,
    errs: &mut Errors,
) -> PeerAuthentications {
    let mut pas = unique(store, "PeerAuthentication", errs);
    // Istio never applies a selector policy of the root namespace (it is neither
    // mesh-wide nor a workload policy there); Trellis says so instead of ignoring it.
    pas.retain(|pa| {
        let misplaced = pa.namespace == settings.root_namespace && pa.spec.match_labels().is_some();
        if misplaced {
            let e = StageError::RootNamespaceSelector {
                root: settings.root_namespace.clone(),
            };
            errs.push(pa, "PeerAuthentication", "spec.selector", e);
        }
        !misplaced
    });
    PeerAuthentications::new(
        &settings.root_namespace,
        pas.iter()
            .map(|pa| (pa.namespace.as_str(), pa.name.as_str(), &pa.spec)),
    )
}

/// A policy without its file position, so moving it between files is not a mesh change.
fn named<T: Clone>(o: &Object<T>) -> Named<T> {
    Named {
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        spec: o.spec.clone(),
    }
}

pub fn security(
    authz: &KindStore<AuthorizationPolicySpec>,
    authn: &KindStore<RequestAuthenticationSpec>,
    errs: &mut Errors,
) -> SecurityPolicies {
    let authz = unique(authz, "AuthorizationPolicy", errs);
    let authn = unique(authn, "RequestAuthentication", errs);
    SecurityPolicies::new(
        authz.into_iter().map(named).collect(),
        authn.into_iter().map(named).collect(),
    )
}
