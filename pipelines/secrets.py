"""Secrets (API keys, annotation-tool tokens) for oracles and samplers.

A config names where a secret lives — a Prefect Secret block, an environment variable of the worker, or
both — and never holds the value. ``resolve`` reads it when a stage needs it; the value goes to the
client that uses it and nowhere else: not into the store, a log line, an artifact or a flow parameter.

As a second line of defence, every value ``resolve`` returns is masked (``***``) in the log records
this process sends to Prefect and in failure messages passed through ``redact``: an HTTP client's error
that quotes the key it was given must not put it in the UI.

Create a block once per workspace (the value is typed at a prompt, not kept in shell history):

    python -c "from getpass import getpass; from prefect.blocks.system import Secret; \\
               Secret(value=getpass('value: ')).save('judge-api-key', overwrite=True)"
"""

from __future__ import annotations

import functools
import logging
import os
import threading

_known: set[str] = set()
_lock = threading.Lock()
MASK = "***"


class SecretNotFound(LookupError):
    """No value where the config says the secret lives; the message says how to provide one."""


def resolve(secret_block_name: str | None = None, env_var: str | None = None) -> str:
    """The secret's value: the Prefect Secret block ``secret_block_name`` if given (and found), else the
    environment variable ``env_var`` of the process that runs the stage (the worker's flow process).

    Raises SecretNotFound naming where it looked — never the value."""
    if not secret_block_name and not env_var:
        raise SecretNotFound("no secret configured: set api_key_secret (a Prefect Secret block) or api_key_env (an environment variable)")
    tried = []
    if secret_block_name:
        value = _from_block(secret_block_name)
        if value:
            return _remember(value)
        tried.append(
            f"Prefect Secret block {secret_block_name!r} does not exist or is empty on {_api()} "
            f"(create it: Secret(value=...).save({secret_block_name!r}), or in the UI under Blocks → Secret)"
        )
    if env_var:
        value = os.environ.get(env_var)
        if value:
            return _remember(value)
        tried.append(f"environment variable {env_var} is not set where the flow runs (set it in the worker's environment or in the deployment's job_variables.env)")
    raise SecretNotFound("; ".join(tried))


def redact(text: str) -> str:
    """``text`` with every secret value this process has resolved replaced by ``***``."""
    with _lock:
        values = sorted(_known, key=len, reverse=True)
    for v in values:
        text = text.replace(v, MASK)
    return text


def _from_block(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name)
    except ValueError:  # "Unable to find block document named …"
        return None
    value = block.get()
    return value if isinstance(value, str) else None


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "the local Prefect API"


def _remember(value: str) -> str:
    with _lock:
        new = value not in _known
        _known.add(value)
    if new:
        _install_log_filter()
    return value


class _RedactingFilter(logging.Filter):
    """Masks resolved secrets in a record's message and traceback before a handler sends it anywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known:
            record.msg, record.args = redact(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        return True


_filter = _RedactingFilter()


def _install_log_filter() -> None:
    """Attach the filter to every handler configured in this process: Prefect's API handlers (run
    loggers), the console, and any a library added."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if _filter not in handler.filters:
            handler.addFilter(_filter)


def scrub_errors(fn):
    """Decorator for a stage that talks to a secret-holding client: an exception whose message quotes a
    resolved secret is re-raised with the value masked (same type where its message can be rewritten),
    so the task's state message in the UI does not show it either."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _known or redact(str(e)) == str(e):
                raise
            e.args = tuple(redact(a) if isinstance(a, str) else a for a in e.args)
            if redact(str(e)) == str(e):
                raise e from None
            raise RuntimeError(f"{type(e).__name__}: {redact(str(e))}") from None

    return wrapper
