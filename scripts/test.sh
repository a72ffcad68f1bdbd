#!/usr/bin/env bash
# The test suite on a fresh machine: install, lint, type-check, then the tests (the slow
# reliability tests too, unless FAST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_os_packages
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
