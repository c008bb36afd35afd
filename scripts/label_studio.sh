#!/usr/bin/env bash
# A local Label Studio server for tests, benchmarks and CI.
#
#   scripts/label_studio.sh install    its own venv (.venv-ls): label-studio would downgrade the
#                                      project's openai and pyarrow if installed beside them
#   eval "$(scripts/label_studio.sh start)"
#                                      start on 127.0.0.1 with a fixed user and legacy API token, wait
#                                      for /health, print `export LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=...`
#   scripts/label_studio.sh stop | restart | status
#
# Settings (environment, with defaults): LABEL_STUDIO_SCRATCH (.scratch/label-studio: database, media,
# pid file, server log), LABEL_STUDIO_PORT (8080), LABEL_STUDIO_API_KEY (a fixed test token; the token
# survives restarts), LABEL_STUDIO_VENV (.venv-ls), PYTHON (python3, to create the venv),
# LABEL_STUDIO_START_TIMEOUT (seconds to wait for /health, 300: a fresh database takes ~30 s alone).
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LABEL_STUDIO_VENV:-$ROOT/.venv-ls}"
SCRATCH="${LABEL_STUDIO_SCRATCH:-$ROOT/.scratch/label-studio}"
PORT="${LABEL_STUDIO_PORT:-8080}"
HOST=127.0.0.1
URL="http://$HOST:$PORT"
# Test-only credentials for a server bound to loopback; override them for anything else.
TOKEN="${LABEL_STUDIO_API_KEY:-nashflow-local-test-token-0001}"
USERNAME="${LABEL_STUDIO_USERNAME:-admin@example.com}"
PASSWORD="${LABEL_STUDIO_PASSWORD:-nashflow-local-password}"
START_TIMEOUT="${LABEL_STUDIO_START_TIMEOUT:-300}"
PIDFILE="$SCRATCH/server.pid"
LOG="$SCRATCH/server.log"

say() { echo "label_studio.sh: $*" >&2; }

installed() { "$VENV/bin/python" -m pip show label-studio >/dev/null 2>&1 && [ -x "$VENV/bin/label-studio" ]; }

cmd_install() {
    if installed; then
        say "already installed in $VENV ($("$VENV/bin/python" -m pip show label-studio | sed -n 's/^Version: //p'))"
        return 0
    fi
    say "installing label-studio into $VENV (about 2 minutes)"
    test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet label-studio
    installed || { say "install failed"; return 1; }
}

server_pid() {  # the pid of the server this script started, if it still runs
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

healthy() { curl -fsS --max-time 5 "$URL/health" >/dev/null 2>&1; }

port_busy() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

print_env() {
    echo "export LABEL_STUDIO_URL=$URL"
    echo "export LABEL_STUDIO_API_KEY=$TOKEN"
}

cmd_start() {
    installed || { say "label-studio is not installed; run: $0 install"; return 1; }
    if server_pid >/dev/null && healthy; then
        say "already running at $URL (pid $(server_pid))"
        print_env
        return 0
    fi
    # A busy port makes label-studio silently choose another one: refuse instead.
    if port_busy; then
        say "port $PORT on $HOST is already in use by another program; set LABEL_STUDIO_PORT"
        return 1
    fi
    mkdir -p "$SCRATCH/data"
    say "starting at $URL (data in $SCRATCH/data, log in $LOG)"
    # No telemetry: the default build reports server errors to Sentry; an empty DSN turns that off.
    # setsid: the server and its children get their own process group, so `stop` ends exactly them.
    LABEL_STUDIO_BASE_DATA_DIR="$SCRATCH/data" \
    LABEL_STUDIO_USERNAME="$USERNAME" LABEL_STUDIO_PASSWORD="$PASSWORD" \
    LABEL_STUDIO_USER_TOKEN="$TOKEN" LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
    LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
    SENTRY_DSN= FRONTEND_SENTRY_DSN= \
        setsid "$VENV/bin/label-studio" start --no-browser --internal-host "$HOST" --port "$PORT" \
        --data-dir "$SCRATCH/data" --enable-legacy-api-token </dev/null >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    local waited=0
    until healthy; do
        if ! server_pid >/dev/null; then
            say "the server exited during start; last lines of $LOG:"
            tail -n 30 "$LOG" >&2
            return 1
        fi
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            say "no answer on $URL/health after ${START_TIMEOUT}s; stopping it"
            cmd_stop
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "ready after ${waited}s"
    print_env
}

cmd_stop() {
    local pid
    if ! pid="$(server_pid)"; then
        say "not running"
        rm -f "$PIDFILE"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    # The port must be free again before a restart, or the new server would pick another one.
    for _ in $(seq 1 30); do
        port_busy || break
        sleep 1
    done
    rm -f "$PIDFILE"
    say "stopped (pid $pid)"
}

cmd_status() {
    if server_pid >/dev/null && healthy; then
        say "running at $URL (pid $(server_pid))"
    else
        say "not running"
        return 1
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    env) print_env ;;
    *) echo "usage: $0 install|start|stop|restart|status|env" >&2; exit 2 ;;
esac
