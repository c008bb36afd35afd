"""A whole campaign through Prefect: it learns, it resumes, and a repeated round adds nothing."""

import os
import shutil

import numpy as np
import pytest
from store_contents import parquet_files

from data import Store
from data.rounds import rounds_table
from pipelines import flows, stages
from pipelines.config import (
    TrainerSettings,
    config_from_settings,
    load_config,
    parse_config,
)
from pipelines.oracle_factory import build_oracle
from pipelines.versions import (
    checkpoint_dir,
    ensure_reference,
    has_checkpoint,
    load_policy,
)
from pipelines.world import World

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
    table = rounds_table(Store(config.store))
    assert list(table["round"]) == [1, 2, 3, 4]
    gap = table["eval/duality_gap"].to_numpy()
    world = World(config)
    start = np.mean([stages.tabular.duality_gap(world.reference()[p], P, world.reference()[p], 0.3) for p, P in world.games.items()])
    assert np.all(np.diff(np.r_[start, gap]) < 0), f"gap should fall every round: {start}, {gap}"
    assert gap[-1] < 0.5 * start
    assert np.all(table["pref/judged_now"] > 0)
    # one attempt per round judged all of the round's pairs, in both phases of Nash-MP (midpoint, update)
    assert (table["pref/round_judged"] == table["pref/judged_now"] + table["midpoint/pref/judged_now"]).all()
    # a finished round's writes (both phases' samples and judge chunks) are merged: one file per table
    store = Store(config.store)
    assert {len(store.files(t, rounds=[r])) for t in ("responses", "comparisons") for r in range(1, 5)} == {1}

    before = parquet_files(config.store)
    flows.alignment_round(config, 3)  # a finished round, run again
    flows.alignment_campaign(config)  # and the whole campaign
    assert parquet_files(config.store) == before
    assert os.path.exists(os.path.join(config.store, "plots", "metrics.png"))


def test_learning_with_noisy_votes(tmp_path, prefect_harness):
    config = _config(tmp_path, rounds=5, oracle={"kind": "matrix", "mode": "bernoulli"}, solver={"algorithm": "inpo", "beta": 0.5})
    flows.alignment_campaign(config)
    gap = rounds_table(Store(config.store))["eval/duality_gap"].to_numpy()
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


def test_a_checkpoint_without_its_manifest_is_not_taken_and_an_old_store_reads(tmp_path):
    config, store = _config(tmp_path), Store(tmp_path / "store")
    world = World(config)
    ensure_reference(store, config, world)
    assert has_checkpoint(store, "v0") and os.path.isfile(store.path("checkpoints/v0.json"))
    reference = load_policy(store, "v0", config, world)
    # a half-written checkpoint: its files, no manifest (a crash before the last write)
    shutil.copytree(store.path(checkpoint_dir("v0")), store.path(checkpoint_dir("v1")))
    assert not has_checkpoint(store, "v1")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_policy(store, "v1", config, world)
    store.delete("checkpoints/v0.json")
    assert not has_checkpoint(store, "v0")
    # a store written before manifests marked v0 with checkpoints/v0/_COMPLETE: it reads, and is migrated
    store.write_bytes(f"{checkpoint_dir('v0')}/_COMPLETE", b"")
    assert has_checkpoint(store, "v0") and os.path.isfile(store.path("checkpoints/v0.json"))
    assert load_policy(store, "v0", config, world).responses == reference.responses


def test_solver_configs_come_from_settings_whole():
    from solvers.preference_model import PreferenceTrainConfig
    from solvers.trainer import TrainerConfig

    config = parse_config({**_raw_cascade(), "trainer": {"lr": 0.01, "epochs": 2, "compile": True}})
    built = config_from_settings(TrainerConfig, config.trainer, pipeline_only=TrainerSettings.PIPELINE_ONLY, loss="inpo", seed=3)
    assert (built.lr, built.epochs, built.compile, built.seed) == (0.01, 2, True, 3)
    assert config_from_settings(PreferenceTrainConfig, config.oracle.train, device="cpu").lr == config.oracle.train.lr
    with pytest.raises(TypeError, match="window"):  # a setting the trainer would silently drop is refused
        config_from_settings(TrainerConfig, TrainerSettings())


def _raw_cascade():
    return {
        "name": "settings",
        "store": "unused",
        "rounds": 1,
        "prompts": {"source": "text_world"},
        "policy": {"kind": "causal_lm", "model": "tiny"},
        "oracle": {"kind": "cascade", "init": "tiny", "judge": {"kind": "text_world"}},
        "solver": {"algorithm": "inpo"},
    }
