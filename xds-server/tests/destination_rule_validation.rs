//! DestinationRule validation: bad traffic policies are errors naming the field; what
//! Trellis cannot honour yet says so; the rule and subset and port-level policies are
//! all checked.
#![allow(clippy::unwrap_used)]

use xds_server::config::parse::parse_file;
use xds_server::config::ConfigError;
use xds_server::mesh::MeshStore;

fn dr(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n{spec}"
    )
}

/// `trafficPolicy` with `body` (indented under it).
fn tp(body: &str) -> String {
    dr(&format!("  trafficPolicy:\n{body}"))
}

fn error(text: &str) -> ConfigError {
    let errs = parse_file("dr.yaml", text).expect_err("document should be rejected");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

#[track_caller]
fn rejected(text: &str, field: &str, message: &str) {
    let e = error(text);
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "`{message}` not in: {e}");
    assert_eq!(e.object.as_deref(), Some("DestinationRule default/reviews"));
}

#[test]
fn full_policies_parse() {
    let files = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/traffic-policy"),
    )
    .unwrap();
    for f in files.flatten() {
        let text = std::fs::read_to_string(f.path()).unwrap();
        let name = f.path().display().to_string();
        parse_file(&name, &text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[test]
fn unknown_fields_and_types() {
    rejected(
        &tp("    connectionPool:\n      tcp: {maxConection: 1}\n"),
        "spec.trafficPolicy.connectionPool.tcp.maxConection",
        "unknown field `maxConection`",
    );
    rejected(
        &tp("    outlierDetection: {interval: 5s, baseEjectionTime: 30s, maxEjectionPercent: lots}\n"),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "invalid type",
    );
    rejected(
        &tp("    tunnel: {protocol: CONNECT, targetHost: x, targetPort: 1}\n"),
        "spec.trafficPolicy.tunnel",
        "unknown field `tunnel`",
    );
}

#[test]
fn durations_and_numbers() {
    rejected(
        &tp("    connectionPool:\n      tcp: {connectTimeout: -1s}\n"),
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "must not be negative",
    );
    rejected(
        &tp("    outlierDetection: {interval: soon}\n"),
        "spec.trafficPolicy.outlierDetection.interval",
        "does not start with a number",
    );
    rejected(
        &tp("    outlierDetection: {baseEjectionTime: 0s}\n"),
        "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        "at least 1ms",
    );
    rejected(
        &tp("    outlierDetection: {maxEjectionPercent: 101}\n"),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "not a percentage",
    );
    rejected(
        &tp("    outlierDetection: {minHealthPercent: -5}\n"),
        "spec.trafficPolicy.outlierDetection.minHealthPercent",
        "not a percentage",
    );
    rejected(
        &tp("    connectionPool:\n      http: {http1MaxPendingRequests: -1}\n"),
        "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
        "must not be negative",
    );
    rejected(
        &tp("    connectionPool:\n      http: {h2UpgradePolicy: SOMETIMES}\n"),
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        "unknown policy",
    );
    rejected(
        &tp("    outlierDetection: {consecutiveLocalOriginFailures: 3}\n"),
        "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        "splitExternalLocalOriginErrors",
    );
}

#[test]
fn consistent_hash() {
    rejected(
        &tp("    loadBalancer:\n      consistentHash: {httpHeaderName: x-user, useSourceIp: true}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
        "only one hash key",
    );
    rejected(
        &tp("    loadBalancer:\n      consistentHash: {ringHash: {minimumRingSize: 64}}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "needs one hash key",
    );
    rejected(
        &tp("    loadBalancer:\n      simple: RANDOM\n      consistentHash: {useSourceIp: true}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "alternatives",
    );
    rejected(
        &tp("    loadBalancer:\n      consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "prime",
    );
    rejected(
        &tp("    loadBalancer:\n      consistentHash: {httpCookie: {name: s, ttl: 1 hour}}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        "1 hour",
    );
    rejected(
        &tp("    loadBalancer:\n      consistentHash: {httpHeaderName: X-User}\n"),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
        "lowercase",
    );
    rejected(
        &tp("    loadBalancer: {simple: PASSTHROUGH}\n"),
        "spec.trafficPolicy.loadBalancer.simple",
        "PASSTHROUGH",
    );
}

/// `localityLbSetting` under `trafficPolicy.loadBalancer`, `body` indented under it.
fn locality(body: &str) -> String {
    tp(&format!(
        "    loadBalancer:\n      localityLbSetting:\n{body}"
    ))
}

const LOCALITY: &str = "spec.trafficPolicy.loadBalancer.localityLbSetting";

#[test]
fn locality_settings_that_load() {
    for body in [
        "        failover: [{from: us-east, to: eu-west}, {from: eu-west, to: us-east}]\n",
        "        distribute:\n        - from: us-east/*\n          to: {\"us-east/zone1/*\": 70, \"us-east/zone2\": 20, eu-west: 10}\n        - {from: \"eu-west/*\", to: {\"*\": 100}}\n",
        "        failoverPriority: [topology.istio.io/network, topology.kubernetes.io/region, version, example.com/tier=gold]\n",
        "        failoverPriority: [topology.istio.io/network, topology.istio.io/cluster]\n        failover: [{from: us-east, to: eu-west}]\n",
        "        enabled: false\n        failover: [{from: us-east, to: eu-west}]\n",
    ] {
        let text = locality(body);
        parse_file("dr.yaml", &text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
    }
}

#[test]
fn distribute_and_failover_are_alternatives() {
    rejected(
        &locality("        distribute: [{from: us-east, to: {us-east: 100}}]\n        failover: [{from: us-east, to: eu-west}]\n"),
        &format!("{LOCALITY}.failover"),
        "distribute and failover are alternatives",
    );
    rejected(
        &locality("        distribute: [{from: us-east, to: {us-east: 100}}]\n        failoverPriority: [version]\n"),
        &format!("{LOCALITY}.failoverPriority"),
        "distribute and failoverPriority are alternatives",
    );
}

#[test]
fn distribute_weights_and_patterns() {
    let d = |to: &str| {
        locality(&format!(
            "        distribute:\n        - from: us-east/*\n          to: {to}\n"
        ))
    };
    rejected(
        &d("{us-east: 70, eu-west: 20}"),
        &format!("{LOCALITY}.distribute[0].to"),
        "add up to 90, not 100",
    );
    rejected(
        &d("{us-east: 0, eu-west: 100}"),
        &format!("{LOCALITY}.distribute[0].to.us-east"),
        "out of range 1-100",
    );
    rejected(
        &d("{}"),
        &format!("{LOCALITY}.distribute[0].to"),
        "at least one locality",
    );
    rejected(
        &d("{\"us-east/*/a\": 100}"),
        &format!("{LOCALITY}.distribute[0].to.us-east/*/a"),
        "`*` stands for a whole part",
    );
    rejected(
        &d("{\"us-east/zo*\": 100}"),
        &format!("{LOCALITY}.distribute[0].to.us-east/zo*"),
        "`*` stands for a whole part",
    );
    rejected(
        &d("{\"us-east//a\": 100}"),
        &format!("{LOCALITY}.distribute[0].to.us-east//a"),
        "an empty part",
    );
    rejected(
        &d("{\"a/b/c/d\": 100}"),
        &format!("{LOCALITY}.distribute[0].to.a/b/c/d"),
        "more than three parts",
    );
    rejected(
        &d("{\"us-east/*\": 50, \"us-east/zone1\": 50}"),
        &format!("{LOCALITY}.distribute[0].to.us-east/zone1"),
        "overlaps `us-east/*`",
    );
    rejected(
        &locality("        distribute:\n        - {from: \"us-east/zone1/*\", to: {us-east: 100}}\n        - {from: us-east, to: {eu-west: 100}}\n"),
        &format!("{LOCALITY}.distribute[1].from"),
        "overlaps distribute[0].from",
    );
    rejected(
        &locality("        distribute:\n        - {from: \"\", to: {us-east: 100}}\n"),
        &format!("{LOCALITY}.distribute[0].from"),
        "not a locality",
    );
}

#[test]
fn failover_regions() {
    let f = |list: &str| locality(&format!("        failover: {list}\n"));
    rejected(
        &f("[{from: us-east, to: us-east}]"),
        &format!("{LOCALITY}.failover[0].to"),
        "another region",
    );
    rejected(
        &f("[{from: us-east/zone1, to: eu-west}]"),
        &format!("{LOCALITY}.failover[0].from"),
        "not a region",
    );
    rejected(
        &f("[{from: us-east, to: \"*\"}]"),
        &format!("{LOCALITY}.failover[0].to"),
        "not a region",
    );
    rejected(
        &f("[{from: us-east, to: eu-west}, {from: us-east, to: ap-south}]"),
        &format!("{LOCALITY}.failover[1].from"),
        "fails over to failover[0].to already",
    );
    rejected(
        &f("[{from: us-east}]"),
        &format!("{LOCALITY}.failover[0]"),
        "missing field `to`",
    );
}

#[test]
fn failover_priority_labels() {
    let p = |list: &str| locality(&format!("        failoverPriority: {list}\n"));
    rejected(
        &p("[\"bad key\"]"),
        &format!("{LOCALITY}.failoverPriority[0]"),
        "not a label key",
    );
    rejected(
        &p("[version, \"-x.io/tier\"]"),
        &format!("{LOCALITY}.failoverPriority[1]"),
        "not a label key",
    );
    rejected(
        &p("[\"version=v 1\"]"),
        &format!("{LOCALITY}.failoverPriority[0]"),
        "not a label value",
    );
    rejected(
        &p("[version, version=v1]"),
        &format!("{LOCALITY}.failoverPriority[1]"),
        "listed already",
    );
    rejected(
        &locality("        failoverPriority: [topology.kubernetes.io/zone]\n        failover: [{from: us-east, to: eu-west}]\n"),
        &format!("{LOCALITY}.failoverPriority[0]"),
        "not together with failover",
    );
}

#[test]
fn subset_and_port_level_locality_settings_are_checked() {
    rejected(
        &dr("  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      portLevelSettings:\n      - port: {number: 9080}\n        loadBalancer:\n          localityLbSetting:\n            failover: [{from: a, to: a}]\n"),
        "spec.subsets[0].trafficPolicy.portLevelSettings[0].loadBalancer.localityLbSetting.failover[0].to",
        "another region",
    );
}

#[test]
fn tls() {
    rejected(
        &tp("    tls: {mode: SIMPLE, credentialName: bank-ca, caCertificates: /ca.pem}\n"),
        "spec.trafficPolicy.tls.caCertificates",
        "credentialName and certificate files are alternatives",
    );
    rejected(
        &tp("    tls: {mode: MUTUAL, caCertificates: /certs/ca.pem}\n"),
        "spec.trafficPolicy.tls.clientCertificate",
        "required with tls mode MUTUAL",
    );
    rejected(
        &tp("    tls: {mode: SIMPLE, caCertificates: certs/ca.pem}\n"),
        "spec.trafficPolicy.tls.caCertificates",
        "absolute path",
    );
    rejected(
        &tp("    tls: {mode: ISTIO_MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}\n"),
        "spec.trafficPolicy.tls.clientCertificate",
        "takes no certificate files",
    );
    rejected(
        &tp("    tls: {mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}\n"),
        "spec.trafficPolicy.tls.insecureSkipVerify",
        "not together",
    );
    rejected(
        &tp("    tls: {mode: OPTIONAL}\n"),
        "spec.trafficPolicy.tls.mode",
        "unknown tls mode",
    );
    // Istio verifies against the system's roots without caCertificates: so does Trellis.
    parse_file("dr.yaml", &tp("    tls: {mode: SIMPLE}\n")).unwrap();
    parse_file(
        "dr.yaml",
        &tp("    tls: {mode: SIMPLE, insecureSkipVerify: true}\n"),
    )
    .unwrap();
}

#[test]
fn subsets_and_port_levels_are_checked_too() {
    rejected(
        &dr("  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      outlierDetection: {maxEjectionPercent: 200}\n"),
        "spec.subsets[0].trafficPolicy.outlierDetection.maxEjectionPercent",
        "not a percentage",
    );
    rejected(
        &tp("    portLevelSettings:\n    - port: {number: 9080}\n      loadBalancer:\n        consistentHash: {}\n"),
        "spec.trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash",
        "needs one hash key",
    );
    rejected(
        &tp("    portLevelSettings:\n    - loadBalancer: {simple: RANDOM}\n"),
        "spec.trafficPolicy.portLevelSettings[0].port",
        "required",
    );
    rejected(
        &tp("    portLevelSettings:\n    - port: {number: 9080}\n    - port: {number: 9080}\n"),
        "spec.trafficPolicy.portLevelSettings[1].port.number",
        "has settings already",
    );
}

#[test]
fn export_to_and_workload_selector() {
    rejected(
        &dr("  exportTo: [\".\"]\n"),
        "spec.exportTo",
        "not supported yet",
    );
    rejected(
        &dr("  exportTo: [\"Not_A_Namespace\"]\n"),
        "spec.exportTo[0]",
        "not `*`, `.` or a namespace",
    );
    parse_file("dr.yaml", &dr("  exportTo: [\"*\", \".\"]\n")).unwrap();
    rejected(
        &dr("  workloadSelector: {matchLabels: {app: web}}\n"),
        "spec.workloadSelector.matchLabels",
        "unknown field",
    );
    rejected(
        &dr("  workloadSelector: {labels: {app: web}}\n"),
        "spec.workloadSelector",
        "not supported yet",
    );
}

/// A port-level setting for a port the service lacks is a cross-object error.
#[test]
fn port_level_settings_name_a_port_of_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{number: 9080, name: http, protocol: HTTP}]\n  workloadSelector: {labels: {app: reviews}}\n";
    std::fs::write(dir.path().join("se.yaml"), se).unwrap();
    let rule = tp("    portLevelSettings:\n    - port: {number: 9090}\n      loadBalancer: {simple: RANDOM}\n");
    std::fs::write(dir.path().join("dr.yaml"), rule).unwrap();
    let (_store, outcome) = MeshStore::open(dir.path()).unwrap();
    assert_eq!(outcome.new_errors.len(), 1, "{:?}", outcome.new_errors);
    let e = &outcome.new_errors[0];
    assert_eq!(
        e.field.as_deref(),
        Some("spec.trafficPolicy.portLevelSettings[0].port.number")
    );
    assert!(e.message.contains("has no port 9090"), "{e}");
}
