"""A learned preference model as an oracle: fast, free per query, and able to represent cycles.

    model = load_preference_model(checkpoint)        # solvers/preference_model.py, or any object with
    oracle = LearnedOracle(model)                    # predict(prompts, a_texts, b_texts) -> list[float]
    judgments = oracle.judge(pairs)                  # and a fingerprint (content hash of its checkpoint)

The model is duck-typed, so oracles/ never imports solvers/. ``oracle_id`` carries the fingerprint, so
judgments of two model versions never mix in the store; a model with no fingerprint (trained in memory,
never saved) is refused rather than given an id that would not change with its weights.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Protocol, runtime_checkable

from oracles.protocol import Judgment, Pair, make_oracle_id

KIND = "learned"  # the kind part of oracle_id; data/ and solvers/ leave this kind out of training data


@runtime_checkable
class PreferencePredictor(Protocol):
    fingerprint: str | None

    def predict(self, prompts: list[str], a_texts: list[str], b_texts: list[str]) -> list[float]:
        """P(a ≻ b | prompt) per aligned triple."""
        ...


class LearnedOracle:
    """An ``Oracle`` answering with a preference model's P(a ≻ b). One vote per judgment, no cost;
    the latency is the batch's time shared equally among its pairs."""

    def __init__(self, model: PreferencePredictor, *, name: str = "pairwise", batch_size: int = 64):
        fingerprint = getattr(model, "fingerprint", None)
        if not callable(getattr(model, "predict", None)):
            raise TypeError(f"{type(model).__name__} has no predict(prompts, a_texts, b_texts) method")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("the model has no fingerprint: save it as a checkpoint (and load it) first, so its oracle_id names its weights")
        self.model, self.fingerprint = model, fingerprint
        self._predict_kwargs = {"batch_size": batch_size} if _takes_batch_size(model) else {}
        # the fingerprint in the name, readable in the store, besides the id's hash of it
        self.oracle_id = make_oracle_id(KIND, f"{name}@{fingerprint[:12]}", {"fingerprint": fingerprint})

    def __repr__(self) -> str:
        return f"LearnedOracle({self.oracle_id!r})"

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        if not pairs:
            return []
        started = time.perf_counter()
        ps = list(self.model.predict([p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs], **self._predict_kwargs))
        if len(ps) != len(pairs):
            raise RuntimeError(f"{type(self.model).__name__}.predict returned {len(ps)} probabilities for {len(pairs)} pairs")
        latency = (time.perf_counter() - started) / len(pairs)
        out = []
        for pair, p in zip(pairs, ps):
            p = float(p)
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):  # an abstention with its reason, never a silent ½
                out.append(Judgment(pair, None, n_votes=0, latency_s=latency, error=f"abstained: the model returned {p!r}"))
            else:
                out.append(Judgment(pair, p, latency_s=latency))
        return out

    def metrics(self, judgments: list[Judgment]) -> dict:
        """learned/pairs, learned/abstained, learned/mean_margin (mean |P − ½|: how sure the model is)."""
        answered = [j.p_a for j in judgments if j.p_a is not None]
        return {
            "learned/pairs": len(judgments),
            "learned/abstained": len(judgments) - len(answered),
            "learned/mean_margin": sum(abs(p - 0.5) for p in answered) / len(answered) if answered else None,
        }


def _takes_batch_size(model) -> bool:
    try:
        return "batch_size" in inspect.signature(model.predict).parameters
    except (TypeError, ValueError):
        return False
