#!/usr/bin/env bash
# Quick start, command 1: install telerad in .venv and run the demo (a hub and a station
# gateway on loopback, the synthetic sample studies flowing from a "modality" to the hub).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv
"$VENV/bin/pip" install -q -e .
exec "$VENV/bin/telerad" demo "$@"
