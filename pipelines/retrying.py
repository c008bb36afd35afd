"""Which failures a task retries: an allow-list of errors that may pass the next time.

A retry is worth it only when the cause is outside the code and the config and may go away by itself:
the network, a server that is restarting or overloaded, the store's filesystem, a GPU another process
is using, a process killed from outside. Everything else fails the same way every time, so a retry only
delays the message that says what to fix: a bad API key (``openai.AuthenticationError``), a missing
Secret block (``pipelines.secrets.SecretNotFound``), a model or route that does not exist (404), a bad
request, a missing checkpoint (``FileNotFoundError``), a bad config or data (``ValueError`` and the
like), a loss that went NaN. The HTTP clients retry their own transient errors first (openai: 2 retries
with back-off); a task retry is the second line, seconds later, for an outage that outlasts them.
"""

from __future__ import annotations

import subprocess
import sys

import httpx

# HTTP answers that mean "not now": request timeout, conflict (a lock), too many requests, server side
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

# OSErrors about a path that is not there or not ours: a config or data mistake, not an outage
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(error: BaseException | None) -> bool:
    """Whether ``error`` may not happen again on a second try (see the module docstring)."""
    if error is None or not isinstance(error, Exception):
        return False
    if isinstance(error, TimeoutError | ConnectionError | httpx.TransportError):  # no answer in time, connection refused or reset
        return True
    if isinstance(error, OSError):  # the store's filesystem or an object store's network (pyarrow raises OSError)
        return not isinstance(error, _PATH_ERRORS)
    status = _status_code(error)
    if status is not None:  # an HTTP error answer: openai.APIStatusError, httpx.HTTPStatusError, Label Studio's ApiError
        return status in RETRY_STATUS
    if _is_openai_connection_error(error):  # openai.APIConnectionError / APITimeoutError: no answer at all
        return True
    if _is_cuda_out_of_memory(error):
        # the GPU slot serializes the tasks of one Prefect server, but another process (a sampling server,
        # another worker's cached memory) can hold the memory for a while; a deterministic OOM fails again
        # after the task's few retries
        return True
    if isinstance(error, subprocess.CalledProcessError):  # a child killed by a signal (OOM killer, preemption)
        return error.returncode < 0
    return False


def worth_retrying(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only the failures ``is_transient`` allows."""
    return is_transient(state.result(raise_on_failure=False))


def _status_code(error: Exception) -> int | None:
    for holder in (error, getattr(error, "response", None)):
        code = getattr(holder, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _is_openai_connection_error(error: Exception) -> bool:
    openai = sys.modules.get("openai")  # only a client that was imported can have raised it
    return openai is not None and isinstance(error, openai.APIConnectionError)


def _is_cuda_out_of_memory(error: Exception) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)
