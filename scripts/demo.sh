#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the daemon end to end against a private
# Mosquitto with a demo HomeIQ database and a locally built model, pressing Start over MQTT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
# shellcheck disable=SC2119  # its arguments are extra tools, and the demo needs none
ensure_os_packages
ensure_venv ""
export HF_HUB_OFFLINE=1
exec "$VENV/bin/homeiq-trainer" demo "$@"
