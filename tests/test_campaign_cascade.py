"""A cascade campaign through Prefect: a tiny learned preference model answers the pairs it is sure of, the
text world stands in for an expensive judge within a per-round budget, and the model is retrained after
each round on what the judge answered. Plus the cascade's people stage (a stand-in), the `learned`
oracle kind, `nashflow status --fit-gap`, and the config's refusals."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from store_contents import parquet_files

from data import Store
from data.rounds import rounds_table
from oracles.protocol import Judgment
from pipelines import flows, stages
from pipelines.config import ConfigError, parse_config
from pipelines.oracle_factory import (
    OracleSpec,
    build_oracle,
    campaign_oracle_ids,
    people_spec,
)
from pipelines.preference_models import model_rounds, read_manifest
from pipelines.world import World

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 12  # judge pairs per round, of 36 (6 prompts × 6 pairs)


def _raw(store, **oracle):
    return {
        "name": "cascade-test",
        "store": str(store),
        "rounds": 2,
        "prompts": {"source": "text_world", "limit_train": 6, "limit_eval": 2},
        "policy": {"kind": "causal_lm", "model": "tiny", "max_new_tokens": 8},
        "oracle": {
            "kind": "cascade",
            "init": "tiny",
            "confidence": 0.1,
            "judge": {"kind": "text_world"},
            "budget": {"pairs": BUDGET},
            "retrain": True,
            "train": {"lr": 3e-3, "schedule": "constant", "epochs": 3, "micro_batch_size": 16},
            **oracle,
        },
        "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}},
        "sampling": {"samples_per_prompt": 4},
        "trainer": {"lr": 0.002, "micro_batch_size": 16},
        "evaluation": {"samples_per_prompt": 2},
    }


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, prefect_harness):
    """Two rounds, run once for the tests of this file (one torch thread: conftest's one_torch_thread)."""
    config = parse_config(_raw(tmp_path_factory.mktemp("cascade") / "store"))
    flows.alignment_campaign(config)
    return config


@pytest.mark.slow
def test_a_cascade_round_routes_within_its_budget_records_who_answered_and_retrains(campaign):
    store, world = Store(campaign.store), World(campaign)
    table = rounds_table(store)
    assert list(table["round"]) == [1, 2]

    # one oracle id for the whole campaign, read by the solver; the model version is in each detail
    (cascade_id,) = campaign_oracle_ids(campaign, world)
    assert cascade_id.startswith("cascade:cascade-test:")
    comps = store.read("comparisons")
    assert set(comps["oracle_id"]) == {cascade_id}
    # who answered lives in typed columns (answered_by, stage, model_version, route); detail keeps the raw rest
    details = [json.loads(d) if d else {} for d in comps["detail"]]
    comps["held_out"] = [bool(d.get("held_out")) for d in details]
    train = comps[~comps["held_out"]]
    for r, version in ((1, "preference_models/r0"), (2, "preference_models/r1")):
        mine = train[train["round"] == r]
        assert set(mine["model_version"]) == {version}
        by_judge = mine[mine["stage"] == "judge"]
        assert 0 < len(by_judge) <= BUDGET  # the budget holds, per round
        assert by_judge["answered_by"].str.startswith("text_world:").all()
        assert mine.loc[mine["stage"] == "learned", "answered_by"].str.startswith("learned:").all()
        answered = mine[mine["stage"].notna()]
        assert all([s["oracle"] for s in route if s["accepted"]] == [who] for route, who in zip(answered["route"], answered["answered_by"]))
        # past the budget: stored without a probability (a rerun does not ask again), the route says why
        over = mine[[details[i].get("not_judged") == "budget" for i in mine.index]]
        assert len(over) and all(route[-1]["over_budget"] for route in over["route"])
    learned_ids = set(train.loc[train["stage"] == "learned", "answered_by"]) | {route[0]["oracle"] for route in train["route"]}
    assert len(learned_ids) == 2  # r0 and r1 answered as two oracles, told apart by their fingerprints
    assert comps.loc[[d.get("not_judged") is not None for d in details], "p_a"].isna().all()
    # the held-out evaluation pairs went to the judge alone
    held_out = comps[comps["held_out"]]
    assert len(held_out) and held_out["answered_by"].str.startswith("text_world:").all()

    # a checkpoint per round, the next round judged with it, and the metrics of both
    assert model_rounds(store) == [0, 1, 2]
    fingerprints = {read_manifest(store, r)["fingerprint"] for r in (0, 1, 2)}
    assert len(fingerprints) == 3
    assert {route[0]["oracle"].split("@")[1][:12] for route in train["route"]} == {read_manifest(store, r)["fingerprint"][:12] for r in (0, 1)}
    for key in ("cascade/share/learned", "cascade/share/judge", "cascade/share/not_judged", "cascade/cost_usd/judge", "prefmodel/eval_logloss", "prefmodel/train_pairs"):
        assert key in table, key
    assert (table["cascade/budget_left_pairs/judge"] >= 0).all()
    assert list(table["prefmodel/version"]) == [1.0, 2.0] and list(table["cascade/prefmodel_version"]) == [0, 1]
    assert table["prefmodel/train_pairs"].iloc[1] > table["prefmodel/train_pairs"].iloc[0]  # judged pairs accumulate

    # a finished round run again asks nobody and writes nothing
    before = parquet_files(campaign.store)
    flows.alignment_round(campaign, 2)
    assert parquet_files(campaign.store) == before and model_rounds(store) == [0, 1, 2]


@pytest.mark.slow
def test_people_after_the_judge_get_its_overflow_within_their_budget(campaign, tmp_path, monkeypatch):
    class People:  # a queued oracle: people answer later, under their own id
        def __init__(self):
            self.oracle_id = people_spec(config).oracle_id
            self.submitted = []

        def submit(self, pairs, *, round):
            self.submitted += [(p, round) for p in pairs]

    shutil.copytree(campaign.store, tmp_path / "store")
    raw = _raw(tmp_path / "store", people=True, people_pairs=5, budget={"pairs": 4})
    config = parse_config({**raw, "humans": {"share": 0.0, "url": "http://127.0.0.1:1"}})
    people = People()
    monkeypatch.setattr("pipelines.oracle_factory.people_spec", lambda config: OracleSpec(people.oracle_id, lambda: people))
    store = Store(config.store)
    pairs = stages.pair_responses(store, round=2, policy_version="v1", strategy="all_pairs", skip_identical=True, seed=0)
    oracle = build_oracle(config, World(config))
    judgments = oracle.judge(pairs)
    assert not any(j.skipped for j in judgments)
    stage = [j.detail.get("stage") or j.detail.get("not_judged") for j in judgments]
    assert stage.count("judge") <= 4 and stage.count("people") == 5 == len(people.submitted)
    assert {r for _, r in people.submitted} == {2}
    assert all(j.p_a is None for j in judgments if j.detail.get("not_judged"))
    metrics = oracle.metrics(judgments)
    assert metrics["cascade/share/pending"] == pytest.approx(5 / len(pairs))
    assert metrics["cascade/budget_left_pairs/judge"] == 0 and metrics["cascade/budget_left_pairs/people"] == 0
    assert campaign_oracle_ids(config, World(config)) == {oracle.oracle_id, people.oracle_id}

    # stored, the round's budgets count what it holds: a fresh cascade for the round has nothing left
    store.write("comparisons", [j.row(oracle.oracle_id, 2) for j in judgments])
    again = build_oracle(config, World(config)).for_round(2)
    assert again.budgets["judge"].room() == 0 and again.budgets["people"].room() == 0


@pytest.mark.slow
def test_a_model_changed_after_it_was_written_is_refused(campaign, tmp_path):
    shutil.copytree(campaign.store, tmp_path / "store")
    config = parse_config(_raw(tmp_path / "store"))
    with open(tmp_path / "store" / "preference_models" / "r1" / "preference_model.json", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="changed after it was written"):
        build_oracle(config, World(config)).for_round(2)


@pytest.mark.slow
def test_a_learned_oracle_from_a_checkpoint_answers_every_pair(campaign, tmp_path):
    checkpoint = os.path.join(campaign.store, "preference_models", "r2")
    raw = _raw(tmp_path / "store")
    config = parse_config({**raw, "oracle": {"kind": "learned", "checkpoint": checkpoint}})
    oracle = build_oracle(config, World(config))
    assert campaign_oracle_ids(config, World(config)) == {oracle.oracle_id}
    assert read_manifest(Store(campaign.store), 2)["fingerprint"][:12] in oracle.oracle_id
    pairs = stages.pair_responses(Store(campaign.store), round=2, policy_version="v1", strategy="all_pairs", skip_identical=True, seed=0)
    judgments = oracle.judge(pairs)
    assert pairs and len(judgments) == len(pairs)
    assert all(isinstance(j, Judgment) and not j.skipped and 0 <= j.p_a <= 1 for j in judgments)


@pytest.mark.slow
def test_status_fit_gap_prints_the_gap_and_the_cycle_share(campaign):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", campaign.store, "--fit-gap", "--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "log-loss gap (BT − pairwise):" in proc.stdout and "cyclic triples:" in proc.stdout
    assert "Bradley–Terry" in proc.stdout and "by judge" in proc.stdout  # the rounds table, then the fit


@pytest.mark.slow
def test_a_default_status_does_not_fit(campaign):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", campaign.store], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "by judge" in proc.stdout  # the rounds table, and no fit after it
    assert "log-loss gap" not in proc.stdout and "Bradley–Terry" not in proc.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"oracle": {"kind": "cascade"}}, "oracle.cascade.judge: Field required"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "confidence": 0.7}}, "oracle.cascade.confidence: Input should be less than or equal to 0.5"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "budget": {"usd": 5}}}, "oracle.cascade.budget: usd needs usd_per_pair"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "matrix"}}}, "oracle.judge: the matrix oracle judges the responses of `games`"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "people": True}}, "oracle.people: people are the cascade's last stage, but the campaign has no `humans`"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "people": True}, "humans": {}}, "humans.share is 1: every pair goes to people directly"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "people_pairs": 3}}, "people_pairs is a budget for people, but people is false"),
        ({"humans": {"share": 0}}, "humans.share is 0: people would see only what a cascade passes on"),
        ({"oracle": {"kind": "learned"}}, "oracle.learned.checkpoint: Field required"),
        ({"oracle": {"kind": "cascade", "judge": {"kind": "text_world"}, "train": {"lr": 0}}}, "oracle.cascade.train.lr: Input should be greater than 0"),
    ],
)
def test_bad_cascade_configs_name_the_field(tmp_path, change, message):
    raw = {**_raw(tmp_path / "store"), **change}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert message in str(e.value)


def test_the_example_config_loads():
    from pipelines.config import load_config

    config = load_config(str(ROOT / "examples" / "lm_cascade.yaml"))
    assert config.oracle.kind == "cascade" and config.oracle.retrain
