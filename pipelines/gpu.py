"""The GPU slot: a Prefect global concurrency limit that a task holds while it runs a model.

Every stage that runs a torch model holds it for as long as the model works and no longer: sampling and
scoring a causal-LM policy, its update, the evaluation's samples, a learned preference model's judging
(the ``learned`` oracle, a ``cascade``'s first stage) and its retraining. An LLM judge over HTTP, people
in Label Studio and the tabular world (numpy) never take it, so a round waiting on them leaves the GPU
to other rounds.

The limit is per machine: its name is ``$NASHFLOW_GPU_LIMIT`` in the worker's environment, by default
``gpu-<hostname>``, so rounds on two machines that share one Prefect server do not wait for each other,
and a machine with several GPUs gives each worker its own device and name
(``CUDA_VISIBLE_DEVICES=1 NASHFLOW_GPU_LIMIT=gpu-host-1 prefect worker start …``). Create it once:
``prefect gcl create gpu-$(hostname) --limit 1``. Without the limit nothing waits: the slot is looked
up (one API call, a few ms), found missing, and skipped with one log line per process, so ``nashflow run``
needs no setup. Outside a task run (a notebook, plain-Python tests) the slot does nothing.

Why a context manager and not a task tag: a tag holds its slot for the whole task, and the judge and
evaluation stages mix model work with HTTP calls that can take minutes. The cost: the server does not
release a slot held in code when its task run crashes, so the lease is short (60 s, Prefect's minimum;
renewed while the model works) and a killed process's slot comes back within about 75 s (the lease plus
the server's 15 s sweep).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

ENV = "NASHFLOW_GPU_LIMIT"
LEASE_SECONDS = 60  # the server's minimum: a killed holder's slot is free again soon

_held = threading.local()  # re-entrant per thread: a model stage inside another never waits for itself
_said_missing: set[str] = set()


def limit_name() -> str:
    """The concurrency limit this process's GPU tasks hold: ``$NASHFLOW_GPU_LIMIT`` or ``gpu-<hostname>``."""
    return os.environ.get(ENV) or f"gpu-{socket.gethostname()}"


def policy_runs_model(config) -> bool:
    """Whether the campaign's policy is a torch model (a causal LM); the tabular policy is numpy."""
    return config.policy.kind == "causal_lm"


@contextmanager
def gpu_slot(needed: bool = True):
    """Hold the GPU slot for the block when ``needed``, inside a Prefect task run; waits while another
    task holds it."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get() if needed else None
    if ctx is None or getattr(_held, "depth", 0):
        yield
        return
    name = limit_name()
    if not _limit_exists(name):
        yield
        return
    from prefect import get_run_logger
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    started = time.perf_counter()
    with concurrency(name, lease_duration=LEASE_SECONDS, holder=ConcurrencyLeaseHolder(type="task_run", id=ctx.task_run.id)):
        waited = time.perf_counter() - started
        if waited > 1.0:
            get_run_logger().info("waited %.0f s for the GPU slot %s", waited, name)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


class HoldingGpu:
    """An oracle that holds the GPU slot while it judges (a learned model inside a cascade, whose other
    stages do not need the GPU)."""

    def __init__(self, oracle):
        self.oracle, self.oracle_id = oracle, oracle.oracle_id

    def __repr__(self) -> str:
        return f"HoldingGpu({self.oracle!r})"

    def judge(self, pairs):
        with gpu_slot():
            return self.oracle.judge(pairs)


def _limit_exists(name: str) -> bool:
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        return True
    except ObjectNotFound:
        if name not in _said_missing:
            _said_missing.add(name)
            get_run_logger().info("no concurrency limit %r on this Prefect server: GPU stages run without waiting for each other (create it: prefect gcl create %s --limit 1)", name, name)
        return False
