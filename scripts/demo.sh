#!/usr/bin/env bash
# The demo on embedded defaults: local Ray, embedded broker, synthetic events, live table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/raystream demo "$@"
