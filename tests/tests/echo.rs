//! The echo app and the blocking HTTP client against each other.

use std::path::Path;
use std::time::Duration;

use trellis_tests::{
    free_addr, http_get, http_request, start_echo_bin, test_dir, Signal, LOCALHOST,
};

fn echo_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_echo"))
}

#[test]
fn echoes_method_path_and_headers() {
    let dir = test_dir("echo").expect("temp dir");
    let addr = free_addr(LOCALHOST).expect("free addr");
    let _echo = start_echo_bin(echo_bin(), dir.path(), addr, "reviews", "v2").expect("echo");

    let response = http_get(
        addr,
        "/api/items?limit=3",
        &[
            ("Host", "reviews.default"),
            ("X-Test", "a"),
            ("x-test", "b"),
        ],
    )
    .expect("GET");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-echo-workload"), Some("reviews"));
    assert_eq!(response.header("X-Echo-Version"), Some("v2"));
    assert!(response
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/json")));

    let body = response.json().expect("json");
    assert_eq!(body["workload"], "reviews");
    assert_eq!(body["version"], "v2");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/api/items");
    assert_eq!(body["query"], "limit=3");
    assert_eq!(body["headers"]["host"], "reviews.default");
    assert_eq!(body["authority"], "reviews.default");
    assert_eq!(body["protocol"], "HTTP/1.1");
    assert_eq!(body["headers"]["x-test"], "a, b");
}

#[test]
fn any_method_and_path_is_echoed() {
    let dir = test_dir("echo-methods").expect("temp dir");
    let addr = free_addr(LOCALHOST).expect("free addr");
    let _echo = start_echo_bin(echo_bin(), dir.path(), addr, "ratings", "v1").expect("echo");

    for (method, path) in [("POST", "/"), ("DELETE", "/a/b/c"), ("PUT", "/healthz")] {
        let response = http_request(addr, method, path, &[], b"payload", Duration::from_secs(5))
            .expect(method);
        assert_eq!(response.status, 200);
        let body = response.json().expect("json");
        assert_eq!(body["method"], method);
        assert_eq!(body["path"], path);
        assert_eq!(body["headers"]["content-length"], "7");
    }

    let head = http_request(addr, "HEAD", "/", &[], &[], Duration::from_secs(5)).expect("HEAD");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("x-echo-workload"), Some("ratings"));
}

#[test]
fn exits_cleanly_on_sigterm_and_sigint() {
    let dir = test_dir("echo-signals").expect("temp dir");
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let addr = free_addr(LOCALHOST).expect("free addr");
        let mut echo = start_echo_bin(echo_bin(), dir.path(), addr, &format!("sig{signal}"), "v1")
            .expect("echo");
        echo.signal(signal).expect("signal");
        let status = echo
            .wait_timeout(Duration::from_secs(10))
            .expect("wait")
            .unwrap_or_else(|| panic!("echo still running after {signal}"));
        assert!(
            status.success(),
            "{signal}: {status}\n{}",
            echo.log_tail(20)
        );
        assert!(echo.log().contains("shutting down"), "{}", echo.log());
    }
}

#[test]
fn connection_refused_is_an_error_not_a_hang() {
    let addr = free_addr(LOCALHOST).expect("free addr");
    let err = http_get(addr, "/", &[]).expect_err("nothing listens there");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
