"""Asking only what is missing: the pairs an oracle has not judged yet, according to the store, and
the pairs of a list of keys with their texts read back from it.

The store is the cache (DESIGN.md): a pair is judged once per ``oracle_id``, across rounds and restarts,
because its comparison is stored under ``comparison_id(prompt_id, a_id, b_id, oracle_id)``. A judgment
with ``skipped=True`` (budget exhausted, retries used up) is not stored, so its pair stays missing and is
asked again next time.
"""

from __future__ import annotations

from collections.abc import Iterable

from data.keys import comparison_id
from oracles.protocol import Pair


def unjudged(pairs: Iterable[Pair], oracle_id: str, store, *, rounds: Iterable[int] | None = None) -> list[Pair]:
    """The pairs with no stored comparison by ``oracle_id`` (in ``rounds``, default all), in order.
    ``store`` is a ``data.store.Store`` (anything with ``keys("comparisons", rounds=...)``)."""
    stored = {k[0] for k in store.keys("comparisons", rounds=rounds)}
    return [p for p in pairs if comparison_id(p.prompt_id, p.a_id, p.b_id, oracle_id) not in stored]


def pairs_from_keys(store, keys: list[tuple[str, str, str]], *, round: int) -> list[Pair]:
    """The pairs of ``pipelines.stages.pair_keys`` (prompt_id, a_id, b_id), in order, with their texts
    read back from the store (the round's responses and the prompts)."""
    if not keys:
        return []
    stored = store.read("responses", rounds=[round], columns=["response_id", "text"])
    texts = dict(zip(stored["response_id"], stored["text"]))  # dicts: a pandas lookup per pair costs seconds at 8k pairs
    prompts = store.read("prompts", columns=["prompt_id", "prompt"])
    prompts = dict(zip(prompts["prompt_id"], prompts["prompt"]))
    missing = sorted({r for _, a, b in keys for r in (a, b)} - texts.keys())
    if missing:
        raise ValueError(f"round {round}: {len(missing)} paired responses are not in the store {store} (first {missing[0]}); run the round again from its sample stage")
    return [Pair(pid, prompts[pid], a, texts[a], b, texts[b]) for pid, a, b in keys]
