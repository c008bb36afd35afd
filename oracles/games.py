"""Finite preference games: P[i, j] = P(response i ≻ response j), with P + Pᵀ = 1 and a diagonal of ½.

These are the ground truth of the tabular world, and the only place preference matrices are
generated or checked.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-9


class GameError(ValueError):
    """A matrix that is not a preference matrix; the message names the entry."""


def check_preference_matrix(P: np.ndarray, *, name: str = "P") -> np.ndarray:
    """Return ``P`` as float64 if it is a preference matrix, else raise :class:`GameError`."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
        raise GameError(f"{name}: a preference matrix is square with n ≥ 2, got shape {P.shape}")
    bad = ~np.isfinite(P) | (P < -TOLERANCE) | (P > 1 + TOLERANCE)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise GameError(f"{name}[{i}, {j}] = {P[i, j]} is not a probability in [0, 1]")
    skew = np.abs(P + P.T - 1.0)
    if skew.max() > TOLERANCE:
        i, j = np.unravel_index(np.argmax(skew), skew.shape)
        raise GameError(
            f"{name}[{i}, {j}] + {name}[{j}, {i}] = {P[i, j] + P[j, i]:.12g}, but a preference matrix has "
            f"P + Pᵀ = 1 (within {TOLERANCE:g}): P(i ≻ j) and P(j ≻ i) must add up to one"
        )
    return np.clip(P, 0.0, 1.0)


def cyclic_game(n: int = 3, strength: float = 1.0) -> np.ndarray:
    """Rock-paper-scissors generalized to n responses: i beats the next ⌊(n−1)/2⌋ responses around
    the circle with probability ``strength``; opposite responses (even n) tie."""
    if n < 3:
        raise GameError(f"cyclic game: n must be at least 3, got {n}")
    if not 0.5 <= strength <= 1.0:
        raise GameError(f"cyclic game: strength must be in [0.5, 1], got {strength}")
    d = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # how far j is ahead of i
    half = (n - 1) // 2
    sign = np.where((d >= 1) & (d <= half), 1.0, np.where(d >= n - half, -1.0, 0.0))
    return 0.5 + (strength - 0.5) * sign


def random_game(n: int, seed: int = 0) -> np.ndarray:
    """P[i, j] ~ U(0, 1) for i > j, P[j, i] = 1 − P[i, j], diagonal ½."""
    rng = np.random.default_rng(seed)
    lower = np.tril(rng.uniform(size=(n, n)), k=-1)
    return lower + np.triu(1.0 - lower.T, k=1) + 0.5 * np.eye(n)


GENERATORS = {"cyclic": cyclic_game, "random": random_game}


def make_game(kind: str, n: int, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    if kind == "cyclic":
        return cyclic_game(n, strength)
    if kind == "random":
        return random_game(n, seed)
    raise GameError(f"unknown game generator {kind!r}; choose one of {sorted(GENERATORS)}")


def load_game(path: str) -> np.ndarray:
    """A preference matrix from a ``.npy`` file, checked."""
    try:
        P = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GameError(f"{path}: cannot read a .npy matrix ({e})") from None
    return check_preference_matrix(P, name=path)
