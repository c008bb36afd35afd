"""What a campaign is about: its prompts (train and held-out) and, for a tabular world, each prompt's
true game."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from data import prompt_id
from oracles.games import load_game, make_game
from oracles.text_world import text_world_prompts
from pipelines.config import CampaignConfig
from solvers import tabular


@dataclass
class World:
    """What the campaign is about: its prompts (train and held-out) and, for a tabular world, each
    prompt's true game."""

    config: CampaignConfig

    @cached_property
    def games(self) -> dict[str, np.ndarray]:
        out = {}
        for i, spec in enumerate(self.config.games or []):
            P = load_game(spec.path) if spec.kind == "file" else make_game(spec.kind, spec.n, spec.seed, spec.strength)
            out[f"game-{i}: {spec.kind} n={len(P)}"] = P
        return out

    @cached_property
    def splits(self) -> dict[str, list[str]]:
        if self.config.games:
            return {"train": list(self.games), "eval": []}
        cfg = self.config.prompts
        if cfg.source == "text_world":
            train, held_out = text_world_prompts("train"), text_world_prompts("eval")
        else:
            train, held_out = _read_prompts(cfg.source)
        return {"train": train[: cfg.limit_train], "eval": held_out[: cfg.limit_eval]}

    @property
    def prompts(self) -> list[str]:
        """The training prompts."""
        return self.splits["train"]

    @property
    def eval_prompts(self) -> list[str]:
        return self.splits["eval"]

    def prompt_rows(self) -> list[dict]:
        source = "games" if self.config.games else self.config.prompts.source
        return [
            {"prompt_id": prompt_id(p), "prompt": p, "split": split, "source": source}
            for split, prompts in self.splits.items()
            for p in prompts
        ]

    def reference(self) -> dict[str, np.ndarray]:
        """Tabular μ per prompt: softmax of N(0, spread²) logits, seeded, so cyclic games are not trivial."""
        cfg = self.config.policy
        rng = np.random.default_rng(cfg.seed)
        return {p: np.exp(tabular.normalize(cfg.reference_spread * rng.standard_normal(len(P)))) for p, P in self.games.items()}


def _read_prompts(path: str) -> tuple[list[str], list[str]]:
    """A .txt file (one training prompt per line) or .jsonl ({"prompt": ..., "split": "train"|"eval"})."""
    train, held_out = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                    (held_out if row.get("split", "train") == "eval" else train).append(row["prompt"])
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' (and optional 'split')") from None
            else:
                train.append(line.rstrip("\n"))
    if not train:
        raise ValueError(f"{path}: no training prompts")
    return train, held_out
