//! Mutual TLS between sidecars: PeerAuthentication modes on inbound listeners, automatic
//! mTLS and DestinationRule `tls` on outbound clusters, endpoint metadata, validation,
//! reuse across snapshots, and Envoy's own verdict on the generated config.
//!
//! The mesh is `tests/fixtures/mtls`; golden files are `tests/golden/mtls.*.json`
//! (regenerate with `UPDATE_GOLDEN=1` and review the diff).
#![allow(clippy::unwrap_used)]

mod translated;

use std::path::PathBuf;
use std::sync::Arc;
use translated::{
    check_dump, check_golden, dump, edit_and_reload, editable_copy, open_store, resource,
};
use xds_server::cache::{Snapshot, TypeKind};
use xds_server::config::parse::parse_file;
use xds_server::config::peer_authentication::MtlsMode;
use xds_server::config::ConfigError;
use xds_server::mesh::MeshState;
use xds_server::mesh::MeshStore;
use xds_server::translate::ProxyScope;

fn fixture() -> PathBuf {
    translated::fixture("mtls")
}

fn snapshot() -> Snapshot {
    Snapshot::build(1, open_store(&fixture()).mesh())
}

fn workload(id: &str) -> ProxyScope {
    ProxyScope::Workload(id.into())
}

#[test]
fn golden_config_of_sidecars_with_identities() {
    let snap = snapshot();
    let web = workload("web-v1.shop");
    // Port-level STRICT (8080) and DISABLE (9000) under a namespace-wide PERMISSIVE.
    check_dump("mtls.web-v1.listeners", &snap, &web, TypeKind::Listener);
    // Auto mTLS, DestinationRule ISTIO_MUTUAL / DISABLE (subset), MESH_EXTERNAL, inline endpoints.
    check_dump("mtls.web-v1.clusters", &snap, &web, TypeKind::Cluster);
    check_dump("mtls.endpoints", &snap, &web, TypeKind::Endpoint);
    // The other workloads' outbound listeners are web's; only their inbound ones differ.
    // Namespace-wide PERMISSIVE: TLS inspector, an mTLS and a plaintext chain.
    check_golden(
        "mtls.cart-v1.inbound",
        &inbound(&snap, &workload("cart-v1.shop")),
    );
    // Mesh-wide STRICT (gRPC port): one mTLS chain.
    check_golden(
        "mtls.ledger-v1.inbound",
        &inbound(&snap, &workload("ledger-v1.bank")),
    );
    // Selector DISABLE: plaintext only.
    check_golden(
        "mtls.audit-v1.inbound",
        &inbound(&snap, &workload("audit-v1.bank")),
    );
}

fn inbound(snap: &Snapshot, scope: &ProxyScope) -> serde_json::Value {
    let all = dump(snap, scope, TypeKind::Listener);
    serde_json::Value::Array(
        all.as_array()
            .unwrap()
            .iter()
            .filter(|l| l["resource"]["trafficDirection"] == "INBOUND")
            .cloned()
            .collect(),
    )
}

#[test]
fn inbound_chains_follow_the_resolved_mode() {
    let snap = snapshot();
    let chains = |scope: &str, listener: &str| {
        let l = resource(&snap, &workload(scope), TypeKind::Listener, listener);
        let names: Vec<String> = l["filterChains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap_or("").to_string())
            .collect();
        let inspector = l["listenerFilters"].as_array().is_some_and(|f| {
            f.iter()
                .any(|f| f["name"] == "envoy.filters.listener.tls_inspector")
        });
        (names, inspector)
    };
    let strict = (vec!["mtls".to_string()], false);
    let permissive = (vec!["mtls".to_string(), "plaintext".to_string()], true);
    let plaintext = (vec![String::new()], false);
    assert_eq!(chains("web-v1.shop", "127.0.3.1_8080"), strict);
    assert_eq!(chains("web-v1.shop", "127.0.3.1_9000"), plaintext);
    assert_eq!(chains("cart-v1.shop", "127.0.3.2_8081"), permissive);
    assert_eq!(chains("ledger-v1.bank", "127.0.3.5_7070"), strict);
    assert_eq!(chains("audit-v1.bank", "127.0.3.6_8083"), plaintext);
    // No identity, no TLS, whatever the namespace says.
    assert_eq!(chains("legacy-v1.shop", "127.0.3.4_8082"), plaintext);

    // The mTLS chain tells the app who called; the plaintext chain strips the header.
    let l = resource(
        &snap,
        &workload("cart-v1.shop"),
        TypeKind::Listener,
        "127.0.3.2_8081",
    );
    let hcm = |i: usize| l["filterChains"][i]["filters"][0]["typedConfig"].clone();
    assert_eq!(hcm(0)["forwardClientCertDetails"], "SANITIZE_SET");
    assert_eq!(hcm(0)["setCurrentClientCertDetails"]["uri"], true);
    assert!(hcm(1).get("forwardClientCertDetails").is_none()); // SANITIZE, the default
    let tls = &l["filterChains"][0]["transportSocket"]["typedConfig"];
    assert_eq!(tls["requireClientCertificate"], true);
    let ctx = &tls["commonTlsContext"];
    assert_eq!(ctx["tlsCertificateSdsSecretConfigs"][0]["name"], "default");
    let validation = &ctx["combinedValidationContext"];
    assert_eq!(
        validation["validationContextSdsSecretConfig"]["name"],
        "ROOTCA"
    );
    assert_eq!(
        validation["defaultValidationContext"]["matchTypedSubjectAltNames"][0]["matcher"]["prefix"],
        "spiffe://trellis.test/"
    );
}

#[test]
fn outbound_clusters_of_proxies_with_identity() {
    let snap = snapshot();
    let web = workload("web-v1.shop");
    let cluster = |name: &str| resource(&snap, &web, TypeKind::Cluster, name);

    // Auto mTLS: socket matches, SNI and the exact identity of the service's workloads.
    let ledger = cluster("outbound|7070||ledger.bank.svc.cluster.local");
    let matches = ledger["transportSocketMatches"].as_array().unwrap();
    assert_eq!(matches[0]["name"], "tlsMode-istio");
    assert_eq!(matches[0]["match"], serde_json::json!({"tlsMode": "istio"}));
    let upstream = &matches[0]["transportSocket"]["typedConfig"];
    assert_eq!(
        upstream["sni"],
        "outbound_.7070_._.ledger.bank.svc.cluster.local"
    );
    assert_eq!(upstream["commonTlsContext"]["alpnProtocols"][0], "h2");
    let sans = &upstream["commonTlsContext"]["combinedValidationContext"]
        ["defaultValidationContext"]["matchTypedSubjectAltNames"];
    assert_eq!(
        sans,
        &serde_json::json!([{"sanType": "URI", "matcher": {"exact": "spiffe://trellis.test/ns/bank/sa/ledger"}}])
    );
    assert_eq!(matches[1]["name"], "tlsMode-disabled");
    assert_eq!(
        matches[1]["transportSocket"]["name"],
        "envoy.transport_sockets.raw_buffer"
    );

    // Inline endpoint: any identity of the trust domain.
    let vault = cluster("outbound|8200||vault.bank.svc.cluster.local");
    let sans = &vault["transportSocketMatches"][0]["transportSocket"]["typedConfig"]
        ["commonTlsContext"]["combinedValidationContext"]["defaultValidationContext"]
        ["matchTypedSubjectAltNames"];
    assert_eq!(sans[0]["matcher"]["prefix"], "spiffe://trellis.test/");

    // DestinationRule ISTIO_MUTUAL: always mTLS; its subset v2 says DISABLE.
    let cart = cluster("outbound|8081||cart.shop.svc.cluster.local");
    assert!(cart.get("transportSocketMatches").is_none());
    let ctx = &cart["transportSocket"]["typedConfig"];
    assert_eq!(ctx["sni"], "outbound_.8081_._.cart.shop.svc.cluster.local");
    let ids: Vec<&str> = ctx["commonTlsContext"]["combinedValidationContext"]
        ["defaultValidationContext"]["matchTypedSubjectAltNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["matcher"]["exact"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://trellis.test/ns/shop/sa/cart",
            "spiffe://trellis.test/ns/shop/sa/default"
        ]
    );
    let v1 = cluster("outbound|8081|v1|cart.shop.svc.cluster.local");
    assert_eq!(
        v1["transportSocket"]["typedConfig"]["sni"],
        "outbound_.8081_.v1_.cart.shop.svc.cluster.local"
    );
    let v2 = cluster("outbound|8081|v2|cart.shop.svc.cluster.local");
    assert!(v2.get("transportSocket").is_none() && v2.get("transportSocketMatches").is_none());

    // MESH_EXTERNAL: no automatic mTLS, and the very same encoded resource as for
    // proxies without identity.
    let external = "outbound|8443||api.payments.example";
    assert!(cluster(external).get("transportSocketMatches").is_none());
    let plain = snap.view(&ProxyScope::namespace("shop", "primary"));
    assert!(Arc::ptr_eq(
        snap.view(&web).get(TypeKind::Cluster, external).unwrap(),
        plain.get(TypeKind::Cluster, external).unwrap()
    ));
}

#[test]
fn proxies_without_identity_never_reference_secrets() {
    let snap = snapshot();
    for scope in [
        workload("legacy-v1.shop"),
        ProxyScope::namespace("shop", "primary"),
        workload("not-a-workload.shop"),
    ] {
        for kind in [TypeKind::Cluster, TypeKind::Listener] {
            let text = dump(&snap, &scope, kind).to_string();
            for secret_ref in ["ROOTCA", "SdsSecretConfig", "transportSocket"] {
                assert!(
                    !text.contains(secret_ref),
                    "{scope:?} {kind:?} contains {secret_ref}"
                );
            }
        }
    }
    // Outbound clusters are the shared plaintext set.
    let legacy = snap.view(&workload("legacy-v1.shop"));
    let ns = snap.view(&ProxyScope::namespace("shop", "primary"));
    let name = "outbound|7070||ledger.bank.svc.cluster.local";
    assert!(Arc::ptr_eq(
        legacy.get(TypeKind::Cluster, name).unwrap(),
        ns.get(TypeKind::Cluster, name).unwrap()
    ));
}

#[test]
fn endpoint_metadata_marks_ports_that_take_mtls() {
    let snap = snapshot();
    let scope = ProxyScope::namespace("shop", "primary");
    let metadata = |cluster: &str| {
        let cla = resource(&snap, &scope, TypeKind::Endpoint, cluster);
        cla["endpoints"][0]["lbEndpoints"][0]["metadata"].clone()
    };
    let istio = serde_json::json!({"filterMetadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}});
    assert_eq!(metadata("outbound|8080||web.shop.svc.cluster.local"), istio);
    // web's port 9000 is DISABLE: automatic mTLS must not send TLS there.
    assert!(metadata("outbound|9000||web.shop.svc.cluster.local").is_null());
    assert!(metadata("outbound|8083||audit.bank.svc.cluster.local").is_null());
    assert!(metadata("outbound|8082||legacy.shop.svc.cluster.local").is_null());
    assert_eq!(
        metadata("outbound|8200||vault.bank.svc.cluster.local"),
        istio
    );
}

#[test]
fn modes_resolve_workload_over_namespace_over_mesh() {
    let mesh = open_store(&fixture()).mesh();
    let mode = |id: &str, port: u32| {
        let w = &mesh.workloads[id];
        mesh.peer_authentication.mode(&w.namespace, &w.labels, port)
    };
    assert_eq!(mode("web-v1.shop", 8080), MtlsMode::Strict); // port level
    assert_eq!(mode("web-v1.shop", 9000), MtlsMode::Disable); // port level, quoted key
    assert_eq!(mode("web-v1.shop", 1234), MtlsMode::Permissive); // UNSET -> namespace
    assert_eq!(mode("cart-v1.shop", 8081), MtlsMode::Permissive); // namespace
    assert_eq!(mode("ledger-v1.bank", 7070), MtlsMode::Strict); // mesh
    assert_eq!(mode("audit-v1.bank", 8083), MtlsMode::Disable); // selector
    assert_eq!(mesh.root_namespace, "istio-system");
    // Without any policy: PERMISSIVE.
    let empty = MeshState::default();
    let labels = Default::default();
    assert_eq!(
        empty.peer_authentication.mode("x", &labels, 80),
        MtlsMode::Permissive
    );
}

fn one_error(text: &str) -> ConfigError {
    let errs = parse_file("pa.yaml", text).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

fn pa(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}")
}

#[test]
fn bad_peer_authentications_are_rejected_naming_the_field() {
    let e = one_error(&pa("  mtls: {mode: STRIKT}\n"));
    assert_eq!(e.object.as_deref(), Some("PeerAuthentication shop/p"));
    assert_eq!(e.field.as_deref(), Some("spec.mtls.mode"));
    assert!(e.message.contains("unknown variant `STRIKT`"), "{e}");

    let e = one_error(&pa("  portLevelMtls:\n    8080: {mode: STRICT}\n"));
    assert_eq!(e.field.as_deref(), Some("spec.portLevelMtls"));
    assert!(e.message.contains("requires a selector"), "{e}");

    let e = one_error(&pa(
        "  mtls: {mode: STRICT}\n  targetRef: {kind: Service}\n",
    ));
    assert_eq!(e.field.as_deref(), Some("spec.targetRef"));
    assert!(e.message.contains("unknown field `targetRef`"), "{e}");

    let e = one_error(&pa(
        "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    http: {mode: STRICT}\n",
    ));
    assert!(
        e.field
            .as_deref()
            .unwrap()
            .starts_with("spec.portLevelMtls"),
        "{e}"
    );

    let e = one_error(&pa(
        "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    0: {mode: STRICT}\n",
    ));
    assert_eq!(e.field.as_deref(), Some("spec.portLevelMtls.0"));

    // Both API versions Istio serves are accepted.
    let v1beta1 = pa("  mtls: {mode: STRICT}\n").replace("/v1\n", "/v1beta1\n");
    assert_eq!(parse_file("pa.yaml", &v1beta1).unwrap().len(), 1);
}

#[test]
fn destination_rule_tls_modes_are_checked() {
    let dr = |tls: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: cart, namespace: shop}}\nspec:\n  host: cart\n  trafficPolicy:\n    tls: {tls}\n")
    };
    // SIMPLE and MUTUAL originate TLS with files (see tests/traffic_policy.rs); their
    // certificate fields are checked.
    let e = one_error(&dr("{mode: MUTUAL}"));
    assert_eq!(
        e.field.as_deref(),
        Some("spec.trafficPolicy.tls.clientCertificate")
    );
    assert!(e.message.contains("required with tls mode MUTUAL"), "{e}");
    let e = one_error(&dr("{mode: ISTIO_MUTUAL, credentialName: cart-ca}"));
    assert_eq!(
        e.field.as_deref(),
        Some("spec.trafficPolicy.tls.credentialName")
    );
    assert!(e.message.contains("only SIMPLE and MUTUAL"), "{e}");
    let e = one_error(&dr("{mode: DISABLE, sni: x.example}"));
    assert_eq!(e.field.as_deref(), Some("spec.trafficPolicy.tls.mode"));
    let e = one_error(&dr("{mode: MAYBE}"));
    assert!(e.message.contains("unknown tls mode"), "{e}");
}

#[test]
fn a_selector_policy_in_the_root_namespace_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = pa("  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n")
        .replace("namespace: shop", "namespace: mesh-root");
    std::fs::write(dir.path().join("pa.yaml"), text).unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {rootNamespace: mesh-root}\n",
    )
    .unwrap();
    let (store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert_eq!(outcome.new_errors.len(), 1, "{:?}", outcome.new_errors);
    let e = &store.errors()[0];
    assert_eq!(e.field.as_deref(), Some("spec.selector"));
    assert!(e.message.contains("root namespace `mesh-root`"), "{e}");
}

#[test]
fn policy_changes_retranslate_only_what_they_touch() {
    let (dir, mut store) = editable_copy(&fixture());
    let a = Snapshot::build(1, store.mesh());
    let web = workload("web-v1.shop");
    let ledger = "outbound|7070||ledger.bank.svc.cluster.local";
    let (va, legacy_a) = (a.view(&web), a.view(&workload("legacy-v1.shop")));

    // An endpoint change elsewhere keeps ledger's identity cluster (built lazily once).
    edit_and_reload(&mut store, dir.path(), "workloads.yaml", |t| {
        t.replace("127.0.3.6", "127.0.3.60")
    });
    let b = Snapshot::build_from(2, store.mesh(), Some(&a));
    let vb = b.view(&web);
    assert!(Arc::ptr_eq(
        va.get(TypeKind::Cluster, ledger).unwrap(),
        vb.get(TypeKind::Cluster, ledger).unwrap()
    ));
    assert_eq!(
        va.version(TypeKind::Listener),
        vb.version(TypeKind::Listener)
    );

    // Mesh-wide PERMISSIVE instead of STRICT: ledger's listener changes, clusters do not.
    edit_and_reload(&mut store, dir.path(), "security.yaml", |t| {
        t.replacen("mtls: {mode: STRICT}", "mtls: {mode: PERMISSIVE}", 1)
    });
    let c = Snapshot::build_from(3, store.mesh(), Some(&b));
    let ledger_scope = workload("ledger-v1.bank");
    assert_ne!(
        b.view(&ledger_scope).version(TypeKind::Listener),
        c.view(&ledger_scope).version(TypeKind::Listener)
    );
    assert!(Arc::ptr_eq(
        vb.get(TypeKind::Cluster, ledger).unwrap(),
        c.view(&web).get(TypeKind::Cluster, ledger).unwrap()
    ));
    // A plaintext proxy's clusters never changed.
    assert_eq!(
        legacy_a.version(TypeKind::Cluster),
        c.view(&workload("legacy-v1.shop"))
            .version(TypeKind::Cluster)
    );
}
