"""Server processes that a test starts on this machine: a free loopback port, a wait until the server's
health URL answers, and a stop that leaves nothing running. Used by the tests that run a real Prefect
server, a local S3-compatible server and `transformers serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, *, what: str, timeout: float, logs: Callable[[], str], status: int | None = 200, poll: float = 0.5) -> float:
    """Poll ``url`` until it answers with ``status`` (``None``: any answer); fail the test with ``logs()``
    if ``proc`` exits first or ``timeout`` seconds pass. Returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            r = httpx.get(url, timeout=2)
            if status is None or r.status_code == status:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - started > timeout:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout:.0f} s"
            pytest.fail(f"{what} did not start ({state})\n{logs()}", pytrace=False)
        time.sleep(poll)


def stop(proc: subprocess.Popen, *, wait: float = 20) -> None:
    """SIGTERM, then SIGKILL if it lingers past ``wait`` seconds; to its whole process group when it leads
    one (started with start_new_session), so that the server's own children go too."""
    if proc.poll() is not None:
        return
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return
    for sig, seconds in ((signal.SIGTERM, wait), (signal.SIGKILL, 10)):
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(seconds)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def transformers_serve(folder: Path, log_path: Path, *, timeout: float, env: dict | None = None) -> Iterator[str]:
    """`transformers serve FOLDER --device cpu` on a free loopback port, offline, its output in
    ``log_path``; yields its OpenAI-compatible base URL (…/v1) once /health answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", proc, what="transformers serve", timeout=timeout, logs=lambda: log_tail(log_path), poll=0.25)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop(proc, wait=10)
