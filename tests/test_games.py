"""Preference matrices and the matrix-game oracle."""

import numpy as np
import pytest

from oracles.games import GameError, check_preference_matrix, cyclic_game, load_game, random_game
from oracles.matrix import MatrixOracle
from oracles.protocol import Oracle, Pair


def test_generators_make_preference_matrices():
    for P in (cyclic_game(3), cyclic_game(6, 0.8), random_game(50, 1)):
        check_preference_matrix(P)
        assert np.allclose(np.diag(P), 0.5)
    rps = cyclic_game(3)
    assert rps[0, 1] == 1.0 and rps[1, 2] == 1.0 and rps[2, 0] == 1.0  # 0 ≻ 1 ≻ 2 ≻ 0


@pytest.mark.parametrize(
    "P, message",
    [
        (np.array([[0.5, 0.7], [0.4, 0.5]]), r"P\[0, 1\] \+ P\[1, 0\] = 1.1"),
        (np.array([[0.5, 1.2], [-0.2, 0.5]]), r"P\[0, 1\] = 1.2 is not a probability"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), r"P\[0, 1\] = nan"),
        (np.ones((2, 3)), "square"),
    ],
)
def test_bad_matrices_are_refused(P, message):
    with pytest.raises(GameError, match=message):
        check_preference_matrix(P)


def test_load_game_names_the_file(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.array([[0.5, 0.9], [0.9, 0.5]]))
    with pytest.raises(GameError, match="bad.npy"):
        load_game(str(path))
    np.save(path, random_game(4))
    assert load_game(str(path)).shape == (4, 4)


def _pair(a, b, prompt="g"):
    return Pair("p-1", prompt, f"r-{a}", a, f"r-{b}", b)


def test_matrix_oracle_exact_and_bernoulli():
    P = random_game(4, seed=3)
    exact = MatrixOracle({"g": P}, mode="exact")
    assert isinstance(exact, Oracle)
    (j,) = exact.judge([_pair("y1", "y3")])
    assert j.p_a == P[1, 3]
    vote = MatrixOracle({"g": P}, mode="bernoulli", seed=7)
    answers = [j.p_a for j in vote.judge([Pair("p", "g", f"a{i}", "y0", f"b{i}", "y2") for i in range(4000)])]
    assert set(answers) == {0.0, 1.0}
    assert np.mean(answers) == pytest.approx(P[0, 2], abs=0.03)
    assert answers[:50] == [j.p_a for j in vote.judge([Pair("p", "g", f"a{i}", "y0", f"b{i}", "y2") for i in range(50)])]  # asked again: same answer
    assert exact.oracle_id != vote.oracle_id != MatrixOracle({"g": P}, mode="bernoulli", seed=8).oracle_id


def test_matrix_oracle_abstains_on_unknown_responses():
    (j,) = MatrixOracle({"g": cyclic_game(3)}).judge([_pair("y0", "y9")])
    assert j.p_a is None and "y9" in j.error
    (j,) = MatrixOracle({"g": cyclic_game(3)}).judge([_pair("y0", "y1", prompt="other")])
    assert j.p_a is None and "no game" in j.error
