"""The sample stage's sampler for a policy version, as ``policy.sampler`` chooses: the policy itself
(in process), or an OpenAI-compatible server through solvers/openai_sampler.py — one this module starts
on the version's model folder and stops afterwards (``command``), or one the user runs (``base_url``).

It owns the server's process and port: a free loopback port, the command run in its own process group
(a shell and whatever it starts), a wait until ``/v1/models`` answers, and a stop of the whole group,
whatever happened in between. A command that exits before answering fails the stage with one line
holding its own last output; a server that dies while the stage samples makes the requests fail as
``ServerUnreachable``, which the task retries (pipelines/retrying.py: a ``ConnectionError``), starting it
again; what was stored before is kept (``stages.sample_responses`` writes chunk by chunk).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from data import Store
from pipelines.config import CampaignConfig, ServerSamplerConfig, config_from_settings
from pipelines.secrets import SecretNotFound, resolve
from pipelines.versions import load_policy, served_folder
from pipelines.world import World

TAIL_CHARS = 600  # of the server's output, in an error


class ServerStartError(RuntimeError):
    """The sampling server exited before it answered, or did not answer in time; the message holds its output's tail."""


@contextmanager
def version_sampler(store: Store, config: CampaignConfig, world: World, version: str) -> Iterator:
    """A Policy that samples ``version`` as the config says, for the duration of the block."""
    policy = load_policy(store, version, config, world)
    choice = getattr(config.policy, "sampler", None)  # a tabular policy has no choice
    if choice is None or choice.kind == "local":
        yield policy
        return
    from solvers.openai_sampler import OpenAISampler  # the openai package: only for a server

    with tempfile.TemporaryDirectory(prefix="nashflow-serve-") as tmp:
        if choice.command is None:  # the user's server: the version is the model name
            model = (choice.model or "{version}").replace("{version}", version)
            yield OpenAISampler(policy, _client_config(choice, choice.base_url, model), api_key=_api_key(choice))
            return
        folder = served_folder(store, version, os.path.join(tmp, "model"))
        model = (choice.model or "{checkpoint}").replace("{checkpoint}", folder).replace("{version}", version)
        with started_server(choice.command, folder, log_path=os.path.join(tmp, "server.log"), timeout_s=choice.startup_timeout_s) as base_url:
            yield OpenAISampler(policy, _client_config(choice, base_url, model), api_key="EMPTY")  # ours: no key to send


@contextmanager
def started_server(command: str, folder: str, *, log_path: str, timeout_s: float) -> Iterator[str]:
    """Run ``command`` (``{checkpoint}`` → ``folder``, ``{port}`` → a free loopback port) until the block
    ends; yields the server's base URL (``http://127.0.0.1:<port>/v1``) once ``/v1/models`` answers."""
    port = _free_port()
    line = command.replace("{checkpoint}", shlex.quote(folder)).replace("{port}", str(port))
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(line, shell=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(proc, base_url, log_path, timeout_s)
        try:
            yield base_url
        except Exception as e:
            if proc.poll() is not None and isinstance(e, ConnectionError):  # say why it stopped answering
                e.args = (f"{e} (the sampling server exited with {proc.returncode}: {_tail(log_path)})",)
            raise
    finally:
        _stop(proc)


def _wait_until_up(proc: subprocess.Popen, base_url: str, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while True:
            try:
                if client.get(f"{base_url}/models").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise ServerStartError(f"policy.sampler.command exited with {proc.returncode} before it answered on {base_url}: {_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"policy.sampler.command did not answer on {base_url}/models within {timeout_s:.0f} s (startup_timeout_s): {_tail(log_path)}")
            time.sleep(0.25)


def _stop(proc: subprocess.Popen, wait_s: float = 20.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL if it lingers."""
    for sig, seconds in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(seconds)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.poll()


def _tail(log_path: str) -> str:
    """The end of the server's output on one line (its lines joined by ' | ')."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 4 * TAIL_CHARS))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no output)"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return " | ".join(lines)[-TAIL_CHARS:] or "(no output)"


# the server's settings that are not the client's (or that this module fills in itself)
_NOT_CLIENT = frozenset({"kind", "command", "base_url", "model", "api_key_secret", "api_key_env", "startup_timeout_s"})


def _client_config(choice: ServerSamplerConfig, base_url: str, model: str):
    from solvers.openai_sampler import OpenAISamplerConfig

    return config_from_settings(OpenAISamplerConfig, choice, pipeline_only=_NOT_CLIENT, base_url=base_url, model=model)


def _api_key(choice: ServerSamplerConfig) -> str:
    """The user's server's key, resolved as the LLM judge resolves its own; none set: no key ("EMPTY")."""
    try:
        return resolve(choice.api_key_secret, choice.api_key_env)
    except SecretNotFound:
        if choice.api_key_secret:  # a block named but missing is a mistake to report, not a keyless server
            raise
        return "EMPTY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
