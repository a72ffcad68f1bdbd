#!/usr/bin/env bash
# Shared by demo.sh and test.sh: a virtual environment with CPU torch first, then the package, and
# the OS packages the tests and the demo need (mosquitto, openssl). Safe to run again: it only
# installs what is missing.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# CPU build of torch, installed before anything that depends on it so pip never pulls a CUDA build.
# Where PyPI would serve a CUDA build, point TORCH_INDEX_URL at PyTorch's CPU index.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_os_packages() {
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing OS packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            "$VENV/bin/pip" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
        else
            "$VENV/bin/pip" install -q "$TORCH_SPEC"
        fi
    fi
    "$VENV/bin/pip" install -q -e ".${extras}"
}
