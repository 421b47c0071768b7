#!/usr/bin/env bash
# Quick start, command 1: install telerad in .venv and run the demo (a hub and a station
# gateway on loopback, the synthetic sample studies flowing from a "modality" to the hub).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv
"$VENV/bin/pip" install -q -e .
# The OHIF viewer at the hub's /viewer (once; the hub itself never downloads anything).
bash scripts/install_viewer.sh || echo "viewer not installed: the hub's /viewer answers 503" >&2
exec "$VENV/bin/telerad" demo "$@"
