"""Export judgments to the formats preference-tuning tools read (TRL / Hugging Face style)."""

from __future__ import annotations

import pandas as pd

from data.store import Store, StoreError


def preference_pairs(store: Store, *, rounds=None, include_ties: bool = False) -> pd.DataFrame:
    """One row per judged pair: ``prompt, chosen, rejected`` plus ``p_chosen`` (the oracle's
    probability that ``chosen`` is better) and the keys to trace it back. Abstentions are left out;
    ties (P = ½) are kept only with ``include_ties`` (then ``chosen`` is response a)."""
    comps = store.read("comparisons", rounds=rounds)
    comps = comps[comps["p_a"].notna()]
    if not include_ties:
        comps = comps[comps["p_a"] != 0.5]
    texts = store.read("responses").set_index("response_id")["text"]
    prompts = store.read("prompts").set_index("prompt_id")["prompt"]
    a_wins = comps["p_a"] >= 0.5
    out = pd.DataFrame(
        {
            "prompt": comps["prompt_id"].map(prompts).to_numpy(),
            "chosen": comps["a_id"].where(a_wins, comps["b_id"]).map(texts).to_numpy(),
            "rejected": comps["b_id"].where(a_wins, comps["a_id"]).map(texts).to_numpy(),
            "p_chosen": comps["p_a"].where(a_wins, 1.0 - comps["p_a"]).to_numpy(),
            "n_votes": comps["n_votes"].to_numpy(),
            "round": comps["round"].to_numpy(),
            "oracle_id": comps["oracle_id"].to_numpy(),
            "comparison_id": comps["comparison_id"].to_numpy(),
        }
    )
    return out.reset_index(drop=True)


def export_preferences(store: Store, dest: str, *, rounds=None, include_ties: bool = False) -> int:
    """Write :func:`preference_pairs` to ``dest`` (``.parquet`` or ``.jsonl``); returns the row count.
    Refuses to overwrite an existing file."""
    import os

    if os.path.exists(dest):
        raise StoreError(f"{dest}: already exists; choose another path or remove it first")
    df = preference_pairs(store, rounds=rounds, include_ties=include_ties)
    if dest.endswith(".parquet"):
        df.to_parquet(dest, index=False)
    elif dest.endswith(".jsonl"):
        df.to_json(dest, orient="records", lines=True, force_ascii=False)
    else:
        raise StoreError(f"{dest}: unknown export format; use a .parquet or .jsonl file name")
    return len(df)
