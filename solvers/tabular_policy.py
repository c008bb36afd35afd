"""A tabular policy: a finite set of responses per prompt and a log-policy over them.

Its update is the *stochastic* form of a tabular solver: the exact step of ``solvers.tabular`` with the
true P replaced by P̂, the empirical preference matrix of the judged pairs accumulated in the store.
As judgments accumulate P̂ → P, so the iterates follow the exact dynamics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from solvers import tabular
from solvers.algorithms import Algorithm
from solvers.policy import Sample


@dataclass
class Judged:
    """One judged pair as the update needs it: texts and P(a ≻ b) with its weight (number of votes)."""

    prompt: str
    a: str
    b: str
    p_a: float
    n_votes: int = 1


def estimate_preferences(responses: list[str], judged: Iterable[Judged], prior_votes: float = 1.0) -> np.ndarray:
    """P̂[i, j]: vote-weighted mean of P(i ≻ j) over judged pairs in either order, shrunk toward ½
    by ``prior_votes`` pseudo-votes (unseen pairs are ½). P̂ + P̂ᵀ = 1 by construction."""
    index = {r: i for i, r in enumerate(responses)}
    n = len(responses)
    wins = np.zeros((n, n))
    votes = np.zeros((n, n))
    for j in judged:
        i, k = index[j.a], index[j.b]
        w = max(j.n_votes, 1)
        wins[i, k] += w * j.p_a
        wins[k, i] += w * (1.0 - j.p_a)
        votes[i, k] += w
        votes[k, i] += w
    P = (wins + 0.5 * prior_votes) / (votes + prior_votes)
    np.fill_diagonal(P, 0.5)
    return P


@dataclass
class TabularPolicy:
    """Per prompt: the response texts, the reference log-policy log μ and the solver state (ℓ_t …)."""

    responses: dict[str, list[str]]
    log_mu: dict[str, np.ndarray]
    states: dict[str, tabular.State] = field(default_factory=dict)

    def __post_init__(self):
        for p, lm in self.log_mu.items():
            self.states.setdefault(p, tabular.State(tabular.normalize(lm.copy())))

    @classmethod
    def from_reference(cls, responses: dict[str, list[str]], mu: dict[str, np.ndarray]) -> "TabularPolicy":
        return cls(responses, {p: np.log(np.asarray(m, float)) for p, m in mu.items()})

    def distribution(self, prompt: str) -> np.ndarray:
        return self.states[prompt].pi

    def reference(self, prompt: str) -> np.ndarray:
        return np.exp(self.log_mu[prompt])

    # ----- the Policy protocol ---------------------------------------------------------------------
    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        rng = np.random.default_rng(seed)
        out = []
        for prompt in prompts:
            pi = self._known(prompt).pi
            picks = rng.choice(len(pi), size=k, p=pi / pi.sum())
            out.append([Sample(self.responses[prompt][i], 1, "stop", float(np.log(pi[i]))) for i in picks])
        return out

    def score(self, prompts: list[str], responses: list[str], *, finished: list[bool] | None = None, tokens: list | None = None) -> list[float]:
        return [float(self._known(p).l[self.responses[p].index(r)]) for p, r in zip(prompts, responses)]

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        doc = {
            p: {
                "responses": self.responses[p],
                "log_mu": self.log_mu[p].tolist(),
                "l": s.l.tolist(),
                "t": s.t,
                "history": [h.tolist() for h in s.history],
                "g_prev": None if s.g_prev is None else s.g_prev.tolist(),
            }
            for p, s in self.states.items()
        }
        with open(os.path.join(path, "policy.json"), "w") as f:
            json.dump(doc, f)

    @classmethod
    def load(cls, path: str) -> "TabularPolicy":
        with open(os.path.join(path, "policy.json")) as f:
            doc = json.load(f)
        states = {
            p: tabular.State(
                np.array(d["l"]), d["t"], [np.array(h) for h in d["history"]], None if d["g_prev"] is None else np.array(d["g_prev"])
            )
            for p, d in doc.items()
        }
        return cls({p: d["responses"] for p, d in doc.items()}, {p: np.array(d["log_mu"]) for p, d in doc.items()}, states)

    def _known(self, prompt: str) -> tabular.State:
        if prompt not in self.states:
            raise KeyError(f"tabular policy has no responses for prompt {prompt!r}")
        return self.states[prompt]

    # ----- the update --------------------------------------------------------------------------------
    def update(self, judged: list[Judged], algorithm: Algorithm, params: tabular.Params, phase: str, midpoint: "TabularPolicy | None" = None) -> "TabularPolicy":
        """The next policy from this (anchor) policy and P̂ of the judged pairs.

        phase="midpoint" (two-phase solvers): π_{t+½} from g = P̂ π_t.
        phase="update": π_{t+1} — for two-phase solvers from the anchor with g = P̂ π_{t+½} (pass the
        midpoint policy); for the others, the solver's single step with g = P̂ π.
        """
        by_prompt: dict[str, list[Judged]] = {}
        for j in judged:
            by_prompt.setdefault(j.prompt, []).append(j)
        half = algorithm.half_step
        if phase == "midpoint" and half is None:
            raise ValueError(f"{algorithm.name} has no midpoint phase")
        if phase == "update" and half is not None and midpoint is None:
            raise ValueError(f"{algorithm.name}: the update phase needs the midpoint policy")
        states = {}
        for prompt, state in self.states.items():
            P_hat = estimate_preferences(self.responses[prompt], by_prompt.get(prompt, []))
            log_mu = self.log_mu[prompt]
            if phase == "midpoint":
                l = half(state.l, log_mu, P_hat @ state.pi, params.eta, params.beta)
                states[prompt] = tabular.State(l, state.t, state.history, state.g_prev)
            elif half is not None:
                g = P_hat @ midpoint.distribution(prompt)
                l = half(state.l, log_mu, g, params.eta, params.beta)
                states[prompt] = tabular.State(l, state.t + 1, [state.l, *state.history][: params.history], state.g_prev)
            else:
                states[prompt] = algorithm.step(params, state, log_mu, lambda pi, P=P_hat: P @ pi)
        return TabularPolicy(self.responses, self.log_mu, states)
