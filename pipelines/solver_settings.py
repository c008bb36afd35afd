"""The solver's settings as the tabular dynamics and the round's flow read them."""

from __future__ import annotations

from pipelines.config import CampaignConfig
from solvers import tabular


def solver_params(config: CampaignConfig) -> tabular.Params:
    s = config.solver
    return tabular.Params(s.algorithm, s.beta, s.eta, s.history, tuple(s.weights) if s.weights else None, s.schedule)


def phases(config: CampaignConfig) -> tuple[str, ...]:
    """The sample → judge → update phases of one round: extragradient solvers need a midpoint."""
    return ("midpoint", "update") if config.solver.algorithm in tabular.TWO_PHASE else ("update",)
