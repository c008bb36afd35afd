"""Exact NLHF dynamics on finite games: the ground truth the language-model losses are tested against.

Notation (shared with docs/solvers.md): P the preference matrix (P + Pᵀ = 1), μ the reference policy,
β > 0 the KL regularization, ℓ = log π (always normalized), g(π) = P π the win-rate of each response
against π. The β-regularized game has a unique equilibrium π* with

    log π* = log μ + P π* / β − log Z.

Every update is written on log-policies, so that the same formulas serve the exact solver here (g = P π)
and the stochastic tabular policy of the pipelines (g = P̂ π with P̂ estimated from judged pairs).

Nothing here knows an algorithm by name: each algorithm's exact step is a function below, and
``solvers/algorithms.py`` says which algorithm uses which (its registry entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np


def normalize(l: np.ndarray) -> np.ndarray:
    """log-softmax of a log-policy (shifts it so that Σ exp ℓ = 1)."""
    m = l.max()
    return l - (m + np.log(np.exp(l - m).sum()))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p‖q) for distributions on the same finite set."""
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


# ----- the equilibrium and how far a policy is from it ---------------------------------------------


def fixed_point_residual(pi: np.ndarray, P: np.ndarray, mu: np.ndarray, beta: float) -> float:
    """Span (max − min) of log π − log μ − Pπ/β: zero exactly at the regularized equilibrium."""
    r = np.log(pi) - np.log(mu) - P @ pi / beta
    return float(r.max() - r.min())


@dataclass
class Equilibrium:
    pi: np.ndarray
    residual: float
    iterations: int


def regularized_nash(P: np.ndarray, mu: np.ndarray, beta: float, *, tol: float = 1e-12, max_iterations: int = 1_000_000) -> Equilibrium:
    """The β-regularized Nash equilibrium π* ∝ μ exp(Pπ*/β), to a fixed-point residual below ``tol``.

    Mirror prox (linear rate 1/(1+2β), independent of n) brings the residual under 1e-6; Newton's
    method on F(ℓ) = ℓ − log μ − P softmax(ℓ)/β then polishes it quadratically. F(ℓ + c1) = F(ℓ) + c1,
    so the constant direction is harmless: the Jacobian I − P(diag π − ππᵀ)/β maps 1 to 1.
    """
    P, mu = np.asarray(P, float), np.asarray(mu, float)
    log_mu = np.log(mu)
    l, it = normalize(log_mu.copy()), 0
    residual = fixed_point_residual(np.exp(l), P, mu, beta)
    while residual > max(tol, 1e-6) and it < max_iterations:
        l = prox_step(l, log_mu, P @ np.exp(prox_step(l, log_mu, P @ np.exp(l), 2.0, beta)), 2.0, beta)
        it += 1
        residual = fixed_point_residual(np.exp(l), P, mu, beta)
    for _ in range(30):
        if residual <= tol:
            break
        pi = np.exp(l)
        F = l - log_mu - P @ pi / beta
        J = np.eye(len(l)) - (P * pi[None, :] - np.outer(P @ pi, pi)) / beta
        try:
            candidate = normalize(l - np.linalg.solve(J, F - F.mean()))
        except np.linalg.LinAlgError:
            break
        r = fixed_point_residual(np.exp(candidate), P, mu, beta)
        if not r < residual:
            break
        l, residual, it = candidate, r, it + 1
    return Equilibrium(np.exp(l), residual, it)


def duality_gap(pi: np.ndarray, P: np.ndarray, mu: np.ndarray | None = None, beta: float = 0.0) -> float:
    """The regularized duality gap 2(V(π) + β KL(π‖μ)) − 1, V(π) = β log Σ_y μ(y) exp(P(y ≻ π)/β).

    It is ≥ 0 and zero only at the regularized equilibrium. ``beta=0`` gives the unregularized gap
    (exploitability) 2 max_y P(y ≻ π) − 1.
    """
    g = P @ pi
    if beta == 0:
        return float(2 * g.max() - 1)
    V = beta * _logsumexp(np.log(mu) + g / beta)
    return float(2 * (V + beta * kl(pi, mu)) - 1)


# ----- the updates, on log-policies ------------------------------------------------------------------


def mirror_step(l: np.ndarray, log_mu: np.ndarray, g: np.ndarray, step: float, beta: float) -> np.ndarray:
    """Online mirror descent on the β-regularized game (INPO; EGPO's half-steps):
    ℓ' = (1 − sβ) ℓ + sβ log μ + s g, normalized."""
    return normalize((1 - step * beta) * l + step * beta * log_mu + step * g)


def prox_step(l: np.ndarray, log_mu: np.ndarray, g: np.ndarray, eta: float, beta: float) -> np.ndarray:
    """Nash-MP's proximal half-step, KL-to-μ kept inside the prox (arXiv 2505.19731):
    ℓ' = (ℓ + ηβ log μ + η g)/(1 + ηβ), normalized. The paper's η_p is our ηβ."""
    return normalize((l + eta * beta * log_mu + eta * g) / (1 + eta * beta))


def geometric_mixture(l: np.ndarray, log_mu: np.ndarray, weight: float) -> np.ndarray:
    """log of π^{1−w} μ^{w}, normalized (Nash-MD's opponent, arXiv 2312.00886)."""
    return normalize((1 - weight) * l + weight * log_mu)


@dataclass
class Params:
    """The settings of an exact step. ``eta`` is the algorithm's own step parameter (a step size, or
    for MNPO the inverse step, as in its paper); ``solvers.algorithms`` fills in each algorithm's default."""

    beta: float
    eta: float
    history: int = 2  # past iterates kept in State.history (MNPO's H)
    weights: tuple[float, ...] | None = None  # MNPO: λ_1..λ_H, normalized to sum 1; None = uniform
    schedule: str = "constant"  # Nash-MD: "constant" or "decay" (η_t = 2/(β(t+2)))

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.history < 1:
            raise ValueError(f"history must be ≥ 1, got {self.history}")
        if self.weights is None:
            self.weights = (1.0,) * self.history
        self.weights = tuple(float(w) for w in self.weights)
        if len(self.weights) != self.history or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be {self.history} (history) non-negative numbers with a positive sum, got {self.weights}")
        if self.schedule not in ("constant", "decay"):
            raise ValueError(f"schedule must be 'constant' or 'decay', got {self.schedule!r}")

    @property
    def rho(self) -> float:
        """MNPO's ρ: its fixed point is π* with β = ρη, so ρ = β/η."""
        return self.beta / self.eta

    def lambdas(self) -> np.ndarray:
        w = np.asarray(self.weights, float)
        return w / w.sum()


def single_call_step(beta: float) -> float:
    """The default step of the single-call methods (INPO, ONPO, Nash-MD), s = β/(β² + ¼): near P π*,
    the iteration matrix is (1 − sβ)I + sA with A's eigenvalues imaginary and of modulus at most ½;
    that s minimizes |1 − sβ + i s/2|."""
    return beta / (beta**2 + 0.25)


@dataclass
class State:
    """What an algorithm carries from one iteration to the next."""

    l: np.ndarray  # ℓ_t = log π_t
    t: int = 0
    history: list[np.ndarray] = field(default_factory=list)  # ℓ_{t−1}, ℓ_{t−2}, … (MNPO)
    g_prev: np.ndarray | None = None  # g(π_{t−1}) (optimistic mirror descent)

    @property
    def pi(self) -> np.ndarray:
        return np.exp(self.l)


def _advance(params: Params, state: State, l: np.ndarray, **changes) -> State:
    """The next state: ℓ_{t+1} = ``l``, the current ℓ_t pushed onto the history."""
    return replace(state, l=l, t=state.t + 1, history=[state.l, *state.history][: params.history], **changes)


WinRate = Callable[[np.ndarray], np.ndarray]  # π ↦ P π (exact) or an estimate of it


def inpo_step(params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """INPO (arXiv 2407.00617): online mirror descent, ℓ' = (1 − sβ) ℓ + sβ log μ + s Pπ_t, s = ``eta``."""
    return _advance(params, state, mirror_step(state.l, log_mu, win_rate(state.pi), params.eta, params.beta))


def onpo_step(params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """Optimistic online mirror descent: the mirror step with the extrapolated gradient 2 g_t − g_{t−1}."""
    g = win_rate(state.pi)
    g_prev = g if state.g_prev is None else state.g_prev
    return _advance(params, state, mirror_step(state.l, log_mu, 2 * g - g_prev, params.eta, params.beta), g_prev=g)


def mnpo_step(params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """MNPO (arXiv 2509.23102): ℓ_{t+1} = ρ log μ + (1−ρ) Σ_j λ̄_j ℓ_{t−j} + (1/η) P π_t, ρ = β/η.
    Before H iterates exist, the oldest one stands in for the missing ones."""
    past = [state.l, *state.history][: params.history]
    past += [past[-1]] * (params.history - len(past))
    mix = sum(w * p for w, p in zip(params.lambdas(), past))
    return _advance(params, state, normalize(params.rho * log_mu + (1 - params.rho) * mix + win_rate(state.pi) / params.eta))


def nash_md_eta(params: Params, t: int) -> float:
    """Nash-MD's step at iteration t: ``eta``, or 2/(β(t+2)) with the decaying schedule."""
    return 2.0 / (params.beta * (t + 2)) if params.schedule == "decay" else params.eta


def nash_md_opponent(params: Params, state: State, log_mu: np.ndarray) -> np.ndarray:
    """The log-policy Nash-MD's pairs are drawn from: the geometric mixture π_t^{1−ηβ} μ^{ηβ}."""
    return geometric_mixture(state.l, log_mu, nash_md_eta(params, state.t) * params.beta)


def nash_md_step(params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """Nash-MD (arXiv 2312.00886): ℓ_{t+1} = ℓ_mix + η_t P π_mix, ℓ_mix the geometric mixture."""
    l_mix = nash_md_opponent(params, state, log_mu)
    return _advance(params, state, normalize(l_mix + nash_md_eta(params, state.t) * win_rate(np.exp(l_mix))))


def sppo_step(params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """SPPO (arXiv 2405.00675): multiplicative weights, ℓ_{t+1} = ℓ_t + η P π_t (μ only as π_0)."""
    return _advance(params, state, normalize(state.l + params.eta * win_rate(state.pi)))


HalfStep = Callable[[np.ndarray, np.ndarray, np.ndarray, float, float], np.ndarray]  # (ℓ_anchor, log μ, g, η, β) ↦ ℓ'


def extragradient_step(half: HalfStep, params: Params, state: State, log_mu: np.ndarray, win_rate: WinRate) -> State:
    """Both halves of a two-phase iteration, each taken from the anchor ℓ_t: the midpoint with
    g = P π_t, then the next iterate with g = P π_{t+½} (Nash-MP: ``prox_step``; EGPO: ``mirror_step``)."""
    mid = half(state.l, log_mu, win_rate(state.pi), params.eta, params.beta)
    return _advance(params, state, half(state.l, log_mu, win_rate(np.exp(mid)), params.eta, params.beta))


Step = Callable[[Params, State, np.ndarray, WinRate], State]


def iterate(P: np.ndarray, mu: np.ndarray, step: Step, params: Params, pi0: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """π_0, π_1, … of the exact dynamics of ``step`` (endless; take what you need)."""
    log_mu = np.log(np.asarray(mu, float))
    P = np.asarray(P, float)
    state = State(normalize(np.log(pi0) if pi0 is not None else log_mu.copy()))
    while True:
        yield state.pi
        state = step(params, state, log_mu, lambda pi: P @ pi)


@dataclass
class Solution:
    policies: np.ndarray  # (iterations + 1, n): π_0 … π_T
    average: np.ndarray  # (iterations + 1, n): running averages (what SPPO converges in)
    params: Params

    @property
    def last(self) -> np.ndarray:
        return self.policies[-1]


def run(P: np.ndarray, mu: np.ndarray, step: Step, params: Params, iterations: int) -> Solution:
    """``iterations`` exact iterations of ``step`` from π_0 = μ; every iterate and the running averages."""
    it = iterate(P, mu, step, params)
    policies = np.stack([next(it) for _ in range(iterations + 1)])
    average = np.cumsum(policies, axis=0) / np.arange(1, iterations + 2)[:, None]
    return Solution(policies, average, params)


# ----- the unregularized equilibrium of a symmetric zero-sum game: the maximal lottery -----------------


def maximal_lottery(M: np.ndarray, *, tol: float = 1e-10) -> np.ndarray:
    """The Nash equilibrium p of the antisymmetric game M (Mᵀ = −M; e.g. M = W − ½ with W the win-rate
    matrix, W + Wᵀ = 1): a mixture with pᵀ M ≥ 0, no option beats it on average. Fishburn's maximal
    lottery (Rev. Econ. Stud. 1984), the β → 0 end of NLHF's regularized game (Munos et al., arXiv
    2312.00886); unique when M has no zero-sum ties among odd subsets (Laffond, Laslier & Le Breton 1997).

    Solved exactly as a linear program, not by iterating: with A = M + c (c > max |M|, so A > 0 and
    the value is c), the column player's  max Σy s.t. A y ≤ 1, y ≥ 0  is in standard form with the slack
    basis feasible; a dense tableau simplex with Bland's rule (no cycling) finds a vertex y and
    q = y / Σy is the column player's optimal strategy. The game is symmetric, so q is also optimal for
    the row player (M q ≤ 0 ⇔ Mᵀ q ≥ 0), i.e. a maximal lottery. Last, the support S of q is polished
    by solving M_SS q_S = 0, Σ q_S = 1 (complementary slackness), so the result is exact up to
    rounding, not to a tolerance of the simplex."""
    M = np.asarray(M, float)
    n = len(M)
    if M.ndim != 2 or M.shape != (n, n) or n == 0:
        raise ValueError(f"maximal_lottery: M must be a non-empty square matrix, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError("maximal_lottery: M has NaN or infinite entries (a pair of options never compared?)")
    if np.abs(M + M.T).max() > 1e-9:
        raise ValueError(f"maximal_lottery: M is not antisymmetric (max |M + Mᵀ| = {np.abs(M + M.T).max():.3g}); pass W − ½ of a win-rate matrix with W + Wᵀ = 1")
    A = M + 1.0 + np.abs(M).max()
    # tableau [A | I | 1] with the objective row [−1 | 0 | 0]; basis = the slacks
    T = np.zeros((n + 1, 2 * n + 1))
    T[:n, :n], T[:n, n : 2 * n], T[:n, -1] = A, np.eye(n), 1.0
    T[n, :n] = -1.0
    basis = list(range(n, 2 * n))
    for _ in range(50 * n * n + 100):
        entering = next((j for j in range(2 * n) if T[n, j] < -tol), None)
        if entering is None:
            break
        col = T[:n, entering]
        rows = [i for i in range(n) if col[i] > tol]
        ratio = min(T[i, -1] / col[i] for i in rows)  # bounded: A > 0, so some row always qualifies
        leaving = min((i for i in rows if T[i, -1] / col[i] <= ratio + tol), key=lambda i: basis[i])
        T[leaving] /= T[leaving, entering]
        for i in range(n + 1):
            if i != leaving:
                T[i] -= T[i, entering] * T[leaving]
        basis[leaving] = entering
    else:
        raise RuntimeError("maximal_lottery: the simplex did not finish (it cannot cycle under Bland's rule: report this game)")
    y = np.zeros(n)
    for i, b in enumerate(basis):
        if b < n:
            y[b] = max(T[i, -1], 0.0)
    q = y / y.sum()
    return _polish_support(M, q, tol)


def _polish_support(M: np.ndarray, q: np.ndarray, tol: float) -> np.ndarray:
    """q re-solved on its support S from M_SS q_S = 0, Σ q_S = 1; kept as it is if that is not an equilibrium."""
    S = np.flatnonzero(q > 1e-9)
    system = np.vstack([M[np.ix_(S, S)], np.ones(len(S))])
    rhs = np.zeros(len(S) + 1)
    rhs[-1] = 1.0
    q_S, *_ = np.linalg.lstsq(system, rhs, rcond=None)
    polished = np.zeros(len(q))
    polished[S] = q_S
    ok = (q_S >= -tol).all() and np.abs(system @ q_S - rhs).max() < 1e-9 and (M @ polished).max() <= 1e-9
    if not ok:
        return q
    polished = np.clip(polished, 0.0, None)
    return polished / polished.sum()


def maximal_lottery_by_supports(M: np.ndarray, *, max_n: int = 12) -> np.ndarray:
    """An independent check of ``maximal_lottery`` by brute force: for every support S, smallest first,
    solve M_SSᵀ p_S = 0, Σ p_S = 1 (complementary slackness) and return the first p ≥ 0 with Mᵀp ≥ 0.
    2ⁿ linear solves: for tests and benchmarks with n ≤ ``max_n``."""
    M = np.asarray(M, float)
    n = len(M)
    if n > max_n:
        raise ValueError(f"maximal_lottery_by_supports: n = {n} > max_n = {max_n} (2^n supports); use maximal_lottery")
    for size in range(1, n + 1):
        for S in combinations(range(n), size):
            S = list(S)
            A = np.vstack([M[np.ix_(S, S)].T, np.ones(size)])
            rhs = np.r_[np.zeros(size), 1.0]
            x, *_ = np.linalg.lstsq(A, rhs, rcond=None)
            if np.abs(A @ x - rhs).max() > 1e-9 or (x < -1e-12).any():
                continue
            p = np.zeros(n)
            p[S] = x
            if (M.T @ p).min() >= -1e-12:
                return p
    raise RuntimeError("maximal_lottery_by_supports: no support gives an equilibrium (M not antisymmetric?)")
