#!/usr/bin/env bash
# The one test entry point: formatting, lints, every test (with real Envoy), doc tests.
# Used by developers and by CI (.ci/run, with CI=true, where missing Envoy fails the run).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"

step() { printf '\n==> %s\n' "$*"; }

step "install Envoy"
ENVOY_BIN="$(scripts/install-envoy.sh)"
export ENVOY_BIN
echo "ENVOY_BIN=${ENVOY_BIN}"

if ! cargo nextest --version >/dev/null 2>&1; then
    step "install cargo-nextest"
    # Not fatal: without nextest the suite still runs under cargo test.
    cargo install cargo-nextest --locked || echo "cargo-nextest install failed; using cargo test" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# End-to-end tests locate the workspace binaries (xds-server, echo, ...) in target/debug
# via cargo_bin(); test runs only build a package's bins for that package's own tests.
step "cargo build (binaries for end-to-end tests)"
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run"
    cargo nextest run --workspace --no-fail-fast
else
    step "cargo test"
    cargo test --workspace --no-fail-fast
fi

step "doc tests"
cargo test --workspace --doc
