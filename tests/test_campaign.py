"""A whole campaign through Prefect: it learns, it resumes, and a repeated round adds nothing."""

import os

import numpy as np
import pytest

from data import Store
from pipelines import flows, stages
from pipelines.components import World, build_oracle
from pipelines.config import load_config, parse_config
from store_contents import parquet_files

pytestmark = pytest.mark.slow
HERE = os.path.dirname(__file__)


def _config(tmp_path, **changes):
    raw = {
        "name": "test",
        "store": str(tmp_path / "store"),
        "rounds": 4,
        "games": [{"kind": "cyclic", "n": 5, "strength": 0.9}, {"kind": "random", "n": 6, "seed": 3}],
        "oracle": {"kind": "matrix", "mode": "exact"},
        "solver": {"algorithm": "nash_mp", "beta": 0.3},
        "sampling": {"samples_per_prompt": 6},
        "pairing": {"strategy": "both_orders"},
    }
    raw.update(changes)
    return parse_config(raw)


def test_campaign_learns_and_a_repeated_round_adds_nothing(tmp_path, prefect_harness):
    config = _config(tmp_path)
    flows.alignment_campaign(config)
    table = stages.rounds_table(Store(config.store))
    assert list(table["round"]) == [1, 2, 3, 4]
    gap = table["eval/duality_gap"].to_numpy()
    world = World(config)
    start = np.mean([stages.tabular.duality_gap(world.reference()[p], P, world.reference()[p], 0.3) for p, P in world.games.items()])
    assert np.all(np.diff(np.r_[start, gap]) < 0), f"gap should fall every round: {start}, {gap}"
    assert gap[-1] < 0.5 * start
    assert np.all(table["pref/judged_now"] > 0)
    # one attempt per round judged all of the round's pairs, in both phases of Nash-MP (midpoint, update)
    assert (table["pref/round_judged"] == table["pref/judged_now"] + table["midpoint/pref/judged_now"]).all()

    before = parquet_files(config.store)
    flows.alignment_round(config, 3)  # a finished round, run again
    flows.alignment_campaign(config)  # and the whole campaign
    assert parquet_files(config.store) == before
    assert os.path.exists(os.path.join(config.store, "plots", "metrics.png"))


def test_learning_with_noisy_votes(tmp_path, prefect_harness):
    config = _config(tmp_path, rounds=5, oracle={"kind": "matrix", "mode": "bernoulli"}, solver={"algorithm": "inpo", "beta": 0.5})
    flows.alignment_campaign(config)
    gap = stages.rounds_table(Store(config.store))["eval/duality_gap"].to_numpy()
    assert gap[-1] < gap[0]


def test_crashed_judge_stage_resumes_without_asking_twice(tmp_path, prefect_harness, monkeypatch):
    config = _config(tmp_path, rounds=1, solver={"algorithm": "inpo", "beta": 0.3})
    store, world = Store(config.store), World(config)
    # the round got as far as judging half of its pairs before it died
    stages.register_prompts(store, world)
    policy = flows.load_policy(store, "v0", config, world)
    stages.sample_responses(store, policy, world.prompts, round=1, policy_version="v0", k=6, seed=config.seed)
    pairs = stages.pair_responses(store, round=1, policy_version="v0", strategy="both_orders", skip_identical=True, seed=config.seed)
    oracle = build_oracle(config, world)
    stages.judge_pairs(store, oracle, pairs[: len(pairs) // 2], round=1)

    asked = []

    class Counting:
        oracle_id = oracle.oracle_id

        def judge(self, batch):
            asked.extend(batch)
            return oracle.judge(batch)

    monkeypatch.setattr(flows, "build_oracle", lambda c, w: Counting())
    flows.alignment_round(config, 1)
    comps = store.read("comparisons")
    assert len(asked) == len(pairs) - len(pairs) // 2
    assert len(comps) == len(pairs) and comps["comparison_id"].is_unique


def test_example_configs_validate():
    for name in os.listdir(os.path.join(HERE, "..", "examples")):
        if name.endswith(".yaml"):
            load_config(os.path.join(HERE, "..", "examples", name))
