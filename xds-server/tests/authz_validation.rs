//! Validation of AuthorizationPolicy and RequestAuthentication: what Trellis cannot
//! enforce is rejected with the field that asks for it, never ignored.
#![allow(clippy::unwrap_used)]

use xds_server::config::parse::parse_file;
use xds_server::config::{ConfigError, ConfigObject};

fn authz(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n{spec}"
    )
}

fn authn(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: default}}\nspec:\n{spec}"
    )
}

const JWKS: &str = r#"'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'"#;

#[track_caller]
fn rejected(doc: &str, field: &str, message: &str) -> ConfigError {
    let errs = parse_file("p.yaml", doc).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
    e
}

#[track_caller]
fn accepted(doc: &str) -> ConfigObject {
    let mut objs = parse_file("p.yaml", doc).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(objs.len(), 1);
    objs.remove(0)
}

#[test]
fn both_api_versions_and_istio_examples_are_accepted() {
    let doc = authz(
        r#"  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["test"]}
    to:
    - operation: {methods: ["GET"], paths: ["/info*"]}
    - operation: {methods: ["POST"], paths: ["/data"]}
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#,
    );
    assert!(matches!(
        accepted(&doc),
        ConfigObject::AuthorizationPolicy(_)
    ));
    let beta = doc.replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n");
    accepted(&beta);
    // Allow-nothing and deny-all shapes.
    accepted(&authz("  {}\n"));
    accepted(&authz("  action: DENY\n  rules: [{}]\n"));
    let ra = authn(&format!(
        "  jwtRules:\n  - issuer: https://issuer.example\n    jwks: {JWKS}\n"
    ));
    assert!(matches!(
        accepted(&ra),
        ConfigObject::RequestAuthentication(_)
    ));
}

#[test]
fn audit_and_custom_actions_are_not_supported() {
    rejected(
        &authz("  action: AUDIT\n  rules: [{}]\n"),
        "spec.action",
        "AUDIT is not supported",
    );
    rejected(
        &authz("  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n"),
        "spec.action",
        "CUSTOM (external authorization) is not supported",
    );
    rejected(
        &authz("  action: BLOCK\n"),
        "spec.action",
        "unknown variant `BLOCK`",
    );
    rejected(
        &authz("  provider: {name: ext-authz}\n"),
        "spec.provider",
        "only for action CUSTOM",
    );
}

#[test]
fn unknown_fields_are_named() {
    let e = rejected(
        &authz("  rules:\n  - from:\n    - source: {serviceAccounts: [sleep]}\n"),
        "spec.rules[0].from[0].source.serviceAccounts",
        "unknown field `serviceAccounts`",
    );
    assert!(
        e.to_string()
            .starts_with("p.yaml: document 1 (line 1): AuthorizationPolicy default/p: "),
        "{e}"
    );
    rejected(
        &authz("  targetRef: {kind: Gateway, name: gw}\n"),
        "spec.targetRef",
        "unknown field `targetRef`",
    );
    rejected(
        &authn(&format!(
            "  jwtRules:\n  - issuer: i\n    jwks: {JWKS}\n    cacheDuration: 5m\n"
        )),
        "spec.jwtRules[0].cacheDuration",
        "unknown field `cacheDuration`",
    );
}

#[test]
fn unsupported_and_malformed_conditions_are_rejected() {
    let when = |key: &str, values: &str| {
        authz(&format!(
            "  rules:\n  - when:\n    - key: {key}\n      values: {values}\n"
        ))
    };
    rejected(
        &when("request.auth.presenters", "[x]"),
        "spec.rules[0].when[0].key",
        "unknown condition key `request.auth.presenters`",
    );
    rejected(
        &when("connection.sni", "[x]"),
        "spec.rules[0].when[0].key",
        "not supported",
    );
    rejected(
        &when("experimental.envoy.filters.a[b]", "[x]"),
        "spec.rules[0].when[0].key",
        "not supported",
    );
    rejected(
        &when("request.headers[]", "[x]"),
        "spec.rules[0].when[0].key",
        "request.headers[NAME]",
    );
    rejected(
        &when("source.ip", "[10.0.0.0/40]"),
        "spec.rules[0].when[0].values[0]",
        "prefix length",
    );
    rejected(
        &when("destination.port", "[http]"),
        "spec.rules[0].when[0].values[0]",
        "not a port number",
    );
    rejected(
        &authz("  rules:\n  - when:\n    - key: source.ip\n"),
        "spec.rules[0].when[0]",
        "needs values or notValues",
    );
    // Every supported key is accepted.
    for key in [
        "request.headers[x-user]",
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[groups]",
        "request.auth.claims[nested][claim]",
        "destination.ip",
        "destination.port",
    ] {
        let value = match key {
            "source.ip" | "remote.ip" | "destination.ip" => "10.0.0.1",
            "destination.port" => "8080",
            _ => "abc*",
        };
        accepted(&when(key, &format!("[\"{value}\"]")));
    }
}

#[test]
fn sources_and_operations_must_say_something() {
    rejected(
        &authz("  rules:\n  - from: [{}]\n"),
        "spec.rules[0].from[0].source",
        "must be set",
    );
    rejected(
        &authz("  rules:\n  - from: [{source: {}}]\n"),
        "spec.rules[0].from[0].source",
        "must not be empty",
    );
    rejected(
        &authz("  rules:\n  - to: [{operation: {}}]\n"),
        "spec.rules[0].to[0].operation",
        "must not be empty",
    );
    rejected(
        &authz("  rules:\n  - to: [{operation: {ports: [\"0\"]}}]\n"),
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port number",
    );
    rejected(
        &authz("  rules:\n  - to: [{operation: {notPaths: [\"/a/{*}/b\"]}}]\n"),
        "spec.rules[0].to[0].operation.notPaths[0]",
        "path templates are not supported",
    );
    rejected(
        &authz("  rules:\n  - to: [{operation: {paths: [api]}}]\n"),
        "spec.rules[0].to[0].operation.paths[0]",
        "must start with '/'",
    );
    rejected(
        &authz("  rules:\n  - from: [{source: {principals: [\"cluster.local/*/sa/x\"]}}]\n"),
        "spec.rules[0].from[0].source.principals[0]",
        "`*` is only allowed",
    );
    rejected(
        &authz("  rules:\n  - from: [{source: {notIpBlocks: [\"10.0.0.300\"]}}]\n"),
        "spec.rules[0].from[0].source.notIpBlocks[0]",
        "not an IP address",
    );
    rejected(
        &authz("  selector: {matchLabels: {app: \"web*\"}}\n"),
        "spec.selector.matchLabels.app",
        "wildcards",
    );
}

#[test]
fn jwks_sources() {
    let rule = |extra: &str| authn(&format!("  jwtRules:\n  - issuer: i\n{extra}"));
    // Istio's JWT task pages.
    accepted(&rule(
        "    jwksUri: https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json\n",
    ));
    accepted(&rule(
        "    jwksUri: http://jwks.test:8080/jwks.json\n    timeout: 2s\n",
    ));
    rejected(
        &rule("    jwksUri: ./jwks.json\n"),
        "spec.jwtRules[0].jwksUri",
        "not an http(s):// URI or a file:///absolute/path URI",
    );
    rejected(
        &rule("    jwksUri: https:///jwks.json\n"),
        "spec.jwtRules[0].jwksUri",
        "https:///jwks.json",
    );
    rejected(
        &rule("    jwksUri: https://me:secret@idp.example/jwks.json\n"),
        "spec.jwtRules[0].jwksUri",
        "user information in the URI is not supported",
    );
    rejected(
        &rule("    jwksUri: http://idp.example:99999/jwks.json\n"),
        "spec.jwtRules[0].jwksUri",
        "does not name a valid port",
    );
    rejected(
        &rule("    jwksUri: http://idp.example/jwks.json\n    timeout: soon\n"),
        "spec.jwtRules[0].timeout",
        "duration",
    );
    rejected(
        &rule("    jwksUri: http://idp.example/jwks.json\n    timeout: 0s\n"),
        "spec.jwtRules[0].timeout",
        "greater than 0",
    );
    rejected(
        &rule(""),
        "spec.jwtRules[0].jwksUri",
        "OpenID discovery from the issuer is not supported",
    );
    rejected(
        &rule(&format!(
            "    jwks: {JWKS}\n    jwksUri: file:///etc/jwks.json\n"
        )),
        "spec.jwtRules[0].jwks",
        "either jwks or jwksUri",
    );
    rejected(
        &rule("    jwks: 'not json'\n"),
        "spec.jwtRules[0].jwks",
        "not valid JSON",
    );
    rejected(
        &rule("    jwks: '{\"keys\": []}'\n"),
        "spec.jwtRules[0].jwks",
        "non-empty `keys` array",
    );
    accepted(&rule("    jwksUri: file:///etc/trellis/jwks.json\n"));
}

#[test]
fn jwt_rule_fields_are_checked() {
    rejected(
        &authn(&format!("  jwtRules:\n  - issuer: ''\n    jwks: {JWKS}\n")),
        "spec.jwtRules[0].issuer",
        "must not be empty",
    );
    rejected(
        &authn(&format!(
            "  jwtRules:\n  - issuer: i\n    jwks: {JWKS}\n    fromHeaders: [{{name: 'bad header'}}]\n"
        )),
        "spec.jwtRules[0].fromHeaders[0].name",
        "not a valid HTTP header name",
    );
    rejected(
        &authn(&format!(
            "  jwtRules:\n  - issuer: i\n    jwks: {JWKS}\n    outputClaimToHeaders: [{{header: x-sub, claim: ''}}]\n"
        )),
        "spec.jwtRules[0].outputClaimToHeaders[0].claim",
        "must not be empty",
    );
}
