"""A campaign whose oracle is the LLM judge, end to end over real HTTP to a local OpenAI-compatible stub."""

import os

import pytest
from openai_stub import StubConfig, StubServer

from data import Store
from data.rounds import rounds_table
from pipelines import flows
from pipelines.config import parse_config

pytestmark = pytest.mark.slow
KEY = "sk-test-campaign-judge-0123456789abcdef"


def test_judge_campaign_runs_and_keeps_the_key_out(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.setenv("NASHFLOW_TEST_JUDGE_KEY", KEY)
    with StubServer(StubConfig(latency_s=0.0, api_key=KEY)) as server:  # refuses any other key
        config = parse_config(
            {
                "name": "judged",
                "store": str(tmp_path / "store"),
                "rounds": 2,
                "games": [{"kind": "random", "n": 4, "seed": 1}],
                "oracle": {
                    "kind": "llm_judge",
                    "model": "stub-judge",
                    "base_url": server.base_url,
                    "api_key_env": "NASHFLOW_TEST_JUDGE_KEY",
                    "prices": {"stub-judge": [1.0, 2.0]},
                },
                "solver": {"algorithm": "inpo", "beta": 0.5},
                "sampling": {"samples_per_prompt": 4},
            }
        )
        flows.alignment_campaign(config)
        requests_after_campaign = server.requests
        flows.alignment_round(config, 2)  # the judge's answers are in the store: nothing is asked again
        assert server.requests == requests_after_campaign
    table = rounds_table(Store(config.store))
    assert list(table["round"]) == [1, 2]
    comps = Store(config.store).read("comparisons")
    assert len(comps) and comps["oracle_id"].str.startswith("llm_judge:").all()
    assert comps["p_a"].notna().all() and (comps["cost_usd"] > 0).all()
    assert {"judge/position_bias", "judge/consistency", "cost/usd"} <= set(table.columns)
    for folder, _, files in os.walk(config.store):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert KEY.encode() not in f.read(), f"the API key leaked into {name}"
