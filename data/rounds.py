"""The rounds table as a campaign reads it: one row per finished round, its metrics as columns.

Kept apart from the pipelines so that ``nashflow status`` reads a store without importing a solver.
"""

from __future__ import annotations

import json

import pandas as pd

from data.store import Store


def rounds_table(store: Store) -> pd.DataFrame:
    """One row per finished round with its metrics as columns; ``perf/round_seconds`` is the sum of the
    stage timings of the run that finished the round (not the time since the campaign started)."""
    rounds = store.read("rounds").sort_values("round")
    if rounds.empty:
        return pd.DataFrame()
    metrics = pd.DataFrame([json.loads(m) for m in rounds["metrics"]], index=rounds.index)
    seconds = pd.Series([sum(json.loads(t).values()) for t in rounds["timings"]], index=rounds.index, name="perf/round_seconds")
    return pd.concat([rounds[["round", "policy_version", "solver"]], metrics, seconds], axis=1).reset_index(drop=True)
