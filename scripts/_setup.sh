#!/usr/bin/env bash
# Shared by demo.sh and test.sh: a virtual environment with CPU torch first, then the package, and
# the OS packages the tests and the demo need (mosquitto, openssl; PostgreSQL for the tests). Safe to
# run again: it only installs what is missing.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# CPU build of torch, installed before anything that depends on it so pip never pulls a CUDA build.
# Where PyPI would serve a CUDA build, point TORCH_INDEX_URL at PyTorch's CPU index.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Extra arguments: more tools to install where missing, each a Debian package of the same name.
ensure_os_packages() {
    local missing=() tool
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # Debian's python3 makes no venv without it ("ensurepip is not available").
    "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing OS packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The tests' PostgreSQL: 127.0.0.1, this port, user postgres without a password (trust), as on CI.
PG_TEST_PORT="${PG_TEST_PORT:-5432}"

_pg_answers() {
    (exec 3<>"/dev/tcp/127.0.0.1/$PG_TEST_PORT") 2>/dev/null
}

# The tests log in as postgres without a password; say so plainly where the server refuses that.
_pg_lets_tests_in() {
    command -v psql >/dev/null 2>&1 || return 0
    if ! PGCONNECT_TIMEOUT=5 psql -w -h 127.0.0.1 -p "$PG_TEST_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
        echo "PostgreSQL on 127.0.0.1:$PG_TEST_PORT refuses user postgres without a password: trust 127.0.0.1 in" \
            "its pg_hba.conf, or set TEST_POSTGRES_URL to a server the tests may use" >&2
        return 1
    fi
}

ensure_postgres() {
    # A server that answers is used as it is: never restarted, reconfigured or stopped.
    if _pg_answers; then
        _pg_lets_tests_in
        return
    fi
    local fresh=0 version="" name=""
    if ! command -v pg_createcluster >/dev/null 2>&1; then
        echo "installing PostgreSQL (the tests need one on 127.0.0.1:$PG_TEST_PORT)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
        fresh=1
    fi
    # Debian's package may have created a cluster on the port (stopped, or just made by the install).
    read -r version name _ < <(pg_lsclusters -h 2>/dev/null | awk -v port="$PG_TEST_PORT" '$3 == port' | head -n1) || true
    if [ -z "$version" ]; then
        version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
        name=homeiq_test
        echo "creating PostgreSQL cluster $version/$name on port $PG_TEST_PORT (trust on 127.0.0.1)"
        as_root pg_createcluster "$version" "$name" --port "$PG_TEST_PORT" -- --auth-local=trust --auth-host=trust >/dev/null
    elif [ "$fresh" = 1 ]; then
        # The package's own cluster, made by the install above for these tests: trust 127.0.0.1 as CI does.
        as_root sed -i '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$version/$name/pg_hba.conf"
    fi
    if as_root pg_ctlcluster "$version" "$name" status >/dev/null 2>&1; then
        # Started by the install itself (where apt starts services): read the trust line added above.
        as_root pg_ctlcluster "$version" "$name" reload
    else
        as_root pg_ctlcluster "$version" "$name" start
    fi
    for _ in $(seq 1 60); do
        if _pg_answers; then
            _pg_lets_tests_in
            return
        fi
        sleep 0.5
    done
    echo "PostgreSQL $version/$name did not start on port $PG_TEST_PORT" >&2
    return 1
}

# A virtual environment at $1 with the CPU build of torch (installed before anything that needs it).
_venv_with_torch() {
    local venv="$1"
    if [ ! -x "$venv/bin/pip" ]; then
        # --clear: an earlier attempt without python3-venv left a python and no pip.
        "$PYTHON" -m venv --clear "$venv"
    fi
    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            "$venv/bin/pip" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
        else
            "$venv/bin/pip" install -q "$TORCH_SPEC"
        fi
    fi
}

ensure_venv() {
    local extras="${1:-}"
    _venv_with_torch "$VENV"
    "$VENV/bin/pip" install -q -e ".${extras}"
}

# HomeIQ's own Python packages, as its Ask AI service pins them (transformers below 5), in a venv of
# their own: the tests load a served adapter there the way HomeIQ does, so a format only
# transformers 5 reads cannot pass unnoticed.
HOMEIQ_VENV="${HOMEIQ_VENV:-.venv-homeiq}"
HOMEIQ_PACKAGES=("transformers>=4.46.1,<5.0.0" "peft>=0.12.0,<1.0.0" sentencepiece)

ensure_homeiq_venv() {
    _venv_with_torch "$HOMEIQ_VENV"
    if ! "$HOMEIQ_VENV/bin/python" -c "import peft, transformers" >/dev/null 2>&1; then
        "$HOMEIQ_VENV/bin/pip" install -q "${HOMEIQ_PACKAGES[@]}"
    fi
}
