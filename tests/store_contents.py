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


def store_pairs(store: Store, pairs, *, split: str = "train", source: str = "test") -> None:
    """Store the prompts and responses that ``pairs`` (oracles.protocol.Pair) name, as round 0 of "v0"."""
    store.write("prompts", [dict(prompt_id=p.prompt_id, prompt=p.prompt, split=split, source=source) for p in {p.prompt_id: p for p in pairs}.values()])
    texts = {p.a_id: (p.prompt_id, p.a) for p in pairs} | {p.b_id: (p.prompt_id, p.b) for p in pairs}
    store.write("responses", [dict(response_id=r, round=0, policy_version="v0", prompt_id=pid, text=t) for r, (pid, t) in texts.items()])


def parquet_files(root) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every Parquet file under ``root``, sorted: equal before and
    after a run when the run wrote nothing."""
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith(".parquet")
    )
