"""What a campaign is about: its prompts (train and held-out) and, for a tabular world, each prompt's
true game."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from data import prompt_id
from data.prompts import chat_text, message_problem
from oracles.games import load_game, make_game
from oracles.text_world import text_world_prompts
from pipelines.config import CampaignConfig, PromptsConfig
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
            train, held_out = _read_prompts(cfg)
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


HELD_OUT = ("eval", "validation", "test")  # a saved DatasetDict's splits read as held-out prompts


def _read_prompts(cfg: PromptsConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) from ``cfg.source``: a .txt file (one training prompt per
    line), a .jsonl or .parquet file, or a Hugging Face dataset saved to disk. In the last three the
    prompt is column ``cfg.column`` (text, or chat messages, kept as ``data.prompts.chat_text``) and the
    split column ``cfg.split_column`` says "train" or "eval". A bad row is refused with its file, line
    or row, and field."""
    path = cfg.source
    if os.path.isdir(path):
        rows = _dataset_rows(path, cfg)
    elif not os.path.exists(path):
        raise ValueError(f"prompts.source: {path} does not exist")
    elif path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".parquet"):
        rows = _parquet_rows(path, cfg)
    else:
        rows = _text_rows(path, cfg)
    train, held_out = [], []
    for where, row, split in rows:
        split, prompt = _prompt_of(where, row, cfg, split)
        (held_out if split == "eval" else train).append(prompt)
    if not train:
        raise ValueError(f"{path}: no training prompts")
    return train, held_out


def _prompt_of(where: str, row, cfg: PromptsConfig, split: str | None) -> tuple[str, str]:
    """(split, stored prompt text) of one row; ``split`` None: the row's split column says."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with a {cfg.column!r} field, got {type(row).__name__}")
    if cfg.column not in row or row[cfg.column] is None:
        raise ValueError(f"{where}: no {cfg.column!r} field (prompts.column); the row has {', '.join(map(repr, row)) or 'no fields'}")
    value = row[cfg.column]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {cfg.column!r} is empty")
        prompt = value
    else:
        problem = message_problem(value)
        if problem:
            raise ValueError(f"{where}: field {cfg.column!r} is neither text nor chat messages: {problem}")
        prompt = chat_text(value)
    if split is not None:
        return split, prompt
    split = row.get(cfg.split_column) if cfg.split_column else None
    if split not in (None, "train", "eval"):
        raise ValueError(f"{where}: field {cfg.split_column!r} (prompts.split_column) must be 'train' or 'eval', got {split!r}")
    return split or "train", prompt


def _text_rows(path: str, cfg: PromptsConfig):
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", {cfg.column: line.rstrip("\n")}, "train"


def _jsonl_rows(path: str):
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line), None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _parquet_rows(path: str, cfg: PromptsConfig):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError for a file that is not Parquet
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    columns = [c for c in (cfg.column, cfg.split_column) if c in table.column_names]
    if cfg.column not in columns:
        raise ValueError(f"{path}: no column {cfg.column!r} (prompts.column); its columns are {', '.join(table.column_names)}")
    for n, row in enumerate(table.select(columns).to_pylist()):
        yield f"{path} row {n}", row, None


def _dataset_rows(path: str, cfg: PromptsConfig):
    """A ``Dataset`` or ``DatasetDict`` saved with ``save_to_disk``; a DatasetDict's splits say what is held out."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"prompts.source: {path} is a folder; reading a saved Hugging Face dataset needs the datasets package (pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # FileNotFoundError for a folder that is not a saved dataset
        raise ValueError(f"prompts.source: {path} is not a dataset saved with save_to_disk ({e})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for name, part in parts:
        if name is not None and name != "train" and name not in HELD_OUT:
            raise ValueError(f"{path}: split {name!r} is neither train nor one of {', '.join(HELD_OUT)}")
        if cfg.column not in part.column_names:
            raise ValueError(f"{path}{f'[{name}]' if name else ''}: no column {cfg.column!r} (prompts.column); its columns are {', '.join(part.column_names)}")
        split = None if name is None else "train" if name == "train" else "eval"
        for n, row in enumerate(part):
            yield f"{path}{f'[{name}]' if name else ''} row {n}", row, split
