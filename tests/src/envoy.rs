//! Running real Envoy processes side by side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::http::{http_request, HttpResponse};
use crate::process::ChildGuard;

/// Envoy's start on a loaded 2-core machine can take a few seconds; this is generous.
pub const ENVOY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `--mode validate` may take before it counts as hung.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-request timeout for admin calls: the admin API answers locally and fast.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How an Envoy is started. [`Default`] suits most tests.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// `--log-level`.
    pub log_level: String,
    /// `--concurrency` (worker threads). One keeps many Envoys cheap on a 2-core machine.
    pub concurrency: u32,
    /// `--base-id`; `None` picks one unique within this test process. With hot restart
    /// disabled Envoy opens no shared memory or domain sockets, so this is belt and braces.
    pub base_id: Option<u32>,
    /// Appended last, e.g. `["--component-log-level", "upstream:debug"]`.
    pub extra_args: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            concurrency: 1,
            base_id: None,
            extra_args: Vec::new(),
        }
    }
}

fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread by pid so Envoys of concurrently running test processes differ too.
    let per_process = std::process::id() % 100_000;
    per_process * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

fn write_bootstrap(dir: &Path, name: &str, bootstrap_yaml: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.bootstrap.yaml"));
    std::fs::write(&path, bootstrap_yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts Envoy with `bootstrap_yaml` written to `<dir>/<name>.bootstrap.yaml`, logging to
/// `<dir>/<name>.log`; see [`start_envoy_with`].
pub fn start_envoy(
    envoy: &Path,
    dir: &Path,
    name: &str,
    bootstrap_yaml: &str,
) -> anyhow::Result<ChildGuard> {
    start_envoy_with(envoy, dir, name, bootstrap_yaml, &EnvoyOptions::default())
}

/// Starts Envoy as
/// `envoy -c FILE --base-id N --log-level L --concurrency C --disable-hot-restart`.
///
/// Hot restart is disabled so that any number of Envoys run side by side. Returns once the
/// process is spawned: wait for readiness with [`wait_envoy_admin`] or [`wait_envoy_live`].
pub fn start_envoy_with(
    envoy: &Path,
    dir: &Path,
    name: &str,
    bootstrap_yaml: &str,
    options: &EnvoyOptions,
) -> anyhow::Result<ChildGuard> {
    let config = write_bootstrap(dir, name, bootstrap_yaml)?;
    let base_id = options.base_id.unwrap_or_else(next_base_id);
    let mut command = Command::new(envoy);
    command
        .arg("-c")
        .arg(&config)
        .arg("--base-id")
        .arg(base_id.to_string())
        .arg("--log-level")
        .arg(&options.log_level)
        .arg("--concurrency")
        .arg(options.concurrency.to_string())
        .arg("--disable-hot-restart")
        .args(&options.extra_args);
    ChildGuard::spawn(name, command, dir)
}

/// Runs `envoy --mode validate` on a bootstrap: checks that Envoy accepts a config without
/// binding anything. The error carries Envoy's own complaint.
pub fn envoy_validate(
    envoy: &Path,
    dir: &Path,
    name: &str,
    bootstrap_yaml: &str,
) -> anyhow::Result<()> {
    let config = write_bootstrap(dir, name, bootstrap_yaml)?;
    let mut command = Command::new(envoy);
    command
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&config)
        .arg("--log-level")
        .arg("warning")
        .arg("--disable-hot-restart");
    let mut guard = ChildGuard::spawn(&format!("{name}.validate"), command, dir)?;
    match guard.wait_timeout(VALIDATE_TIMEOUT)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!(
            "Envoy rejected {} ({status}):\n{}",
            config.display(),
            guard.log_tail(20)
        ),
        None => anyhow::bail!("envoy --mode validate still running after {VALIDATE_TIMEOUT:?}"),
    }
}

/// `GET` on Envoy's admin interface, e.g. `envoy_admin_get(admin, "/config_dump")`.
pub fn envoy_admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(admin, "GET", path, &[], &[], ADMIN_TIMEOUT)
}

/// `POST` on Envoy's admin interface (mutating endpoints such as `/healthcheck/fail`).
pub fn envoy_admin_post(admin: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(admin, "POST", path, &[], &[], ADMIN_TIMEOUT)
}

/// Waits until the admin interface answers (Envoy may still be initializing).
pub fn wait_envoy_admin(
    envoy: &mut ChildGuard,
    admin: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    envoy.wait_until(timeout, Duration::from_millis(50), || {
        envoy_admin_get(admin, "/ready").map(drop)
    })
}

/// Waits until `/ready` says `LIVE`: static resources are up and, with xDS, the initial
/// fetch of clusters and listeners completed (or timed out).
pub fn wait_envoy_live(
    envoy: &mut ChildGuard,
    admin: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    envoy.wait_until(timeout, Duration::from_millis(50), || {
        let response = envoy_admin_get(admin, "/ready")?;
        let state = response.text();
        if response.status == 200 && state.trim() == "LIVE" {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "/ready: {} {}",
                response.status,
                state.trim()
            ))
        }
    })
}

/// An Envoy bootstrap that takes listeners and clusters over ADS (gRPC, plaintext) from a
/// control plane at `xds`, as a Trellis sidecar would.
#[derive(Debug, Clone)]
pub struct AdsBootstrap {
    pub node_id: String,
    pub node_cluster: String,
    /// `node.metadata` (free-form; Istio-style keys such as `NAMESPACE` go here).
    pub node_metadata: serde_json::Value,
    pub admin: SocketAddr,
    pub xds: SocketAddr,
}

impl AdsBootstrap {
    pub fn new(node_id: &str, node_cluster: &str, admin: SocketAddr, xds: SocketAddr) -> Self {
        Self {
            node_id: node_id.to_owned(),
            node_cluster: node_cluster.to_owned(),
            node_metadata: json!({}),
            admin,
            xds,
        }
    }

    /// The bootstrap as YAML text (JSON flow style, which is valid YAML).
    pub fn to_yaml(&self) -> String {
        let socket = |addr: SocketAddr| json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}});
        let ads_source = json!({"ads": {}, "resource_api_version": "V3"});
        let bootstrap = json!({
            "node": {
                "id": self.node_id,
                "cluster": self.node_cluster,
                "metadata": self.node_metadata,
            },
            "admin": {"address": socket(self.admin)},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                },
                "cds_config": ads_source,
                "lds_config": ads_source,
            },
            "static_resources": {
                "clusters": [{
                    "name": "xds_cluster",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        },
                    },
                    "load_assignment": {
                        "cluster_name": "xds_cluster",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(self.xds)}}]}],
                    },
                }],
            },
        });
        // Pretty output keeps the file readable when a test keeps its dir for inspection.
        serde_json::to_string_pretty(&bootstrap).unwrap_or_else(|_| bootstrap.to_string())
    }
}

/// A static bootstrap: one HTTP listener on `listener` routing every request to one
/// upstream `upstream` (cluster `name`), admin on `admin`. Useful to check the plumbing
/// (Envoy + echo + client) without a control plane.
pub fn static_proxy_bootstrap(
    admin: SocketAddr,
    listener: SocketAddr,
    name: &str,
    upstream: SocketAddr,
) -> String {
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: "{admin_ip}", port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: "{listener_ip}", port_value: {listener_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: "{name}" }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: "{name}"
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: "{name}"
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{ socket_address: {{ address: "{upstream_ip}", port_value: {upstream_port} }} }}
"#,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        listener_ip = listener.ip(),
        listener_port = listener.port(),
        upstream_ip = upstream.ip(),
        upstream_port = upstream.port(),
    )
}
