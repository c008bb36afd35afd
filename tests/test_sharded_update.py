"""Updates in several processes (torchrun, gloo on the CPU, the tiny model): DDP and FSDP2 follow the
one-process update; a campaign with ``trainer.processes: 2`` runs through Prefect; a rank killed
mid-update is resumed by the task's retry from the step checkpoint, to the uninterrupted weights; a
launch that cannot run, or a rank that raises, fails with one line naming the cause.

Tolerances: the loss curve and the gradient norms within 1e-5 (relative), the weights and AdamW's
moments within 1e-5 (absolute): two processes sum the same gradients in another order (float32).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from test_trainer import assert_same_weights, make_examples, weights

from data import Store
from data import checkpoints as marks
from data.rounds import rounds_table
from pipelines import flows, stages, torchrun
from pipelines.config import default_config_path, load_config
from pipelines.world import World
from solvers import checkpoint as ckpt
from solvers import lora, sharding, trainer, update_job
from solvers.causal_lm import CausalLMConfig, tiny_policy
from solvers.trainer import TrainerConfig

pytestmark = pytest.mark.slow

TOL = {"rtol": 1e-5, "atol": 1e-5}
LORA = lora.LoraSettings(r=4, alpha=8.0)


def job_config(*, grad_accum: int, sharding: str = "ddp", **more) -> TrainerConfig:
    return TrainerConfig(loss="dpo", lr=1e-2, micro_batch_size=2, grad_accum=grad_accum, max_steps=4, warmup_steps=1, schedule="cosine", sharding=sharding, **more)


def launch(tmp_path: Path, config: TrainerConfig, examples, processes: int = 2, *, adapter: bool = False) -> tuple[Path, list[str]]:
    """The anchor (the tiny model with an AdamW state, as a round's checkpoint has; ``adapter``: a LoRA
    adapter with its AdamW state, on the tiny model as its base) and the job, launched under torchrun as
    the update stage does. Returns (the job folder, the log lines)."""
    anchor, base, job = tmp_path / "anchor", tmp_path / "base", tmp_path / "job"
    if not anchor.exists():
        policy = tiny_policy(seed=0)
        if adapter:
            ckpt.save_checkpoint(base, policy.model, policy.tokenizer)
            trained = lora.for_training(tiny_policy(seed=0), LORA, seed=1)
            state = trainer.update(trained, make_examples(policy, 2), TrainerConfig(loss="dpo", lr=1e-2, micro_batch_size=2)).optimizer_state
            ckpt.save_checkpoint(anchor, trained.model, None, {"optimizer": state})
        else:
            ckpt.save_checkpoint(anchor, policy.model, policy.tokenizer, {"optimizer": anchor_optimizer_state(policy)})
    update_job.write_job(
        job, examples, config, anchor=anchor, base=base if adapter else None, lora=LORA if adapter else None, policy=CausalLMConfig(dtype="float32"), checkpoint_dir=tmp_path / "work"
    )  # fmt: skip
    lines: list[str] = []
    torchrun.run_module("solvers.update_job", [str(job)], processes, error_dir=job / update_job.ERRORS, log=lines.append, what="the test update")
    return job, lines


def anchor_optimizer_state(policy) -> dict:
    """AdamW's moments after one step on other data: a resumed round starts from them."""
    result = trainer.update(tiny_policy(seed=0), make_examples(policy, 2), TrainerConfig(loss="dpo", lr=1e-2, micro_batch_size=2))
    return result.optimizer_state


@pytest.mark.parametrize("how,adapter", [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)], ids=["ddp", "fsdp", "ddp-lora", "fsdp-lora"])
def test_two_processes_follow_the_one_process_update(tmp_path, how, adapter):
    """2 processes × micro 2 × accum 1 against 1 process × micro 2 × accum 2 (the same global batch of
    4), from an anchor with AdamW moments. FSDP also checkpoints its activations (recomputed in backward),
    writes sharded step checkpoints and, without LoRA, compiles the forward (torch.compile: ~50 s here). With LoRA the anchor is an adapter on its base, and the
    processes train and save the adapter alone."""
    policy = tiny_policy(seed=0)
    examples = make_examples(policy)
    extra = {"gradient_checkpointing": True, "checkpoint_every": 2, "compile": not adapter} if how == "fsdp" else {}
    job, lines = launch(tmp_path, job_config(grad_accum=1, sharding=how, **extra), examples, adapter=adapter)

    if adapter:
        one, anchor_state = lora.load_checkpoint(tmp_path / "base", tmp_path / "anchor")
        one = lora.for_training(one, LORA)
    else:
        one, anchor_state = tiny_policy(seed=0), ckpt.load_trainer_state(tmp_path / "anchor")["optimizer"]
    single = trainer.update(one, examples, job_config(grad_accum=2), optimizer_state=anchor_state)
    launched = json.loads((job / update_job.METRICS).read_text())
    assert launched["processes"] == 2 and launched["sharding"] == how
    torch.testing.assert_close(torch.tensor([h["loss/dpo"] for h in launched["history"]]), torch.tensor([h["loss/dpo"] for h in single.history]), **TOL)
    torch.testing.assert_close(torch.tensor([h["optim/grad_norm"] for h in launched["history"]]), torch.tensor([h["optim/grad_norm"] for h in single.history]), **TOL)
    assert single.history[-1]["loss/dpo"] < single.history[0]["loss/dpo"]
    # rank 0's checkpoint: the whole model (or the adapter alone), and AdamW's state gathered into the one-process format
    result = job / update_job.RESULT
    assert ckpt.is_complete(result)
    if adapter:
        assert lora.is_adapter_folder(result) and not (result / "model.safetensors").exists()
        trained = {n: p.detach() for n, p in one.model.named_parameters() if p.requires_grad}
        assert_same_weights(lora.model_state(one.model, result), trained, **TOL)
        steps = {f.name for f in ckpt.latest_checkpoint(tmp_path / "work").iterdir()} if how == "fsdp" else set()
        assert "model.safetensors" not in steps  # a step checkpoint gathers the adapter alone
    else:
        assert_same_weights(ckpt.read_weights(result), weights(one.model), **TOL)
    moments = ckpt.load_trainer_state(result)["optimizer"]["state"]
    assert moments.keys() == single.optimizer_state["state"].keys()
    for i, state in single.optimizer_state["state"].items():
        torch.testing.assert_close(moments[i]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert any(line.startswith("step 4:") for line in lines)  # the processes' output reached the log
    if how == "fsdp":  # a step checkpoint holds AdamW's state in parts, one per process
        step = ckpt.latest_checkpoint(tmp_path / "work")
        assert (step / ckpt.OPTIMIZER_FOLDER / ".metadata").is_file() and not (step / ckpt.TRAINER_STATE).read_bytes().count(b"exp_avg")


def test_a_rank_that_raises_fails_the_launch_with_its_error(tmp_path):
    policy = tiny_policy(seed=0)
    broken = [dataclasses.replace(e, ref_logp=None) for e in make_examples(policy)]  # INPO needs log μ
    with pytest.raises(torchrun.LaunchError) as raised:
        launch(tmp_path, TrainerConfig(loss="inpo", max_steps=1), broken)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("the test update failed: rank ")
    assert "of 2 raised ValueError: inpo needs ref_logp for y and y' (from the store's log-prob cache) for every example; example 0 (c0)" in message
    assert raised.value.returncode > 0  # not taken for a transient failure: the task does not retry it


def test_more_processes_than_the_machine_has_are_refused_before_launching(tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(ValueError, match=f"trainer.processes = {too_many} but this machine has {os.cpu_count()} CPU cores: use at most {os.cpu_count()}"):
        sharding.check_processes(too_many, "cpu")
    config = campaign_config(tmp_path, trainer={"processes": too_many})
    with pytest.raises(ValueError, match=f"trainer.processes = {too_many} but this machine has"):
        stages.update_policy(Store(config.store), config, World(config), round=1, phase="update", sampled_version="v0", oracle_ids=set())
    with pytest.raises(ValueError, match="trainer.sharding: fsdp needs trainer.processes ≥ 2"):
        campaign_config(tmp_path, trainer={"processes": 1, "sharding": "fsdp"})


# ----- through Prefect --------------------------------------------------------------------------------


def campaign_config(tmp_path: Path, name: str = "store", **over):
    trainer_settings = {"lr": 0.002, "micro_batch_size": 4, "checkpoint_every": 1, "processes": 2, "sharding": "fsdp", **over.pop("trainer", {})}
    settings = {"rounds": 1, "prompts": {"source": "text_world", "limit_train": 4, "limit_eval": 2}, "evaluation": {"samples_per_prompt": 2}, "trainer": trainer_settings, **over}
    return load_config(default_config_path(), store=str(tmp_path / name), **settings)


LORA_POLICY = {"kind": "causal_lm", "model": "tiny", "lora": {"r": 4, "alpha": 8.0}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prefect_harness):
    """A two-round LoRA campaign whose updates run in 2 FSDP processes, untouched: round 1 puts a new
    adapter on v0, round 2 trains v1's adapter further on its base."""
    config = campaign_config(tmp_path_factory.mktemp("uninterrupted"), rounds=2, policy=LORA_POLICY)
    flows.alignment_campaign(config)
    return config


def test_a_campaign_updates_in_two_processes_through_prefect(uninterrupted):
    store = Store(uninterrupted.store)
    table = rounds_table(store)
    assert list(table["round"]) == [1, 2] and table["loss/inpo"].notna().all() and table["perf/tokens_per_s"].gt(0).all()
    assert_store_holds_only_complete_checkpoints(store)
    assert sorted(marks.complete_checkpoints(store, "checkpoints")) == ["v0", "v1", "v2"]
    for v in ("v1", "v2"):  # adapters on v0, as an update in one process stores them
        folder = Path(store.local_path(f"checkpoints/{v}"))
        assert lora.is_adapter_folder(folder) and not (folder / "model.safetensors").exists()
        assert marks.read_manifest(store, f"checkpoints/{v}")["base"] == "v0"
    assert ckpt.read_weights(store.local_path("checkpoints/v1")).keys() == ckpt.read_weights(store.local_path("checkpoints/v2")).keys()


def test_a_killed_rank_is_resumed_by_the_task_retry(tmp_path, monkeypatch, uninterrupted):
    """Rank 1 kills itself (SIGKILL) after step 2 of 4; torchrun stops the other; the task fails with a
    negative exit code, is retried, and the second launch resumes from step 2's checkpoint."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(update_job.KILL_ENV, f"1:2:{marker}")
    config = campaign_config(tmp_path, policy=LORA_POLICY)  # round 1 of the uninterrupted campaign
    store = Store(config.store)
    launches, failures = [], []
    real = torchrun.run_module

    def watched(module, args, processes, **kw):
        assert_store_holds_only_complete_checkpoints(store, during_update=True)
        launches.append(ckpt.latest_checkpoint(store.local_path("checkpoints/.work-v1")))
        try:
            real(module, args, processes, **kw)
        except torchrun.LaunchError as e:
            failures.append(e)
            raise

    monkeypatch.setattr(torchrun, "run_module", watched)
    flows.alignment_campaign(config)

    assert marker.exists() and len(failures) == 1
    assert str(failures[0]) == "the update to v1 (2 processes, fsdp) failed: rank 1 of 2 was killed by SIGKILL (from outside: the OOM killer, a preemption, a kill)"
    assert failures[0].returncode == -9
    assert [p.name if p else None for p in launches] == [None, "step-00000002"]
    assert_store_holds_only_complete_checkpoints(store)
    resumed = ckpt.read_weights(store.local_path("checkpoints/v1"))
    assert_same_weights(resumed, ckpt.read_weights(Store(uninterrupted.store).local_path("checkpoints/v1")), rtol=0, atol=1e-6)
    assert rounds_table(store)["loss/inpo"].iloc[0] == pytest.approx(rounds_table(Store(uninterrupted.store))["loss/inpo"].iloc[0], rel=1e-5)


def assert_store_holds_only_complete_checkpoints(store: Store, during_update: bool = False) -> None:
    """Every checkpoint folder a reader can see has its manifest; no update's leftovers once it is done
    (during an update: its job and step checkpoints, each step checkpoint complete or hidden)."""
    root = Path(store.local_path("checkpoints"))
    names = sorted(p.name for p in root.iterdir()) if root.exists() else []
    for name in names:
        if (root / name).is_dir() and not name.startswith("."):
            assert (root / f"{name}.json").is_file(), f"{name} has no manifest"
    hidden = [n for n in names if n.startswith(".")]
    if not during_update:
        assert hidden == [], hidden
        return
    assert set(hidden) <= {".work-v1", ".job-v1"}, hidden
    work = root / ".work-v1"
    for step in work.glob("step-*") if work.exists() else []:
        if step.is_dir():
            assert ckpt.is_complete(step), f"{step.name} has no manifest"


def test_the_gpu_bench_smoke_runs_two_fsdp_processes_on_the_cpu():
    """bench/gpu_update.py --smoke --lora: the script starts itself under torchrun (2 gloo processes,
    FSDP2) and trains an adapter (without --lora: the same path but ``with_adapter``)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "bench/gpu_update.py", "--smoke", "--warmup", "1", "--steps", "2", "--lora", "--lora-rank", "4"]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["processes"] == 2 and line["sharding"] == "fsdp" and line["steps_timed"] == 2 and line["tokens_per_s"] > 0
    assert line["lora_rank"] == 4 and line["trainable_params"] < line["params"] / 4
    assert line["sequences_per_step"] == 16  # 2 processes × 2 pairs × 2 accumulation × 2 sequences
    assert line["largest_params_fit"] is None and line["peak_memory_bytes"] is None  # CUDA only
