//! End to end: the reviews VirtualService routes real traffic through real Envoy sidecars
//! configured by a real xds-server, by header, by path and by weight, in SotW and Delta.
//!
//! Keep test dirs with `TRELLIS_KEEP_TEST_DIRS=1` to read every process's log.

mod common;

use common::{
    assert_all_served_by, count_versions, send, served_version, Mesh, Mode, SidecarMesh, PORT,
};
use trellis_tests::require_envoy;

/// Requests per check that a route always picks one version. With the 80/20 split as the
/// alternative, a wrong route would show v1 in 50 requests except with probability 0.2^50.
const ALWAYS: usize = 50;

fn routing(mode: Mode) {
    let Some(envoy_bin) = require_envoy() else {
        return;
    };
    let mut mesh =
        Mesh::start(&envoy_bin, &format!("e2e-routing-{}", mode.as_str()), mode).expect("mesh");
    let client = mesh.client();

    // By header, whatever form of the host the app uses.
    for host in [
        "reviews".to_owned(),
        format!("reviews:{PORT}"),
        "reviews.default".to_owned(),
        "reviews.default.svc.cluster.local".to_owned(),
        format!("reviews.default.svc.cluster.local:{PORT}"),
    ] {
        assert_all_served_by(
            client,
            ALWAYS,
            "/reviews/1",
            &[("host", &host), ("end-user", "jason")],
            "v2",
        );
    }
    // The header must match exactly: another user gets the split, so v1 shows up.
    let other_user =
        count_versions(client, ALWAYS, "/", &[("end-user", "jasonx")]).expect("traffic");
    assert!(
        other_user.contains_key("v1"),
        "end-user: jasonx must not be pinned to v2: {other_user:?}"
    );

    // By path prefix.
    assert_all_served_by(client, ALWAYS, "/beta", &[], "v2");
    assert_all_served_by(client, ALWAYS, "/beta/reviews/1?page=2", &[], "v2");
    let not_beta = count_versions(client, ALWAYS, "/reviews/beta", &[]).expect("traffic");
    assert!(
        not_beta.contains_key("v1"),
        "/reviews/beta does not start with /beta: {not_beta:?}"
    );

    // By weight.
    mesh.assert_default_split(400);

    // The other service is reachable through the same outbound listener, by Host.
    let response = send(client, "/ratings/1", &[("host", "ratings")]).expect("ratings");
    assert_eq!(served_version(&response, "ratings").expect("ratings"), "v1");

    // The traffic went through the destination sidecars' inbound listeners (not straight
    // from the client sidecar to the apps).
    for name in ["reviews-v1", "reviews-v2", "ratings-v1"] {
        let inbound = mesh
            .envoy_stat(
                name,
                &format!("http.inbound_{PORT}.downstream_rq_completed"),
            )
            .expect("stats");
        assert!(inbound > 0, "{name}'s sidecar served no inbound request");
    }
    let body = send(client, "/", &[("end-user", "jason")])
        .expect("request")
        .json()
        .expect("json");
    assert!(
        body["headers"]["x-request-id"].is_string(),
        "not proxied: {body}"
    );

    // Traffic changed nothing in the control plane's view.
    mesh.check_converged(true).expect("still converged");
    for sidecar in &mut mesh.sidecars {
        sidecar.envoy.ensure_running().expect("sidecar running");
    }
}

#[test]
fn routing_by_header_path_and_weight_sotw() {
    routing(Mode::Sotw);
}

#[test]
fn routing_by_header_path_and_weight_delta() {
    routing(Mode::Delta);
}
