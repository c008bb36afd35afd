"""The default campaign: a tiny causal LM learns the intransitive text world with INPO, through Prefect."""

import math
import os
import shutil

import pandas as pd
import pytest
from store_contents import parquet_files

from data import Store
from data.rounds import rounds_table
from pipelines import flows
from pipelines.config import default_config_path, load_config

pytestmark = pytest.mark.slow


def test_demo_campaign_beats_the_reference(tmp_path, prefect_harness):
    config = load_config(default_config_path(), store=str(tmp_path / "store"))
    flows.alignment_campaign(config)
    table = rounds_table(Store(config.store))
    assert list(table["round"]) == [1, 2, 3]
    last = table.iloc[-1]
    # fixed seed: the new policy wins against the reference on held-out prompts, beyond the interval
    assert last["eval/win_rate_vs_ref"] - last["eval/win_rate_ci95"] > 0.5, table[["eval/win_rate_vs_ref", "eval/win_rate_ci95"]]
    assert last["eval/pairs"] == 8 * 8
    assert "loss/inpo" in table and table["perf/tokens_per_s"].gt(0).all()

    store = Store(config.store)
    responses = store.read("responses")
    # every response keeps the tokens it was sampled as, which its log-probs are of
    assert responses["token_ids"].map(lambda ids: ids is not None and len(ids) > 0).all()
    assert (responses["token_ids"].map(len) == responses["n_tokens"]).all()
    logprobs = store.read("logprobs")
    assert not logprobs.duplicated(["response_id", "policy_version"]).any()
    # the reference scored the training responses it needed exactly once, whatever the round
    assert set(logprobs["policy_version"]) >= {"v0", "v1", "v2"}

    files = parquet_files(config.store)
    flows.alignment_round(config, 3)
    assert parquet_files(config.store) == files


def test_sppo_trains_per_response_in_a_campaign(tmp_path, prefect_harness):
    config = load_config(default_config_path(), store=str(tmp_path / "store"), rounds=1, solver={"algorithm": "sppo", "loss": {"eta": 10.0}})
    flows.alignment_campaign(config)
    table = rounds_table(Store(config.store))
    assert "loss/sppo" in table and 0.0 <= table["pref/win_rate"].iloc[0] <= 1.0
    assert os.path.exists(os.path.join(config.store, "checkpoints", "v1.json"))  # its manifest (data/checkpoints.py)


def test_nash_md_compares_each_sample_with_one_from_the_mixture(tmp_path, prefect_harness):
    config = load_config(
        default_config_path(), store=str(tmp_path / "store"), rounds=2, solver={"algorithm": "nash_md", "loss": {"beta": 0.1}}, sampling={"samples_per_prompt": 4, "mixture_weight": 0.5}
    )
    flows.alignment_campaign(config)
    store = Store(config.store)
    table = rounds_table(store)
    assert "loss/nash_md" in table and os.path.exists(os.path.join(config.store, "checkpoints", "v2.json"))

    responses = store.read("responses", rounds=[2]).set_index("response_id")
    train = responses[responses["prompt_id"].isin(store.read("prompts").query("split == 'train'")["prompt_id"])]
    assert train["policy_version"].value_counts().to_dict() == {"v1": 12 * 4, "v1-mixture": 12 * 4}
    comps = store.read("comparisons", rounds=[2])
    comps = comps[comps["a_id"].isin(train.index)]
    versions = list(zip(comps["a_id"].map(responses["policy_version"]), comps["b_id"].map(responses["policy_version"])))
    # one pair per sample of π_1 (identical texts skipped), with its own mixture opponent, in a random order
    assert {frozenset(v) for v in versions} == {frozenset({"v1", "v1-mixture"})} and 0.8 * 48 <= len(comps) <= 48
    assert not pd.concat([comps["a_id"], comps["b_id"]]).duplicated().any()  # no sample, and no opponent, in two pairs
    assert 0 < sum(a == "v1" for a, _ in versions) < len(versions)
    # μ scores the training samples of π_1 the loss uses; their opponents need no log-probs under μ
    ref = set(store.read("logprobs").query("policy_version == 'v0' and round == 2")["response_id"]) & set(train.index)
    assert ref and ref <= set(train.index[train["policy_version"] == "v1"])


def test_a_round_resumed_after_its_update_reports_the_round(tmp_path, prefect_harness):
    config = load_config(default_config_path(), store=str(tmp_path / "store"), rounds=2)
    flows.alignment_campaign(config)
    store = Store(config.store)
    first = rounds_table(store).set_index("round").loc[2]
    # the run died after round 2's update, before its row was written: the next run redoes only the row
    shutil.rmtree(os.path.join(config.store, "rounds", "round=2"))
    flows.alignment_campaign(config)
    row = rounds_table(store).set_index("round").loc[2]
    assert row["pref/judged_now"] == 0  # this attempt judged nothing: the store had every pair
    train = store.read("comparisons", rounds=[2]).merge(store.read("prompts"), on="prompt_id").query("split == 'train'")
    assert row["pref/round_judged"] == first["pref/round_judged"] == train["p_a"].notna().sum() > 0
    # the update that made v2 ran in the first attempt: its loss is kept beside the checkpoint
    assert math.isfinite(row["loss/inpo"]) and row["loss/inpo"] == first["loss/inpo"]
