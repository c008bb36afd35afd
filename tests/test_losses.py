"""The NLHF losses: hand-worked values, and consistency with the exact dynamics of solvers/tabular.py.

The tabular world: a softmax policy with one logit per response (n responses, float64), the exact
preference matrix of a random game, and pairs enumerated with their exact probabilities instead of
sampled. Every loss is quadratic in the logits there (Δ_θ = θ_y − θ_y'), so Newton's method minimizes
it exactly; the minimizer is compared with the tabular update.
"""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from oracles.games import random_game
from solvers import algorithms as A
from solvers import losses as L
from solvers import tabular as T

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ----- hand-worked values ------------------------------------------------------------------------------


def test_inpo_by_hand():
    # η = 1/4, τ = 1/8: τ/η = ½, (η − τ)/η = ½, target 1/(2η) = 2.
    # pair 1: h = 5 − ½·2 − ½·4 = 2, p = 1:   (2 − 2)² = 0
    # pair 2: h = 1 − 0 − 0 = 1,     p = 0:   (−1 − 2)² = 9
    # pair 3: h = 1,                 p = ½:   ½(1 − 2)² + ½(−1 − 2)² = ½ + 9/2 = 5
    loss, m = L.inpo(t(5, 1, 1), t(2, 0, 0), t(4, 0, 0), t(1, 0, 0.5), L.INPOConfig(eta=0.25, tau=0.125))
    assert_close(loss, t(0, 9, 5))
    assert_close(m["pref/margin"], t(4 / 3).squeeze())
    assert_close(m["loss/inpo"], t(14 / 3).squeeze())


def test_inpo_default_tau_is_a_third_of_eta():
    assert L.INPOConfig().tau == pytest.approx(0.0075 / 3)
    assert L.INPOConfig(eta=0.3).tau == pytest.approx(0.1)


def test_mnpo_by_hand_uses_the_weights():
    # η = ½ (target 1), ρ = ½, λ = (3, 1) → λ̄ = (¾, ¼).
    # pair 1: Σ λ̄Δ = ¾·4 + ¼·0 = 3;  h = 4 − ½·2 − ½·3 = 1.5,  p = 1: (1.5 − 1)² = 0.25
    # pair 2: Σ λ̄Δ = ¾·0 + ¼·4 = 1;  h = 0 − 0 − ½·1 = −0.5,  p = 0: (0.5 − 1)² = 0.25
    # uniform λ̄ = (½, ½): Σ = 2 for both; h = 2 → (2 − 1)² = 1 and h = −1 → (1 − 1)² = 0
    cfg = L.MNPOConfig(eta=0.5, rho=0.5, weights=(3, 1))
    loss, _ = L.mnpo(t(4, 0), t(2, 0), torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=F64), t(1, 0), cfg)
    assert_close(loss, t(0.25, 0.25))
    uniform, _ = L.mnpo(t(4, 0), t(2, 0), torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=F64), t(1, 0), L.MNPOConfig(eta=0.5, rho=0.5))
    assert_close(uniform, t(1.0, 0.0))


def test_egpo_by_hand():
    # β = ¼. pair 1: target (¾ − ¼)/¼ = 2; (3 − 1 − 2)² = 0
    #        pair 2: y'' = y' (p_other = ½), p = 1: target (1 − ½)/¼ = 2; (0 − 0 − 2)² = 4
    #        pair 3: p = 0, p_other = 1: target −4; (1 − 0 + 4)² = 25
    loss, m = L.egpo(t(3, 0, 1), t(1, 0, 0), t(0.75, 1, 0), t(0.25, 0.5, 1), L.EGPOConfig(beta=0.25))
    assert_close(loss, t(0, 4, 25))
    assert_close(m["pref/advantage"], t((0.5 + 0.5 - 1) / 3).squeeze())


def test_nash_mp_by_hand():
    # η = 1, β = 1: 1 + ηβ = 2.
    # pair 1: target (Δ_k + Δ_ref + (1 − 0))/2 = (2 + 2 + 1)/2 = 2.5; (3 − 2.5)² = 0.25
    # pair 2: target (0 + 4 + (½ − 1))/2 = 1.75;                        (0 − 1.75)² = 3.0625
    loss, m = L.nash_mp(t(3, 0), t(2, 4), t(2, 0), t(1, 0.5), t(0, 1), L.NashMPConfig(eta=1, beta=1))
    assert_close(loss, t(0.25, 3.0625))
    assert_close(m["pref/target"], t((2.5 + 1.75) / 2).squeeze())


def test_nash_md_by_hand():
    # β = ½, one response of two tokens (a third is padding and holds garbage):
    #   log π = (−1, −2), log μ = (−2, −2) → r = (1, 0), log π(y) = −3, P̂ = 1 → P̂ − ½ = ½
    #   sequence: β·sg[1 + 0]·(−3) − ½·(−3) = −1.5 + 1.5 = 0;   ∂/∂log π_i = β·1 − ½ = (0, 0)
    #   token:    β·(1·(−1) + 0·(−2)) − ½·(−3) = −0.5 + 1.5 = 1; ∂/∂log π_i = β·r_i − ½ = (0, −½)
    for kl, value, grad in (("sequence", 0.0, (0.0, 0.0, 0.0)), ("token", 1.0, (0.0, -0.5, 0.0))):
        logp = torch.tensor([[-1.0, -2.0, -math.inf]], dtype=F64, requires_grad=True)
        ref = torch.tensor([[-2.0, -2.0, 7.0]], dtype=F64)
        mask = torch.tensor([[1, 1, 0]])
        loss, m = L.nash_md(logp, ref, mask, t(1), L.NashMDConfig(beta=0.5, kl=kl))
        loss.sum().backward()
        assert_close(loss, t(value))
        assert_close(logp.grad, torch.tensor([grad], dtype=F64))
        assert_close(m["kl/ref"], t(1).squeeze())


def test_online_ipo_by_hand():
    # β = ½: p = 1 → target (1 − ½)/½ = 1, (2 − 1 − 1)² = 0;  p = 0 → target −1, (1 + 1)² = 4
    loss, _ = L.online_ipo(t(2, 2), t(1, 1), t(1, 0), L.OnlineIPOConfig(beta=0.5))
    assert_close(loss, t(0, 4))


def test_sppo_by_hand():
    # η = 2: log π_θ/π_t = −1 − (−2) = 1, target 2(¾ − ½) = ½, (1 − ½)² = ¼
    #        log-ratio 0, win-rate 0: target −1, (0 + 1)² = 1
    loss, _ = L.sppo(t(-1, -3), t(-2, -3), t(0.75, 0), L.SPPOConfig(eta=2))
    assert_close(loss, t(0.25, 1))


def test_dpo_by_hand():
    # β = 1, m = Δ_θ − Δ_ref = log 3: σ(log 3) = ¾, σ(−log 3) = ¼.
    #   p = 1: −log ¾ = log(4/3);  p = 0: −log ¼ = log 4;  p = ½: ½ log(4/3) + ½ log 4
    m = math.log(3)
    loss, _ = L.dpo(t(m + 1, m + 1, m + 1), t(1, 1, 1), t(1, 0, 0.5), L.DPOConfig(beta=1))
    assert_close(loss, t(math.log(4 / 3), math.log(4), 0.5 * math.log(4 / 3) + 0.5 * math.log(4)))


# ----- properties every loss shares ------------------------------------------------------------------------


def _inputs(name: str, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"delta_hist": (batch, 2), "logp_tokens": (batch, 3), "ref_logp_tokens": (batch, 3), "mask": (batch, 3)}
    out = {}
    for k in A.get(name).loss.inputs:
        x = torch.randn(shapes.get(k, (batch,)), generator=g, dtype=F64)
        if k in ("p_hat", "p_hat_other", "win_rate"):
            x = torch.rand(batch, generator=g, dtype=F64)
        if k == "mask":
            x = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]][:batch])
        out[k] = x
    policy = {"delta", "logp", "logp_tokens"} & out.keys()
    for k in policy:
        out[k].requires_grad_(True)
    return out


WITH_LOSS = sorted(n for n, a in A.ALGORITHMS.items() if a.loss is not None)


@pytest.mark.parametrize("name", WITH_LOSS)
def test_registry_dispatch_shapes_and_metrics(name):
    spec = A.get(name).loss
    x = _inputs(name)
    loss, metrics = L.compute(spec, {**x, "unused": torch.zeros(1)})
    assert loss.shape == (4,) and loss.dtype == F64
    assert set(metrics) == set(spec.metrics) and f"loss/{name}" in metrics
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    loss.sum().backward()
    grads = [x[k].grad for k in ("delta", "logp", "logp_tokens") if k in x]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert "cfg" not in spec.inputs and isinstance(spec.config(), spec.config)


def test_registry_names_losses_and_phases():
    assert set(WITH_LOSS) == {"inpo", "mnpo", "egpo", "nash_mp", "nash_md", "online_ipo", "sppo", "dpo"}
    assert {n for n, a in A.ALGORITHMS.items() if a.has_tabular} == {"inpo", "mnpo", "egpo", "nash_mp", "nash_md", "onpo", "sppo"}
    assert {n for n, a in A.ALGORITHMS.items() if a.phases == ("midpoint", "update")} == {"nash_mp", "egpo"}
    assert {n for n, a in A.ALGORITHMS.items() if a.per_response} == {"sppo", "nash_md"}
    # an algorithm's loss is its own: the function and the loss/<name> metric carry the algorithm's name
    assert all(A.get(n).loss.fn.__name__ == n and A.get(n).loss.metrics[0] == f"loss/{n}" for n in WITH_LOSS)


@pytest.mark.parametrize("name", ["inpo", "mnpo", "dpo", "online_ipo", "egpo", "nash_mp"])
def test_swapping_the_pair_gives_the_same_loss(name):
    # (y, y', P̂) and (y', y, 1 − P̂) are one judgment; for EGPO/Nash-MP swapping also swaps P̂(·≻y'').
    x = {k: v.detach() for k, v in _inputs(name).items()}
    swapped = {k: -v if k.startswith("delta") else v for k, v in x.items()}
    if "p_hat_other" in x:
        swapped["p_hat"], swapped["p_hat_other"] = x["p_hat_other"], x["p_hat"]
    else:
        swapped["p_hat"] = 1 - x["p_hat"]
    spec = A.get(name).loss
    assert_close(L.compute(spec, swapped)[0], L.compute(spec, x)[0])


def test_bad_configs_and_inputs_are_refused():
    for make in (
        lambda: L.INPOConfig(eta=0.1, tau=0.2),
        lambda: L.MNPOConfig(rho=1.5),
        lambda: L.MNPOConfig(weights=(-1, 2)),
        lambda: L.MNPOConfig(weights=()),
        lambda: L.EGPOConfig(beta=0),
        lambda: L.NashMDConfig(kl="exact"),
        lambda: A.get("nope"),
        lambda: A.with_loss("onpo"),
    ):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError):
        L.DPOConfig(eta=1.0)
    inpo = A.get("inpo").loss
    with pytest.raises(KeyError, match="delta_prev"):
        L.compute(inpo, {"delta": t(1), "delta_ref": t(1), "p_hat": t(1)})
    with pytest.raises(TypeError):
        L.compute(inpo, _inputs("inpo"), L.DPOConfig())
    with pytest.raises(ValueError, match="one shape"):
        L.dpo(t(1, 2), t(1, 2).unsqueeze(-1), t(1, 0))
    with pytest.raises(ValueError, match="delta_hist"):
        L.mnpo(t(1, 2), t(1, 2), torch.zeros(2, 3, dtype=F64), t(1, 0))


# ----- consistency with solvers/tabular.py ----------------------------------------------------------------

N = 6


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(11)
    P = random_game(N, seed=5)
    log_mu = np.log(rng.dirichlet(np.full(N, 2.0)))
    l_t = T.normalize(np.log(rng.dirichlet(np.full(N, 2.0))))
    l_prev = T.normalize(np.log(rng.dirichlet(np.full(N, 2.0))))
    return P, log_mu, l_t, l_prev


def pairs(k: int = 2):
    """All ordered k-tuples of responses, as k index tensors."""
    grid = torch.cartesian_prod(*[torch.arange(N)] * k)
    return grid.unbind(-1)


def diff(l, i, j) -> torch.Tensor:
    l = torch.as_tensor(l, dtype=F64)
    return l[i] - l[j]


def newton(objective, theta: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Minimize a function of the logits; exact in one step for a quadratic. The constant direction is
    flat (softmax ignores it), hence the pseudo-inverse."""
    for _ in range(steps):
        g = torch.autograd.functional.jacobian(objective, theta)
        H = torch.autograd.functional.hessian(objective, theta)
        theta = theta - torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ g
    assert torch.autograd.functional.jacobian(objective, theta).abs().max() < 1e-9
    return theta


def minimize_over_pairs(loss_of_delta, weight: torch.Tensor, i, j) -> np.ndarray:
    def objective(theta):
        l = torch.log_softmax(theta, 0)
        return (weight * loss_of_delta(l[i] - l[j])).sum()

    return torch.log_softmax(newton(objective, torch.zeros(N, dtype=F64)), 0).numpy()


def exact_win_rate(P):
    return lambda pi: P @ pi


@pytest.mark.parametrize("cfg", [L.INPOConfig(), L.INPOConfig(eta=0.5, tau=0.2)], ids=["defaults", "eta0.5"])
def test_inpo_minimizer_is_the_tabular_inpo_step(world, cfg):
    P, log_mu, l_t, _ = world
    pi_t = torch.as_tensor(np.exp(l_t))
    i, j = pairs()
    P_ij = torch.as_tensor(P)[i, j]
    got = minimize_over_pairs(lambda d: L.inpo(d, diff(log_mu, i, j), diff(l_t, i, j), P_ij, cfg)[0], pi_t[i] * pi_t[j], i, j)
    # tabular's INPO is the mirror step ℓ' = (1 − sβ)ℓ + sβ log μ + s Pπ_t with s = 1/η, β = τ
    want = T.inpo_step(A.params("inpo", beta=cfg.tau, eta=1 / cfg.eta), T.State(l_t), log_mu, exact_win_rate(P)).l
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("cfg", [L.MNPOConfig(weights=(3, 1)), L.MNPOConfig(eta=0.5, rho=0.4, weights=(1, 2))], ids=["defaults-3:1", "eta0.5"])
def test_mnpo_minimizer_is_the_tabular_mnpo_step(world, cfg):
    P, log_mu, l_t, l_prev = world
    pi_t = torch.as_tensor(np.exp(l_t))
    i, j = pairs()
    hist = torch.stack([diff(l_t, i, j), diff(l_prev, i, j)], -1)  # Δ_t, Δ_{t−1}
    P_ij = torch.as_tensor(P)[i, j]
    got = minimize_over_pairs(lambda d: L.mnpo(d, diff(log_mu, i, j), hist, P_ij, cfg)[0], pi_t[i] * pi_t[j], i, j)
    # tabular's MNPO Params take η as the inverse step and the β of the fixed point, β = ρη
    params = A.params("mnpo", beta=cfg.rho * cfg.eta, eta=cfg.eta, history=2, weights=cfg.weights)
    assert params.rho == pytest.approx(cfg.rho)
    want = T.mnpo_step(params, T.State(l_t, history=[l_prev]), log_mu, exact_win_rate(P)).l
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
    uniform = T.mnpo_step(A.params("mnpo", beta=cfg.rho * cfg.eta, eta=cfg.eta), T.State(l_t, history=[l_prev]), log_mu, exact_win_rate(P)).l
    assert np.abs(got - uniform).max() > 1e-3  # so the weights were really used


def test_nash_mp_two_prox_steps_are_the_tabular_nash_mp_iteration(world):
    P, log_mu, l_k, _ = world
    cfg = L.NashMPConfig(eta=2.0, beta=0.3)
    Pt = torch.as_tensor(P)
    i, j, k = pairs(3)  # (y, y', y''): the opponent y'' enumerated, not averaged

    def prox(l_opp):
        pi_opp = torch.as_tensor(np.exp(l_opp))
        loss = lambda d: L.nash_mp(d, diff(log_mu, i, j), diff(l_k, i, j), Pt[i, k], Pt[j, k], cfg)[0]
        return minimize_over_pairs(loss, pi_opp[i] * pi_opp[j] * pi_opp[k], i, j)

    mid = prox(l_k)  # opponent π_k, anchored at π_k
    np.testing.assert_allclose(mid, T.prox_step(l_k, log_mu, P @ np.exp(l_k), cfg.eta, cfg.beta), rtol=0, atol=1e-8)
    nxt = prox(mid)  # opponent π_{k+½}, anchored at π_k again
    nash_mp = A.get("nash_mp")
    want = nash_mp.exact_step(nash_mp.params(beta=cfg.beta, eta=cfg.eta), T.State(l_k), log_mu, exact_win_rate(P)).l
    np.testing.assert_allclose(nxt, want, rtol=0, atol=1e-8)


def _egpo_or_ipo(name, beta):
    """The loss of Δ_θ over all (y, y', y'') triples (online IPO ignores y''), with its pair indices."""
    i, j, k = pairs(3)
    if name == "egpo":
        return (lambda d, Pt, log_mu: L.egpo(d, diff(log_mu, i, j), Pt[i, k], Pt[j, k], L.EGPOConfig(beta=beta))[0]), (i, j, k)
    i, j = pairs(2)
    return (lambda d, Pt, log_mu: L.online_ipo(d, diff(log_mu, i, j), Pt[i, j], L.OnlineIPOConfig(beta=beta))[0]), (i, j)


@pytest.mark.parametrize("name", ["egpo", "online_ipo"])
def test_egpo_and_online_ipo_are_minimized_by_the_regularized_best_response(world, name):
    P, log_mu, l_t, _ = world
    beta = 0.25
    pi_t = torch.as_tensor(np.exp(l_t))
    loss, idx = _egpo_or_ipo(name, beta)
    weight = torch.stack([pi_t[a] for a in idx]).prod(0)  # every sample from π_t
    got = minimize_over_pairs(lambda d: loss(d, torch.as_tensor(P), log_mu), weight, idx[0], idx[1])
    np.testing.assert_allclose(got, T.normalize(log_mu + P @ np.exp(l_t) / beta), rtol=0, atol=1e-8)


@pytest.mark.parametrize("uniform_start", [False, True], ids=["any-policy", "uniform-policy"])
@pytest.mark.parametrize("name", ["egpo", "online_ipo"])
def test_one_gradient_step_is_a_mirror_step_with_s_beta_4lr_over_n(world, name, uniform_start):
    """Over all n² ordered pairs weighted 1/n² (EGPO: n³ triples, 1/n³), ∂L/∂θ_z = (4/n)(θ_z − log μ_z
    − (Pu)_z/β + const), u the uniform distribution. So θ − lr∇L = (1 − sβ)θ + sβ log μ + s Pu + const
    with sβ = 4·lr/n: tabular's mirror step against the *uniform* opponent (the pair distribution),
    which is its INPO/EGPO step against π_t only when π_t is uniform."""
    P, log_mu, l_t, _ = world
    beta, lr = 0.25, 0.05
    theta = torch.zeros(N, dtype=F64) if uniform_start else torch.as_tensor(l_t + 0.7).clone()
    theta.requires_grad_(True)
    loss, idx = _egpo_or_ipo(name, beta)
    l = torch.log_softmax(theta, 0)
    loss(l[idx[0]] - l[idx[1]], torch.as_tensor(P), log_mu).mean().backward()
    stepped = torch.log_softmax(theta.detach() - lr * theta.grad, 0).numpy()
    s = 4 * lr / (N * beta)
    l0 = T.normalize(theta.detach().numpy())
    np.testing.assert_allclose(stepped, T.mirror_step(l0, log_mu, P @ np.full(N, 1 / N), s, beta), rtol=0, atol=1e-12)
    if uniform_start:
        np.testing.assert_allclose(stepped, A.get("egpo").half_step(l0, log_mu, P @ np.exp(l0), s, beta), rtol=0, atol=1e-12)


def test_nash_md_expected_gradient_is_the_regularized_preference_gradient(world):
    """One-token responses: Σ_{y,y'} sg[π_θ(y)] π_mix(y') ∇ℓ = −∇[π_θᵀ P π_mix − β KL(π_θ‖μ)]."""
    P, log_mu, l_t, _ = world
    beta, m = 0.3, 0.25
    pi_mix = torch.as_tensor(np.exp(T.geometric_mixture(l_t, log_mu, m)))
    Pt, lmu = torch.as_tensor(P), torch.as_tensor(log_mu)
    i, j = pairs()
    for kl in ("sequence", "token"):
        theta = torch.as_tensor(l_t).clone().requires_grad_(True)
        l = torch.log_softmax(theta, 0)
        loss, _ = L.nash_md(l[i].unsqueeze(-1), lmu[i].unsqueeze(-1), torch.ones(len(i), 1), Pt[i, j], L.NashMDConfig(beta=beta, kl=kl))
        (l.exp().detach()[i] * pi_mix[j] * loss).sum().backward()

        exact = torch.as_tensor(l_t).clone().requires_grad_(True)
        pi = torch.softmax(exact, 0)
        (-(pi @ Pt @ pi_mix - beta * (pi * (pi.log() - lmu)).sum())).backward()
        assert_close(theta.grad, exact.grad, rtol=0, atol=1e-12)


def test_nash_md_sequence_kl_estimator_is_unbiased_and_the_token_one_is_not():
    """Two tokens from a vocabulary of two, 4 responses, P̂ = ½ so that only the KL term acts: the
    sequence estimator's expectation is ∇KL(π_θ‖μ) exactly; the per-token one misses the first token's
    effect on the second token's log-ratio."""
    g = torch.Generator().manual_seed(3)
    first, second = torch.randn(2, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)
    mu1, mu2 = torch.randn(2, generator=g, dtype=F64).log_softmax(0), torch.randn(2, 2, generator=g, dtype=F64).log_softmax(-1)
    y1, y2 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    ref_tokens = torch.stack([mu1[y1], mu2[y1, y2]], -1)

    def policy(a, b):
        return torch.stack([a.log_softmax(0)[y1], b.log_softmax(-1)[y1, y2]], -1)  # (4 responses, 2 tokens)

    exact_a, exact_b = first.clone().requires_grad_(True), second.clone().requires_grad_(True)
    lp = policy(exact_a, exact_b).sum(-1)
    (lp.exp() * (lp - ref_tokens.sum(-1))).sum().backward()  # ∇KL(π‖μ)

    errors = {}
    for kl in ("sequence", "token"):
        a, b = first.clone().requires_grad_(True), second.clone().requires_grad_(True)
        tokens = policy(a, b)
        loss, _ = L.nash_md(tokens, ref_tokens, torch.ones(4, 2), torch.full((4,), 0.5, dtype=F64), L.NashMDConfig(beta=1.0, kl=kl))
        (tokens.sum(-1).exp().detach() * loss).sum().backward()
        errors[kl] = max((a.grad - exact_a.grad).abs().max().item(), (b.grad - exact_b.grad).abs().max().item())
    assert errors["sequence"] < 1e-12
    assert errors["token"] > 1e-3
