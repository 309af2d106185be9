//! VirtualService HTTP features: conflicting or malformed options are errors naming the
//! file, document, object and field; the fixture with every feature loads.
#![allow(clippy::unwrap_used)]

use xds_server::config::parse::parse_file;
use xds_server::config::ConfigError;
use xds_server::config::ConfigObject;
use xds_server::mesh::MeshState;

fn one_error(text: &str) -> ConfigError {
    let errs = parse_file("vs.yaml", text).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

fn vs(rule: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{rule}"
    )
}

const ROUTE: &str = "    route:\n    - destination: {host: reviews}\n";

/// The rule `extra` (lines of one `http` entry, indented by four) plus a route.
fn with_route(extra: &str) -> String {
    vs(&format!("  - name: r\n{extra}{ROUTE}"))
}

#[track_caller]
fn rejected(text: &str, field: &str, message: &str) {
    let e = one_error(text);
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
    let line = e.to_string();
    assert!(
        line.starts_with("vs.yaml: document 1") && line.contains("VirtualService default/reviews"),
        "{line}"
    );
}

#[test]
fn conflicting_actions_are_errors() {
    rejected(
        &with_route("    redirect: {uri: /x}\n"),
        "spec.http[0].redirect",
        "redirect and route are mutually exclusive",
    );
    rejected(
        &with_route("    directResponse: {status: 200}\n"),
        "spec.http[0].directResponse",
        "directResponse and route are mutually exclusive",
    );
    rejected(
        &vs("  - redirect: {uri: /x}\n    directResponse: {status: 200}\n"),
        "spec.http[0].directResponse",
        "directResponse and redirect are mutually exclusive",
    );
    rejected(
        &vs("  - match: [{uri: {prefix: /}}]\n"),
        "spec.http[0].route",
        "one of route, redirect, directResponse or delegate is required",
    );
    rejected(
        &vs("  - redirect: {uri: /x}\n    rewrite: {uri: /y}\n"),
        "spec.http[0].rewrite",
        "has no effect with redirect",
    );
    rejected(
        &vs("  - directResponse: {status: 503}\n    mirror: {host: ratings}\n"),
        "spec.http[0].mirror",
        "has no effect with directResponse",
    );
}

#[test]
fn durations_must_be_well_formed_and_not_negative() {
    rejected(
        &with_route("    timeout: -1s\n"),
        "spec.http[0].timeout",
        "must not be negative",
    );
    rejected(
        &with_route("    fault: {delay: {fixedDelay: -5s, percentage: {value: 10}}}\n"),
        "spec.http[0].fault.delay.fixedDelay",
        "must not be negative",
    );
    rejected(
        &with_route("    fault: {delay: {fixedDelay: soon}}\n"),
        "spec.http[0].fault.delay.fixedDelay",
        "does not start with a number",
    );
    rejected(
        &with_route("    corsPolicy: {maxAge: 1.5s}\n"),
        "spec.http[0].corsPolicy.maxAge",
        "whole seconds",
    );
    rejected(
        &with_route("    retries: {attempts: 2, perTryTimeout: 0s}\n"),
        "spec.http[0].retries.perTryTimeout",
        "greater than zero",
    );
}

#[test]
fn percentages_must_be_within_0_and_100() {
    rejected(
        &with_route("    fault: {abort: {httpStatus: 503, percentage: {value: 100.5}}}\n"),
        "spec.http[0].fault.abort.percentage.value",
        "outside 0..100",
    );
    rejected(
        &with_route("    fault: {delay: {fixedDelay: 1s, percentage: {value: -1}}}\n"),
        "spec.http[0].fault.delay.percentage.value",
        "outside 0..100",
    );
    rejected(
        &with_route("    mirror: {host: ratings}\n    mirrorPercentage: {value: 101}\n"),
        "spec.http[0].mirrorPercentage.value",
        "outside 0..100",
    );
    rejected(
        &with_route(
            "    mirrors:\n    - destination: {host: ratings}\n      percentage: {value: 200}\n",
        ),
        "spec.http[0].mirrors[0].percentage.value",
        "outside 0..100",
    );
}

#[test]
fn malformed_options_name_their_field() {
    rejected(
        &with_route("    fault: {abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}\n"),
        "spec.http[0].fault.abort",
        "exactly one of httpStatus or grpcStatus",
    );
    rejected(
        &with_route("    fault: {abort: {grpcStatus: SOMETIMES}}\n"),
        "spec.http[0].fault.abort.grpcStatus",
        "unknown gRPC status",
    );
    rejected(
        &with_route("    fault: {abort: {httpStatus: 99}}\n"),
        "spec.http[0].fault.abort.httpStatus",
        "outside 200..599",
    );
    rejected(
        &with_route("    fault: {}\n"),
        "spec.http[0].fault",
        "at least one of delay or abort",
    );
    rejected(
        &vs("  - redirect: {uri: /x, redirectCode: 305}\n"),
        "spec.http[0].redirect.redirectCode",
        "not one of 301",
    );
    rejected(
        &vs("  - redirect: {uri: x}\n"),
        "spec.http[0].redirect.uri",
        "must start with '/'",
    );
    rejected(
        &vs("  - redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}\n"),
        "spec.http[0].redirect.derivePort",
        "mutually exclusive",
    );
    rejected(
        &vs("  - directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n"),
        "spec.http[0].directResponse.body",
        "exactly one of string or bytes",
    );
    rejected(
        &vs("  - directResponse: {status: 200, body: {bytes: \"not base64!\"}}\n"),
        "spec.http[0].directResponse.body",
        "not valid base64",
    );
    rejected(
        &vs("  - directResponse: {status: 42}\n"),
        "spec.http[0].directResponse.status",
        "outside 200..599",
    );
    rejected(
        &with_route("    rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}\n"),
        "spec.http[0].rewrite.uriRegexRewrite",
        "mutually exclusive",
    );
    rejected(
        &with_route("    rewrite: {uriRegexRewrite: {match: \"(\", rewrite: b}}\n"),
        "spec.http[0].rewrite.uriRegexRewrite.match",
        "invalid regex",
    );
    rejected(
        &with_route("    headers: {request: {remove: [host]}}\n"),
        "spec.http[0].headers.request.remove[0]",
        "cannot be removed",
    );
    rejected(
        &with_route("    headers: {response: {set: {\":status\": \"200\"}}}\n"),
        "spec.http[0].headers.response.set.:status",
        "cannot be changed",
    );
    rejected(
        &with_route("    headers: {request: {add: {x-a: \"one\\ntwo\"}}}\n"),
        "spec.http[0].headers.request.add.x-a",
        "must not contain CR, LF or NUL",
    );
    rejected(
        &with_route("    corsPolicy: {allowOrigins: [{exact: a, prefix: b}]}\n"),
        "spec.http[0].corsPolicy.allowOrigins[0]",
        "exactly one of",
    );
    rejected(
        &with_route("    corsPolicy: {allowMethods: [\"GET, POST\"]}\n"),
        "spec.http[0].corsPolicy.allowMethods[0]",
        "single token",
    );
    rejected(
        &with_route("    match:\n    - queryParams: {q: {}}\n"),
        "spec.http[0].match[0].queryParams.q",
        "exactly one of",
    );
    rejected(
        &with_route("    match:\n    - sourceLabels: {app: \"a b\"}\n"),
        "spec.http[0].match[0].sourceLabels.app",
        "not a label value",
    );
    rejected(
        &with_route("    match:\n    - port: 0\n"),
        "spec.http[0].match[0].port",
        "out of range",
    );
}

#[test]
fn unsupported_fields_are_errors() {
    rejected(
        &with_route("    match:\n    - gateways: [Ingress_GW]\n"),
        "spec.http[0].match[0].gateways[0]",
        "gateway `Ingress_GW`",
    );
    let e = one_error(&with_route(
        "    fault: {delay: {exponentialDelay: 1s, percentage: {value: 1}}}\n",
    ));
    assert!(
        e.message.contains("unknown field `exponentialDelay`"),
        "{e}"
    );
    let e = one_error(&with_route("    corsPolicy: {allowOrigin: [a]}\n"));
    assert!(e.message.contains("unknown field `allowOrigin`"), "{e}");
}

#[test]
fn mirror_destinations_must_be_services() {
    let services = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/vs-features/services.yaml"),
    )
    .unwrap();
    let text = format!(
        "{services}---\n{}",
        with_route("    mirror: {host: nowhere}\n    mirrors:\n    - destination: {host: ratings, subset: v9}\n")
    );
    let objects: Vec<ConfigObject> = parse_file("vs.yaml", &text).unwrap();
    let errs = MeshState::build(&objects).unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.clone().unwrap()).collect();
    assert_eq!(
        fields,
        [
            "spec.http[0].mirror.host",
            "spec.http[0].mirrors[0].destination.subset"
        ],
        "{errs:?}"
    );
    assert!(errs[0].message.contains("not a service"), "{}", errs[0]);
}

#[test]
fn the_feature_fixture_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vs-features");
    let (store, outcome) = xds_server::mesh::MeshStore::open(&dir).unwrap();
    assert!(outcome.new_errors.is_empty(), "{:?}", outcome.new_errors);
    let mesh = store.mesh();
    let vs = &mesh.virtual_services["reviews.default.svc.cluster.local"];
    assert_eq!(vs.http.len(), 16);
    assert_eq!(vs.http[3].mirrors.len(), 2);
}
