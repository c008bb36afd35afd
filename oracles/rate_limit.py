"""Pacing and retrying requests to a rate-limited API: a per-minute limiter and backoff (what a judge
may spend is oracles/budget.py's ``Budget``).

Plain asyncio, no threads: every method that reserves does so synchronously before its first ``await``,
so concurrent coroutines of one event loop never race.
"""

from __future__ import annotations

import email.utils
import random
import time


class RateLimiter:
    """At most ``per_minute`` units (requests, or tokens) per minute, paced evenly.

    Generic cell rate algorithm: each reservation of ``amount`` units moves a theoretical arrival time
    forward by ``amount · 60 / per_minute`` seconds; a caller waits until that time minus a burst
    tolerance of ``burst_s`` seconds. A reservation larger than the tolerance is allowed (it waits
    longer), so a big request can never deadlock the limiter. ``adjust`` corrects an estimate once the
    true amount is known (tokens are only counted by the server).
    """

    def __init__(self, per_minute: float, *, burst_s: float = 1.0, clock=time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"rate limit must be positive, got {per_minute}")
        self.interval = 60.0 / per_minute
        self.burst_s = burst_s
        self._clock = clock
        self._tat = clock()

    def reserve(self, amount: float = 1.0) -> float:
        """Reserve ``amount`` units now; returns how many seconds to wait before using them."""
        now = self._clock()
        start = max(now, self._tat - self.burst_s)
        self._tat = max(self._tat, start) + amount * self.interval
        return start - now

    def adjust(self, delta: float) -> None:
        """Count ``delta`` more units (negative: fewer) against the reservations already made."""
        self._tat += delta * self.interval


def retry_after_s(headers) -> float | None:
    """The server's requested wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, *, base_s: float, max_s: float, retry_after: float | None = None,
              rng: random.Random = random._inst) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, …).

    The server's Retry-After is honoured as a minimum (plus up to 10% jitter so a crowd of waiting
    requests does not return at the same instant); otherwise "full jitter" exponential backoff,
    uniform in [0, min(max_s, base_s · 2^(attempt−1))] (AWS Architecture Blog, "Exponential Backoff
    And Jitter", 2015).
    """
    if retry_after is not None:
        return retry_after * (1.0 + 0.1 * rng.random())
    return rng.uniform(0.0, min(max_s, base_s * 2 ** (attempt - 1)))
