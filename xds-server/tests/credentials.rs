//! DestinationRule `credentialName`: the config folder's `credentials/NAME/` read,
//! checked and watched like the YAML files; clusters that reference the credential's SDS
//! secrets only for proxies with an identity in the rule's namespace; the secrets
//! themselves only for those; keys in no debug print. Envoy's side is in
//! `tests/tests/e2e_credentials.rs`.
#![allow(clippy::unwrap_used)]

mod translated;

use std::path::Path;
use translated::{copy_config, fixture, resource};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::ConfigError;
use xds_server::mesh::MeshStore;
use xds_server::translate::credentials::{ca_secret, certificate_secret, uses};
use xds_server::translate::ProxyScope;

const CLUSTER: &str = "outbound|443||pay.example.com";

fn egress(tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pay, namespace: shop}}
spec:
  hosts: [pay.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.9.9}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pay, namespace: shop}}
spec:
  host: pay.example.com
  trafficPolicy:
    tls: {tls}
"
    )
}

/// (chain, key, ca) PEM: a CA and a client certificate it signed.
fn material() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["client.example.com".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem(), ca.pem())
}

fn write_credential(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let d = dir.join("credentials").join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
}

fn open(tls: &str) -> (tempfile::TempDir, MeshStore) {
    let dir = tempfile::tempdir().unwrap();
    copy_config(&fixture("mtls"), dir.path());
    std::fs::write(dir.path().join("pay.yaml"), egress(tls)).unwrap();
    let (store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    (dir, store)
}

fn workload(id: &str) -> ProxyScope {
    ProxyScope::Workload(id.into())
}

fn has_cluster(snap: &Snapshot, scope: &ProxyScope) -> bool {
    snap.view(scope).get(TypeKind::Cluster, CLUSTER).is_some()
}

fn secret_names(snap: &Snapshot, ns: &str) -> Vec<String> {
    snap.credential_secrets(ns)
        .map(|s| s.map.keys().map(|k| k.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn missing_folder_is_listed_and_used_once_it_appears() {
    let (dir, mut store) = open("{mode: MUTUAL, credentialName: pay-client, sni: pay.example.com}");
    let status = uses(&store.mesh());
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].object, "shop/pay");
    assert_eq!(status[0].credential, "pay-client");
    assert!(status[0].status.starts_with("missing"), "{status:?}");
    // The cluster already references the secrets; none are served yet.
    let snap = Snapshot::build(1, store.mesh());
    assert!(has_cluster(&snap, &workload("web-v1.shop")));
    assert!(secret_names(&snap, "shop").is_empty());

    let (chain, key, ca) = material();
    write_credential(
        dir.path(),
        "pay-client",
        &[("tls.crt", &chain), ("tls.key", &key), ("ca.crt", &ca)],
    );
    let outcome = store.reload().unwrap();
    assert!(
        outcome.changed && outcome.new_errors.is_empty(),
        "{outcome:?}"
    );
    assert_eq!(uses(&store.mesh())[0].status, "ready");
    let snap = Snapshot::build(2, store.mesh());
    assert_eq!(
        secret_names(&snap, "shop"),
        vec![certificate_secret("pay-client"), ca_secret("pay-client")]
    );
    // The key reaches the secret, and no debug print of the mesh.
    let secrets = snap.credential_secrets("shop").unwrap();
    let body = xds_server::dump::resource_json(&secrets.map[&*certificate_secret("pay-client")]);
    assert!(body.to_string().contains("PRIVATE KEY"));
    let body_line = key.lines().nth(1).unwrap();
    assert!(!format!("{:?}", store.mesh()).contains(body_line));

    // Unchanged folder: nothing to do.
    assert!(!store.reload().unwrap().changed);
}

#[test]
fn clusters_and_secrets_only_for_identities_of_the_rule_namespace() {
    let (dir, store) = open("{mode: MUTUAL, credentialName: pay-client}");
    let (chain, key, ca) = material();
    write_credential(
        dir.path(),
        "pay-client",
        &[("cert", &chain), ("key", &key), ("cacert", &ca)],
    );
    let mut store = store;
    store.reload().unwrap();
    let snap = Snapshot::build(1, store.mesh());

    let c = resource(&snap, &workload("web-v1.shop"), TypeKind::Cluster, CLUSTER);
    let tls = &c["transportSocket"]["typedConfig"]["commonTlsContext"];
    assert_eq!(
        tls["tlsCertificateSdsSecretConfigs"][0]["name"], "kubernetes://pay-client",
        "{c}"
    );
    assert_eq!(
        tls["combinedValidationContext"]["validationContextSdsSecretConfig"]["name"],
        "kubernetes://pay-client-cacert",
        "{c}"
    );
    assert!(!c.to_string().contains("PRIVATE KEY"), "never inline: {c}");
    // No identity: no cluster (it could never get the secrets).
    assert!(!has_cluster(&snap, &workload("legacy-v1.shop")));
    assert!(!has_cluster(
        &snap,
        &ProxyScope::namespace("shop", "primary")
    ));
    // Another namespace: neither the cluster nor the secrets.
    assert!(!has_cluster(&snap, &workload("ledger-v1.bank")));
    assert!(secret_names(&snap, "bank").is_empty());
    assert_eq!(secret_names(&snap, "shop").len(), 2);
    // The other clusters are unchanged for everyone.
    for w in ["legacy-v1.shop", "ledger-v1.bank"] {
        assert!(snap
            .view(&workload(w))
            .get(
                TypeKind::Cluster,
                "outbound|8081||cart.shop.svc.cluster.local"
            )
            .is_some());
    }
}

#[test]
fn simple_mode_gets_the_ca_only_and_falls_back_to_system_roots() {
    let (dir, mut store) = open("{mode: SIMPLE, credentialName: pay-ca}");
    let (_, _, ca) = material();
    write_credential(dir.path(), "pay-ca", &[("ca.crt", &ca)]);
    store.reload().unwrap();
    let snap = Snapshot::build(1, store.mesh());
    assert_eq!(secret_names(&snap, "shop"), vec![ca_secret("pay-ca")]);
    let c = resource(&snap, &workload("web-v1.shop"), TypeKind::Cluster, CLUSTER);
    let tls = &c["transportSocket"]["typedConfig"]["commonTlsContext"];
    assert!(tls["tlsCertificateSdsSecretConfigs"].is_null(), "{c}");

    // A certificate without a CA: the system's roots verify the server.
    let (chain, key, _) = material();
    std::fs::remove_file(dir.path().join("credentials/pay-ca/ca.crt")).unwrap();
    write_credential(
        dir.path(),
        "pay-ca",
        &[("tls.crt", &chain), ("tls.key", &key)],
    );
    store.reload().unwrap();
    let snap = Snapshot::build(2, store.mesh());
    let secrets = snap.credential_secrets("shop").unwrap();
    let ca = xds_server::dump::resource_json(&secrets.map[&*ca_secret("pay-ca")]);
    assert!(
        ca["resource"]["validationContext"]["systemRootCerts"].is_object(),
        "{ca}"
    );
}

fn reload_errors(store: &mut MeshStore) -> Vec<ConfigError> {
    store.reload().unwrap().new_errors
}

#[test]
fn a_bad_folder_is_refused_and_the_last_good_one_stays() {
    let (dir, mut store) = open("{mode: MUTUAL, credentialName: pay-client}");
    let (chain, key, ca) = material();
    write_credential(
        dir.path(),
        "pay-client",
        &[("tls.crt", &chain), ("tls.key", &key), ("ca.crt", &ca)],
    );
    store.reload().unwrap();
    let good = store.mesh().credentials["pay-client"].fingerprint;

    let (_, other_key, _) = material();
    write_credential(dir.path(), "pay-client", &[("tls.key", &other_key)]);
    let errs = reload_errors(&mut store);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let msg = errs[0].to_string();
    assert!(
        msg.contains("credentials/pay-client") && msg.contains("does not match"),
        "{msg}"
    );
    assert!(!msg.contains(other_key.lines().nth(1).unwrap()), "{msg}");
    assert_eq!(store.mesh().credentials["pay-client"].fingerprint, good);
    assert_eq!(store.errors().len(), 1);

    // Not PEM, too large, a key without a certificate, both key names: each named.
    let cases: [(&str, String, &str); 3] = [
        ("tls.crt", "hello".to_string(), "no CERTIFICATE"),
        (
            "tls.crt",
            "x".repeat(300 * 1024),
            "more than the limit of 262144",
        ),
        ("cert", chain.clone(), "holds both tls.crt and cert"),
    ];
    for (file, text, expected) in cases {
        write_credential(
            dir.path(),
            "pay-client",
            &[("tls.key", &key), ("tls.crt", &chain)],
        );
        write_credential(dir.path(), "pay-client", &[(file, &text)]);
        let errs = reload_errors(&mut store);
        assert!(
            errs.iter().any(|e| e.to_string().contains(expected)),
            "{file}: expected `{expected}` in {errs:?}"
        );
        assert_eq!(store.mesh().credentials["pay-client"].fingerprint, good);
        let _ = std::fs::remove_file(dir.path().join("credentials/pay-client/cert"));
    }
    // Fixed: the error goes away.
    write_credential(
        dir.path(),
        "pay-client",
        &[("tls.crt", &chain), ("tls.key", &key)],
    );
    store.reload().unwrap();
    assert!(store.errors().is_empty(), "{:?}", store.errors());

    // Deleted: the credential is gone, the rule shows it missing again.
    std::fs::remove_dir_all(dir.path().join("credentials/pay-client")).unwrap();
    assert!(store.reload().unwrap().changed);
    assert!(uses(&store.mesh())[0].status.starts_with("missing"));
}

#[test]
fn credential_name_validation() {
    let cases = [
        (
            "{mode: MUTUAL, credentialName: pay, caCertificates: /etc/ca.pem}",
            "spec.trafficPolicy.tls.caCertificates",
            "alternatives",
        ),
        (
            "{mode: ISTIO_MUTUAL, credentialName: pay}",
            "spec.trafficPolicy.tls.credentialName",
            "only SIMPLE and MUTUAL",
        ),
        (
            "{mode: SIMPLE, credentialName: Pay_Creds}",
            "spec.trafficPolicy.tls.credentialName",
            "not a secret name",
        ),
    ];
    for (tls, field, msg) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pay.yaml"), egress(tls)).unwrap();
        let (_, outcome) = MeshStore::open(dir.path()).unwrap();
        let e = outcome
            .new_errors
            .iter()
            .find(|e| e.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("{tls}: no error on {field}: {:?}", outcome.new_errors));
        assert!(e.message.contains(msg), "{tls}: {e}");
    }
    // `kubernetes://` is accepted, as in Istio.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pay.yaml"),
        egress("{mode: MUTUAL, credentialName: kubernetes://pay}"),
    )
    .unwrap();
    let (store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    assert_eq!(uses(&store.mesh())[0].credential, "pay");
}
