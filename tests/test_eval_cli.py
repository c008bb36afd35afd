"""`nashflow eval` end to end on a finished demo store: stored samples and judgments are reused, a
second run stores nothing, population figures add up, and evaluation judgments never train."""

import json

import numpy as np
import pytest

from store_contents import parquet_files
from test_cli import nashflow


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("eval") / "store")
    nashflow("run", "pipelines/demo.yaml", "--store", store, "--rounds", "2")
    return store


def eval_json(store, *args):
    return json.loads(nashflow("eval", store, "--json", *args).stdout)


def test_eval_reuses_the_rounds_samples_and_judgments(demo_store):
    before = parquet_files(demo_store)
    report = eval_json(demo_store)  # against the reference: what each round's evaluation stage judged
    assert report["sampled"] == 0 and report["judged_now"] == 0
    assert parquet_files(demo_store) == before
    rows = {r["version"]: r for r in report["rows"]}
    assert set(rows) == {"v0", "v1", "v2"}
    for v in ("v1", "v2"):
        assert rows[v]["opponent"] == "v0" and rows[v]["pairs"] == 8 * 8
        assert 0 <= rows[v]["lc_win_rate"] <= 1 and rows[v]["lc_win_rate_ci95"] > 0
        assert rows[v]["mean_tokens"] > 0 and 0 <= rows[v]["truncated_share"] <= 1
    # the same figures the round's evaluation stage stored (and `status` lists)
    status = nashflow("status", demo_store).stdout
    assert "LC win" in status and "tokens" in status


def test_population_is_judged_once(demo_store):
    first = eval_json(demo_store, "--against", "population")
    assert first["sampled"] == 0 and first["judged_now"] == 8 * 8  # v1 vs v2 only: both vs v0 are stored
    files = parquet_files(demo_store)
    again = eval_json(demo_store, "--against", "population")
    assert again["judged_now"] == 0 and parquet_files(demo_store) == files
    pop = again["population"]
    W = np.array(pop["W"])
    np.testing.assert_allclose(W + W.T, 1.0)
    lottery = np.array(pop["maximal_lottery"])
    assert lottery.sum() == pytest.approx(1.0)
    assert ((W - 0.5).T @ lottery >= -1e-9).all()  # no version beats the mixture
    assert 0 <= pop["cyclic_triples"] <= pop["triples"] == 1


def test_evaluation_judgments_never_train(demo_store):
    from data import Store
    from solvers.preference_model import examples_from_store

    store = Store(demo_store)
    split = store.read("prompts").set_index("prompt_id")["split"]
    assert {split[e.prompt_id] for e in examples_from_store(store)} == {"train"}
    assert "eval" in {split[e.prompt_id] for e in examples_from_store(store, splits=None)}


def test_eval_names_a_bad_option(demo_store):
    out = nashflow("eval", demo_store, "--against", "nobody", check=False)
    assert out.returncode == 2 and "--against" in out.stderr
    out = nashflow("eval", demo_store, "--versions", "v9", check=False)
    assert out.returncode == 2 and "v9" in out.stderr


def test_eval_against_previous_and_with_another_oracle(demo_store, tmp_path):
    previous = eval_json(demo_store, "--against", "previous")
    rows = {r["version"]: r for r in previous["rows"]}
    assert rows["v2"]["opponent"] == "v1" and rows["v1"]["opponent"] == "v0" and "opponent" not in rows["v0"]
    oracle = tmp_path / "voters.yaml"
    oracle.write_text("oracle: {kind: text_world, mode: bernoulli, seed: 5}\n")
    other = eval_json(demo_store, "--oracle", str(oracle), "--versions", "v2")
    assert other["oracle_id"] != previous["oracle_id"] and other["sampled"] == 0 and other["judged_now"] == 8 * 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("oracle: {kind: text_world, mode: sometimes}\n")
    out = nashflow("eval", demo_store, "--oracle", str(bad), check=False)
    assert out.returncode == 2 and "bad.yaml" in out.stderr and "oracle.text_world.mode" in out.stderr


def test_eval_against_a_file_of_reference_outputs(demo_store, tmp_path):
    from oracles.text_world import text_world_prompts

    held_out = text_world_prompts("eval")[:3]
    path = tmp_path / "reference.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output": "A short answer."}) + "\n" for p in held_out))
    first = eval_json(demo_store, "--against", str(path), "--versions", "v2")
    (row,) = first["rows"]
    assert row["opponent"].startswith("file-") and row["pairs"] == 3 * 8
    assert first["sampled"] == 0  # v2's held-out samples of round 2 cover these prompts
    files = parquet_files(demo_store)
    assert eval_json(demo_store, "--against", str(path), "--versions", "v2")["judged_now"] == 0 and parquet_files(demo_store) == files
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": text_world_prompts("train")[0], "output": "x"}) + "\n")
    out = nashflow("eval", demo_store, "--against", str(train), check=False)
    assert out.returncode == 2 and "train.jsonl:1" in out.stderr and "training prompts" in out.stderr
