#!/usr/bin/env bash
# A local Label Studio server for tests, benchmarks and CI.
#
#   scripts/label_studio.sh install    its own venv (.venv-ls): label-studio would downgrade the
#                                      project's openai and pyarrow if installed beside them
#   eval "$(scripts/label_studio.sh start)"
#                                      start on 127.0.0.1 with a fixed user and legacy API token, wait
#                                      for /health, print `export LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=...`
#   scripts/label_studio.sh stop | restart | status | env
#   scripts/label_studio.sh port       the port `start` would use now (see LABEL_STUDIO_PORT)
#
# Settings (environment, with defaults): LABEL_STUDIO_SCRATCH (.scratch/label-studio: database, media,
# pid file, port file, server log), LABEL_STUDIO_PORT (unset: the last server's port, kept in the scratch
# folder, or 8080, whichever is free, else a free port the system picks; set: that port, refused if busy;
# `start` checks that the server answering there is the one it started), LABEL_STUDIO_API_KEY (a fixed
# test token; the token survives restarts), LABEL_STUDIO_VENV (.venv-ls), PYTHON (python3, to create the venv),
# LABEL_STUDIO_START_TIMEOUT (seconds to wait for /health, 300: a fresh database takes ~30 s alone).
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LABEL_STUDIO_VENV:-$ROOT/.venv-ls}"
SCRATCH="${LABEL_STUDIO_SCRATCH:-$ROOT/.scratch/label-studio}"
HOST=127.0.0.1
DEFAULT_PORT=8080
PORTFILE="$SCRATCH/server.port"
# The port asked for, else that of the last server this script started (PORTFILE), else the default;
# `start` chooses again (choose_port) when it starts a server.
PORT="${LABEL_STUDIO_PORT:-$(cat "$PORTFILE" 2>/dev/null || echo "$DEFAULT_PORT")}"
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

port_busy() { (exec 3<>"/dev/tcp/$HOST/${1:-$PORT}") 2>/dev/null; }

free_port() {  # a port on $HOST that nothing listens on now, picked by the system
    "${PYTHON:-python3}" -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$HOST"
}

choose_port() {  # LABEL_STUDIO_PORT if set (refused when busy), else the last server's port (a restart
                  # keeps its URL), else 8080, whichever is free first, else a free port
    local last
    last="$(cat "$PORTFILE" 2>/dev/null || true)"
    if [ -n "${LABEL_STUDIO_PORT:-}" ]; then
        if port_busy "$LABEL_STUDIO_PORT"; then
            say "port $LABEL_STUDIO_PORT on $HOST (LABEL_STUDIO_PORT) is already in use by another program$(listener_note "$LABEL_STUDIO_PORT"); choose another or unset it to get a free one"
            return 1
        fi
        echo "$LABEL_STUDIO_PORT"
    elif [ -n "$last" ] && ! port_busy "$last"; then
        echo "$last"
    elif ! port_busy "$DEFAULT_PORT"; then
        echo "$DEFAULT_PORT"
    else
        say "port ${last:-$DEFAULT_PORT} is in use by another program$(listener_note "${last:-$DEFAULT_PORT}"); using a free port instead"
        free_port
    fi
}

listener_pids() {  # pids of the processes listening on TCP port $1 (those this user may see)
    if command -v ss >/dev/null 2>&1; then
        ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
    elif command -v lsof >/dev/null 2>&1; then
        lsof -t -nP -iTCP:"$1" -sTCP:LISTEN 2>/dev/null | sort -u
    fi
}

listener_note() {  # " (pid 123: python3 -m http.server 8080)", or nothing when it cannot be seen
    local pid
    pid="$(listener_pids "$1" | head -n 1)"
    [ -n "$pid" ] && echo " (pid $pid: $(ps -o args= -p "$pid" 2>/dev/null | cut -c1-80))"
}

ours_listening() {  # is the process listening on $PORT the server this script started (its session)?
    local server="$1" pid sid
    for pid in $(listener_pids "$PORT"); do
        sid="$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')"
        [ "$pid" = "$server" ] || [ "$sid" = "$server" ] && return 0
    done
    return 1
}

print_env() {
    echo "export LABEL_STUDIO_URL=$URL"
    echo "export LABEL_STUDIO_API_KEY=$TOKEN"
}

cmd_start() {
    installed || { say "label-studio is not installed; run: $0 install"; return 1; }
    local server
    if server="$(server_pid)" && healthy && ours_listening "$server"; then
        say "already running at $URL (pid $server)"
        print_env
        return 0
    fi
    [ -z "$server" ] || cmd_stop  # ours, but not answering on its port: start afresh
    # A busy port makes label-studio silently choose another one: choose a free one, and check below
    # that the server answering on it is ours.
    PORT="$(choose_port)" || return 1
    URL="http://$HOST:$PORT"
    mkdir -p "$SCRATCH/data"
    echo "$PORT" >"$PORTFILE"
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
    local waited=0 pid="$!"
    until healthy && ours_listening "$pid"; do
        if port_busy && ! ours_listening "$pid" && [ -n "$(listener_pids "$PORT")" ]; then
            # another program took the port after it was chosen: ours would move elsewhere silently
            say "port $PORT was taken by another program$(listener_note "$PORT") while Label Studio started; stopping ours (run start again)"
            cmd_stop
            return 1
        fi
        if ! server_pid >/dev/null; then
            say "the server exited during start; last lines of $LOG:"
            tail -n 30 "$LOG" >&2
            return 1
        fi
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            if healthy; then
                say "$URL/health answers, but not from the server this script started (pid $pid)$(listener_note "$PORT"); stopping ours"
            else
                say "no answer on $URL/health after ${START_TIMEOUT}s; stopping it"
            fi
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
    # The port must be free again before a restart, or the new server would pick another one (only ours
    # counts: another program on the port is start's business).
    for _ in $(seq 1 30); do
        ours_listening "$pid" || break
        sleep 1
    done
    rm -f "$PIDFILE"
    say "stopped (pid $pid)"
}

cmd_status() {
    local server
    if server="$(server_pid)" && healthy && ours_listening "$server"; then
        say "running at $URL (pid $server)"
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
    port) choose_port ;;
    *) echo "usage: $0 install|start|stop|restart|status|env|port" >&2; exit 2 ;;
esac
