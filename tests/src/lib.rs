//! Test support for Trellis integration tests that run real processes: Envoy, the `echo`
//! workload of this crate and the Trellis binaries, talking over loopback addresses.
//!
//! Conventions (see `shared/DESIGN.md`, "Testing"):
//! - every spawned process is owned by a [`ChildGuard`], so it dies with the test, even on
//!   panic, and its log tail is printed when the test fails;
//! - tests wait for conditions with [`eventually`] / [`ChildGuard::wait_until`], never with
//!   fixed sleeps;
//! - an end-to-end test calls [`require_envoy`], which skips loudly on a developer machine
//!   without Envoy and fails under `CI=true`;
//! - each test keeps its files (bootstraps, logs) in its own [`test_dir`]. Declare the dir
//!   before the guards so that it is dropped after them and logs stay readable.
//!
//! ```no_run
//! use std::time::Duration;
//! use trellis_tests::*;
//!
//! # fn main() -> anyhow::Result<()> {
//! let Some(envoy_bin) = require_envoy() else { return Ok(()) };
//! let dir = test_dir("example")?;
//! let echo_addr = free_addr(LOCALHOST)?;
//! let _echo = start_echo(dir.path(), echo_addr, "reviews", "v1")?;
//! let (admin, listener) = (free_addr(LOCALHOST)?, free_addr(LOCALHOST)?);
//! let bootstrap = static_proxy_bootstrap(admin, listener, "reviews", echo_addr);
//! let mut envoy = start_envoy(&envoy_bin, dir.path(), "envoy", &bootstrap)?;
//! wait_envoy_live(&mut envoy, admin, ENVOY_START_TIMEOUT)?;
//! let response = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
//!     http_get(listener, "/", &[])
//! });
//! assert_eq!(response.header("x-echo-workload"), Some("reviews"));
//! # Ok(())
//! # }
//! ```

mod dns;
mod echo;
mod envoy;
mod envoy_stats;
mod http;
mod net;
mod paths;
mod process;
mod wait;

pub use dns::start_dns;
pub use echo::{
    start_echo, start_echo_bin, start_echo_mtls, start_echo_tls, start_file_server,
    ECHO_START_TIMEOUT,
};
pub use envoy::{
    envoy_admin_get, envoy_admin_post, envoy_validate, start_envoy, start_envoy_with,
    static_proxy_bootstrap, wait_envoy_admin, wait_envoy_live, AdsBootstrap, EnvoyOptions,
    ENVOY_START_TIMEOUT,
};
pub use envoy_stats::{
    envoy_certs, envoy_stat, envoy_stat_sum, normalize_serial, EnvoyCert, EnvoyCerts,
};
pub use http::{http_get, http_get_json, http_request, HttpResponse, DEFAULT_TIMEOUT};
pub use net::{free_addr, free_port, port_open, LoopbackNet, LOCALHOST};
pub use paths::{cargo_bin, envoy_binary, require_envoy, target_dir, workspace_root};
pub use process::{run_to_completion, test_dir, ChildGuard, TERMINATE_GRACE};
pub use wait::{eventually, eventually_async, poll_until, poll_until_async};

/// Re-exported so tests can send signals (e.g. SIGHUP) via [`ChildGuard::signal`] without
/// depending on `nix` themselves.
pub use nix::sys::signal::Signal;
