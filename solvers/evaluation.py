"""Evaluation as the NLHF papers report it, as numpy functions of judged pairs (no torch, no store):
the raw win-rate, the length-controlled win-rate (AlpacaEval 2), response-length statistics, and a
population of versions — its win-rate matrix, Bradley–Terry ratings, cyclic triples, the maximal
lottery (``solvers.tabular.maximal_lottery``) and each version's win-rate against that mixture.

Every probability is P(version ≻ opponent) ∈ [0, 1] (a judge's soft label, or 0/½/1); every interval
is a 95% normal interval, given as its half-width (``…_ci95``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from solvers.tabular import maximal_lottery

Z95 = 1.959964


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1/(1+e^{−x}), without overflow


def win_rate(p) -> tuple[float, float]:
    """Mean P(version ≻ opponent) and the half-width 1.96·sd/√n of its 95% interval (NaN for n < 2)."""
    p = np.asarray(p, float)
    if len(p) == 0:
        return float("nan"), float("nan")
    half = Z95 * float(p.std(ddof=1)) / np.sqrt(len(p)) if len(p) > 1 else float("nan")
    return float(p.mean()), half


def length_stats(n_tokens, finish_reasons) -> dict:
    """Mean and median response length in tokens, and the share cut at max_new_tokens (finish_reason "length")."""
    n = np.asarray(n_tokens, float)
    cut = np.asarray([r == "length" for r in finish_reasons], bool)
    if len(n) == 0:
        return {"mean_tokens": float("nan"), "median_tokens": float("nan"), "truncated_share": float("nan")}
    return {"mean_tokens": float(np.nanmean(n)), "median_tokens": float(np.nanmedian(n)), "truncated_share": float(cut.mean())}


# ----- a penalized logistic regression on soft labels, with a sandwich covariance --------------------


@dataclass
class LogisticFit:
    coef: np.ndarray  # (d,)
    cov: np.ndarray  # (d, d) sandwich covariance H⁻¹ (Σ sᵢ sᵢᵀ) H⁻¹, valid for soft labels
    iterations: int


def fit_logistic(X: np.ndarray, y: np.ndarray, penalty: np.ndarray, *, max_iterations: int = 100, tol: float = 1e-10) -> LogisticFit:
    """argmax_b Σᵢ [yᵢ log σ(xᵢb) + (1−yᵢ) log(1−σ(xᵢb))] − ½ Σₖ penaltyₖ bₖ² by Newton's method (IRLS),
    for labels y ∈ [0, 1]. The covariance is the sandwich H⁻¹ B H⁻¹ (H = XᵀDX + diag(penalty), D = σ(1−σ),
    B = Σ sᵢsᵢᵀ with sᵢ = xᵢ(yᵢ − σ(xᵢb))): a soft label is not a Bernoulli draw, so the model-based
    H⁻¹ would misstate the spread."""
    X, y, penalty = np.asarray(X, float), np.asarray(y, float), np.asarray(penalty, float)
    b = np.zeros(X.shape[1])
    for it in range(1, max_iterations + 1):
        q = _sigmoid(X @ b)
        grad = X.T @ (y - q) - penalty * b
        H = (X * (q * (1 - q))[:, None]).T @ X + np.diag(penalty)
        step = np.linalg.solve(H, grad)
        b = b + step
        if np.abs(step).max() < tol:
            break
    q = _sigmoid(X @ b)
    H = (X * (q * (1 - q))[:, None]).T @ X + np.diag(penalty)
    S = X * (y - q)[:, None]
    Hinv = np.linalg.inv(H)
    return LogisticFit(b, Hinv @ (S.T @ S) @ Hinv, it)


# ----- length-controlled win-rate ---------------------------------------------------------------------


def lc_win_rate(p, length_diff, prompt_ids, *, prompt_penalty: float = 1.0, stability_penalty: float = 1e-4) -> dict:
    """The length-controlled win-rate of AlpacaEval 2 (Dubois, Galambosi, Liang & Hashimoto, arXiv
    2404.04475, §3): a logistic model of the preference

        P(m ≻ b | x) = σ( θ  +  φ · tanh(Δℓ / sd(Δℓ))  +  δ_x )

    with θ the version's strength against the baseline (its identity), Δℓ = len(m) − len(b) the length
    difference in tokens under a bounded transform, and δ_x a per-prompt term (the paper's instruction
    difficulty (ψ_m − ψ_b)γ_x; here a ridge-penalized prompt effect, ``prompt_penalty``). The LC win-rate
    is the model's prediction with the length term at zero, averaged over the judged pairs:

        LC = mean_i σ(θ + δ_{x_i}).

    Its interval is the delta method on the sandwich covariance (``fit_logistic``). θ and φ carry a tiny
    ridge (``stability_penalty``) so that a version that wins every pair still has a finite fit. When
    every pair has the same length difference (sd = 0) the length term is left out: LC = the model's
    prediction without it.

    ``p``: P(m ≻ b) per judged pair; ``length_diff``: len(m) − len(b) in tokens; ``prompt_ids``: the
    pair's prompt. Returns ``lc_win_rate``, ``lc_ci95``, ``length_coef`` (φ), ``pairs``."""
    p, d = np.asarray(p, float), np.asarray(length_diff, float)
    prompts = np.asarray(prompt_ids, dtype=object)
    if not (len(p) == len(d) == len(prompts)):
        raise ValueError(f"lc_win_rate: p, length_diff and prompt_ids differ in length ({len(p)}, {len(d)}, {len(prompts)})")
    if len(p) == 0:
        return {"lc_win_rate": float("nan"), "lc_ci95": float("nan"), "length_coef": float("nan"), "pairs": 0}
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("lc_win_rate: p must be probabilities in [0, 1] (drop abstentions first)")
    if not np.isfinite(d).all():
        raise ValueError("lc_win_rate: length_diff has NaN (a response without n_tokens?)")
    sd = float(d.std())
    uniq, index = np.unique(prompts.astype(str), return_inverse=True)
    onehot = np.zeros((len(p), len(uniq)))
    onehot[np.arange(len(p)), index] = 1.0
    has_length = sd > 0
    length = np.tanh(d / sd)[:, None] if has_length else np.zeros((len(p), 0))
    X = np.hstack([np.ones((len(p), 1)), length, onehot])
    penalty = np.concatenate([[stability_penalty], [stability_penalty] * has_length, np.full(len(uniq), prompt_penalty)])
    fit = fit_logistic(X, p, penalty)
    X0 = X.copy()
    if has_length:
        X0[:, 1] = 0.0  # the length term at zero
    q0 = _sigmoid(X0 @ fit.coef)
    grad = ((q0 * (1 - q0))[:, None] * X0).mean(axis=0)
    half = Z95 * float(np.sqrt(max(grad @ fit.cov @ grad, 0.0)))
    return {"lc_win_rate": float(q0.mean()), "lc_ci95": half, "length_coef": float(fit.coef[1]) if has_length else 0.0, "pairs": int(len(p))}


# ----- a population of versions ---------------------------------------------------------------------


def win_rate_matrix(i, j, p, k: int) -> np.ndarray:
    """W[a, b] = mean P(a ≻ b) over the judged pairs of versions a and b, in either order (a row
    (i, j, p) counts as p for W[i, j] and 1 − p for W[j, i]); W[a, a] = ½; NaN where a pair was never
    judged. W + Wᵀ = 1 by construction."""
    i, j, p = np.asarray(i, int), np.asarray(j, int), np.asarray(p, float)
    total, count = np.zeros((k, k)), np.zeros((k, k))
    np.add.at(total, (i, j), p)
    np.add.at(total, (j, i), 1 - p)
    np.add.at(count, (i, j), 1)
    np.add.at(count, (j, i), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        W = total / count
    np.fill_diagonal(W, 0.5)
    return W


def bradley_terry(i, j, p, k: int, *, penalty: float = 1e-4) -> dict:
    """Bradley–Terry ratings r (logit scale) with logit P(a ≻ b) = r_a − r_b, fit on soft labels;
    version 0 (the reference) is the anchor, r_0 = 0, and each interval is relative to it (sandwich
    covariance, ``fit_logistic``). A BT rating is the best *transitive* summary: under intransitive
    preferences it hides the cycles that ``cyclic_triples`` counts."""
    i, j, p = np.asarray(i, int), np.asarray(j, int), np.asarray(p, float)
    X = np.zeros((len(p), k))
    X[np.arange(len(p)), i] += 1.0
    X[np.arange(len(p)), j] -= 1.0
    fit = fit_logistic(X[:, 1:], p, np.full(k - 1, penalty))
    ratings = np.concatenate([[0.0], fit.coef])
    half = np.concatenate([[0.0], Z95 * np.sqrt(np.clip(np.diag(fit.cov), 0.0, None))])
    return {"ratings": ratings, "ci95": half}


def cyclic_triples(W: np.ndarray) -> tuple[int, int]:
    """(cyclic, judged): among the triples of versions whose three pairs are judged, those whose
    majorities go round (a beats b beats c beats a, each W > ½)."""
    cyclic = judged = 0
    for a, b, c in combinations(range(len(W)), 3):
        w = (W[a, b], W[b, c], W[c, a])
        if any(np.isnan(x) for x in w):
            continue
        judged += 1
        cyclic += all(x > 0.5 for x in w) or all(x < 0.5 for x in w)
    return cyclic, judged


def population(W: np.ndarray) -> dict:
    """The answer NLHF gives to "which version should I deploy": the maximal lottery p, the Nash
    equilibrium of the antisymmetric game M = W − ½ (exact, ``tabular.maximal_lottery``), and MNPO's
    mixed-policy evaluation (arXiv 2509.23102): each version's win-rate against that mixture, W p."""
    if np.isnan(W).any():
        a, b = np.argwhere(np.isnan(W))[0]
        raise ValueError(f"population: versions {a} and {b} were never judged against each other; the maximal lottery needs every pair")
    M = 0.5 * (W - W.T)  # = W − ½ when W + Wᵀ = 1, exactly antisymmetric in floating point
    lottery = maximal_lottery(M)
    return {"maximal_lottery": lottery, "win_rate_vs_mix": W @ lottery}


def head_to_head(p, version_tokens, opponent_tokens, prompt_ids, version_finish, opponent_finish) -> dict:
    """One version against one opponent on judged pairs (``p`` = P(version ≻ opponent), abstentions
    dropped): raw win-rate, LC win-rate, each with its 95% half-width, and both sides' lengths."""
    p = np.asarray(p, float)
    raw, raw_half = win_rate(p)
    lc = lc_win_rate(p, np.asarray(version_tokens, float) - np.asarray(opponent_tokens, float), prompt_ids)
    mine, theirs = length_stats(version_tokens, version_finish), length_stats(opponent_tokens, opponent_finish)
    return {
        "win_rate": raw,
        "win_rate_ci95": raw_half,
        "lc_win_rate": lc["lc_win_rate"],
        "lc_win_rate_ci95": lc["lc_ci95"],
        "length_coef": lc["length_coef"],
        "pairs": int(len(p)),
        **mine,
        **{f"opponent_{k}": v for k, v in theirs.items()},
    }
