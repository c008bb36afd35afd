"""A reward model's scores in the store: one row per (response, oracle), so a response is scored once
per checkpoint, whichever round or stage asks again (the ``scores`` table; as ``logprobs`` caches
log π(y|x) per (response, policy version)).

    scores = StoredScores(store, oracle_id)
    scores.lookup(["r1", "r2"])        # {"r1": 0.3} (what the store holds)
    scores.save({"r2": -1.2})          # written into r2's round

A score lives in its response's round (a response id names its round), so a store's rounds stay
self-contained; a lookup reads the rows of this oracle and these responses only (filters pushed down
to the Parquet reader), and remembers what it has read.
"""

from __future__ import annotations

import pyarrow.compute as pc

from data.store import Store


class StoredScores:
    """The ``ScoreCache`` of oracles/local_judges.py's reward model, kept in a store."""

    def __init__(self, store: Store, oracle_id: str):
        self.store, self.oracle_id = store, oracle_id
        self._known: dict[str, float] = {}

    def lookup(self, response_ids: list[str]) -> dict[str, float]:
        missing = [i for i in response_ids if i not in self._known]
        if missing:
            where = (pc.field("oracle_id") == self.oracle_id) & pc.field("response_id").isin(missing)
            rows = self.store.read("scores", columns=["response_id", "score"], where=where)
            self._known.update(zip(rows["response_id"], rows["score"].astype(float)))
        return {i: self._known[i] for i in response_ids if i in self._known}

    def save(self, scores: dict[str, float]) -> None:
        if not scores:
            return
        rounds = self.store.read("responses", columns=["response_id", "round"], where=pc.field("response_id").isin(list(scores)))
        round_of = dict(zip(rounds["response_id"], rounds["round"]))
        unknown = [i for i in scores if i not in round_of]
        if unknown:
            raise ValueError(f"scores: response {unknown[0]} (and {len(unknown) - 1} more) is not in the store {self.store}")
        self.store.write("scores", [{"response_id": i, "oracle_id": self.oracle_id, "round": int(round_of[i]), "score": float(s)} for i, s in scores.items()])
        self._known.update(scores)
