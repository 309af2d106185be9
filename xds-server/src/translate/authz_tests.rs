//! Matcher conversion and Istio's evaluation rules, checked on the generated Envoy types.

use super::*;
use crate::config::security::Rule;
use envoy_types::pb::envoy::config::rbac::v3::Rbac as EnvoyRbac;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as EnvoyHttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as EnvoyNetworkRbac;
use prost::Message;

fn spec(yaml: &str) -> AuthorizationPolicySpec {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn named(name: &str, yaml: &str) -> Named<AuthorizationPolicySpec> {
    Named {
        namespace: "default".into(),
        name: name.into(),
        spec: spec(yaml),
    }
}

fn ctx(tcp: bool, action: AuthzAction) -> Context<'static> {
    Context {
        tcp,
        action,
        issuers: &["https://idp.example"],
    }
}

fn one_rule(yaml: &str) -> Rule {
    spec(yaml).rules.remove(0)
}

fn exact(s: &str) -> StringMatcher {
    jwt::string(MatchPattern::Exact(s.into()))
}

fn authn(m: StringMatcher) -> Principal {
    authenticated(m)
}

#[test]
fn principals_get_the_spiffe_scheme() {
    let p = |v| {
        principal(
            &Attribute::SourcePrincipal,
            v,
            &ctx(false, AuthzAction::Allow),
        )
    };
    assert_eq!(
        p("cluster.local/ns/default/sa/sleep"),
        authn(exact("spiffe://cluster.local/ns/default/sa/sleep"))
    );
    assert_eq!(
        p("cluster.local/ns/default/*"),
        authn(jwt::string(MatchPattern::Prefix(
            "spiffe://cluster.local/ns/default/".into()
        )))
    );
    assert_eq!(
        p("*/sa/sleep"),
        authn(regex(r"spiffe://.*/sa/sleep".into()))
    );
    assert_eq!(p("*"), authn(regex(".+".into())));
}

#[test]
fn namespaces_match_the_spiffe_namespace_segment() {
    assert_eq!(namespace_regex("prod"), "spiffe://[^/]+/ns/prod/.*");
    assert_eq!(namespace_regex("prod-*"), "spiffe://[^/]+/ns/prod-[^/]*/.*");
    assert_eq!(namespace_regex("*-test"), "spiffe://[^/]+/ns/[^/]*-test/.*");
    assert_eq!(namespace_regex("*"), "spiffe://[^/]+/ns/[^/]+/.*");
    let re = regex::Regex::new(&format!("^{}$", namespace_regex("prod-*"))).unwrap();
    assert!(re.is_match("spiffe://cluster.local/ns/prod-eu/sa/api"));
    assert!(!re.is_match("spiffe://cluster.local/ns/staging/sa/prod-x"));
}

#[test]
fn regex_metacharacters_are_quoted() {
    assert_eq!(quote("a.b*(c)"), r"a\.b\*\(c\)");
    assert_eq!(
        string_matcher("*.svc", "spiffe://"),
        regex(r"spiffe://.*\.svc".into())
    );
}

#[test]
fn ip_blocks_and_ports() {
    let c = ctx(false, AuthzAction::Allow);
    assert_eq!(
        principal(&Attribute::SourceIp, "10.0.0.0/8", &c),
        id(Identifier::DirectRemoteIp(CidrRange {
            address_prefix: "10.0.0.0".into(),
            prefix_len: Some(UInt32Value { value: 8 }),
        }))
    );
    assert_eq!(
        principal(&Attribute::RemoteIp, "127.0.0.1", &c),
        id(Identifier::RemoteIp(CidrRange {
            address_prefix: "127.0.0.1".into(),
            prefix_len: Some(UInt32Value { value: 32 }),
        }))
    );
    assert_eq!(
        permission(&Attribute::DestinationPort, "9080"),
        rule(PermissionRule::DestinationPort(9080))
    );
}

#[test]
fn http_attributes_follow_istio_string_matching() {
    let method = permission(&Attribute::Method, "GET");
    let Some(PermissionRule::Header(h)) = method.rule else {
        panic!("{method:?}")
    };
    assert_eq!(h.name, ":method");
    assert_eq!(
        h.header_match_specifier,
        Some(HeaderMatchSpecifier::StringMatch(exact("GET")))
    );
    let host = permission(&Attribute::Host, "*.example.com");
    let Some(PermissionRule::Header(h)) = host.rule else {
        panic!("{host:?}")
    };
    assert_eq!(h.name, ":authority");
    assert_eq!(
        h.header_match_specifier,
        Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Suffix(".example.com".into())),
            ignore_case: true,
        }))
    );
    let any = principal(
        &Attribute::RequestHeader("x-user".into()),
        "*",
        &ctx(false, AuthzAction::Allow),
    );
    let Some(Identifier::Header(h)) = any.identifier else {
        panic!("{any:?}")
    };
    assert_eq!(
        h.header_match_specifier,
        Some(HeaderMatchSpecifier::PresentMatch(true))
    );
    assert_eq!(
        permission(&Attribute::Path, "/api/*"),
        rule(PermissionRule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(jwt::string(MatchPattern::Prefix(
                "/api/".into()
            )))),
        }))
    );
}

#[test]
fn fields_and_values_combine_as_istio_documents() {
    // Values of a field are ORed, fields ANDed, not-values negated.
    let r = one_rule(
        r#"
rules:
- from:
  - source: {principals: [a/ns/x/sa/y, b/ns/x/sa/y], notNamespaces: [test]}
  to:
  - operation: {methods: [GET]}
  - operation: {paths: [/admin]}
  when:
  - {key: destination.port, values: ["9080"]}
"#,
    );
    let p = policy(&r, &ctx(false, AuthzAction::Allow)).unwrap();
    assert_eq!(p.principals.len(), 1);
    let Some(Identifier::AndIds(and)) = &p.principals[0].identifier else {
        panic!("{p:?}")
    };
    assert!(matches!(and.ids[0].identifier, Some(Identifier::OrIds(ref s)) if s.ids.len() == 2));
    assert!(matches!(and.ids[1].identifier, Some(Identifier::NotId(_))));
    // Two operations: two permissions, each ANDed with the port condition.
    assert_eq!(p.permissions.len(), 2);
    for perm in &p.permissions {
        let Some(PermissionRule::AndRules(and)) = &perm.rule else {
            panic!("{perm:?}")
        };
        assert_eq!(
            and.rules[1],
            rule(PermissionRule::DestinationPort(9080)),
            "the `when` condition comes after the operation's fields"
        );
    }
}

#[test]
fn an_empty_rule_matches_everything() {
    let p = policy(&Rule::default(), &ctx(false, AuthzAction::Deny)).unwrap();
    assert_eq!(p.permissions, vec![rule(PermissionRule::Any(true))]);
    assert_eq!(p.principals, vec![id(Identifier::Any(true))]);
}

#[test]
fn allow_nothing_denies_and_an_empty_deny_is_absent() {
    let allow_nothing = named("nothing", "{}");
    let r = rbac(&[&allow_nothing], AuthzAction::Allow, false, &[]).unwrap();
    assert_eq!(r.action, 0);
    assert!(r.policies.is_empty(), "ALLOW without policies denies all");
    let deny_nothing = named("deny", "action: DENY");
    assert!(rbac(&[&deny_nothing], AuthzAction::Deny, false, &[]).is_none());
    assert!(rbac(&[&deny_nothing], AuthzAction::Allow, false, &[]).is_none());
}

#[test]
fn policy_names_follow_istiod() {
    let p = named("web", "rules: [{}, {to: [{operation: {methods: [GET]}}]}]");
    let r = rbac(&[&p], AuthzAction::Allow, false, &[]).unwrap();
    let names: Vec<&String> = r.policies.keys().collect();
    assert_eq!(
        names,
        [
            "ns[default]-policy[web]-rule[0]",
            "ns[default]-policy[web]-rule[1]"
        ]
    );
}

#[test]
fn http_only_fields_on_tcp_fail_safe() {
    let r = one_rule(
        r#"
rules:
- from: [{source: {namespaces: [bad]}}]
  to: [{operation: {methods: [GET]}}]
"#,
    );
    // ALLOW: the whole rule is dropped (it can allow nothing on TCP).
    assert!(policy(&r, &ctx(true, AuthzAction::Allow)).is_none());
    // DENY: only the HTTP field goes, so the rule denies every connection from `bad`.
    let p = policy(&r, &ctx(true, AuthzAction::Deny)).unwrap();
    assert_eq!(p.permissions, vec![rule(PermissionRule::Any(true))]);
    assert_eq!(p.principals, vec![authn(regex(namespace_regex("bad")))]);
    // Fields a rule does not use are not "HTTP-only fields in use".
    let principals_only = one_rule("rules: [{from: [{source: {principals: [td/ns/a/sa/b]}}]}]");
    assert!(policy(&principals_only, &ctx(true, AuthzAction::Allow)).is_some());
    // On HTTP both stay.
    let p = policy(&r, &ctx(false, AuthzAction::Allow)).unwrap();
    assert_ne!(p.permissions, vec![rule(PermissionRule::Any(true))]);
}

#[test]
fn an_allow_policy_whose_rules_all_drop_denies_tcp() {
    let p = named("http-only", "rules: [{to: [{operation: {paths: [/x]}}]}]");
    let r = rbac(&[&p], AuthzAction::Allow, true, &[]).unwrap();
    assert!(r.policies.is_empty());
}

#[test]
fn request_principals_need_a_configured_issuer() {
    let r = one_rule("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]");
    let none = Context {
        tcp: false,
        action: AuthzAction::Allow,
        issuers: &[],
    };
    let p = policy(&r, &none).unwrap();
    assert_eq!(p.principals, vec![jwt::nobody()]);
    let p = policy(&r, &ctx(false, AuthzAction::Allow)).unwrap();
    assert_ne!(p.principals, vec![jwt::nobody()]);
}

#[test]
fn filters_decode_as_envoys_types_in_deterministic_order() {
    let deny = named(
        "deny",
        "action: DENY\nrules: [{to: [{operation: {paths: [/admin*]}}]}]",
    );
    let allow = named(
        "allow",
        "rules: [{from: [{source: {principals: [td/ns/a/sa/b]}}]}, {}, {to: [{operation: {methods: [GET]}}]}]",
    );
    let encode = || {
        let d = rbac(&[&deny, &allow], AuthzAction::Deny, false, &[]).unwrap();
        let a = rbac(&[&deny, &allow], AuthzAction::Allow, false, &[]).unwrap();
        (
            HttpRbac { rules: Some(d) }.encode_to_vec(),
            NetworkRbac {
                rules: Some(a),
                stat_prefix: TCP_STAT_PREFIX.into(),
            }
            .encode_to_vec(),
        )
    };
    let (http, tcp) = encode();
    assert_eq!(
        encode(),
        (http.clone(), tcp.clone()),
        "same input, same bytes"
    );
    let http = EnvoyHttpRbac::decode(http.as_slice()).unwrap();
    let rules: EnvoyRbac = http.rules.unwrap();
    assert_eq!(rules.action, 1);
    assert!(rules
        .policies
        .contains_key("ns[default]-policy[deny]-rule[0]"));
    let tcp = EnvoyNetworkRbac::decode(tcp.as_slice()).unwrap();
    assert_eq!(tcp.stat_prefix, "tcp.");
    assert_eq!(tcp.rules.unwrap().policies.len(), 3);
}
