#!/usr/bin/env bash
# The test command: set-up, import rules, then the whole suite against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== import rules (pipeline core and pipeline/io never import Ray)"
.venv/bin/lint-imports --no-cache
echo "== tests"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected: that is a failure" >&2
  exit 1
fi
exit "$rc"
