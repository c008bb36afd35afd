"""The synthetic text world: the groups' votes worked by hand, a preference cycle, the oracle protocol."""

from fractions import Fraction

import numpy as np
import pytest

from data.keys import prompt_id
from oracles.games import check_preference_matrix
from oracles.protocol import Oracle, Pair
from oracles.text_world import DEFAULT_GROUPS, Group, TextWorldOracle, text_world_prompts

A = "aaaa"  # share of "a" 1, length 4 (8 from 12), 1 distinct character
B = "abcdefghijk"  # share 1/11, length 11 (1 from 12), 11 distinct
C = "aaaaaaaaaabcdefghijklm"  # share 10/22, length 22 (10 from 12), 13 distinct


def pair(a: str, b: str, prompt: str = "Write about the sea.") -> Pair:
    return Pair(prompt_id(prompt), prompt, "r-" + a, a, "r-" + b, b)


def test_each_group_scores_its_property():
    fond, brief, varied = DEFAULT_GROUPS
    assert [fond.score(t) for t in (A, B, C, "")] == [1, Fraction(1, 11), Fraction(10, 22), 0]
    assert [brief.score(t) for t in (A, B, C)] == [-8, -1, -10]
    assert [varied.score(t) for t in (A, B, C)] == [1, 11, 13]
    assert Group("e", "fondness", char="e").vote("eee", "ee") == 0.5  # equal shares tie
    assert Group("len", "length", target=3).vote("ab", "abcd") == 0.5  # both one character away


def test_a_preference_cycle_exists():
    oracle = TextWorldOracle()
    # B ≻ A by length and variety; A ≻ C by share of "a" and length; C ≻ B by share of "a" and variety
    assert oracle.votes(B, A) == {"a-lovers": 0.0, "brief": 1.0, "varied": 1.0}
    assert oracle.votes(A, C) == {"a-lovers": 1.0, "brief": 1.0, "varied": 0.0}
    assert oracle.votes(C, B) == {"a-lovers": 1.0, "brief": 0.0, "varied": 1.0}
    assert oracle.prob(B, A) == oracle.prob(A, C) == oracle.prob(C, B) == pytest.approx(2 / 3)
    P = oracle.matrix([A, B, C])
    np.testing.assert_allclose(P, [[0.5, 1 / 3, 2 / 3], [2 / 3, 0.5, 1 / 3], [1 / 3, 2 / 3, 0.5]])
    # no ranking of the three agrees with every majority: the world has no Bradley–Terry reward
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
        assert any(P[order[i], order[j]] < 0.5 for i in range(3) for j in range(i + 1, 3))


def test_probabilities_form_a_preference_matrix_and_weights_count():
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcde "), size=rng.integers(0, 20))) for _ in range(12)]
    check_preference_matrix(TextWorldOracle().matrix(texts))  # P + Pᵀ = 1, entries in [0, 1]
    heavy = TextWorldOracle(groups=(Group("a-lovers", "fondness", weight=2.0), *DEFAULT_GROUPS[1:]))
    assert heavy.prob(B, A) == pytest.approx(2 / 4)  # a-lovers (weight 2) against brief and varied
    assert heavy.prob(A, A) == 0.5


def test_judge_implements_the_oracle_protocol():
    oracle = TextWorldOracle()
    assert isinstance(oracle, Oracle)
    judgments = oracle.judge([pair(B, A), pair(A, B), pair(A, A)])
    assert [j.p_a for j in judgments] == pytest.approx([2 / 3, 1 / 3, 0.5])
    assert [j.n_votes for j in judgments] == [3, 3, 3]
    assert judgments[0].detail == {"votes": {"a-lovers": 0.0, "brief": 1.0, "varied": 1.0}}
    rows = [j.row(oracle.oracle_id, round=0) for j in judgments]
    assert [r["label"] for r in rows] == ["a", "b", "tie"]
    assert all(r["oracle_id"] == oracle.oracle_id and r["error"] is None for r in rows)


def test_oracle_id_is_stable_and_follows_the_settings():
    assert TextWorldOracle().oracle_id == TextWorldOracle().oracle_id
    assert TextWorldOracle().oracle_id.startswith("text_world:text_world:")
    ids = {
        TextWorldOracle().oracle_id,
        TextWorldOracle(groups=(Group("a-lovers", "fondness", char="e"), *DEFAULT_GROUPS[1:])).oracle_id,
        TextWorldOracle(groups=(DEFAULT_GROUPS[0], Group("brief", "length", target=20), DEFAULT_GROUPS[2])).oracle_id,
        TextWorldOracle(mode="bernoulli").oracle_id,
        TextWorldOracle(mode="bernoulli", seed=1).oracle_id,
    }
    assert len(ids) == 5
    assert TextWorldOracle(seed=5).oracle_id == TextWorldOracle().oracle_id  # the seed plays no part in exact mode


def test_bernoulli_mode_is_one_reproducible_vote_with_the_right_mean():
    oracle = TextWorldOracle(mode="bernoulli", seed=3)
    pairs = [Pair(f"p-{i}", "x", f"r-{i}", B, f"s-{i}", A) for i in range(3000)]
    votes = [j.p_a for j in oracle.judge(pairs)]
    assert set(votes) <= {0.0, 1.0} and all(j.n_votes == 1 for j in oracle.judge(pairs[:5]))
    assert np.mean(votes) == pytest.approx(2 / 3, abs=0.03)  # 4 standard errors ≈ 0.034
    assert [j.p_a for j in oracle.judge(pairs[:50])] == votes[:50]
    assert [j.p_a for j in TextWorldOracle(mode="bernoulli", seed=4).judge(pairs[:50])] != votes[:50]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        Group("x", "loudness")
    with pytest.raises(ValueError, match="one character"):
        Group("x", "fondness", char="ab")
    with pytest.raises(ValueError, match="mode"):
        TextWorldOracle(mode="vibes")
    with pytest.raises(ValueError, match="distinct"):
        TextWorldOracle(groups=(DEFAULT_GROUPS[0], DEFAULT_GROUPS[0]))


def test_prompts_train_and_held_out():
    train, held_out = text_world_prompts("train"), text_world_prompts("eval")
    assert len(train) == 24 and len(held_out) == 8
    assert len(set(train)) == 24 and not set(train) & set(held_out)
    assert text_world_prompts("train") == train  # fixed, not drawn
    assert all(0 < len(p) < 40 for p in train + held_out)  # short: a byte-level model reads every byte
    with pytest.raises(ValueError):
        text_world_prompts("test")
