"""Progress for a person at a terminal. The flows report to whatever reporter is installed; the CLI
installs one that draws with rich, and under a worker nothing is drawn (the Prefect UI shows progress)."""

from __future__ import annotations

from contextlib import contextmanager


class Reporter:
    def round_started(self, round: int, total: int) -> None: ...

    def stage(self, round: int, stage: str) -> None: ...

    def round_finished(self, round: int, metrics: dict) -> None: ...


_reporter = Reporter()


def reporter() -> Reporter:
    return _reporter


@contextmanager
def reporting(r: Reporter):
    global _reporter
    previous, _reporter = _reporter, r
    try:
        yield r
    finally:
        _reporter = previous
