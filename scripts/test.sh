#!/usr/bin/env bash
# Runs the test suite with the services it needs. Called by `make test` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest "$@"
