#!/usr/bin/env bash
# The test suite on a fresh machine: install (PostgreSQL too, where none answers on 127.0.0.1:5432,
# or PG_TEST_PORT; shellcheck), lint, type-check, then the tests (the slow reliability tests too, unless FAST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_os_packages shellcheck  # the add-on's run.sh is checked with it
ensure_postgres
export TEST_POSTGRES_URL="${TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:$PG_TEST_PORT/postgres}"
ensure_venv "[test,ray]"
export HF_HUB_OFFLINE=1
"$VENV/bin/ruff" check homeiq_trainer tests
"$VENV/bin/ruff" format --check homeiq_trainer tests
"$VENV/bin/mypy"
"$VENV/bin/pytest" "$@"
if [ "${FAST:-0}" != "1" ]; then
    # Soak, fuzz, broker flapping and crash tests: minutes, not seconds. Exit code 5 means the
    # selection found nothing to run, which is not a failure here.
    "$VENV/bin/pytest" -m slow "$@" || [ $? -eq 5 ]
fi
