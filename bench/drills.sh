#!/usr/bin/env bash
# The long fault drills: the tests marked `drill` (recovery drills with faults together, the chaos experiment,
# whole nodes of a multi-node Ray cluster killed, Ray's autoscaler through a lag spike). ~12 minutes on 2 cores;
# the test command leaves them out to stay under 15 minutes. Extra arguments go to pytest (e.g. -k multinode).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/test.sh -m drill "$@"
