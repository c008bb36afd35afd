"""One policy update in several processes: the entry point that a torchrun launch runs on every rank.

    python -m torch.distributed.run --standalone --nproc-per-node N -m solvers.update_job JOB

``JOB`` is a folder that :func:`write_job` fills: ``job.json`` (the trainer's config, the policy's
config, the anchor checkpoint to start from and, for a LoRA adapter, its base, the LoRA settings,
where the step checkpoints go) and ``examples.jsonl``
(one ``trainer.Example`` per line). Every rank reads them and runs ``trainer.update`` (DDP or FSDP2,
``TrainerConfig.sharding``); a retried launch with the same job resumes from the last step checkpoint.
Rank 0 alone writes the new policy into ``JOB/result/`` (a complete checkpoint: weights gathered whole
and the tokenizer, or a LoRA adapter alone; AdamW's state in the single-process format; written
atomically, manifest last) and the
update's metrics into ``JOB/metrics.json``. A rank that fails writes its error, one line, to
``JOB/errors/rank-<r>.txt`` before it exits, so the launcher can say which rank failed and why.

Imports ``solvers`` and ``data`` only: it runs on a GPU machine without Prefect.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from solvers import algorithms, checkpoint, lora, sharding, trainer
from solvers.causal_lm import CausalLMConfig, load_checkpoint
from solvers.lora import LoraSettings
from solvers.trainer import Example, TrainerConfig

RESULT = "result"  # the new policy's checkpoint folder inside the job (its manifest: result.json beside it)
METRICS = "metrics.json"  # the update's history and summary
ERRORS = "errors"  # rank-<r>.txt: the first line of the error that stopped rank r
# A test hook: "RANK:STEP:MARKER" makes that rank kill itself (SIGKILL) after that optimizer step,
# once (the MARKER file records that it did), so a test can kill a rank mid-update.
KILL_ENV = "NASHFLOW_TEST_KILL_RANK"


def write_job(
    folder: str | os.PathLike,
    examples: Sequence[Example],
    config: TrainerConfig,
    *,
    anchor: str | os.PathLike,
    policy: CausalLMConfig,
    checkpoint_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    lora: LoraSettings | None = None,
    lora_seed: int = 0,
) -> Path:
    """Fill the job folder ``folder`` (created; a result or errors of an earlier launch are removed).
    ``anchor``: the checkpoint the update starts from; an adapter's needs its ``base``. ``lora``: train a
    LoRA adapter (``lora.for_training``: the anchor's own, or a new one drawn from ``lora_seed``)."""
    folder = Path(folder)
    (folder / ERRORS).mkdir(parents=True, exist_ok=True)
    for old in [*(folder / ERRORS).iterdir(), folder / METRICS]:
        old.unlink(missing_ok=True)
    spec = {
        "trainer": dataclasses.asdict(config),
        "policy": dataclasses.asdict(policy),
        "anchor": str(anchor),
        "base": None if base is None else str(base),
        "lora": None if lora is None else dataclasses.asdict(lora),
        "lora_seed": lora_seed,
        "checkpoint_dir": str(checkpoint_dir),
    }
    (folder / "job.json").write_text(json.dumps(spec, indent=1))
    write_examples(folder / "examples.jsonl", examples)
    return folder


def write_examples(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    """One JSON object per line; floats are written exactly (shortest repr), so the update's
    fingerprint, and a resume, are the same in every process and every launch."""
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps(dataclasses.asdict(e)) + "\n")


def read_examples(path: str | os.PathLike) -> list[Example]:
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                d.update({k: tuple(d[k]) for k in ("ref_logp", "prev_logp", "finished", "tokens") if d.get(k) is not None})
                d["older_logp"] = tuple(tuple(p) for p in d.get("older_logp", ()))
                out.append(Example(**d))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {line_no}: not an example ({e})") from None
    return out


def trainer_config(spec: dict) -> TrainerConfig:
    """The TrainerConfig that ``dataclasses.asdict`` wrote (tuples came back as lists)."""
    spec = dict(spec)
    loss_config = spec.pop("loss_config")
    if loss_config is not None:
        loss_config = algorithms.with_loss(spec["loss"]).loss.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in loss_config.items()})
    return TrainerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}, loss_config=loss_config)


def run_job(folder: str | os.PathLike, rank: int, world: int) -> None:
    folder = Path(folder)
    spec = json.loads((folder / "job.json").read_text())
    config = trainer_config(spec["trainer"])
    policy_config = spec["policy"]
    if config.sharding == "fsdp" and world > 1:
        policy_config["device"] = "cpu"  # each rank loads the model on the CPU; fully_shard moves only its shard to the GPU
    if spec.get("base"):
        policy, optimizer_state = lora.load_checkpoint(spec["base"], spec["anchor"], CausalLMConfig(**policy_config))
    else:
        policy, optimizer_state = load_checkpoint(spec["anchor"], CausalLMConfig(**policy_config))
    settings = spec.get("lora")
    if settings is not None:
        settings = lora.LoraSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    policy = lora.for_training(policy, settings, seed=spec.get("lora_seed", 0))
    examples = read_examples(folder / "examples.jsonl")
    result = trainer.update(policy, examples, config, optimizer_state=optimizer_state, checkpoint_dir=spec["checkpoint_dir"], on_step=_on_step(rank))
    adapter = lora.is_lora(policy.model)  # its checkpoint is the adapter alone, without the tokenizer
    weights = sharding.full_model_state(policy.model, trainable_only=adapter) if sharding.is_sharded(policy.model) else None  # every rank takes part
    if rank == 0:
        tokenizer = None if adapter else policy.tokenizer
        checkpoint.save_checkpoint(folder / RESULT, policy.model, tokenizer, {"optimizer": result.optimizer_state}, overwrite=True, state_dict=weights)
        (folder / METRICS).write_text(json.dumps({"history": result.history, "summary": result.summary, "processes": world, "sharding": config.sharding}))
    sharding.barrier(world)


def _on_step(rank: int):
    kill = os.environ.get(KILL_ENV, "").split(":", 2)
    started = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        if rank == 0:  # one line per step in the launcher's (the task's) log
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("loss/") or k == "optim/grad_norm")
            print(f"step {step}: {shown} ({time.perf_counter() - started:.1f} s)", flush=True)
        if len(kill) == 3 and int(kill[0]) == rank and int(kill[1]) == step and not os.path.exists(kill[2]):
            Path(kill[2]).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def main(argv: Sequence[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m torch.distributed.run … -m solvers.update_job JOB_FOLDER")
    folder = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        rank, world = trainer.init_distributed()
        run_job(folder, rank, world)
    except BaseException as e:
        message = (str(e).strip().splitlines() or [""])[0]
        (folder / ERRORS / f"rank-{rank}.txt").write_text(f"{type(e).__name__}: {message}\n")
        raise
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
