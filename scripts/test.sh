#!/usr/bin/env bash
# Runs the test suite with the services it needs. Called by `make test` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false

# Label Studio for the tests marked label_studio: installed in its own venv (.venv-ls), started on
# 127.0.0.1, stopped when the tests end. A server given by LABEL_STUDIO_URL is used as it is. In CI
# (CI=true) any failure here fails the run; elsewhere the Label Studio tests are skipped with a reason.
# NASHFLOW_NO_LABEL_STUDIO=1 skips starting it (local runs only; CI fails those tests instead).
ci() { case "${CI:-}" in 1 | true | TRUE | True | yes) return 0 ;; *) return 1 ;; esac; }
if [ -z "${LABEL_STUDIO_URL:-}" ] && { ci || [ -z "${NASHFLOW_NO_LABEL_STUDIO:-}" ]; }; then
    export LABEL_STUDIO_CONTROL=scripts/label_studio.sh  # the restart test stops and starts it
    already_running=0
    bash "$LABEL_STUDIO_CONTROL" status 2>/dev/null && already_running=1
    if bash "$LABEL_STUDIO_CONTROL" install && ls_env="$(bash "$LABEL_STUDIO_CONTROL" start)"; then
        eval "$ls_env"
        [ "$already_running" = 1 ] || trap 'bash "$LABEL_STUDIO_CONTROL" stop' EXIT
    elif ci; then
        echo "test.sh: Label Studio could not be installed or started; CI needs it" >&2
        exit 1
    else
        echo "test.sh: Label Studio could not be installed or started; its tests will be skipped" >&2
        unset LABEL_STUDIO_CONTROL
    fi
fi

# tests/test_prefect_server.py starts its own Prefect server, worker and S3-compatible server (moto) on
# free loopback ports and stops them; nothing to start here, and PREFECT_API_URL stays unset so the
# other tests keep their prefect_test_harness.
# Not `exec`: the trap above stops Label Studio when pytest ends.
.venv/bin/python -m pytest "$@"
