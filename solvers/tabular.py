"""Exact NLHF dynamics on finite games: the ground truth the language-model losses are tested against.

Notation (shared with docs/solvers.md): P the preference matrix (P + Pᵀ = 1), μ the reference policy,
β > 0 the KL regularization, ℓ = log π (always normalized), g(π) = P π the win-rate of each response
against π. The β-regularized game has a unique equilibrium π* with

    log π* = log μ + P π* / β − log Z.

Every update is written on log-policies, so that the same formulas serve the exact solver here (g = P π)
and the stochastic tabular policy of the pipelines (g = P̂ π with P̂ estimated from judged pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

ALGORITHMS = ("nash_mp", "egpo", "inpo", "mnpo", "nash_md", "onpo", "sppo")
TWO_PHASE = ("nash_mp", "egpo")  # extragradient-style: a midpoint, then the step from the anchor


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
        l = _prox(l, log_mu, P @ np.exp(_prox(l, log_mu, P @ np.exp(l), 2.0, beta)), 2.0, beta)
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


def _prox(l: np.ndarray, log_mu: np.ndarray, g: np.ndarray, eta: float, beta: float) -> np.ndarray:
    """Nash-MP's proximal half-step, KL-to-μ kept inside the prox (arXiv 2505.19731):
    ℓ' = (ℓ + ηβ log μ + η g)/(1 + ηβ), normalized. The paper's η_p is our ηβ."""
    return normalize((l + eta * beta * log_mu + eta * g) / (1 + eta * beta))


def half_step(algorithm: str, l_anchor: np.ndarray, log_mu: np.ndarray, g: np.ndarray, beta: float, eta: float) -> np.ndarray:
    """One half of a two-phase (extragradient) iteration, always taken from the anchor ℓ_t: with
    g = P π_t it gives the midpoint, with g = P π_{t+½} the next iterate."""
    if algorithm == "nash_mp":
        return _prox(l_anchor, log_mu, g, eta, beta)
    if algorithm == "egpo":
        return mirror_step(l_anchor, log_mu, g, eta, beta)
    raise ValueError(f"{algorithm!r} is not a two-phase algorithm; those are {TWO_PHASE}")


def geometric_mixture(l: np.ndarray, log_mu: np.ndarray, weight: float) -> np.ndarray:
    """log of π^{1−w} μ^{w}, normalized (Nash-MD's opponent, arXiv 2312.00886)."""
    return normalize((1 - weight) * l + weight * log_mu)


@dataclass
class Params:
    """An algorithm and its step sizes. ``eta`` is the algorithm's own step parameter (for MNPO its
    inverse step, as in the paper); None takes the default of :func:`default_eta`."""

    algorithm: str
    beta: float
    eta: float | None = None
    history: int = 2  # MNPO: number of past iterates H
    weights: tuple[float, ...] | None = None  # MNPO: λ_1..λ_H, normalized to sum 1; None = uniform
    schedule: str = "constant"  # Nash-MD: "constant" or "decay" (η_t = 2/(β(t+2)))

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.eta is None:
            self.eta = default_eta(self.algorithm, self.beta)
        if self.algorithm == "mnpo":
            if self.weights is None:
                self.weights = (1.0,) * self.history
            if len(self.weights) != self.history or min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"mnpo: weights must be {self.history} non-negative numbers with a positive sum, got {self.weights}")
            if not 0 < self.rho <= 1:
                raise ValueError(f"mnpo: ρ = β/η = {self.rho} must lie in (0, 1]; raise eta")
        if self.schedule not in ("constant", "decay"):
            raise ValueError(f"schedule must be 'constant' or 'decay', got {self.schedule!r}")

    @property
    def rho(self) -> float:
        """MNPO's ρ: its fixed point is π* with β = ρη, so ρ = β/η."""
        return self.beta / self.eta

    def lambdas(self) -> np.ndarray:
        w = np.asarray(self.weights, float)
        return w / w.sum()

    def nash_md_eta(self, t: int) -> float:
        return 2.0 / (self.beta * (t + 2)) if self.schedule == "decay" else self.eta


def default_eta(algorithm: str, beta: float) -> float:
    """Default steps. Nash-MP: η = 2 (ηL = 1 for the ½-Lipschitz P − ½). EGPO: η = 1/(1+β).
    Single-call methods: s = β/(β² + ¼) — near P π*, the iteration matrix is (1 − sβ)I + sA with A's
    eigenvalues imaginary and of modulus at most ½; that s minimizes |1 − sβ + i s/2|. SPPO: η = 1.
    MNPO's η is the inverse step, so it is 1/s."""
    s = beta / (beta**2 + 0.25)
    return {"nash_mp": 2.0, "egpo": 1.0 / (1.0 + beta), "sppo": 1.0, "mnpo": 1.0 / s}.get(algorithm, s)


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


def opponent(params: Params, state: State, log_mu: np.ndarray) -> np.ndarray:
    """The log-policy the pairs of an iteration's first phase are drawn from (π_t, or Nash-MD's mixture)."""
    if params.algorithm == "nash_md":
        return geometric_mixture(state.l, log_mu, params.nash_md_eta(state.t) * params.beta)
    return state.l


def step(params: Params, state: State, log_mu: np.ndarray, win_rate: Callable[[np.ndarray], np.ndarray]) -> State:
    """One iteration. ``win_rate(π)`` returns P π (exact) or an estimate of it."""
    a, beta, eta, l = params.algorithm, params.beta, params.eta, state.l
    nxt = replace(state, t=state.t + 1, history=[l, *state.history][: params.history])
    if a in TWO_PHASE:
        mid = half_step(a, l, log_mu, win_rate(np.exp(l)), beta, eta)
        nxt.l = half_step(a, l, log_mu, win_rate(np.exp(mid)), beta, eta)
    elif a == "inpo":
        nxt.l = mirror_step(l, log_mu, win_rate(np.exp(l)), eta, beta)
    elif a == "onpo":
        g = win_rate(np.exp(l))
        g_prev = g if state.g_prev is None else state.g_prev
        nxt.l, nxt.g_prev = mirror_step(l, log_mu, 2 * g - g_prev, eta, beta), g
    elif a == "mnpo":
        # ℓ_{t+1} = ρ log μ + (1−ρ) Σ_j λ̄_j ℓ_{t−j} + (1/η) P π_t (arXiv 2509.23102); before H
        # iterates exist, the oldest one stands in for the missing ones.
        past = [l, *state.history][: params.history]
        past += [past[-1]] * (params.history - len(past))
        mix = sum(w * p for w, p in zip(params.lambdas(), past))
        nxt.l = normalize(params.rho * log_mu + (1 - params.rho) * mix + win_rate(np.exp(l)) / eta)
    elif a == "nash_md":
        l_mix = opponent(params, state, log_mu)
        nxt.l = normalize(l_mix + params.nash_md_eta(state.t) * win_rate(np.exp(l_mix)))
    elif a == "sppo":
        nxt.l = normalize(l + eta * win_rate(np.exp(l)))
    return nxt


def iterate(P: np.ndarray, mu: np.ndarray, params: Params, pi0: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """π_0, π_1, … of the exact dynamics (endless; take what you need)."""
    log_mu = np.log(np.asarray(mu, float))
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


def solve(P: np.ndarray, mu: np.ndarray, beta: float, algorithm: str, iterations: int, eta: float | None = None, **options) -> Solution:
    """Run ``iterations`` exact iterations of ``algorithm`` from π_0 = μ; returns every iterate."""
    params = Params(algorithm, beta, eta, **options)
    it = iterate(np.asarray(P, float), mu, params)
    policies = np.stack([next(it) for _ in range(iterations + 1)])
    average = np.cumsum(policies, axis=0) / np.arange(1, iterations + 2)[:, None]
    return Solution(policies, average, params)
