//! DestinationRule `credentialName`: TLS origination with material from the config
//! folder's `credentials/NAME/`, given to sidecars over SDS, never inlined in a cluster.
//!
//! Istio's names: the client certificate and key are the secret `kubernetes://NAME`, the
//! CA the proxy verifies the server with `kubernetes://NAME-cacert` (the credential's own
//! `ca.crt`, else a folder `NAME-cacert`, else the system's roots, as Istio's sidecars do
//! without one).
//!
//! Who gets them: only sidecars with a mesh identity, which are served on the secure port
//! (a proxy on the plaintext port never gets a key), and of those only the proxies of the
//! namespace of a DestinationRule that names the credential, as Istio only lets a proxy
//! read the secrets of its own namespace. Proxies that may not have a credential do not
//! get the clusters that use it either (a cluster waiting for a secret that never comes
//! would hold up the proxy's start): their requests there get no cluster, a 503.

use crate::cache::{Resource, ResourceSet, TypeKind};
use crate::config::credentials::Credential;
use crate::config::model::ClientTlsSettings;
use crate::mesh::MeshState;
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    certificate_validation_context::SystemRootCerts, secret, CertificateValidationContext, Secret,
    TlsCertificate,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The SDS secret with a credential's certificate chain and key.
pub fn certificate_secret(name: &str) -> String {
    format!("kubernetes://{name}")
}

/// The SDS secret with the CA a credential's user verifies its server with.
pub fn ca_secret(name: &str) -> String {
    format!("kubernetes://{name}-cacert")
}

/// A credential named by a DestinationRule, as `/debug/configz` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialUse {
    /// The DestinationRule (`namespace/name`).
    pub object: String,
    pub credential: String,
    /// `ready`, or why proxies cannot use it yet (the folder is missing, say).
    pub status: String,
}

/// Every cluster whose policy names a credential: cluster name -> (the rule's namespace,
/// the credential).
pub fn credential_clusters(mesh: &MeshState) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for (fqdn, dr) in mesh.destination_rules.iter() {
        if !dr.names_credentials() {
            continue;
        }
        let Some(svc) = mesh.services.get(fqdn) else {
            continue;
        };
        let subsets = std::iter::once(None).chain(dr.subsets.keys().map(|s| Some(s.as_str())));
        for subset in subsets {
            for p in &svc.ports {
                let policy = dr.policy(subset, p.number);
                if let Some(c) = policy.tls.as_ref().and_then(ClientTlsSettings::credential) {
                    let name = super::outbound_cluster_name(p.number, subset, fqdn);
                    out.insert(name, (dr.namespace.clone(), c.to_string()));
                }
            }
        }
    }
    out
}

fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(pem.to_string())),
        ..Default::default()
    })
}

/// The CA to verify a credential user's server with: its own, a `NAME-cacert` folder's,
/// else the system's roots.
fn validation_context(mesh: &MeshState, c: &Credential) -> CertificateValidationContext {
    let ca = c.ca.clone().or_else(|| {
        mesh.credentials
            .get(&format!("{}-cacert", c.name))
            .and_then(|x| x.ca.clone())
    });
    CertificateValidationContext {
        trusted_ca: ca.as_deref().and_then(inline),
        system_root_certs: ca.is_none().then(SystemRootCerts::default),
        ..Default::default()
    }
}

/// The SDS secrets of the credentials that rules of `namespace` name (and that exist).
pub fn namespace_secrets(mesh: &MeshState, namespace: &str) -> Arc<ResourceSet> {
    let names: BTreeSet<String> = credential_clusters(mesh)
        .into_values()
        .filter(|(ns, _)| ns == namespace)
        .map(|(_, c)| c)
        .collect();
    let mut out = Vec::new();
    for name in names {
        let Some(c) = mesh.credentials.get(&name) else {
            continue;
        };
        if let (Some(chain), Some(key)) = (&c.chain, &c.key) {
            let secret = Secret {
                name: certificate_secret(&name),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(chain),
                    private_key: inline(key.pem()),
                    ..Default::default()
                })),
            };
            out.push(Resource::new(
                TypeKind::Secret,
                secret.name.as_str(),
                &secret,
            ));
        }
        let ca = Secret {
            name: ca_secret(&name),
            r#type: Some(secret::Type::ValidationContext(validation_context(mesh, c))),
        };
        out.push(Resource::new(TypeKind::Secret, ca.name.as_str(), &ca));
    }
    ResourceSet::new(out)
}

/// The credentials rules name, with whether proxies can use them, for `/debug/configz`.
pub fn uses(mesh: &MeshState) -> Vec<CredentialUse> {
    let mut out: Vec<CredentialUse> = Vec::new();
    for dr in mesh.destination_rules.values() {
        for (mode, name) in dr.credentials() {
            let status = match mesh.credentials.get(name) {
                None => format!(
                    "missing: no folder credentials/{name}/ in the config folder; clusters using it wait for it"
                ),
                Some(c) if mode == "MUTUAL" && c.key.is_none() => format!(
                    "incomplete: tls mode MUTUAL needs tls.crt and tls.key in credentials/{name}/"
                ),
                Some(_) => "ready".to_string(),
            };
            let u = CredentialUse {
                object: dr.key.clone(),
                credential: name.to_string(),
                status,
            };
            if !out.contains(&u) {
                out.push(u);
            }
        }
    }
    out
}
