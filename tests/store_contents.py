"""What tests put into a Parquet store by hand, and what they read back from its files."""

from __future__ import annotations

import os

from data import Store, prompt_id, response_id


def seed_responses(store: Store, prompt: str, texts: list[str], *, round: int, policy_version: str = "v0") -> list[str]:
    """Store ``prompt`` (train split, source "test") and ``texts`` as its responses of ``round`` from
    ``policy_version`` (judged responses must exist); returns their response ids, in order."""
    pid = prompt_id(prompt)
    store.write("prompts", [dict(prompt_id=pid, prompt=prompt, split="train", source="test")])
    ids = [response_id(pid, policy_version, round, i) for i in range(len(texts))]
    store.write("responses", [dict(response_id=r, round=round, policy_version=policy_version, prompt_id=pid, text=t) for r, t in zip(ids, texts)])
    return ids


def parquet_files(root) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every Parquet file under ``root``, sorted: equal before and
    after a run when the run wrote nothing."""
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith(".parquet")
    )
