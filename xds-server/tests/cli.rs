//! The command line: errors are one clear line and a non-zero exit.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

fn xds_server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xds-server"))
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Stdout of a run that must succeed.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("xds-server runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `xds-server ARGS` on the examples mesh with its CA in `ca`.
fn with_examples_and_ca(ca: &Path, args: &[&str]) -> Command {
    let mut cmd = xds_server();
    cmd.args(args)
        .arg("--config-dir")
        .arg(examples())
        .arg("--ca-dir")
        .arg(ca);
    cmd
}

fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("xds-server runs");
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("xds-server: "), "{stderr}");
    last
}

#[test]
fn unknown_workload() {
    let line = run_fails(
        xds_server()
            .args(["bootstrap", "--workload", "nope.default", "--config-dir"])
            .arg(examples()),
    );
    assert!(line.contains("unknown workload `nope.default`"), "{line}");
    assert!(
        line.contains("reviews-v1.default"),
        "lists the known workloads: {line}"
    );
}

#[test]
fn unreadable_config_dir() {
    let line = run_fails(xds_server().args(["serve", "--config-dir", "/nonexistent/trellis"]));
    assert!(
        line.contains("cannot read config dir /nonexistent/trellis"),
        "{line}"
    );
    assert!(line.contains("No such file or directory"), "{line}");
}

#[test]
fn port_in_use() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let line = run_fails(
        xds_server()
            .args(["serve", "--config-dir"])
            .arg(examples())
            .args([
                "--xds-addr",
                &addr.to_string(),
                "--admin-addr",
                "127.0.0.1:0",
            ]),
    );
    assert!(
        line.contains(&format!("cannot listen on {addr} for xDS")),
        "{line}"
    );
    assert!(line.contains("Address already in use"), "{line}");
}

#[test]
fn bootstrap_names_the_workload_and_mode() {
    let yaml = run_ok(
        xds_server()
            .args([
                "bootstrap",
                "--workload",
                "reviews-v2.default",
                "--delta",
                "--admin-port",
                "15999",
                "--config-dir",
            ])
            .arg(examples()),
    );
    assert!(
        yaml.contains("id: sidecar~127.0.1.4~reviews-v2.default~default.svc.cluster.local"),
        "{yaml}"
    );
    assert!(yaml.contains("api_type: DELTA_GRPC"), "{yaml}");
    assert!(yaml.contains("port_value: 15999"), "{yaml}");
}

#[test]
fn token_and_secure_bootstrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let token = run_ok(&mut with_examples_and_ca(
        &ca,
        &["token", "create", "--identity", "default/bookinfo-reviews"],
    ));
    assert_eq!(token.trim().split('.').count(), 3, "{token}");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).expect("write");

    let yaml = run_ok(
        with_examples_and_ca(
            &ca,
            &[
                "bootstrap",
                "--workload",
                "reviews-v1.default",
                "--secure-addr",
                "127.0.0.1:25012",
            ],
        )
        .arg("--token-file")
        .arg(&token_file),
    );
    assert!(
        yaml.contains(&format!("value: Bearer {}", token.trim())),
        "{yaml}"
    );
    assert!(yaml.contains("port_value: 25012"), "{yaml}");
    assert!(yaml.contains("path_config_source"), "{yaml}");
    assert!(
        yaml.contains("spiffe://cluster.local/ns/trellis-system/sa/xds-server"),
        "{yaml}"
    );

    // A token for another namespace's form, and a missing token file, are one-line errors.
    let line = run_fails(
        xds_server()
            .args(["token", "create", "--identity", "no-slash"])
            .arg("--ca-dir")
            .arg(&ca),
    );
    assert!(line.contains("no-slash"), "{line}");
    let line = run_fails(
        xds_server()
            .args([
                "bootstrap",
                "--workload",
                "reviews-v1.default",
                "--token-file",
                "/nonexistent/t",
            ])
            .arg("--config-dir")
            .arg(examples()),
    );
    assert!(
        line.contains("cannot read the token file /nonexistent/t"),
        "{line}"
    );
}

#[test]
fn cluster_join_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let token = run_ok(&mut with_examples_and_ca(
        &ca,
        &[
            "cluster",
            "join-token",
            "--cluster",
            "east",
            "--region",
            "us-east",
            "--ttl",
            "30m",
        ],
    ));
    assert_eq!(
        token.lines().count(),
        1,
        "only the token on stdout: {token}"
    );
    let authority = cert_authority::Authority::open(cert_authority::CaOptions {
        dir: ca.clone(),
        ..Default::default()
    })
    .expect("CA");
    let claims = authority
        .tokens()
        .verify(token.trim(), cert_authority::TokenKind::Join)
        .expect("a join token of this CA");
    assert_eq!(
        claims.sub,
        "spiffe://cluster.local/ns/trellis-system/sa/relay-east"
    );
    assert_eq!(claims.exp - claims.iat, 1800);
    let extra: Vec<(&str, &str)> = claims
        .extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        extra,
        [
            ("cluster", "east"),
            ("network", "east"),
            ("region", "us-east")
        ]
    );
    assert!(
        ca.join(xds_server::identity::XDS_TRUST_FILE).exists(),
        "the trust files are written for the relay's bootstrap"
    );

    // A name that is not a DNS label is one clear line, and no CA dir is made for it.
    let other_ca = dir.path().join("other-ca");
    let line = run_fails(
        xds_server()
            .args(["cluster", "join-token", "--cluster", "East_1"])
            .arg("--ca-dir")
            .arg(&other_ca),
    );
    assert!(
        line.contains("\"East_1\"") && line.contains("DNS label"),
        "{line}"
    );
    assert!(!other_ca.exists());
    let line = run_fails(
        xds_server()
            .args([
                "cluster",
                "join-token",
                "--cluster",
                "east",
                "--zone",
                "a/b",
            ])
            .arg("--ca-dir")
            .arg(&other_ca),
    );
    assert!(line.contains("invalid zone \"a/b\""), "{line}");
}

#[test]
fn analyze_a_valid_folder() {
    let out = run_ok(xds_server().arg("analyze").arg(examples()));
    assert!(out.contains("objects in effect, 0 errors"), "{out}");
}

/// Every error of a folder, with file, document, line, object and field, and a failure;
/// as JSON for tools.
#[test]
fn analyze_lists_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(examples()).expect("examples").flatten() {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    let routing = dir.path().join("reviews-routing.yaml");
    let text = std::fs::read_to_string(&routing).expect("read");
    std::fs::write(&routing, text.replace("subset: v2}", "subset: v3}")).expect("write");
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [x]\n  bogus: 1\n",
    )
    .expect("write");

    let mut cmd = xds_server();
    cmd.arg("analyze").arg(dir.path());
    let out = cmd.output().expect("runs");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("bad.yaml: document 1 (line 1): VirtualService default/x: spec.bogus: unknown field `bogus`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reviews-routing.yaml: document 2 (line 18): VirtualService default/reviews: spec.http[0].route[0].destination.subset: subset `v3`"),
        "{stdout}"
    );
    assert!(stdout.contains("4 errors"), "each error once: {stdout}");

    let mut cmd = xds_server();
    cmd.arg("analyze")
        .arg(dir.path())
        .args(["--output", "json"]);
    let out = cmd.output().expect("runs");
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 4, "{report:#}");
    assert_eq!(errors[0]["field"], "spec.bogus");
    assert_eq!(errors[0]["document"], 1);
    assert_eq!(errors[1]["object"], "VirtualService default/reviews");
}

/// Config that takes effect but routes nothing (a rule naming a delegate VirtualService
/// that does not exist, a delegate nobody names) is a warning: listed, not a failure.
#[test]
fn analyze_lists_warnings_without_failing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(examples()).expect("examples").flatten() {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    std::fs::write(
        dir.path().join("chain.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - delegate: {name: ratings-v1}\n  - route:\n    - destination: {host: ratings}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: spare}\nspec:\n  http:\n  - route:\n    - destination: {host: ratings}\n",
    )
    .expect("write");
    let out = run_ok(xds_server().arg("analyze").arg(dir.path()));
    let warning = |text: &str| {
        out.lines()
            .any(|l| l.starts_with("warning: ") && l.contains(text))
    };
    assert!(
        warning("chain.yaml: document 1 (line 1): VirtualService default/ratings: spec.http[0].delegate: delegate VirtualService default/ratings-v1 does not exist"),
        "{out}"
    );
    assert!(
        warning("chain.yaml: document 2 (line 11): VirtualService default/spare: spec.hosts: no VirtualService delegates to this one"),
        "{out}"
    );
    assert!(out.contains("0 errors, 2 warnings"), "{out}");

    let json = run_ok(
        xds_server()
            .arg("analyze")
            .arg(dir.path())
            .args(["--output", "json"]),
    );
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(report["valid"], true);
    let warnings = report["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 2, "{report:#}");
    assert_eq!(warnings[0]["field"], "spec.hosts");
    assert_eq!(warnings[1]["object"], "VirtualService default/ratings");
}
