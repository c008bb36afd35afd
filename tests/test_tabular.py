"""The exact dynamics: equilibrium, gap, Nash-MP's linear bound, and the algorithms' identities."""

import numpy as np
import pytest

from oracles.games import cyclic_game, random_game
from solvers import algorithms, tabular


def _mu(n, seed=0):
    return np.exp(tabular.normalize(np.random.default_rng(seed).standard_normal(n)))


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_regularized_nash_residual_and_zero_gap(n, beta):
    P, mu = random_game(n, seed=n), _mu(n)
    eq = tabular.regularized_nash(P, mu, beta)
    assert eq.residual < 1e-12
    assert tabular.fixed_point_residual(eq.pi, P, mu, beta) == pytest.approx(eq.residual)
    assert abs(tabular.duality_gap(eq.pi, P, mu, beta)) < 1e-10
    assert tabular.duality_gap(mu, P, mu, beta) > 1e-6  # μ is not the equilibrium


def test_duality_gap_by_hand():
    # Rock-paper-scissors, π = (1, 0, 0): paper beats it surely, so the unregularized gap is 2·1 − 1 = 1.
    P = cyclic_game(3)
    assert tabular.duality_gap(np.array([1.0, 0, 0]), P) == pytest.approx(1.0)
    # Uniform play: every response wins ½ against it: gap 0; regularized with μ uniform: V = β log Σ ⅓ e^{½/β} = ½, KL = 0.
    u = np.full(3, 1 / 3)
    assert tabular.duality_gap(u, P) == pytest.approx(0.0)
    assert tabular.duality_gap(u, P, u, 0.3) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "P",
    [random_game(10, 1), random_game(100, 2), random_game(1000, 3), cyclic_game(7, 0.9)],
    ids=["random10", "random100", "random1000", "cyclic7"],
)
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_nash_mp_linear_bound(P, beta):
    """KL(π*‖π_k) ≤ (1+2β)^{−k} KL(π*‖π_0) at every k (η = 2), whatever n."""
    n = len(P)
    mu = _mu(n, seed=n)
    star = tabular.regularized_nash(P, mu, beta).pi
    sol = algorithms.solve(P, mu, beta, "nash_mp", 200)
    kls = np.array([tabular.kl(star, p) for p in sol.policies])
    bound = (1 + 2 * beta) ** -np.arange(201.0) * kls[0]
    assert kls[0] > 1e-4
    assert np.all(kls <= bound * (1 + 1e-9) + 1e-14)


def test_the_bound_check_catches_a_slower_method():
    """The same check fails for a method that is not that fast (INPO with a small step)."""
    P, mu, beta = random_game(50, 5), _mu(50, 5), 0.1
    star = tabular.regularized_nash(P, mu, beta).pi
    sol = algorithms.solve(P, mu, beta, "inpo", 30, eta=0.1)
    kls = np.array([tabular.kl(star, p) for p in sol.policies])
    assert np.any(kls > (1 + 2 * beta) ** -np.arange(31.0) * kls[0])


def test_inpo_equals_mnpo_with_one_past_iterate():
    P, mu, beta, s = random_game(30, 4), _mu(30, 4), 0.2, 0.7
    inpo = algorithms.solve(P, mu, beta, "inpo", 40, eta=s).policies
    mnpo = algorithms.solve(P, mu, beta, "mnpo", 40, eta=1 / s, history=1).policies
    np.testing.assert_allclose(mnpo, inpo, rtol=0, atol=1e-13)


def test_mnpo_uses_its_weights():
    P, mu = random_game(20, 6), _mu(20, 6)
    a = algorithms.solve(P, mu, 0.2, "mnpo", 10, history=2, weights=(1.0, 0.0)).last
    b = algorithms.solve(P, mu, 0.2, "mnpo", 10, history=2, weights=(0.0, 1.0)).last
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("algorithm", ["nash_mp", "egpo", "inpo", "mnpo", "onpo"])
def test_regularized_algorithms_converge_to_the_equilibrium(algorithm):
    P, mu, beta = random_game(20, 8), _mu(20, 8), 0.5
    star = tabular.regularized_nash(P, mu, beta).pi
    sol = algorithms.solve(P, mu, beta, algorithm, 400)
    assert tabular.kl(star, sol.last) < 1e-8


def test_nash_md_constant_step_is_biased_and_decaying_step_is_not():
    P, mu, beta = cyclic_game(3), np.array([0.6, 0.3, 0.1]), 0.1
    star = tabular.regularized_nash(P, mu, beta).pi
    constant = algorithms.solve(P, mu, beta, "nash_md", 3000, eta=1.0)
    decay = algorithms.solve(P, mu, beta, "nash_md", 3000, schedule="decay")
    # the constant step settles: its last iterates agree with each other, but not with π*
    assert tabular.kl(constant.policies[-2], constant.last) < 1e-12
    assert tabular.kl(star, constant.last) > 1e-3
    assert tabular.kl(star, decay.last) < 1e-5


def test_sppo_average_iterate_approaches_the_unregularized_equilibrium():
    P = cyclic_game(3)
    sol = algorithms.solve(P, np.array([0.6, 0.3, 0.1]), 1.0, "sppo", 2000, eta=0.1)
    assert tabular.duality_gap(sol.average[-1], P) < 0.05  # average iterate: nearly unexploitable
    assert tabular.duality_gap(sol.last, P) > 0.2  # last iterate cycles


def test_two_phase_step_is_two_half_steps():
    P, mu, beta = random_game(12, 9), _mu(12, 9), 0.3
    l0, log_mu = np.log(mu), np.log(mu)
    mid = tabular.prox_step(l0, log_mu, P @ np.exp(l0), 2.0, beta)
    nxt = tabular.prox_step(l0, log_mu, P @ np.exp(mid), 2.0, beta)
    np.testing.assert_allclose(np.exp(nxt), algorithms.solve(P, mu, beta, "nash_mp", 1).last, atol=1e-15)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown algorithm"):
        algorithms.params("nope", 0.1)
    with pytest.raises(ValueError, match="beta"):
        algorithms.params("inpo", 0.0)
    with pytest.raises(ValueError, match="ρ"):
        algorithms.params("mnpo", 0.5, eta=0.1)
    with pytest.raises(ValueError, match="does not use"):
        algorithms.params("inpo", 0.5, history=3)
    with pytest.raises(ValueError, match="no exact tabular dynamics"):
        algorithms.params("dpo", 0.5)
