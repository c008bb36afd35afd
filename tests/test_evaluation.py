"""The evaluation math (solvers/evaluation.py, tabular.maximal_lottery): hand-worked cases, the
length-biased judge, and the maximal lottery against an independent support enumeration."""

import numpy as np
import pytest

from oracles.length_bias import length_biased_judgments
from solvers import evaluation as ev
from solvers.tabular import maximal_lottery, maximal_lottery_by_supports


def test_win_rate_by_hand():
    # mean ½; sd (ddof 1) of 1,0,1,0 is √(1/3); half-width 1.96·√(1/3)/√4
    mean, half = ev.win_rate([1, 0, 1, 0])
    assert mean == 0.5
    assert half == pytest.approx(ev.Z95 * (1 / 3) ** 0.5 / 2)


def test_logistic_intercept_by_hand():
    # one intercept, soft labels all ¾, no penalty: σ(b) = ¾ → b = log 3
    fit = ev.fit_logistic(np.ones((8, 1)), np.full(8, 0.75), np.zeros(1))
    assert fit.coef[0] == pytest.approx(np.log(3), abs=1e-9)
    # every label equals the prediction: the sandwich (residuals zero) says no spread
    assert fit.cov[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_length_stats_by_hand():
    s = ev.length_stats([10, 20, 30, 40], ["stop", "length", "stop", "length"])
    assert s == {"mean_tokens": 25.0, "median_tokens": 25.0, "truncated_share": 0.5}


@pytest.mark.parametrize("length_gap", [12.0, -12.0])
def test_lc_removes_a_length_bias(length_gap):
    """Equal quality, different lengths, a judge that likes long answers: the raw win-rate moves, the
    LC win-rate stays at ½ within its interval."""
    d = length_biased_judgments(prompts=60, samples=10, quality_gap=0.0, length_gap=length_gap, strength=1.0, seed=3)
    raw, raw_half = ev.win_rate(d["p"])
    lc = ev.lc_win_rate(d["p"], d["length_diff"], d["prompt_ids"])
    assert abs(raw - 0.5) > 2 * raw_half  # the bias is visible in the raw number
    assert abs(lc["lc_win_rate"] - 0.5) < lc["lc_ci95"]
    assert lc["length_coef"] > 0.3  # the fit found the judge's taste for length


def test_lc_keeps_a_quality_difference():
    """A real quality difference with equal lengths is kept by LC."""
    d = length_biased_judgments(prompts=60, samples=10, quality_gap=0.8, length_gap=0.0, strength=1.0, seed=4)
    raw, _ = ev.win_rate(d["p"])
    lc = ev.lc_win_rate(d["p"], d["length_diff"], d["prompt_ids"])
    assert lc["lc_win_rate"] - 0.5 > 2 * lc["lc_ci95"]
    assert lc["lc_win_rate"] == pytest.approx(raw, abs=0.03)
    assert abs(lc["lc_win_rate"] - d["true_win_rate"]) < lc["lc_ci95"]


def test_lc_without_length_variation_is_the_prompt_model():
    # equal lengths everywhere: no length term; one prompt, labels ¾ → σ(θ + δ) ≈ ¾
    lc = ev.lc_win_rate(np.full(20, 0.75), np.zeros(20), ["x"] * 20)
    assert lc["length_coef"] == 0.0
    assert lc["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)


def test_lc_refuses_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        ev.lc_win_rate([0.5], [1.0, 2.0], ["x"])
    with pytest.raises(ValueError, match="probabilities"):
        ev.lc_win_rate([np.nan], [1.0], ["x"])


def test_win_rate_matrix_by_hand():
    # (0 vs 1): 1 and, in the other order, P(1 ≻ 0) = ¼ → W[0,1] = (1 + ¾)/2 = ⅞; (1 vs 2) never judged
    W = ev.win_rate_matrix([0, 1], [1, 0], [1.0, 0.25], 3)
    assert W[0, 1] == 0.875 and W[1, 0] == 0.125 and W[2, 2] == 0.5
    assert np.isnan(W[1, 2]) and np.isnan(W[2, 0])


def test_bradley_terry_by_hand():
    # P(1 ≻ 0) = ¾ on every pair: r_1 − r_0 = log 3, anchored at r_0 = 0
    bt = ev.bradley_terry([1] * 10, [0] * 10, [0.75] * 10, 2, penalty=0.0)
    assert bt["ratings"][0] == 0.0
    assert bt["ratings"][1] == pytest.approx(np.log(3), abs=1e-9)


def rps(strength=0.8):
    W = np.full((3, 3), 0.5)
    for a, b in [(0, 1), (1, 2), (2, 0)]:
        W[a, b], W[b, a] = strength, 1 - strength
    return W


def test_cyclic_triples():
    assert ev.cyclic_triples(rps()) == (1, 1)
    W = np.array([[0.5, 0.7, 0.8], [0.3, 0.5, 0.6], [0.2, 0.4, 0.5]])
    assert ev.cyclic_triples(W) == (0, 1)


def test_maximal_lottery_of_rock_paper_scissors_is_uniform():
    pop = ev.population(rps())
    np.testing.assert_allclose(pop["maximal_lottery"], [1 / 3] * 3, atol=1e-12)
    np.testing.assert_allclose(pop["win_rate_vs_mix"], [0.5] * 3, atol=1e-12)


def test_maximal_lottery_of_a_dominant_version_is_that_version():
    W = np.array([[0.5, 0.4, 0.3, 0.45], [0.6, 0.5, 0.8, 0.2], [0.7, 0.2, 0.5, 0.9], [0.55, 0.8, 0.1, 0.5]])
    W[:, 0], W[0, :] = 0.3, 0.7  # version 0 beats everyone
    W[0, 0] = 0.5
    np.testing.assert_allclose(ev.population(W)["maximal_lottery"], [1, 0, 0, 0], atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_maximal_lottery_matches_support_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed % 5
    X = np.triu(rng.uniform(-0.5, 0.5, (n, n)), 1)
    M = X - X.T
    p = maximal_lottery(M)
    assert (M.T @ p).min() >= -1e-12 and p.min() >= 0 and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, maximal_lottery_by_supports(M), atol=1e-9)


def test_maximal_lottery_refuses_a_matrix_that_is_not_a_game():
    with pytest.raises(ValueError, match="antisymmetric"):
        maximal_lottery(np.ones((2, 2)))
    W = np.full((3, 3), np.nan)
    with pytest.raises(ValueError, match="never judged"):
        ev.population(W)
