#!/usr/bin/env bash
# The test suite on a fresh machine: install (PostgreSQL too, where none answers on 127.0.0.1:5432,
# or PG_TEST_PORT; shellcheck), lint, type-check, then the tests (the slow reliability tests too, unless FAST=1),
# on TEST_WORKERS pytest-xdist workers (default: one per core; 0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_os_packages shellcheck  # the add-on's run.sh and these scripts are checked with it
[ -n "${TEST_POSTGRES_URL:-}" ] || ensure_postgres  # a server of the caller's own is used as it is
export TEST_POSTGRES_URL="${TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:$PG_TEST_PORT/postgres}"
ensure_venv "[test,ray]"
ensure_homeiq_venv  # HomeIQ's transformers 4, for the test that loads an adapter as HomeIQ does
export HF_HUB_OFFLINE=1
"$VENV/bin/ruff" check homeiq_trainer tests
"$VENV/bin/ruff" format --check homeiq_trainer tests
"$VENV/bin/mypy"
# The slow reliability tests (soak, fuzz, broker flapping, crashes: minutes, not seconds) run in
# the same session unless FAST=1 (an empty -m lifts pyproject's `not slow`). One pytest-xdist worker
# per core, each pinned to its own (tests/conftest.py): most of a test's time is a training process
# importing torch on one core, so two workers nearly halve the suite on two cores.
marks="not slow"
if [ "${FAST:-0}" != "1" ]; then
    marks=""
fi
# nproc counts the cores this process may use, as tests/conftest.py does (-n auto counts the host's).
"$VENV/bin/pytest" -n "${TEST_WORKERS:-$(nproc)}" --dist worksteal -m "$marks" "$@"
