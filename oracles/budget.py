"""What an oracle may spend: one ``Budget`` for a cascade stage's per-round limit and an LLM judge's cap.

A budget limits pairs and/or USD. Work is admitted against its worst-case cost and then charged its
true cost, so spending never exceeds the limit as long as the worst case holds. Two ways to admit:

- in bulk, before a batch goes out (oracles/cascade.py): ``room()`` says how many more pairs fit, the
  USD part at ``usd_per_pair`` (the most one pair can cost there); ``spend(pairs, usd)`` then charges
  what the batch really cost;
- one pair at a time while others are in flight (oracles/llm_judge.py: concurrent requests, each pair
  with its own worst case): ``admit(worst_case_usd)`` reserves, ``settle(reserved_usd, spent_usd)``
  charges the true cost and frees the reservation. ``admit`` answers True (go), False (it can never
  fit: nothing else is in flight) or None (it does not fit now, but pairs in flight may settle for
  less: ask again after the next ``settle``). It never blocks, so a caller that holds a worker cannot
  deadlock the work it waits for.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Budget:
    """At most ``pairs`` pairs and/or ``usd`` USD (None: no limit on that count) until ``reset``.
    ``usd_per_pair``: the worst-case cost of one pair, which ``room`` needs with ``usd``."""

    pairs: int | None = None
    usd: float | None = None
    usd_per_pair: float | None = None
    spent_pairs: int = field(default=0, init=False)
    spent_usd: float = field(default=0.0, init=False)
    reserved_pairs: int = field(default=0, init=False)
    reserved_usd: float = field(default=0.0, init=False)

    def __post_init__(self):
        if self.pairs is not None and self.pairs < 0:
            raise ValueError(f"Budget: pairs must be ≥ 0, got {self.pairs}")
        if self.usd is not None and self.usd < 0:
            raise ValueError(f"Budget: usd must be ≥ 0, got {self.usd}")
        if self.usd_per_pair is not None and self.usd_per_pair <= 0:
            raise ValueError(f"Budget: usd_per_pair must be > 0, got {self.usd_per_pair}")

    @property
    def admits_in_bulk(self) -> bool:
        """Whether ``room`` can count pairs: a USD limit needs the worst case of one pair."""
        return self.usd is None or self.usd_per_pair is not None

    def room(self) -> int | None:
        """How many more pairs fit (None: no limit)."""
        if not self.admits_in_bulk:
            raise ValueError("Budget: usd needs usd_per_pair > 0, the worst-case cost of one pair, to count the pairs that fit")
        limits = []
        if self.pairs is not None:
            limits.append(self.pairs - self.spent_pairs - self.reserved_pairs)
        if self.usd is not None:
            limits.append(int((self.usd - self.spent_usd - self.reserved_usd) / self.usd_per_pair + 1e-9))
        return max(0, min(limits)) if limits else None

    def spend(self, pairs: int, usd: float) -> None:
        self.spent_pairs += pairs
        self.spent_usd += usd

    def admit(self, worst_case_usd: float) -> bool | None:
        """Reserve one pair at ``worst_case_usd`` if it fits (see the module docstring)."""
        fits = (self.pairs is None or self.spent_pairs + self.reserved_pairs + 1 <= self.pairs) and (
            self.usd is None or self.spent_usd + self.reserved_usd + worst_case_usd <= self.usd * (1 + 1e-12)
        )
        if fits:
            self.reserved_pairs += 1
            self.reserved_usd += worst_case_usd
            return True
        return None if self.reserved_pairs > 0 else False

    def settle(self, reserved_usd: float, spent_usd: float) -> None:
        """An admitted pair is done: charge what it cost, free what it reserved."""
        self.spend(1, spent_usd)
        self.reserved_pairs = max(0, self.reserved_pairs - 1)
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)

    def reset(self) -> None:
        self.spent_pairs, self.spent_usd = 0, 0.0
