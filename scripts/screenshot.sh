#!/usr/bin/env bash
# Regenerates the pictures of what a user sees in the Prefect UI (docs/ui-flow-run.png, the page of one
# round; docs/ui-round-summary.png, its summary artifact). Not part of the tests or CI.
#
# It does what the README's "Run it with Prefect" says, on a private server: starts `prefect server` on
# a free loopback port with a throwaway PREFECT_HOME, creates the pool and the gpu limit, deploys
# prefect.yaml, starts a worker, runs the campaign deployment (examples/tabular_inpo.yaml, 3 rounds, a
# throwaway store), then takes headless Chromium screenshots. Everything it started is stopped on exit.
#
# Needs chromium (Debian: apt-get install -y chromium) or CHROMIUM=/path/to/chrome.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$CHROMIUM" ] || { echo "screenshot.sh: chromium not found (apt-get install -y chromium, or set CHROMIUM)" >&2; exit 1; }

work=$(mktemp -d)
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_HOME="$work/home" PREFECT_API_URL="http://127.0.0.1:$port/api" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=1 PREFECT_LOGGING_LEVEL=INFO PWD="$PWD"
pids=()
# Job control: each background job gets its own process group, and keeps SIGINT (a non-interactive
# shell would start it ignoring SIGINT, and the worker stops on SIGTERM by sending itself SIGINT).
set -m
cleanup() {  # stop each job's whole process group, the worker's first
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM -- "-${pids[i]}" 2>/dev/null || continue
        for _ in $(seq 30); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-${pids[i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$PY" -m prefect server start --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 0.5; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { tail -20 "$work/server.log" >&2; exit 1; }
"$PY" -m prefect work-pool create nashflow --type process >/dev/null
"$PY" -m prefect concurrency-limit create gpu 1 >/dev/null
"$PY" -m prefect --no-prompt deploy --all >/dev/null
"$PY" -m prefect worker start --pool nashflow >"$work/worker.log" 2>&1 &
pids+=($!)

# Run the campaign and find the pages to photograph: the last round's run and its summary artifact.
pages=$("$PY" - "$work/store" <<'EOF'
import sys, time, httpx

api = httpx.Client(base_url=__import__("os").environ["PREFECT_API_URL"], timeout=30)
dep = api.get("/deployments/name/alignment-campaign/campaign").json()
params = {"config_path": "examples/tabular_inpo.yaml", "store": sys.argv[1], "rounds": 3}
run = api.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params}).json()
for _ in range(600):
    state = api.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
    if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        break
    time.sleep(0.5)
assert state == "COMPLETED", f"the campaign run ended {state}"
time.sleep(3)  # the last logs arrive as the flow process exits
rounds = api.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}, "sort": "START_TIME_DESC"}).json()
summary = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["tabular-inpo-summary"]}}, "sort": "CREATED_DESC", "limit": 1}).json()
print(f"runs/flow-run/{rounds[0]['id']} artifacts/artifact/{summary[0]['id']}")
EOF
)
read -r round_page summary_page <<<"$pages"

shoot() {  # URL path, output file, window size (flags from ../shared/ENVIRONMENT.md)
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --user-data-dir="$(mktemp -d -p "$work")" --window-size="$3" \
        --virtual-time-budget=15000 --hide-scrollbars --screenshot="$2" "http://127.0.0.1:$port/$1" 2>/dev/null
    echo "wrote $2"
}
shoot "$round_page" docs/ui-flow-run.png 1400,900
shoot "$summary_page" docs/ui-round-summary.png 1400,1100
