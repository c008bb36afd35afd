"""The letter world's pairs and small, fast settings for the preference-model tests (test_preference_model.py
and test_cascade.py)."""

from __future__ import annotations

import random

from data.keys import prompt_id, response_id
from oracles.protocol import Pair
from oracles.text_world import TextWorldOracle, letter_texts, text_world_prompts
from solvers import preference_model as pm
from solvers.causal_lm import tiny_causal_lm

SMALL = pm.PreferenceModelConfig(head_hidden=64, max_prompt_tokens=32, max_response_tokens=32)
FAST = pm.PreferenceTrainConfig(lr=3e-3, schedule="constant", warmup_steps=10, micro_batch_size=32, epochs=6, eval_share=0)


def world_pairs(split: str, *, k: int = 6, seed: int = 0, prompts: int | None = None) -> list[Pair]:
    """Every unordered pair of k responses per prompt of the text world's split, in a random order."""
    rng = random.Random(seed)
    pairs = []
    for p in text_world_prompts(split)[:prompts]:
        pid = prompt_id(p)
        ys = letter_texts(rng, k)
        for i in range(k):
            for j in range(i + 1, k):
                a, b = (i, j) if rng.random() < 0.5 else (j, i)
                pairs.append(Pair(pid, p, response_id(pid, f"s{seed}", 0, a), ys[a], response_id(pid, f"s{seed}", 0, b), ys[b]))
    return pairs


def as_examples(oracle: TextWorldOracle, pairs: list[Pair]) -> list[pm.PairExample]:
    return [pm.PairExample(p.prompt_id, p.prompt, p.a, p.b, oracle.prob(p.a, p.b), 3.0, f"{p.a}>{p.b}@{p.prompt_id}") for p in pairs]


def backbone_folder(path) -> str:
    """A tiny causal LM saved as a transformers folder: what a user points ``init`` at."""
    model, tokenizer = tiny_causal_lm(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
