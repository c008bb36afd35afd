"""scripts/label_studio.sh without a real Label Studio: which port `start` takes, and that it refuses a
server answering on that port that is not the one it started. A fake `label-studio` (an http.server with
/health) stands in, so each test takes seconds; tests/test_label_studio.py runs the real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from local_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "label_studio.sh")

FAKE_LABEL_STUDIO = """\
#!{python}
# `label-studio start ... --port N`: serve /health on N (FAKE_LS_MODE=ours), or have a process of another
# session serve it while this one only waits (FAKE_LS_MODE=impostor: someone else answers on the port)
import http.server, os, subprocess, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
if os.environ.get("FAKE_LS_MODE") == "serve":
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{{"status": "UP"}}'
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
if os.environ.get("FAKE_LS_MODE") == "impostor":
    other = subprocess.Popen([sys.executable, __file__, "start", "--port", str(port)], env={{**os.environ, "FAKE_LS_MODE": "serve"}}, start_new_session=True)
    open(os.environ["FAKE_LS_IMPOSTOR_PID"], "w").write(str(other.pid))
    time.sleep(600)
else:
    os.execve(sys.executable, [sys.executable, __file__, "start", "--port", str(port)], {{**os.environ, "FAKE_LS_MODE": "serve"}})
"""

FAKE_PYTHON = """\
#!/usr/bin/env bash
# the fake venv's python: `-m pip show label-studio` says it is installed; anything else is real python
if [ "$*" = "-m pip show label-studio" ]; then echo "Name: label-studio"; echo "Version: 0.0-fake"; exit 0; fi
exec {python} "$@"
"""


@pytest.fixture
def fake_env(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    for name, text in (("label-studio", FAKE_LABEL_STUDIO), ("python", FAKE_PYTHON)):
        (venv / name).write_text(textwrap.dedent(text).format(python=sys.executable))
        (venv / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update(LABEL_STUDIO_VENV=str(tmp_path / "venv"), LABEL_STUDIO_SCRATCH=str(tmp_path / "scratch"), LABEL_STUDIO_START_TIMEOUT="20", PYTHON=sys.executable)
    yield env
    subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, timeout=90)


def control(env, command, **extra):
    return subprocess.run(["bash", SCRIPT, command], env={**env, **extra}, capture_output=True, text=True, timeout=90)


def listening(port: int | None = None) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: the script's probes leave TIME_WAITs
    s.bind(("127.0.0.1", port or 0))
    s.listen()
    return s


def test_a_busy_port_is_never_chosen(fake_env):
    with listening() as busy:
        taken = busy.getsockname()[1]
        asked = control(fake_env, "port", LABEL_STUDIO_PORT=str(taken))
        assert asked.returncode == 1 and f"port {taken} on 127.0.0.1 (LABEL_STUDIO_PORT) is already in use" in asked.stderr
        # the port a previous server used (kept in the scratch folder) is skipped when busy, too
        Path(fake_env["LABEL_STUDIO_SCRATCH"]).mkdir()
        Path(fake_env["LABEL_STUDIO_SCRATCH"], "server.port").write_text(f"{taken}\n")
        chosen = int(control(fake_env, "port").stdout)
        assert chosen != taken
        with listening(chosen):  # it was free: nothing else holds it
            pass
    free = free_port()
    assert control(fake_env, "port", LABEL_STUDIO_PORT=str(free)).stdout.strip() == str(free)
    Path(fake_env["LABEL_STUDIO_SCRATCH"], "server.port").write_text(f"{free}\n")
    assert control(fake_env, "port").stdout.strip() == str(free)  # a restart keeps its URL


def test_8080_busy_gives_another_free_port(fake_env):
    try:
        held = listening(8080)
    except OSError:  # something on this machine holds 8080 already: the case to test
        held = None
    try:
        chosen = control(fake_env, "port")
        assert chosen.returncode == 0 and int(chosen.stdout) != 8080, chosen.stderr
        assert "port 8080 is in use by another program" in chosen.stderr
    finally:
        if held:
            held.close()


def test_start_exports_the_url_its_own_server_answers_on(fake_env):
    with listening(8080) if _free(8080) else _nothing():
        started = control(fake_env, "start")
        assert started.returncode == 0, started.stderr
        env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        url = env["LABEL_STUDIO_URL"]
        assert url != "http://127.0.0.1:8080" and httpx.get(f"{url}/health").json() == {"status": "UP"}
        assert control(fake_env, "status").returncode == 0 and "running at " + url in control(fake_env, "status").stderr
        assert control(fake_env, "env").stdout == started.stdout
    stopped = control(fake_env, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr


def test_start_refuses_a_server_that_is_not_its_own(fake_env, tmp_path):
    pid_file = tmp_path / "impostor.pid"
    started = control(fake_env, "start", FAKE_LS_MODE="impostor", FAKE_LS_IMPOSTOR_PID=str(pid_file))
    try:
        assert started.returncode == 1 and started.stdout == ""
        assert "another program" in started.stderr or "not from the server this script started" in started.stderr, started.stderr
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def _free(port: int) -> bool:
    try:
        listening(port).close()
        return True
    except OSError:
        return False


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
