"""Launching N processes of a project entry point with torchrun, from inside a task.

``python -m torch.distributed.run --standalone`` (one machine; the rendezvous takes a free port, so
two launches on one machine never collide) runs ``python -m MODULE ARGS`` in N processes. Their output
goes line by line into the task's log as it comes. When a process fails, the launch fails with one
line naming the rank and its error: the entry point writes each failing rank's error to
``error_dir/rank-<r>.txt`` (solvers/update_job.py), and torchrun's report names the rank that failed
first (a rank that dies, others then fail waiting for it). A rank killed by a signal (the OOM killer, a
preemption) has written nothing: the line says so, and its negative exit code makes the task's retry
take it for transient (``pipelines.retrying``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import solvers

ROOT = Path(solvers.__file__).resolve().parent.parent  # the project's code, which the processes import too
_PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm lines (loading and writing weights): not worth a log line each


class LaunchError(subprocess.CalledProcessError):
    """A torchrun launch failed; ``str()`` is one line naming the failing rank and its error;
    ``returncode`` is that rank's exit code (negative: killed by that signal)."""

    def __init__(self, message: str, returncode: int, cmd: Sequence[str]):
        super().__init__(returncode, list(cmd))
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_module(module: str, args: Sequence[str], processes: int, *, error_dir: str | os.PathLike, log: Callable[[str], None], what: str = "launch") -> None:
    """Run ``python -m module *args`` in ``processes`` processes under torchrun and wait; raise
    :class:`LaunchError` when any of them fails. ``what`` names the launch in the error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", module, *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))  # N processes share the cores
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    tail: deque[str] = deque(maxlen=400)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line and not _PROGRESS_BAR.search(line):
                log(line)
        returncode = proc.wait()
    if returncode != 0:
        rank, code = _root_cause("\n".join(tail))
        raise LaunchError(failure_line(what, processes, Path(error_dir), rank, code, returncode), code if code is not None else returncode, cmd)


def failure_line(what: str, processes: int, error_dir: Path, rank: int | None, code: int | None, returncode: int) -> str:
    """One line: which rank failed first and why (its own error when it wrote one; the others' errors
    are usually about the rank that went away)."""
    written = {int(p.stem.split("-")[1]): p for p in error_dir.glob("rank-*.txt")} if error_dir.is_dir() else {}
    if rank in written:
        return f"{what} failed: rank {rank} of {processes} raised {written[rank].read_text().strip()}"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        return f"{what} failed: rank {rank} of {processes} was killed by {name} (from outside: the OOM killer, a preemption, a kill)"
    if written:
        first, path = min(written.items(), key=lambda item: item[1].stat().st_mtime)
        return f"{what} failed: rank {first} of {processes} raised {path.read_text().strip()}"
    return f"{what} failed: torchrun exited with {returncode} and no rank reported an error (rank {rank}, exit code {code}); see the task's log above"


def _root_cause(output: str) -> tuple[int | None, int | None]:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" report, where present."""
    _, _, report = output.partition("Root Cause")
    rank = re.search(r"\brank\s*:\s*(\d+)", report)
    code = re.search(r"\bexitcode\s*:\s*(-?\d+)", report)
    return (int(rank.group(1)) if rank else None), (int(code.group(1)) if code else None)
