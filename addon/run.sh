#!/usr/bin/with-contenv bash
# shellcheck shell=bash
# ==============================================================================
# The add-on's CMD, run by s6-overlay's /init as the container's main process.
# with-contenv gives it the container's environment (SUPERVISOR_TOKEN, HF_HOME,
# PATH with the venv). The daemon itself reads /data/options.json and asks the
# Supervisor for the MQTT broker (homeiq_trainer/addon.py), so there is nothing
# to translate here; exec makes it the process that receives SIGTERM on stop.
# ==============================================================================
set -euo pipefail

exec homeiq-trainer serve
