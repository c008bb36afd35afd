"""The algorithm registry and the typed ``solver`` settings built from it: every algorithm has one entry,
the config reads it, and a setting the campaign's policy kind never reads is refused by name."""

from dataclasses import fields

import numpy as np
import pytest

from oracles.games import cyclic_game
from pipelines.config import SOLVER_SETTINGS, TABULAR_SETTINGS, ConfigError, parse_config
from solvers import algorithms, losses, tabular

BASE = {"name": "x", "store": "s", "rounds": 1}
TABULAR = {**BASE, "games": [{"kind": "cyclic"}], "oracle": {"kind": "matrix"}}
LM = {**BASE, "prompts": {"source": "text_world"}, "policy": {"kind": "causal_lm"}, "oracle": {"kind": "text_world"}}


def refused(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="c.yaml")
    return str(e.value)


def test_every_algorithm_has_one_settings_model_with_the_fields_it_reads():
    assert set(SOLVER_SETTINGS) == set(algorithms.ALGORITHMS)
    assert set(TABULAR_SETTINGS) == {f.name for f in fields(tabular.Params)}
    for name, a in algorithms.ALGORITHMS.items():
        model = SOLVER_SETTINGS[name].model_fields
        assert set(model) == {"algorithm", *(a.tabular_fields if a.has_tabular else ()), *(["loss"] if a.loss else [])}, name
        assert all(field.description for field in model.values()), name


@pytest.mark.parametrize("name", [n for n, a in algorithms.ALGORITHMS.items() if a.has_tabular])
def test_each_tabular_entry_runs_its_exact_step_from_the_config(name):
    config = parse_config({**TABULAR, "solver": {"algorithm": name, "beta": 0.5}})
    params = config.solver.tabular_params()
    assert params.eta == algorithms.get(name).default_eta(0.5)
    P = cyclic_game(3)
    solution = algorithms.get(name).solve(P, np.full(3, 1 / 3), 0.5, 3)
    assert solution.policies.shape == (4, 3) and np.allclose(solution.policies.sum(1), 1)


@pytest.mark.parametrize("name", [n for n, a in algorithms.ALGORITHMS.items() if a.loss is not None])
def test_each_language_model_entry_gets_its_typed_loss_config(name):
    config = parse_config({**LM, "solver": {"algorithm": name}})
    assert isinstance(config.solver.loss, algorithms.get(name).loss.config)


def test_a_solver_without_an_algorithm_is_the_default_algorithm_s():
    config = parse_config({**TABULAR, "solver": {"beta": 0.5}})
    assert config.solver.algorithm == "nash_mp" and config.solver.tabular_params().eta == 2.0
    assert parse_config(TABULAR).solver.algorithm == "nash_mp"


def test_loss_settings_are_typed_and_checked_with_their_path():
    config = parse_config({**LM, "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}}})
    assert config.solver.loss == losses.INPOConfig(eta=0.1, tau=0.1 / 3)
    assert "c.yaml: solver.loss: inpo: eta must be > 0" in refused({**LM, "solver": {"algorithm": "inpo", "loss": {"eta": -1}}})
    assert "solver.loss.rho" in refused({**LM, "solver": {"algorithm": "inpo", "loss": {"rho": 0.5}}})


def test_a_tabular_setting_in_a_language_model_campaign_is_refused_by_name():
    message = refused({**LM, "solver": {"algorithm": "inpo", "beta": 0.5}})
    assert "solver.beta is not used by this campaign" in message
    assert "solver.loss (inpo: eta, tau)" in message  # what this campaign reads instead
    assert "solver.eta" in refused({**LM, "solver": {"algorithm": "mnpo", "eta": 0.5}})


def test_a_language_model_setting_in_a_tabular_campaign_is_refused_by_name():
    assert "solver.loss is not used by this campaign" in refused({**TABULAR, "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}}})
    assert "trainer is not used by this campaign" in refused({**TABULAR, "trainer": {"lr": 0.1}})
    assert "sampling.mixture_weight is not used" in refused({**TABULAR, "sampling": {"mixture_weight": 0.3}})
    assert "sampling.mixture_weight is not used" in refused({**LM, "solver": {"algorithm": "inpo"}, "sampling": {"mixture_weight": 0.3}})
    parse_config({**LM, "solver": {"algorithm": "nash_md"}, "sampling": {"mixture_weight": 0.3}})  # Nash-MD reads it


def test_a_setting_the_algorithm_does_not_have_names_the_algorithm_and_its_settings():
    message = refused({**TABULAR, "solver": {"algorithm": "inpo", "history": 3}})
    assert message == "c.yaml: solver.history: inpo has no setting 'history'; its settings are beta, eta, loss"
    assert "unknown algorithm 'nope'" in refused({**TABULAR, "solver": {"algorithm": "nope"}})


def test_algorithms_without_the_policy_kind_s_dynamics_are_refused():
    assert "no language-model loss" in refused({**LM, "solver": {"algorithm": "onpo"}})
    assert "no tabular dynamics" in refused({**TABULAR, "solver": {"algorithm": "dpo"}})
    # MNPO's exact step needs ρ = β/η ≤ 1: refused when the config is read, not in round 1's update
    assert "ρ" in refused({**TABULAR, "solver": {"algorithm": "mnpo", "beta": 0.5, "eta": 0.1}})
