"""The registry of NLHF algorithms: one entry per algorithm, and the only place that knows one by name.

An entry says everything the rest of nashflow asks about an algorithm:

- its exact tabular step (``solvers/tabular.py``), its default step size and its settings' checks;
- its language-model loss (``solvers/losses.py``) with the loss's typed config;
- how a round runs it: the phases (extragradient methods sample, judge and update twice: a midpoint,
  then the step from the anchor), whether an example is a pair or one response, which past iterates'
  log-probs it needs, and whom a sample is compared with (its own policy, or Nash-MD's mixture).

The campaign config (``pipelines/config.py``) builds its typed ``solver`` settings from these entries;
the trainer, the update stage and the flows read them. Adding an algorithm is its entry here, its
exact step and/or loss, and their tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from solvers import losses, tabular

@dataclass(frozen=True)
class Algorithm:
    name: str
    title: str  # the algorithm and its source, as docs and logs name it
    step: tabular.Step | None = None  # exact tabular iteration; None: a language-model baseline only
    half_step: tabular.HalfStep | None = None  # extragradient methods: the half-step taken twice from the anchor
    default_eta: Callable[[float], float] = tabular.single_call_step  # β ↦ the tabular step parameter
    tabular_fields: tuple[str, ...] = ("beta", "eta")  # the tabular.Params fields it reads
    check: Callable[[tabular.Params], None] | None = None  # refuses tabular settings it cannot run with
    loss: losses.LossSpec | None = None  # the causal-LM loss; None: tabular dynamics only
    per_response: bool = False  # an LM example is one response y (its win-rate), not a pair (y, y')
    opponent: Literal["self", "mixture"] = "self"  # LM: a sample is compared with samples of π_t, or of π_t^{1−m} μ^m
    averaged: bool = False  # the iterates' running average converges, not the last iterate (SPPO)

    @property
    def phases(self) -> tuple[str, ...]:
        """The sample → judge → update phases of one round."""
        return ("midpoint", "update") if self.half_step is not None else ("update",)

    @property
    def has_tabular(self) -> bool:
        return self.step is not None or self.half_step is not None

    def params(self, beta: float, eta: float | None = None, **options) -> tabular.Params:
        """Exact-step settings; ``eta`` None takes this algorithm's default."""
        if not self.has_tabular:
            raise ValueError(f"{self.name} is a language-model baseline with no exact tabular dynamics")
        unused = set(options) - set(self.tabular_fields)
        if unused:
            raise ValueError(f"{self.name} does not use {sorted(unused)}; its tabular settings are {list(self.tabular_fields)}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        params = tabular.Params(beta, self.default_eta(beta) if eta is None else eta, **options)
        if self.check is not None:
            self.check(params)
        return params

    def exact_step(self, params: tabular.Params, state: tabular.State, log_mu: np.ndarray, win_rate: tabular.WinRate) -> tabular.State:
        """One whole iteration (both halves for an extragradient method)."""
        if self.half_step is not None:
            return tabular.extragradient_step(self.half_step, params, state, log_mu, win_rate)
        return self.step(params, state, log_mu, win_rate)

    def solve(self, P: np.ndarray, mu: np.ndarray, beta: float, iterations: int, eta: float | None = None, **options) -> tabular.Solution:
        """``iterations`` exact iterations from π_0 = μ."""
        return tabular.run(P, mu, self.exact_step, self.params(beta, eta, **options), iterations)

    def final(self, solution: tabular.Solution) -> np.ndarray:
        """The policy an exact run ends in: the last iterate, or the running average for SPPO."""
        return solution.average[-1] if self.averaged else solution.last

    def older_iterates(self, loss_config) -> int:
        """How many iterates before the anchor π_t the loss reads log-probs of (MNPO: H − 1)."""
        return getattr(loss_config, "history", 1) - 1


def _mnpo_check(params: tabular.Params) -> None:
    if not 0 < params.rho <= 1:
        raise ValueError(f"mnpo: ρ = β/η = {params.rho:.4g} must lie in (0, 1]; raise eta")


def _spec(fn, config, *metrics) -> losses.LossSpec:
    return losses.LossSpec(fn, config, (f"loss/{fn.__name__}", *metrics))


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm(
            "nash_mp", "Nash-MP, Nash mirror prox (arXiv 2505.19731)", half_step=tabular.prox_step, default_eta=lambda beta: 2.0,
            loss=_spec(losses.nash_mp, losses.NashMPConfig, "pref/advantage", "pref/margin", "pref/target"),
        ),
        Algorithm(
            "egpo", "EGPO, extragradient preference optimization (arXiv 2503.08942)", half_step=tabular.mirror_step,
            default_eta=lambda beta: 1.0 / (1.0 + beta), loss=_spec(losses.egpo, losses.EGPOConfig, "pref/advantage", "pref/margin"),
        ),
        Algorithm(
            "inpo", "INPO, iterative Nash policy optimization (arXiv 2407.00617)", step=tabular.inpo_step,
            loss=_spec(losses.inpo, losses.INPOConfig, "pref/p_hat", "pref/margin"),
        ),
        Algorithm(
            "mnpo", "MNPO, multiplayer Nash preference optimization (arXiv 2509.23102)", step=tabular.mnpo_step,
            default_eta=lambda beta: 1.0 / tabular.single_call_step(beta), tabular_fields=("beta", "eta", "history", "weights"), check=_mnpo_check,
            loss=_spec(losses.mnpo, losses.MNPOConfig, "pref/p_hat", "pref/margin"),
        ),
        Algorithm(
            "nash_md", "Nash-MD, Nash mirror descent (arXiv 2312.00886)", step=tabular.nash_md_step, tabular_fields=("beta", "eta", "schedule"),
            loss=_spec(losses.nash_md, losses.NashMDConfig, "pref/p_hat", "kl/ref"), per_response=True, opponent="mixture",
        ),
        Algorithm("onpo", "ONPO, optimistic online mirror descent (tabular only)", step=tabular.onpo_step),
        Algorithm(
            "sppo", "SPPO, self-play preference optimization (arXiv 2405.00675)", step=tabular.sppo_step, default_eta=lambda beta: 1.0,
            loss=_spec(losses.sppo, losses.SPPOConfig, "pref/win_rate", "pref/margin"), per_response=True, averaged=True,
        ),
        Algorithm("online_ipo", "online IPO (arXiv 2310.12036; language models only)", loss=_spec(losses.online_ipo, losses.OnlineIPOConfig, "pref/p_hat", "pref/margin")),
        Algorithm("dpo", "DPO, a Bradley–Terry baseline (arXiv 2305.18290; language models only)", loss=_spec(losses.dpo, losses.DPOConfig, "pref/p_hat", "pref/margin")),
    ]
}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def with_loss(name: str) -> Algorithm:
    """The algorithm ``name``, refused when it has no language-model loss."""
    algorithm = get(name)
    if algorithm.loss is None:
        raise ValueError(f"{name} has no language-model loss; those with one are {sorted(n for n, a in ALGORITHMS.items() if a.loss)}")
    return algorithm


def params(name: str, beta: float, eta: float | None = None, **options) -> tabular.Params:
    """``get(name).params(...)``: exact-step settings with the algorithm's default step."""
    return get(name).params(beta, eta, **options)


def solve(P: np.ndarray, mu: np.ndarray, beta: float, name: str, iterations: int, eta: float | None = None, **options) -> tabular.Solution:
    """Run ``iterations`` exact iterations of algorithm ``name`` from π_0 = μ; returns every iterate."""
    return get(name).solve(P, mu, beta, iterations, eta, **options)
