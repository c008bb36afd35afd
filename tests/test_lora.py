"""LoRA (solvers/lora.py): an update trains the adapter alone, a killed one resumes, μ and past iterates run on
the policy's one copy of the base weights, a campaign stores adapters and exports a merged model that
computes what base + adapter does, and bench/lora.py runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_trainer import PROMPTS, Y, Y_OTHER, assert_same_weights, make_examples, weights

from solvers import checkpoint as ckpt
from solvers import lora, trainer
from solvers.causal_lm import CausalLMPolicy, tiny_policy
from solvers.trainer import TrainerConfig

ROOT = os.path.join(os.path.dirname(__file__), "..")
SETTINGS = lora.LoraSettings(r=4, alpha=8.0)


def lora_policy(seed: int = 0) -> CausalLMPolicy:
    return lora.for_training(tiny_policy(seed=0), SETTINGS, seed=seed)


def split(model) -> tuple[dict, dict]:
    """(base weights, adapter weights) of a LoRA model, copied."""
    state = weights(model)
    return {k: v for k, v in state.items() if "lora_" not in k}, {k: v for k, v in state.items() if "lora_" in k}


def score(policy) -> torch.Tensor:
    return torch.tensor(policy.score(PROMPTS + PROMPTS, Y + Y_OTHER))


def assert_close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_an_update_with_lora_changes_only_the_adapter():
    plain = tiny_policy(seed=0)
    before = score(plain)
    policy = lora.for_training(plain, SETTINGS, seed=0)
    assert_close(score(policy), before)  # B = 0: a fresh adapter changes nothing
    base, adapter = split(policy.model)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    result = trainer.update(policy, make_examples(plain), TrainerConfig(loss="inpo", lr=1e-2, micro_batch_size=4, max_steps=3))
    base_after, adapter_after = split(policy.model)
    assert_same_weights(base_after, base)  # bit-identical
    assert any(not torch.equal(adapter[k], adapter_after[k]) for k in adapter)
    assert len(result.optimizer_state["state"]) == len(trainable)  # AdamW holds the adapter's moments only
    assert (score(policy) - before).abs().max() > 1e-3
    with lora.running(policy.model, None):  # the adapter off: the base model μ again
        assert_close(score(policy), before)


def test_a_killed_lora_update_resumes_from_its_step_checkpoint(tmp_path):
    cfg = TrainerConfig(loss="inpo", lr=1e-2, micro_batch_size=2, max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    examples = make_examples(tiny_policy(seed=0))
    uninterrupted = lora_policy()
    expected = trainer.update(uninterrupted, examples, cfg, checkpoint_dir=tmp_path / "a")

    def kill_after_step_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        trainer.update(lora_policy(), examples, cfg, checkpoint_dir=tmp_path / "b", on_step=kill_after_step_3)
    step_2 = ckpt.step_checkpoint(tmp_path / "b", 2)
    assert ckpt.latest_checkpoint(tmp_path / "b") == step_2
    # a step checkpoint holds the adapter and the trainer state, not the base weights nor the tokenizer
    assert {f.name for f in step_2.iterdir()} >= {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, ckpt.TRAINER_STATE}
    assert not any(f.name.startswith(("model", "tokenizer")) for f in step_2.iterdir())

    steps_run = []
    resumed_policy = lora_policy()  # a fresh process: base + a new adapter, then the checkpoint's adapter
    resumed = trainer.update(resumed_policy, examples, cfg, checkpoint_dir=tmp_path / "b", on_step=lambda s, m: steps_run.append(s))
    assert steps_run == [3, 4, 5, 6]  # steps 1-2 came from the checkpoint
    assert_same_weights(weights(resumed_policy.model), weights(uninterrupted.model))
    assert [h["loss/inpo"] for h in resumed.history] == [h["loss/inpo"] for h in expected.history]


def test_the_reference_and_a_past_iterate_run_on_the_one_base(tmp_path):
    examples = make_examples(tiny_policy(seed=0))
    cfg = TrainerConfig(loss="inpo", lr=1e-2, micro_batch_size=4, max_steps=2)
    past = lora_policy(seed=1)
    trainer.update(past, examples, cfg)
    lora.save_adapter(past.model, tmp_path / "past")
    ckpt.save_checkpoint(tmp_path / "base", tiny_policy(seed=0).model, past.tokenizer)
    current = lora_policy(seed=2)
    trainer.update(current, examples[::-1], cfg)
    trained = {n for n, p in current.model.named_parameters() if p.requires_grad}
    before = weights(current.model)

    # the past iterate's adapter run on the current policy's base = that version loaded on its own
    as_past = lora.AdapterScorer(current, lora.read_adapter(tmp_path / "past")).score(PROMPTS, Y)
    loaded, _ = lora.load_checkpoint(tmp_path / "base", tmp_path / "past")
    assert_close(torch.tensor(as_past), torch.tensor(loaded.score(PROMPTS, Y)))
    assert (torch.tensor(as_past) - torch.tensor(current.score(PROMPTS, Y))).abs().max() > 1e-3
    assert_close(torch.tensor(lora.AdapterScorer(current, None).score(PROMPTS, Y)), torch.tensor(tiny_policy(seed=0).score(PROMPTS, Y)))
    # and the policy is as it was: its own adapter, the same weights, the same trainable parameters
    assert_same_weights(weights(current.model), before)
    assert {n for n, p in current.model.named_parameters() if p.requires_grad} == trained


def test_lora_settings_are_checked_against_the_model_and_the_stored_adapter():
    with pytest.raises(ValueError, match="policy.lora.target_modules"):
        lora.for_training(tiny_policy(seed=0), lora.LoraSettings(target_modules=("no_such_proj",)))
    policy = lora_policy()
    with pytest.raises(ValueError, match=r"policy.lora differs .*r: stored 4, configured 8"):
        lora.for_training(policy, lora.LoraSettings(r=8, alpha=8.0))
    with pytest.raises(ValueError, match="policy.lora is not set"):
        lora.for_training(policy, None)
    assert lora.for_training(policy, SETTINGS) is policy


def test_the_config_takes_lora_settings_and_refuses_the_removed_lean_forward():
    from pipelines.config import ConfigError, parse_config
    from pipelines.versions import lora_settings

    def config(**policy):
        return parse_config({"name": "x", "store": "s", "rounds": 1, "prompts": {}, "policy": {"kind": "causal_lm", **policy}, "oracle": {"kind": "text_world"}})

    assert lora_settings(config()) is None
    assert lora_settings(config(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})) == lora.LoraSettings(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"lora\.r: Input should be greater than or equal to 1"):
        config(lora={"r": 0})
    with pytest.raises(ConfigError, match="policy.lean_forward was removed"):
        config(lean_forward=False)


@pytest.mark.slow
def test_a_lora_campaign_stores_adapters_and_exports_a_merged_model(tmp_path, prefect_harness, monkeypatch):
    from data import Store
    from data.rounds import rounds_table
    from pipelines import flows, lm_update
    from pipelines.config import default_config_path, load_config
    from pipelines.versions import export_model, load_policy, served_folder
    from pipelines.world import World

    # MNPO with H = 2 reads π_{t−1}: round 3 scores v1, an adapter, on v2's base
    config = load_config(
        default_config_path(), store=str(tmp_path / "store"), rounds=3, solver={"algorithm": "mnpo", "loss": {"eta": 0.1}},
        policy={"kind": "causal_lm", "model": "tiny", "max_new_tokens": 12, "lora": {"r": 4, "alpha": 8.0}},
    )  # fmt: skip
    loaded = []
    monkeypatch.setattr(lm_update, "load_policy", lambda store, v, *a, **k: loaded.append(v) or load_policy(store, v, *a, **k))
    flows.alignment_campaign(config)
    store = Store(config.store)
    assert list(rounds_table(store)["round"]) == [1, 2, 3] and rounds_table(store)["loss/mnpo"].notna().all()
    assert loaded == ["v0", "v1", "v2"]  # the update loads its anchor only: μ and π_{t−1} ran on the anchor's base

    checkpoints = tmp_path / "store" / "checkpoints"
    for v in ("v1", "v2", "v3"):
        files = {f.name for f in (checkpoints / v).iterdir()}
        assert {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, ckpt.TRAINER_STATE} <= files and "model.safetensors" not in files, files
        assert json.loads((checkpoints / f"{v}.json").read_text())["base"] == "v0"
    assert "model.safetensors" in {f.name for f in (checkpoints / "v0").iterdir()}

    # v1's log-probs of round 3's samples were scored with v1's adapter on v2's base: as v1 loaded alone scores them
    world = World(config)
    logprobs = store.read("logprobs", rounds=[3]).query("policy_version == 'v1'").set_index("response_id")["logp"]
    responses = store.read("responses", rounds=[3]).set_index("response_id").loc[logprobs.index]
    prompts = store.read("prompts").set_index("prompt_id")["prompt"]
    v1 = load_policy(store, "v1", config, world)
    again = v1.score(list(responses["prompt_id"].map(prompts)), list(responses["text"]), finished=list(responses["finish_reason"] == "stop"), tokens=lm_update.token_lists(responses["token_ids"]))
    assert len(logprobs) > 0
    torch.testing.assert_close(torch.tensor(logprobs.to_numpy()), torch.tensor(again, dtype=torch.float64), rtol=0, atol=1e-4)

    # export-model: v3 merged into a plain folder whose logits are base + adapter's
    out = tmp_path / "v3-merged"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "export-model", config.store, "v3", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not any("adapter" in f.name for f in out.iterdir())
    merged = CausalLMPolicy.load(out)
    v3 = load_policy(store, "v3", config, world)
    assert lora.is_lora(v3.model) and not lora.is_lora(merged.model)
    ids = torch.tensor([[5, 9, 77, 3, 120, 44]])
    with torch.inference_mode():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, v3.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged.model(input_ids=ids).logits, load_policy(store, "v0", config, world).model(input_ids=ids).logits)
    # a sampling server is started on the same merged model (a server loads no adapter)
    served = CausalLMPolicy.load(served_folder(store, "v3", str(tmp_path / "serve")))
    with torch.inference_mode():
        torch.testing.assert_close(served.model(input_ids=ids).logits, merged.model(input_ids=ids).logits, rtol=0, atol=0)
    assert served_folder(store, "v0", str(tmp_path / "serve-v0")) == str(checkpoints / "v0")
    # a whole-model version is copied, without its optimizer state; an existing folder is refused
    export_model(store, "v0", str(tmp_path / "v0-copy"))
    assert {f.name for f in (tmp_path / "v0-copy").iterdir()} == {f.name for f in (checkpoints / "v0").iterdir()} - {ckpt.TRAINER_STATE}
    with pytest.raises(FileExistsError, match="exists"):
        export_model(store, "v0", str(out))


@pytest.mark.slow
def test_bench_lora_smoke_prints_its_keys():
    proc = subprocess.run([sys.executable, "bench/lora.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("checkpoint_bytes_full", "checkpoint_bytes_lora", "peak_bytes_full", "peak_bytes_lora", "seconds_per_pair_full", "seconds_per_pair_lora"):
        assert line[key] > 0, key
    assert line["checkpoint_bytes_lora"] < line["checkpoint_bytes_full"]
    assert line["trainable_parameters_lora"] < line["trainable_parameters_full"]
