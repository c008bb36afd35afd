"""A synthetic judge that likes long answers, with a known strength: the setting in which a raw
win-rate rises while nothing improves, and a length-controlled one should not (tests, bench)."""

from __future__ import annotations

import numpy as np


def length_biased_preference(quality_diff, length_diff, *, strength: float, scale: float = 10.0) -> np.ndarray:
    """P(a ≻ b) = σ(q_a − q_b + strength · tanh((ℓ_a − ℓ_b) / scale)): quality on the logit scale plus a
    saturating bonus for the longer response (``strength`` logits at most, half of it at ~5.5 tokens for scale 10)."""
    x = np.asarray(quality_diff, float) + strength * np.tanh(np.asarray(length_diff, float) / scale)
    return 1.0 / (1.0 + np.exp(-x))


def length_biased_judgments(*, prompts: int, samples: int, quality_gap: float, length_gap: float, strength: float, length_sd: float = 6.0, seed: int = 0) -> dict:
    """One version against a baseline: ``samples`` pairs on each of ``prompts`` prompts, the version's
    responses ``length_gap`` tokens longer on average (both N(·, length_sd²), at least 1 token), its
    quality ``quality_gap`` logits higher, each prompt with its own difficulty (N(0, 0.5²) logits), and a
    0/1 label drawn from the length-biased judge. Returns ``p`` (labels), ``length_diff`` (version −
    baseline, tokens), ``prompt_ids``, and ``true_win_rate`` (the judge's P without the length bonus)."""
    rng = np.random.default_rng(seed)
    n = prompts * samples
    pid = np.repeat(np.arange(prompts), samples)
    difficulty = rng.normal(0.0, 0.5, prompts)[pid]
    base = np.maximum(1, np.round(rng.normal(30.0, length_sd, n)))
    mine = np.maximum(1, np.round(rng.normal(30.0 + length_gap, length_sd, n)))
    p = length_biased_preference(quality_gap + difficulty, mine - base, strength=strength)
    labels = (rng.random(n) < p).astype(float)
    true = 1.0 / (1.0 + np.exp(-(quality_gap + difficulty)))
    return {"p": labels, "length_diff": mine - base, "prompt_ids": [f"prompt-{i}" for i in pid], "true_win_rate": float(true.mean())}
