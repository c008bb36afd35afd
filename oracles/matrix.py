"""The matrix-game oracle: exact P(a ≻ b) from a finite game, or a Bernoulli label drawn from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.keys import stable_hash
from oracles.games import check_preference_matrix
from oracles.protocol import Judgment, Pair, make_oracle_id


def action_names(n: int) -> list[str]:
    """The response texts of a finite game with n responses."""
    return [f"y{i}" for i in range(n)]


@dataclass
class MatrixOracle:
    """Judges pairs of a finite game per prompt. ``games`` maps a prompt's text to its matrix;
    responses are named ``y0 … y{n−1}``.

    mode="exact": p_a = P[a, b]. mode="bernoulli": a single vote, a ≻ b with probability P[a, b],
    drawn from a generator seeded by (seed, pair), so asking again gives the same answer.
    """

    games: dict[str, np.ndarray]
    mode: str = "exact"
    seed: int = 0
    name: str = "matrix"

    def __post_init__(self):
        if self.mode not in ("exact", "bernoulli"):
            raise ValueError(f"matrix oracle: mode must be 'exact' or 'bernoulli', got {self.mode!r}")
        self.games = {p: check_preference_matrix(P, name=f"game for prompt {p!r}") for p, P in self.games.items()}
        fingerprint = {p: stable_hash(P.tobytes()) for p, P in sorted(self.games.items())}
        self.oracle_id = make_oracle_id("matrix", self.name, {"mode": self.mode, "seed": self.seed, "games": fingerprint})

    def matrix(self, prompt: str) -> np.ndarray:
        """The true game of a prompt (for ground-truth evaluation)."""
        return self.games[prompt]

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        return [self._judge_one(p) for p in pairs]

    def _judge_one(self, pair: Pair) -> Judgment:
        P = self.games.get(pair.prompt)
        if P is None:
            return Judgment(pair, None, error=f"no game for prompt {pair.prompt!r}", n_votes=0)
        try:
            i, j = _index(pair.a, len(P)), _index(pair.b, len(P))
        except ValueError as e:
            return Judgment(pair, None, error=str(e), n_votes=0)
        if self.mode == "exact":
            return Judgment(pair, float(P[i, j]))
        u = np.random.default_rng(int(stable_hash(self.seed, pair.prompt_id, pair.a_id, pair.b_id, length=8), 16)).uniform()
        return Judgment(pair, 1.0 if u < P[i, j] else 0.0)


def _index(text: str, n: int) -> int:
    if text.startswith("y") and text[1:].isdigit() and int(text[1:]) < n:
        return int(text[1:])
    raise ValueError(f"response {text!r} is not one of y0..y{n - 1}")
