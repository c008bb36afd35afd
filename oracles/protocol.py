"""The oracle protocol: a batch of ordered pairs in, one judgment per pair out.

A synchronous oracle (synthetic, LLM judge, learned model) answers at once with ``judge``; a queued
oracle (people) accepts pairs with ``submit`` and hands back what has been answered with ``collect``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from data.keys import comparison_id, stable_hash
from data.schemas import ANSWERED_KEYS, answered_columns

NOT_JUDGED = "not judged: "  # how a skipped judgment's ``error`` starts, whichever oracle skipped it


@dataclass(frozen=True)
class Pair:
    """An ordered pair of responses to one prompt; ``a`` is shown first."""

    prompt_id: str
    prompt: str
    a_id: str
    a: str
    b_id: str
    b: str


@dataclass
class Judgment:
    """One oracle's answer for one pair. ``p_a`` is P(a ≻ b); None means the oracle abstained and
    ``error`` says why (never a silent default to one side)."""

    pair: Pair
    p_a: float | None
    label: str | None = None  # "a", "b", "tie"
    n_votes: int = 1
    latency_s: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None
    detail: dict = field(default_factory=dict)  # oracle-specific raw answers; no secrets
    skipped: bool = False  # not judged at all (e.g. budget exhausted): not stored, asked again later

    def row(self, oracle_id: str, round: int) -> dict:
        """The comparisons-table row for this judgment."""
        p = self.pair
        return {
            "comparison_id": comparison_id(p.prompt_id, p.a_id, p.b_id, oracle_id),
            "round": round,
            "prompt_id": p.prompt_id,
            "a_id": p.a_id,
            "b_id": p.b_id,
            "oracle_id": oracle_id,
            "p_a": self.p_a,
            "label": self.label if self.label is not None else side(self.p_a),
            "n_votes": self.n_votes if self.p_a is not None else 0,
            "latency_s": self.latency_s,
            "cost_usd": self.cost_usd,
            "error": self.error,
            # who answered, and a cascade's route, go to typed columns; the rest of detail stays raw
            "detail": json.dumps(raw, sort_keys=True) if (raw := {k: v for k, v in self.detail.items() if k not in ANSWERED_KEYS}) else None,
            **answered_columns(oracle_id, self.detail),
        }


def side(p_a: float | None) -> str | None:
    """Which side P(a ≻ b) favours: "a", "b" or "tie" (None for an abstention)."""
    if p_a is None:
        return None
    return "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"


def orders_agree(detail: dict) -> bool | None:
    """Whether an answer's two orders of presentation favour the same side; None when it lacks either.

    ``detail["orders"]`` as oracles/llm_judge.py records it: ``p_first`` of order "ab" (a shown first)
    and of "ba" (b shown first, so a's side there is ``1 − p_first``)."""
    p = {o.get("order"): o.get("p_first") for o in detail.get("orders", [])}
    if p.get("ab") is None or p.get("ba") is None:
        return None
    return side(p["ab"]) == side(1.0 - p["ba"])


@runtime_checkable
class Oracle(Protocol):
    oracle_id: str

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        """One judgment per pair, in order."""
        ...


@runtime_checkable
class QueuedOracle(Protocol):
    oracle_id: str

    def submit(self, pairs: list[Pair], *, round: int) -> None: ...  # round: the campaign round the pairs belong to

    def collect(self) -> list[Judgment]: ...

    def pending(self) -> int: ...


def make_oracle_id(kind: str, name: str, config: dict) -> str:
    """Stable id: kind + name + a hash of the settings that change answers, so two oracles'
    judgments never mix silently. ``config`` must hold no secrets."""
    return f"{kind}:{name}:{stable_hash(json.dumps(config, sort_keys=True, default=str), length=6)}"
