//! Validation: every rejected document names its file, document, object and field, and a
//! rejected file never changes what is in effect.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use xds_server::config::parse::parse_file;
use xds_server::config::{parse_duration, ConfigError};
use xds_server::mesh::MeshStore;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn one_error(text: &str) -> ConfigError {
    let errs = parse_file("t.yaml", text).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

const SE: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
"#;

fn vs(route: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{route}"
    )
}

#[test]
fn the_examples_load_cleanly() {
    let (store, outcome) = MeshStore::open(examples()).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    let mesh = store.mesh();
    assert_eq!(mesh.services.len(), 4);
    assert_eq!(mesh.workloads.len(), 5);
    assert!(mesh
        .virtual_services
        .contains_key("reviews.default.svc.cluster.local"));
}

#[test]
fn yaml_syntax_errors_name_file_document_and_line() {
    let text = format!("{SE}---\napiVersion: v1\nkind: [unclosed\n");
    let e = one_error(&text);
    assert_eq!(e.document, Some(2));
    assert_eq!(e.line, Some(11));
    assert!(e.message.contains("YAML syntax error at line"), "{e}");
    assert!(
        e.to_string().starts_with("t.yaml: document 2 (line 11): "),
        "{e}"
    );
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let e = one_error(&vs("  - route:\n    - destination: {hots: reviews}\n"));
    assert_eq!(e.object.as_deref(), Some("VirtualService default/reviews"));
    assert_eq!(
        e.field.as_deref(),
        Some("spec.http[0].route[0].destination.hots")
    );
    assert!(e.message.contains("unknown field `hots`"), "{e}");
}

#[test]
fn wrong_types_name_the_field() {
    let e = one_error(&vs(
        "  - route:\n    - destination: {host: reviews}\n      weight: eighty\n",
    ));
    assert_eq!(e.field.as_deref(), Some("spec.http[0].route[0].weight"));
    assert!(e.message.contains("invalid type"), "{e}");
}

#[test]
fn unsupported_features_are_errors_not_ignored() {
    let e = one_error(&vs(
        "  - route:\n    - destination: {host: reviews}\n    mirrorPercent: 50\n",
    ));
    assert!(e.message.contains("unknown field `mirrorPercent`"), "{e}");

    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n";
    let e = one_error(gw);
    assert!(
        e.message
            .contains("kind Gateway (networking.istio.io/v1) is not supported yet"),
        "{e}"
    );

    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {}\n";
    let e = one_error(svc);
    assert!(e.message.contains("not a mesh resource"), "{e}");

    let wildcard = SE.replace("hosts: [", "hosts: [\"*.example.com\", ");
    let e = one_error(&wildcard);
    assert_eq!(e.field.as_deref(), Some("spec.resolution"));
    assert!(e.message.contains("wildcard host"), "{e}");
}

#[test]
fn semantic_checks() {
    let e = one_error(&vs("  - match:\n    - uri: {exact: /a, prefix: /b}\n    route:\n    - destination: {host: reviews}\n"));
    assert_eq!(e.field.as_deref(), Some("spec.http[0].match[0].uri"));
    assert!(e.message.contains("exactly one of"), "{e}");

    let e = one_error(&vs("  - match:\n    - uri: {regex: \"(unclosed\"}\n    route:\n    - destination: {host: reviews}\n"));
    assert_eq!(e.field.as_deref(), Some("spec.http[0].match[0].uri.regex"));

    let e = one_error(&vs("  - route:\n    - destination: {host: reviews}\n      weight: 0\n    - destination: {host: reviews}\n"));
    assert!(e.message.contains("add up to 0"), "{e}");

    let e = one_error(&vs(
        "  - route:\n    - destination: {host: reviews}\n    timeout: 5 seconds\n",
    ));
    assert_eq!(e.field.as_deref(), Some("spec.http[0].timeout"));

    let e = one_error(&vs("  - route:\n    - destination: {host: reviews}\n    retries: {attempts: 2, retryOn: sometimes}\n"));
    assert!(
        e.message.contains("unknown retry condition `sometimes`"),
        "{e}"
    );

    let e = one_error(&vs("  - match:\n    - headers: {End-User: {exact: jason}}\n    route:\n    - destination: {host: reviews}\n"));
    assert!(e.message.contains("lowercase"), "{e}");

    let bad_port = SE.replace("number: 9080", "number: 70000");
    assert_eq!(
        one_error(&bad_port).field.as_deref(),
        Some("spec.ports[0].number")
    );

    let bad_name = SE.replace("name: reviews,", "name: Reviews_1,");
    assert_eq!(one_error(&bad_name).field.as_deref(), Some("metadata.name"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1.5s").unwrap().as_millis(), 1500);
    assert_eq!(parse_duration("300ms").unwrap().as_millis(), 300);
    assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5 days").is_err());
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn a_bad_file_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["services.yaml", "workloads.yaml", "reviews-routing.yaml"] {
        std::fs::copy(examples().join(f), dir.path().join(f)).unwrap();
    }
    let (mut store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert!(outcome.new_errors.is_empty());
    let before = store.mesh();

    // Syntax error in the routing file: nothing changes, the error is kept for the admin API.
    write(dir.path(), "reviews-routing.yaml", "apiVersion: [");
    let outcome = store.reload().unwrap();
    assert!(!outcome.changed);
    assert_eq!(store.errors().len(), 1);
    assert!(store.errors()[0].file.ends_with("reviews-routing.yaml"));
    assert_eq!(*store.mesh(), *before);

    // A route to a subset nobody defines is a cross-file error: also held back.
    let routing = std::fs::read_to_string(examples().join("reviews-routing.yaml")).unwrap();
    write(
        dir.path(),
        "reviews-routing.yaml",
        &routing.replace("subset: v1", "subset: v9"),
    );
    let outcome = store.reload().unwrap();
    assert!(!outcome.changed);
    let errs = store.errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("subset `v9`"), "{}", errs[0]);
    assert_eq!(*store.mesh(), *before);

    // Deleting the services the routes depend on is refused too.
    write(dir.path(), "reviews-routing.yaml", &routing);
    store.reload().unwrap();
    assert!(store.errors().is_empty());
    std::fs::remove_file(dir.path().join("services.yaml")).unwrap();
    let outcome = store.reload().unwrap();
    assert!(!outcome.changed);
    assert!(!store.errors().is_empty());
    assert_eq!(store.mesh().services.len(), 4);

    // A good edit applies and clears the errors.
    std::fs::copy(
        examples().join("services.yaml"),
        dir.path().join("services.yaml"),
    )
    .unwrap();
    write(
        dir.path(),
        "reviews-routing.yaml",
        &routing
            .replace("weight: 80", "weight: 50")
            .replace("weight: 20", "weight: 50"),
    );
    let outcome = store.reload().unwrap();
    assert!(outcome.changed);
    assert!(store.errors().is_empty(), "{:?}", store.errors());
}

#[test]
fn duplicates_across_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SE);
    write(dir.path(), "b.yaml", SE);
    let (store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert!(!outcome.new_errors.is_empty());
    let msg = store
        .errors()
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(msg.contains("already defined in"), "{msg}");
    // Nothing was half-applied.
    assert!(store.mesh().services.is_empty());
}

fn envoy_filter(patches: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: ef, namespace: default}}\nspec:\n  configPatches:\n{patches}"
    )
}

/// An EnvoyFilter's error names the patch, and inside a typed config the very field.
fn envoy_filter_error(patches: &str, field: &str, message: &str) {
    let e = one_error(&envoy_filter(patches));
    assert_eq!(e.object.as_deref(), Some("EnvoyFilter default/ef"), "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
}

const RATE_LIMIT: &str = r#"  - applyTo: HTTP_FILTER
    match: {context: SIDECAR_INBOUND}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value: {stat_prefix: rl}
"#;

#[test]
fn envoy_filters_are_checked_against_the_envoy_api() {
    let objs = parse_file("t.yaml", &envoy_filter(RATE_LIMIT)).unwrap();
    assert_eq!(objs[0].kind(), "EnvoyFilter");
    // The third patch is the bad one: errors say which.
    let bad = |patch: &str| format!("{RATE_LIMIT}{RATE_LIMIT}{patch}");
    envoy_filter_error(
        &bad("  - applyTo: LISTENERS\n    patch: {operation: MERGE, value: {}}\n"),
        "spec.configPatches[2].applyTo",
        "unknown variant `LISTENERS`",
    );
    envoy_filter_error(
        &bad("  - applyTo: CLUSTER\n    patch: {operation: PREPEND, value: {}}\n"),
        "spec.configPatches[2].patch.operation",
        "unknown variant `PREPEND`",
    );
    envoy_filter_error(
        &bad("  - applyTo: CLUSTER\n    patch: {operation: INSERT_FIRST, value: {}}\n"),
        "spec.configPatches[2].patch.operation",
        "does not apply to CLUSTER",
    );
    envoy_filter_error(
        &bad("  - applyTo: CLUSTER\n    patch: {operation: MERGE}\n"),
        "spec.configPatches[2].patch.value",
        "missing patch value for MERGE",
    );
    envoy_filter_error(
        &bad("  - applyTo: CLUSTER\n    patch: {operation: MERGE, value: {connect_timout: 1s}}\n"),
        "spec.configPatches[2].patch.value.connect_timout",
        "unrecognized field name",
    );
    envoy_filter_error(
        &bad(
            "  - applyTo: NETWORK_FILTER\n    patch:\n      operation: ADD\n      value:\n        name: x\n        typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.nope.v3.Nope}\n",
        ),
        "spec.configPatches[2].patch.value.typed_config",
        "envoy.extensions.filters.network.nope.v3.Nope",
    );
    envoy_filter_error(
        &bad(
            "  - applyTo: NETWORK_FILTER\n    patch:\n      operation: ADD\n      value:\n        name: x\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: a\n          idle_timeuot: 1s\n",
        ),
        "spec.configPatches[2].patch.value.typed_config.idle_timeuot",
        "unrecognized field name",
    );
    envoy_filter_error(
        &bad(
            "  - applyTo: HTTP_FILTER\n    patch:\n      operation: ADD\n      value:\n        name: x\n        typed_config:\n          \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n          type_url: type.googleapis.com/envoy.extensions.filters.http.nope.v3.Nope\n",
        ),
        "spec.configPatches[2].patch.value.typed_config.type_url",
        "unknown type",
    );
    envoy_filter_error(
        &bad("  - applyTo: LISTENER_FILTER\n    patch: {operation: ADD, value: {}}\n"),
        "spec.configPatches[2].applyTo",
        "not supported yet",
    );
    envoy_filter_error(
        &bad(
            "  - applyTo: CLUSTER\n    match: {listener: {portNumber: 80}}\n    patch: {operation: REMOVE}\n",
        ),
        "spec.configPatches[2].match.listener",
        "cannot select CLUSTER",
    );
}
