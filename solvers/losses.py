"""The NLHF losses as pure functions of per-sequence log-probs and oracle judgments.

Notation (shared with ``solvers/tabular.py``). For an ordered pair of responses (y, y') to one prompt x:

    Δ_θ(y, y')   = log π_θ(y|x) − log π_θ(y'|x)     (log-probs summed over response tokens; carries grad)
    Δ_ref, Δ_t   = the same for the reference μ and the previous iterate π_t (the round's anchor)
    P̂(y ≻ y')    = the oracle's probability that y is preferred to y' (1/0 for a hard label, ½ for a tie)

Every loss takes tensors of shape ``(batch,)`` (one entry per pair, or per response for SPPO; Nash-MD
takes per-token tensors) and a frozen config, and returns ``(loss, metrics)``: the per-pair losses,
shape ``(batch,)``, and a dict of detached batch means named ``loss/…``, ``pref/…``, ``kl/…``. The caller
reduces (mean, weighted sum, gradient accumulation): nothing here averages the loss.

Soft labels. A pair judged P̂ = p contributes p·ℓ(y, y') + (1 − p)·ℓ(y', y), where ℓ(y, y') is the loss
written with y as the winner. The regression losses (EGPO, Nash-MP, online IPO) take P̂ in their target
and are already symmetric under swapping y and y'.

What the losses are checked against (tests/test_losses.py), on a softmax policy with one logit per
response and exact preferences: minimized over pairs from π_t, INPO, MNPO and the Nash-MP prox form give
exactly the updates of ``solvers/tabular.py``; online IPO and EGPO are minimized by the regularized best
response π ∝ μ exp(Pπ_t/β), and one gradient step on them is a mirror-descent step.

Which algorithm uses which loss is said once, in ``solvers/algorithms.py``; a trainer calls
:func:`compute` with the algorithm's :class:`LossSpec`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]
LossOutput = tuple[Tensor, Metrics]


# ----- configs: one frozen dataclass per loss, every field documented ---------------------------------


@dataclass(frozen=True)
class INPOConfig:
    """INPO. ``eta``: η, the inverse step (the pair target is 1/(2η), in nats of Δ); ``tau``: τ, the
    KL-to-reference weight, 0 ≤ τ ≤ η (None: η/3). Paper-style defaults η = 0.0075, τ = η/3."""

    eta: float = 0.0075
    tau: float | None = None

    def __post_init__(self):
        if self.tau is None:
            object.__setattr__(self, "tau", self.eta / 3)
        if not self.eta > 0:
            raise ValueError(f"inpo: eta must be > 0, got {self.eta}")
        if not 0 <= self.tau <= self.eta:
            raise ValueError(f"inpo: tau must lie in [0, eta] = [0, {self.eta}], got {self.tau}")


@dataclass(frozen=True)
class MNPOConfig:
    """MNPO. ``eta``: η, the inverse step (target 1/(2η)); ``rho``: ρ ∈ [0, 1], the weight of the
    reference against the past iterates; ``weights``: λ_0 … λ_{H−1} for π_t, π_{t−1}, …, normalized to
    sum 1 inside the loss (H = len(weights)). Defaults η = 0.0075, ρ = 1/3, H = 2 uniform."""

    eta: float = 0.0075
    rho: float = 1 / 3
    weights: tuple[float, ...] = (1.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.eta > 0:
            raise ValueError(f"mnpo: eta must be > 0, got {self.eta}")
        if not 0 <= self.rho <= 1:
            raise ValueError(f"mnpo: rho must lie in [0, 1], got {self.rho}")
        if not self.weights or min(self.weights) < 0 or not sum(self.weights) > 0:
            raise ValueError(f"mnpo: weights must be ≥ 1 non-negative numbers with a positive sum, got {self.weights}")

    @property
    def history(self) -> int:
        """H, the number of past iterates (columns of ``delta_hist``)."""
        return len(self.weights)

    @property
    def lambdas(self) -> tuple[float, ...]:
        """λ̄ = λ / Σλ."""
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)


@dataclass(frozen=True)
class EGPOConfig:
    """EGPO. ``beta``: β > 0, the KL-to-reference weight; the target is (P̂(y≻y'') − P̂(y'≻y''))/β.
    The step size is the optimizer's learning rate (see the module tests for the exact relation)."""

    beta: float = 0.1

    def __post_init__(self):
        _positive("egpo", beta=self.beta)


@dataclass(frozen=True)
class NashMPConfig:
    """Nash-MP, prox form. ``eta``: η > 0, the prox step; ``beta``: β ≥ 0, the KL-to-reference weight.
    ηβ is the paper's η_p (as in ``tabular.prox_step``). η = 2 is the tabular default (ηL = 1)."""

    eta: float = 2.0
    beta: float = 0.1

    def __post_init__(self):
        _positive("nash_mp", eta=self.eta)
        if not self.beta >= 0:
            raise ValueError(f"nash_mp: beta must be ≥ 0, got {self.beta}")


@dataclass(frozen=True)
class NashMDConfig:
    """Nash-MD policy gradient. ``beta``: β ≥ 0, the KL-to-reference weight (0 = self-play);
    ``kl``: which score-function estimator of ∇KL(π_θ‖μ) (see :func:`nash_md`): "sequence" (unbiased)
    or "token" (the per-token form, biased for responses longer than one token). The geometric
    mixture's weight belongs to the sampler, not to the loss."""

    beta: float = 0.1
    kl: str = "sequence"

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"nash_md: beta must be ≥ 0, got {self.beta}")
        if self.kl not in ("sequence", "token"):
            raise ValueError(f"nash_md: kl must be 'sequence' or 'token', got {self.kl!r}")


@dataclass(frozen=True)
class OnlineIPOConfig:
    """Online IPO. ``beta``: β > 0; the target of Δ_θ − Δ_ref is (P̂(y≻y') − ½)/β."""

    beta: float = 0.1

    def __post_init__(self):
        _positive("online_ipo", beta=self.beta)


@dataclass(frozen=True)
class SPPOConfig:
    """SPPO. ``eta``: η > 0, the step: the target of log π_θ(y)/π_t(y) is η(P̂(y≻π_t) − ½). Sequence
    log-ratios are large, so language-model runs take η in the hundreds to thousands (1e3 here);
    the tabular solver's η = 1 is for one-token responses."""

    eta: float = 1e3

    def __post_init__(self):
        _positive("sppo", eta=self.eta)


@dataclass(frozen=True)
class DPOConfig:
    """DPO. ``beta``: β > 0, the inverse temperature of the implicit reward β(Δ_θ − Δ_ref)."""

    beta: float = 0.1

    def __post_init__(self):
        _positive("dpo", beta=self.beta)


def _positive(loss: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{loss}: {name} must be > 0, got {v}")


# ----- helpers: shape checks, soft labels, metrics -------------------------------------------------------


def _same_shape(**tensors: Tensor) -> None:
    """Refuse mismatched shapes: broadcasting (batch,) against (batch, 1) would silently give (batch, batch)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"inputs must have one shape, got {shapes}")


def _soft(p_hat: Tensor, loss_if_y_wins: Tensor, loss_if_other_wins: Tensor) -> Tensor:
    """p·ℓ(y, y') + (1 − p)·ℓ(y', y)."""
    return p_hat * loss_if_y_wins + (1 - p_hat) * loss_if_other_wins


def _metrics(name: str, loss: Tensor, means: Mapping[str, Tensor]) -> Metrics:
    """Detached batch means: loss/<name> and the given per-pair quantities."""
    return {f"loss/{name}": loss.detach().mean(), **{k: v.detach().mean() for k, v in means.items()}}


# ----- the losses -------------------------------------------------------------------------------------


def inpo(delta: Tensor, delta_ref: Tensor, delta_prev: Tensor, p_hat: Tensor, cfg: INPOConfig = INPOConfig()) -> LossOutput:
    """INPO, iterative Nash policy optimization (Zhang et al., arXiv 2407.00617; the INPO loss of its
    algorithm, whose minimizer is the online-mirror-descent step):

        h(y, y') = Δ_θ − (τ/η) Δ_ref − ((η − τ)/η) Δ_t
        ℓ(y, y') = (h(y, y') − 1/(2η))²      on (winner y, loser y'),

    soft label: p (h − 1/(2η))² + (1 − p)(h + 1/(2η))² (h is antisymmetric). Over pairs drawn from π_t,
    its minimizer is log π = (τ/η) log μ + (1 − τ/η) log π_t + (1/η) P π_t + const: ``tabular.mirror_step``
    with step s = 1/η and β = τ.

    Shapes: delta (Δ_θ, with grad), delta_ref, delta_prev (Δ_t), p_hat (P̂(y≻y')): all (batch,).
    Returns the per-pair losses (batch,) and metrics loss/inpo, pref/p_hat, pref/margin (mean h).
    """
    _same_shape(delta=delta, delta_ref=delta_ref, delta_prev=delta_prev, p_hat=p_hat)
    eta, tau = cfg.eta, cfg.tau
    h = delta - (tau / eta) * delta_ref - ((eta - tau) / eta) * delta_prev
    target = 1 / (2 * eta)
    loss = _soft(p_hat, (h - target) ** 2, (-h - target) ** 2)
    return loss, _metrics("inpo", loss, {"pref/p_hat": p_hat, "pref/margin": h})


def mnpo(delta: Tensor, delta_ref: Tensor, delta_hist: Tensor, p_hat: Tensor, cfg: MNPOConfig = MNPOConfig()) -> LossOutput:
    """MNPO, multiplayer Nash preference optimization (Wu et al., arXiv 2509.23102): the policy plays
    against a population of its H past iterates, weighted λ̄ = λ/Σλ:

        h(y, y') = Δ_θ − ρ Δ_ref − (1 − ρ) Σ_{j=0}^{H−1} λ̄_j Δ_{t−j}
        ℓ(y, y') = (h(y, y') − 1/(2η))²      on (winner y, loser y'), soft labels as in INPO.

    Over pairs from π_t its minimizer is log π = ρ log μ + (1 − ρ) Σ_j λ̄_j log π_{t−j} + (1/η) P π_t
    + const, the step of ``tabular.mnpo_step``. Its fixed point is the β-regularized equilibrium with
    β = ρη (η = 0.0075, ρ = 1/3 give β = 0.0025, INPO's default τ).

    Shapes: delta, delta_ref, p_hat: (batch,); delta_hist: (batch, H), column j = Δ_{t−j}, column 0 the
    current iterate π_t (H = len(cfg.weights)); before H iterates exist, repeat the oldest column, as
    ``tabular.mnpo_step`` does. Metrics loss/mnpo, pref/p_hat, pref/margin.
    """
    _same_shape(delta=delta, delta_ref=delta_ref, p_hat=p_hat)
    if delta_hist.shape != (*delta.shape, cfg.history):
        want = (*delta.shape, cfg.history)
        raise ValueError(f"mnpo: delta_hist must have shape {want} (batch, H = len(weights)), got {tuple(delta_hist.shape)}")
    lam = torch.tensor(cfg.lambdas, dtype=delta_hist.dtype, device=delta_hist.device)
    h = delta - cfg.rho * delta_ref - (1 - cfg.rho) * (delta_hist @ lam)
    target = 1 / (2 * cfg.eta)
    loss = _soft(p_hat, (h - target) ** 2, (-h - target) ** 2)
    return loss, _metrics("mnpo", loss, {"pref/p_hat": p_hat, "pref/margin": h})


def egpo(delta: Tensor, delta_ref: Tensor, p_hat: Tensor, p_hat_other: Tensor, cfg: EGPOConfig = EGPOConfig()) -> LossOutput:
    """EGPO, extragradient preference optimization (Zhou, Fazel & Du, arXiv 2503.08942): each half-step
    of the extragradient method is a gradient step on an online-IPO-type loss,

        ℓ(y, y', y'') = (Δ_θ − Δ_ref − (P̂(y ≻ y'') − P̂(y' ≻ y''))/β)²,

    y, y', y'' from the same policy (π_t for the midpoint, π_{t+½} for the step from the anchor). With
    y'' = y' (P̂(y' ≻ y') = ½, pass p_hat_other = 0.5) the target is (P̂(y ≻ y') − ½)/β, online IPO.
    Its minimizer is the regularized best response π ∝ μ exp(P π_opp/β), so it is used with small
    steps: one gradient step with learning rate lr on a softmax's logits, over all n² ordered pairs
    weighted 1/n², is ``tabular.mirror_step`` with s·β = 4·lr/n against the uniform opponent.

    Shapes: delta, delta_ref, p_hat (P̂(y≻y'')), p_hat_other (P̂(y'≻y'')): all (batch,).
    Metrics loss/egpo, pref/advantage (mean P̂(y≻y'') − P̂(y'≻y'')), pref/margin (Δ_θ − Δ_ref).
    """
    _same_shape(delta=delta, delta_ref=delta_ref, p_hat=p_hat, p_hat_other=p_hat_other)
    advantage = p_hat - p_hat_other
    margin = delta - delta_ref
    loss = (margin - advantage / cfg.beta) ** 2
    return loss, _metrics("egpo", loss, {"pref/advantage": advantage, "pref/margin": margin})


def nash_mp(
    delta: Tensor, delta_ref: Tensor, delta_prev: Tensor, p_hat: Tensor, p_hat_other: Tensor, cfg: NashMPConfig = NashMPConfig()
) -> LossOutput:
    """Nash-MP, Nash mirror prox (Tiapkin et al., arXiv 2505.19731), its proximal half-step as a
    regression. With anchor π_k (delta_prev = Δ_k) and opponent y'' ~ π_opp:

        target(y, y') = [Δ_k + ηβ Δ_ref + η (P̂(y ≻ y'') − P̂(y' ≻ y''))] / (1 + ηβ)
        ℓ(y, y', y'') = (Δ_θ − target)²

    whose minimizer is log π = (log π_k + ηβ log μ + η P π_opp)/(1 + ηβ) + const, the prox step
    ``tabular.prox_step`` (ηβ is the paper's η_p). A round uses it twice, both times
    anchored at π_k: opponent π_k (gives the midpoint π_{k+½}), then opponent π_{k+½}. This form is
    derived from the mirror-prox update; it is not the paper's language-model recipe.

    Shapes: delta, delta_ref, delta_prev, p_hat (P̂(y≻y'')), p_hat_other (P̂(y'≻y'')): all (batch,).
    Metrics loss/nash_mp, pref/advantage, pref/margin (Δ_θ), pref/target.
    """
    _same_shape(delta=delta, delta_ref=delta_ref, delta_prev=delta_prev, p_hat=p_hat, p_hat_other=p_hat_other)
    eta_p = cfg.eta * cfg.beta
    advantage = p_hat - p_hat_other
    target = (delta_prev + eta_p * delta_ref + cfg.eta * advantage) / (1 + eta_p)
    loss = (delta - target) ** 2
    return loss, _metrics("nash_mp", loss, {"pref/advantage": advantage, "pref/margin": delta, "pref/target": target})


def nash_md(logp_tokens: Tensor, ref_logp_tokens: Tensor, mask: Tensor, p_hat: Tensor, cfg: NashMDConfig = NashMDConfig()) -> LossOutput:
    """Nash-MD policy gradient (Munos et al., arXiv 2312.00886, the Nash-MD-PG variant): a surrogate
    whose gradient, for y ~ π_θ and y' ~ the geometric mixture π_θ^{1−m} μ^m, is an unbiased estimate
    of −∇[P(π_θ ≻ mixture) − β KL(π_θ‖μ)] (the mixture held fixed):

        ℓ(y, y') = β · KL-term − (P̂(y ≻ y') − ½) · log π_θ(y),      log π_θ(y) = Σ_i log π_θ(y_i | y_<i)

    with, writing r_i = log π_θ(y_i|·) − log μ(y_i|·) and sg the stop-gradient,
      kl="sequence":  KL-term = sg[Σ_i r_i] · Σ_i log π_θ(y_i|·)   (score function: unbiased)
      kl="token":     KL-term = Σ_i sg[r_i] · log π_θ(y_i|·)       (drops the credit of token i for
                      the later tokens' log-ratios; equal to "sequence" for one-token responses).
    The ½ is the paper's baseline. The value of the surrogate means nothing; its gradient does.

    Shapes: logp_tokens (batch, T) log π_θ of each response token (with grad), ref_logp_tokens
    (batch, T) log μ of the same tokens, mask (batch, T) 1 for response tokens and 0 for padding,
    p_hat (batch,) P̂(y ≻ y'). Metrics loss/nash_md, pref/p_hat, kl/ref (mean Σ_i r_i, an estimate of
    KL(π_θ‖μ) since y ~ π_θ).
    """
    _same_shape(logp_tokens=logp_tokens, ref_logp_tokens=ref_logp_tokens, mask=mask)
    if p_hat.shape != logp_tokens.shape[:-1]:
        raise ValueError(f"nash_md: p_hat must have shape {tuple(logp_tokens.shape[:-1])} (batch,), got {tuple(p_hat.shape)}")
    # padding positions may hold anything, even -inf: select, never multiply by the mask
    keep = mask.bool()
    logp_tokens = torch.where(keep, logp_tokens, torch.zeros_like(logp_tokens))
    log_ratio = torch.where(keep, logp_tokens.detach() - ref_logp_tokens, torch.zeros_like(logp_tokens))
    logp = logp_tokens.sum(-1)
    if cfg.kl == "sequence":
        kl_term = log_ratio.sum(-1) * logp
    else:
        kl_term = (log_ratio * logp_tokens).sum(-1)
    loss = cfg.beta * kl_term - (p_hat - 0.5) * logp
    return loss, _metrics("nash_md", loss, {"pref/p_hat": p_hat, "kl/ref": log_ratio.sum(-1)})


def online_ipo(delta: Tensor, delta_ref: Tensor, p_hat: Tensor, cfg: OnlineIPOConfig = OnlineIPOConfig()) -> LossOutput:
    """Online IPO (IPO of Azar et al., arXiv 2310.12036, on pairs sampled from the current policy; the
    online form is studied in arXiv 2312.00886 and 2503.08942):

        ℓ(y, y') = (Δ_θ − Δ_ref − (P̂(y ≻ y') − ½)/β)²,

    which is IPO's soft-label loss p(m − 1/(2β))² + (1 − p)(m + 1/(2β))² up to a constant in θ. Its
    minimizer over pairs from π_t is π ∝ μ exp(P π_t/β); see :func:`egpo` for one gradient step.

    Shapes: delta, delta_ref, p_hat: (batch,). Metrics loss/online_ipo, pref/p_hat, pref/margin.
    """
    _same_shape(delta=delta, delta_ref=delta_ref, p_hat=p_hat)
    margin = delta - delta_ref
    loss = (margin - (p_hat - 0.5) / cfg.beta) ** 2
    return loss, _metrics("online_ipo", loss, {"pref/p_hat": p_hat, "pref/margin": margin})


def sppo(logp: Tensor, prev_logp: Tensor, win_rate: Tensor, cfg: SPPOConfig = SPPOConfig()) -> LossOutput:
    """SPPO, self-play preference optimization (Wu et al., arXiv 2405.00675), per response y ~ π_t:

        ℓ(y) = (log π_θ(y)/π_t(y) − η (P̂(y ≻ π_t) − ½))²,

    P̂(y ≻ π_t) estimated as the mean of P̂(y ≻ y_j) over the prompt's other samples y_j (the caller
    averages). It approximates log Z of the update π_{t+1} ∝ π_t exp(η P(y ≻ π_t)) by η/2.

    Shapes: logp (log π_θ(y), with grad), prev_logp (log π_t(y)), win_rate (P̂(y ≻ π_t)): (batch,), one
    entry per response. Metrics loss/sppo, pref/win_rate, pref/margin (log π_θ(y)/π_t(y)).
    """
    _same_shape(logp=logp, prev_logp=prev_logp, win_rate=win_rate)
    margin = logp - prev_logp
    loss = (margin - cfg.eta * (win_rate - 0.5)) ** 2
    return loss, _metrics("sppo", loss, {"pref/win_rate": win_rate, "pref/margin": margin})


def dpo(delta: Tensor, delta_ref: Tensor, p_hat: Tensor, cfg: DPOConfig = DPOConfig()) -> LossOutput:
    """DPO (Rafailov et al., arXiv 2305.18290, the DPO objective), with soft labels:

        ℓ(y, y') = −log σ(β (Δ_θ − Δ_ref))      on (winner y, loser y')
        soft:      −p log σ(β m) − (1 − p) log σ(−β m),   m = Δ_θ − Δ_ref.

    A Bradley–Terry method, kept as a baseline. Shapes: delta, delta_ref, p_hat: (batch,).
    Metrics loss/dpo, pref/p_hat, pref/margin (m).
    """
    _same_shape(delta=delta, delta_ref=delta_ref, p_hat=p_hat)
    margin = delta - delta_ref
    loss = _soft(p_hat, -F.logsigmoid(cfg.beta * margin), -F.logsigmoid(-cfg.beta * margin))
    return loss, _metrics("dpo", loss, {"pref/p_hat": p_hat, "pref/margin": margin})


# ----- what a trainer needs to call a loss -----------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A loss as the trainer sees it: the function, its config class and the metrics it reports. Each
    algorithm's entry in ``solvers/algorithms.py`` holds its loss's spec."""

    fn: Callable[..., LossOutput]
    config: type
    metrics: tuple[str, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The names of the tensors the loss takes, in order (its parameters before ``cfg``)."""
        return tuple(p for p in inspect.signature(self.fn).parameters if p != "cfg")


def compute(spec: LossSpec, tensors: Mapping[str, Tensor], cfg=None) -> LossOutput:
    """Run the loss of ``spec`` on the tensors it needs from ``tensors`` (extra entries are ignored)."""
    name = spec.fn.__name__
    missing = [k for k in spec.inputs if k not in tensors]
    if missing:
        raise KeyError(f"{name} needs tensors {list(spec.inputs)}; missing {missing}")
    cfg = spec.config() if cfg is None else cfg
    if not isinstance(cfg, spec.config):
        raise TypeError(f"{name} takes a {spec.config.__name__}, got {type(cfg).__name__}")
    return spec.fn(*(tensors[k] for k in spec.inputs), cfg=cfg)
