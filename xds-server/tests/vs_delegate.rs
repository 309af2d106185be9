//! VirtualService chaining (`delegate`, `fixtures/vs-delegate/`): the merged rules as the
//! mesh keeps them and as golden routes, the warnings for delegate rules that route
//! nothing, the per-object rules of roots and delegates, and reloads that add, change and
//! remove a delegate. Regenerate golden files with `UPDATE_GOLDEN=1`.
#![allow(clippy::unwrap_used)]

mod translated;

use std::time::Duration;
use translated::{check_dump, editable_copy, fixture, open_store, snapshot_of};
use xds_server::cache::TypeKind;
use xds_server::config::parse::parse_file;
use xds_server::config::{ConfigError, ConfigObject};
use xds_server::mesh::{HttpRouteRule, MeshState, VirtualService};
use xds_server::translate::ProxyScope;

const REVIEWS: &str = "reviews.default.svc.cluster.local";

fn reviews(mesh: &MeshState) -> &VirtualService {
    &mesh.virtual_services[REVIEWS]
}

fn rule<'a>(vs: &'a VirtualService, name: &str) -> &'a HttpRouteRule {
    vs.http
        .iter()
        .find(|r| r.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no rule {name} in {:?}", names(vs)))
}

fn names(vs: &VirtualService) -> Vec<String> {
    vs.http
        .iter()
        .map(|r| r.name.clone().unwrap_or_default())
        .collect()
}

/// (object, field, start of message) of every warning.
fn warnings(mesh: &MeshState) -> Vec<(String, String, String)> {
    mesh.warnings
        .iter()
        .map(|w| {
            (
                w.object.clone().unwrap(),
                w.field.clone().unwrap(),
                w.message.clone(),
            )
        })
        .collect()
}

#[test]
fn delegate_rules_merge_into_their_root() {
    let store = open_store(&fixture("vs-delegate"));
    let mesh = store.mesh();
    let vs = reviews(&mesh);
    // The root's rules in order, each delegating one replaced by the delegate's rules
    // that fit its match (`outside` does not); `missing` names no delegate.
    assert_eq!(
        names(vs),
        [
            "api-v2",
            "api-moved",
            "api-rest",
            "team-canary",
            "team",
            "default"
        ]
    );

    let v2 = rule(vs, "api-v2");
    assert_eq!(v2.destinations[0].subset.as_deref(), Some("v2"));
    assert_eq!(v2.matches.len(), 1);
    assert_eq!(
        v2.matches[0].uri.as_ref().unwrap().prefix.as_deref(),
        Some("/api/v2")
    );
    // The root's options fill in what the delegate's rule leaves unset...
    assert_eq!(v2.timeout, Some(Duration::from_secs(2)));
    let set = &v2.headers.as_ref().unwrap().request.as_ref().unwrap().set;
    assert_eq!(set["x-root"], "api");
    // ...but not where it sets its own, and route options only reach rules that route.
    assert_eq!(rule(vs, "api-rest").timeout, Some(Duration::from_secs(5)));
    let moved = rule(vs, "api-moved");
    assert!(moved.redirect.is_some() && moved.timeout.is_none());
    assert!(moved.headers.is_some(), "headers apply to redirects too");
    // A delegate rule without match takes the root rule's.
    assert_eq!(
        rule(vs, "api-rest").matches[0]
            .uri
            .as_ref()
            .unwrap()
            .prefix
            .as_deref(),
        Some("/api")
    );

    // The team's delegate: its match conjoined with each of the root rule's two.
    let canary = rule(vs, "team-canary");
    assert_eq!(canary.matches.len(), 2);
    for m in &canary.matches {
        assert!(m.headers.contains_key("x-canary"), "{m:?}");
    }
    assert!(canary.matches[0].headers.contains_key("x-team"));
    assert_eq!(canary.retries.as_ref().unwrap().attempts, 1);
    // The root's short mirror host is the root's namespace's service.
    assert_eq!(
        canary.mirrors[0].host, "ratings.default.svc.cluster.local",
        "{canary:?}"
    );
    let split = rule(vs, "team");
    let weights: Vec<_> = split.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, [90, 10]);
    assert!(split.destinations.iter().all(|d| d.host == REVIEWS));

    // A delegate is no VirtualService of its own, and ratings' root kept its own route.
    assert_eq!(
        mesh.virtual_services.len(),
        2,
        "{:?}",
        mesh.virtual_services.keys()
    );
    let ratings = &mesh.virtual_services["ratings.default.svc.cluster.local"];
    assert_eq!(ratings.http.len(), 1);
}

#[test]
fn delegate_rules_that_route_nothing_are_warnings() {
    let mesh = open_store(&fixture("vs-delegate")).mesh();
    let got = warnings(&mesh);
    let expect = [
        (
            "VirtualService default/spare",
            "spec.hosts",
            "no VirtualService delegates to this one",
        ),
        (
            "VirtualService default/reviews",
            "spec.http[2].delegate",
            "delegate VirtualService default/nobody does not exist",
        ),
        (
            "VirtualService default/reviews-api",
            "spec.http[2].match",
            "not within the match of VirtualService default/reviews spec.http[0]",
        ),
        (
            "VirtualService other/ratings",
            "spec.http[0].delegate",
            "delegate VirtualService team/reviews-team is not exported to namespace `other`",
        ),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for (object, field, message) in expect {
        assert!(
            got.iter()
                .any(|(o, f, m)| o == object && f == field && m.starts_with(message)),
            "no warning `{object}: {field}: {message}` in {got:#?}"
        );
    }
}

#[test]
fn golden_merged_routes() {
    let snap = snapshot_of(&fixture("vs-delegate"));
    check_dump(
        "vs-delegate.frontend.routes",
        &snap,
        &ProxyScope::Workload("frontend-v1.default".into()),
        TypeKind::Route,
    );
}

fn parse(text: &str) -> Vec<ConfigObject> {
    parse_file("vs.yaml", text).unwrap()
}

fn one_error(text: &str) -> ConfigError {
    let errs = parse_file("vs.yaml", text).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

#[track_caller]
fn rejected(text: &str, field: &str, message: &str) {
    let e = one_error(text);
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
}

fn virtual_service(name: &str, hosts: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{hosts}  http:\n{http}"
    )
}

fn root(http: &str) -> String {
    virtual_service("reviews", "  hosts: [reviews]\n", http)
}

fn delegate(name: &str, http: &str) -> String {
    virtual_service(name, "", http)
}

/// The rest of a rule: a route to reviews.
const ROUTE: &str = "    route:\n    - destination: {host: reviews}\n";
/// A whole rule routing to reviews.
const RULE: &str = "  - route:\n    - destination: {host: reviews}\n";

#[test]
fn a_rule_delegates_or_routes_never_both() {
    let delegating = "  - delegate: {name: d}\n";
    rejected(
        &root(&format!("{delegating}{ROUTE}")),
        "spec.http[0].route",
        "route and delegate are mutually exclusive",
    );
    rejected(
        &root(&format!("{delegating}    redirect: {{uri: /x}}\n")),
        "spec.http[0].redirect",
        "redirect and delegate are mutually exclusive",
    );
    rejected(
        &root(&format!(
            "{delegating}    directResponse: {{status: 204}}\n"
        )),
        "spec.http[0].directResponse",
        "directResponse and delegate are mutually exclusive",
    );
    rejected(
        &root("  - delegate: {namespace: team}\n"),
        "spec.http[0].delegate.name",
        "must not be empty",
    );
    rejected(
        &root("  - delegate: {name: d, namespace: Team}\n"),
        "spec.http[0].delegate.namespace",
        "not a valid name",
    );
    rejected(
        &root("  - delegate: {name: d, weight: 1}\n"),
        "spec.http[0].delegate.weight",
        "unknown field `weight`",
    );
    // A delegating rule keeps its other options (they fill in the delegate's rules).
    parse(&root(&format!(
        "{delegating}    timeout: 1s\n    retries: {{attempts: 2}}\n    mirror: {{host: ratings}}\n    headers: {{request: {{set: {{x: y}}}}}}\n"
    )));
}

#[test]
fn a_delegate_is_http_rules_only_and_delegates_no_further() {
    rejected(
        &delegate("d", "  - delegate: {name: e}\n"),
        "spec.http[0].delegate",
        "cannot delegate again (Istio supports one level of delegation)",
    );
    let text = delegate("d", RULE).replace("spec:\n", "spec:\n  gateways: [mesh]\n");
    rejected(&text, "spec.gateways", "cannot name gateways");
    let text = delegate("d", RULE).replace(
        "spec:\n",
        "spec:\n  tcp:\n  - route:\n    - destination: {host: reviews}\n",
    );
    rejected(&text, "spec.tcp", "http rules only");
    rejected(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\nspec: {}\n",
        "spec.http",
        "needs http rules",
    );
    parse(&delegate("d", RULE));
}

#[test]
fn websocket_upgrade_is_accepted_and_ignored() {
    let with = parse(&root(&format!("  - websocketUpgrade: true\n{ROUTE}")));
    let without = parse(&root(RULE));
    let services = std::fs::read_to_string(fixture("vs-delegate/services.yaml")).unwrap();
    let services = parse(&services);
    let mesh = |vs: &[ConfigObject]| MeshState::build(services.iter().chain(vs)).unwrap();
    assert_eq!(
        mesh(&with).virtual_services,
        mesh(&without).virtual_services
    );
}

/// The fixture's services and reviews' subsets, plus `extra` documents.
fn mesh_with(extra: &str) -> Result<MeshState, Vec<ConfigError>> {
    let mut objects = Vec::new();
    for file in ["services.yaml", "root.yaml"] {
        let text = std::fs::read_to_string(fixture("vs-delegate").join(file)).unwrap();
        // Only the DestinationRule of root.yaml.
        let docs = parse(&text);
        objects.extend(docs.into_iter().filter(|o| o.kind() != "VirtualService"));
    }
    objects.extend(parse(extra));
    MeshState::build(&objects)
}

#[test]
fn a_virtual_service_with_hosts_is_no_delegate() {
    let text = format!(
        "{}---\n{}",
        root("  - delegate: {name: other}\n"),
        virtual_service("other", "  hosts: [ratings]\n", RULE)
    );
    let mesh = mesh_with(&text).unwrap();
    assert!(reviews(&mesh).http.is_empty());
    let got = warnings(&mesh);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, "spec.http[0].delegate");
    assert!(
        got[0].2.contains("has hosts, so it is no delegate"),
        "{got:?}"
    );
}

#[test]
fn a_delegates_own_errors_name_the_delegate_once() {
    // Two roots use one delegate with an undefined subset: one error, on the delegate.
    let text = format!(
        "{}---\n{}---\n{}",
        root("  - delegate: {name: d}\n"),
        virtual_service(
            "ratings",
            "  hosts: [ratings]\n",
            "  - delegate: {name: d}\n"
        ),
        delegate(
            "d",
            "  - route:\n    - destination: {host: reviews, subset: v9}\n"
        ),
    );
    let errs = mesh_with(&text).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].object.as_deref(), Some("VirtualService default/d"));
    assert_eq!(
        errs[0].field.as_deref(),
        Some("spec.http[0].route[0].destination.subset")
    );
}

#[test]
fn short_hosts_resolve_in_the_namespace_of_the_rule_that_names_them() {
    // A delegate in `team` naming `reviews` means reviews.team, which does not exist.
    let text = format!(
        "{}---\n{}",
        root("  - delegate: {name: d, namespace: team}\n"),
        delegate("d", RULE).replace("namespace: default", "namespace: team"),
    );
    let errs = mesh_with(&text).unwrap_err();
    assert!(
        errs[0].message.contains("reviews.team.svc.cluster.local"),
        "{errs:?}"
    );
}

/// A delegate edit reroutes its root; a removed delegate drops only its rules (with a
/// warning) and comes back with its file.
#[test]
fn reloads_follow_the_delegate() {
    let (dir, mut store) = editable_copy(&fixture("vs-delegate"));
    let subset = |store: &xds_server::mesh::MeshStore| {
        rule(reviews(&store.mesh()), "api-v2").destinations[0]
            .subset
            .clone()
    };
    assert_eq!(subset(&store).as_deref(), Some("v2"));

    translated::edit_and_reload(&mut store, dir.path(), "delegates.yaml", |t| {
        t.replacen("subset: v2}", "subset: v1}", 1)
    });
    assert_eq!(subset(&store).as_deref(), Some("v1"));
    assert_eq!(store.rebuilt_stages(), ["virtual_services"]);
    assert_eq!(*store.mesh(), store.build_from_scratch().unwrap());

    let delegates = dir.path().join("delegates.yaml");
    let text = std::fs::read_to_string(&delegates).unwrap();
    std::fs::remove_file(&delegates).unwrap();
    assert!(store.reload().unwrap().changed);
    let mesh = store.mesh();
    assert_eq!(names(reviews(&mesh)), ["default"]);
    let missing: Vec<_> = warnings(&mesh)
        .into_iter()
        .filter(|(_, _, m)| m.contains("does not exist"))
        .map(|(_, f, _)| f)
        .collect();
    assert_eq!(
        missing,
        [
            "spec.http[0].delegate",
            "spec.http[1].delegate",
            "spec.http[2].delegate",
            "spec.http[0].delegate"
        ],
    );

    std::fs::write(&delegates, text).unwrap();
    assert!(store.reload().unwrap().changed);
    assert_eq!(names(reviews(&store.mesh())).len(), 6);
}
