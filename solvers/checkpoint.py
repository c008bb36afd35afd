"""Checkpoints that are whole or absent, and the anchor an extragradient round restarts from.

A checkpoint is a folder: the model's ``save_pretrained`` (safetensors, config, generation config), the
tokenizer, and ``trainer_state.pt`` (the AdamW state; within an update also the scheduler, the step
counter, the metrics so far and a fingerprint of the update it belongs to). A step checkpoint of an
update sharded with FSDP2 keeps AdamW's state in ``optimizer/`` instead, one part per process
(torch.distributed.checkpoint), and its weights gathered whole (solvers/sharding.py). It is written into a hidden
sibling folder ``.<name>.partial-<random>`` and renamed when complete (files fsynced first), then marked
complete by its manifest ``<name>.json`` beside it (data/checkpoints.py, the one rule for every
checkpoint): readers take only a folder with a manifest, so a process killed while writing leaves
nothing that is read.

Extragradient rounds (EGPO, Nash-MP) step twice from the same θ_t: :func:`snapshot` keeps θ_t and its
optimizer state in memory, :func:`restore` puts them back. Across processes the anchor checkpoint plays
that role (its ``trainer_state.pt`` holds the optimizer state): load it again
(``solvers.causal_lm.load_checkpoint``).
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from data import Store
from data import checkpoints as marks
from solvers import sharding

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_FOLDER = "optimizer"  # AdamW's state of a sharded update, one part per process
STEP_PREFIX = "step-"


def save_checkpoint(
    path: str | os.PathLike,
    model,
    tokenizer,
    trainer_state: dict | None = None,
    *,
    overwrite: bool = False,
    manifest: dict | None = None,
    state_dict: dict | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write model (safetensors; a LoRA model's ``save_pretrained`` writes its adapter alone), tokenizer
    (None: none) and ``trainer_state`` (torch.save; tensors, numbers, strings, lists and dicts only) into
    the folder ``path``, atomically, then its ``manifest`` (which marks it complete). Refuses an existing
    ``path`` unless ``overwrite``. Returns ``path``. ``state_dict``: the weights to write instead of the
    model's own (a sharded model's, gathered); ``move_in``: {name: folder} moved into the checkpoint
    before it is complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    store, name = _local(path)
    marks.unmark(store, name)  # replacing: not complete until the new manifest is written
    partial = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(partial, **({} if state_dict is None else {"state_dict": state_dict}))  # a preference model takes none
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        for inside, folder in (move_in or {}).items():
            os.rename(folder, partial / inside)
        if trainer_state is not None:
            torch.save(trainer_state, partial / TRAINER_STATE)
        _fsync_folder(partial)
        if path.exists():  # replace: move the old one aside first, so `path` is never half of either
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    marks.mark_complete(store, name, manifest)
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """Whether the local folder ``path`` is a complete checkpoint (data/checkpoints.py)."""
    return marks.is_complete(*_local(Path(path)))


def _local(path: Path) -> tuple[Store, str]:
    return Store(path.parent), path.name


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``path`` (every .safetensors file in it), on the CPU."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_weights(model, path: str | os.PathLike) -> None:
    """Copy the weights of checkpoint ``path`` into ``model`` (same architecture), in place. Tied
    weights that ``save_pretrained`` stored once are filled through their twin."""
    state = read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path} has weights the model lacks: {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in stored]
    if untied:
        raise ValueError(f"{path} lacks weights of the model: {untied[:5]}")


def load_trainer_state(path: str | os.PathLike) -> dict | None:
    """The ``trainer_state.pt`` of checkpoint ``path`` (tensors on the CPU), or None if it has none."""
    f = Path(path) / TRAINER_STATE
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def save_step(directory: str | os.PathLike, run, tokenizer) -> Path:
    """The checkpoint of a training run after ``run.step`` optimizer steps (rank 0 writes, the others
    wait), then prune to ``run.config.keep_checkpoints``. ``run`` has: module, optimizer, scheduler,
    step, history, fingerprint (of its examples and config), rank, world, config; and ``fsdp`` when its
    module is sharded: then every rank gathers the weights to rank 0 (``adapter``: a LoRA model's
    adapter alone) and writes its part of AdamW's state into a staged folder that rank 0 moves into the
    checkpoint."""
    path = step_checkpoint(directory, run.step)
    fsdp = getattr(run, "fsdp", False)
    weights, staged = None, Path(directory) / f".{path.name}.optimizer"
    if fsdp:
        weights = sharding.full_model_state(run.module, trainable_only=getattr(run, "adapter", False))
        if run.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # a leftover of a killed save
        sharding.barrier(run.world)
        sharding.save_sharded_optimizer(run.module, run.optimizer, staged)
        sharding.barrier(run.world)
    if run.rank == 0:
        state = {
            "scheduler": run.scheduler.state_dict(),
            "step": run.step,
            "history": run.history,
            "fingerprint": run.fingerprint,
        }
        if not fsdp:
            state["optimizer"] = run.optimizer.state_dict()
        save_checkpoint(path, run.module, tokenizer, state, overwrite=True, state_dict=weights, move_in={OPTIMIZER_FOLDER: staged} if fsdp else None)
        prune_checkpoints(directory, run.config.keep_checkpoints)
    if run.world > 1:
        torch.distributed.barrier()
    return path


def resume_step(directory: str | os.PathLike, run, load=None) -> Path | None:
    """Load the latest complete step checkpoint in ``directory`` into ``run`` (weights with ``load``,
    default :func:`load_weights`; AdamW; schedule; step; metrics so far). None when there is none.
    Refuses a checkpoint of another run (other fingerprint) rather than mixing them."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    saved = load_trainer_state(path)
    if saved.get("fingerprint") != run.fingerprint:
        raise ValueError(f"{path} belongs to another training run (another update: other examples or config); use a fresh checkpoint_dir or delete it")
    (load or load_weights)(run.module, path)
    if (path / OPTIMIZER_FOLDER).is_dir():
        sharding.load_sharded_optimizer(run.module, run.optimizer, path / OPTIMIZER_FOLDER)
    elif getattr(run, "fsdp", False):
        sharding.load_full_optimizer_state(run.module, run.optimizer, saved["optimizer"])
    else:
        run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.step, run.history = saved["step"], list(saved["history"])
    return path


def step_checkpoint(directory: str | os.PathLike, step: int) -> Path:
    """Where an update writes its checkpoint after ``step`` optimizer steps."""
    return Path(directory) / f"{STEP_PREFIX}{step:08d}"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete step checkpoint (one with its manifest) with the most steps in ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [directory / name for name in marks.complete_checkpoints(*_local(directory)) if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit()]
    return max(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]), default=None)


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` latest step checkpoints (called after a new one is complete)."""
    steps = sorted((p for p in Path(directory).glob(f"{STEP_PREFIX}*") if p.is_dir()), key=lambda p: p.name)
    for p in steps[: max(0, len(steps) - keep)]:
        marks.unmark(*_local(p))  # the manifest first: a folder half deleted is never taken as complete
        shutil.rmtree(p, ignore_errors=True)


# ----- the extragradient anchor ----------------------------------------------------------------------


@dataclass
class Snapshot:
    """θ_t and its AdamW state, kept to run the second phase of an extragradient round from."""

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None


def snapshot(model, optimizer_state: dict | None = None) -> Snapshot:
    """Copies (not views) of the model's parameters and buffers and of ``optimizer_state``."""
    return Snapshot({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer_state))


def restore(model, snap: Snapshot) -> dict | None:
    """Put θ_t back into ``model`` in place; returns a fresh copy of its optimizer state (pass it to
    ``trainer.update``: the snapshot itself stays unchanged, so it can be restored again)."""
    model.load_state_dict(snap.model_state)
    return copy.deepcopy(snap.optimizer_state)


def _fsync_folder(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
