"""How an update's model is spread over the processes of a torchrun launch: DDP or FSDP2.

- ``ddp``: every process holds the whole model and its AdamW state; gradients are averaged
  (``torch.nn.parallel.DistributedDataParallel``).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder layer and then on the root,
  so each process holds 1/N of the parameters, gradients and AdamW state, and a layer's parameters are
  gathered only while it runs. On CUDA the gathered parameters are bf16 and gradients are reduced in
  fp32 (``MixedPrecisionPolicy``); on the CPU everything stays fp32.

Only the parameters that require grad are trained (``trainer.make_optimizer``), so a model with frozen
parts (LoRA: the base frozen, the adapters trained) is sharded and saved the same way. The full
state dict is gathered (onto rank 0, on the CPU) only to write a checkpoint; the AdamW state of a step
checkpoint is written sharded with ``torch.distributed.checkpoint`` (each process its own part), and
for the round's checkpoint gathered into the single-process format (``optimizer.state_dict()``: keyed
by the index of the trainable parameter), so the next round can run with any number of processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

SHARDINGS = ("ddp", "fsdp")


def check_processes(processes: int, device: str = "auto") -> None:
    """Refuse a launch of ``processes`` that this machine cannot run: more than its GPUs on CUDA (one
    process per GPU), more than its CPU cores on the CPU."""
    cuda = torch.cuda.is_available() and device != "cpu"
    have, what = (torch.cuda.device_count(), "visible GPUs (one process per GPU)") if cuda else (os.cpu_count() or 1, "CPU cores")
    if processes > have:
        raise ValueError(f"trainer.processes = {processes} but this machine has {have} {what}: use at most {have}")


def wrap(module: torch.nn.Module, sharding: str, device: torch.device, world: int) -> torch.nn.Module:
    """What runs forward: ``module`` itself (one process), DDP around it, or ``module`` sharded in
    place by FSDP2 (its parameters become DTensors; names and the forward stay the same)."""
    if world <= 1:
        return module.to(device)
    if sharding == "ddp":
        return torch.nn.parallel.DistributedDataParallel(module.to(device), device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the root takes what is left (embeddings, final norm, output layer); fully_shard moves each shard to the mesh's device
    fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (Llama, Mistral, Qwen2, …: ``_no_split_modules``
    names their class), the unit FSDP2 gathers one at a time."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"trainer.sharding = fsdp: cannot find the decoder layers of {type(module).__name__} (its _no_split_modules is {sorted(names) or 'empty'})")
    return layers


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gradient_sync(model: torch.nn.Module, world: int, sync: bool):
    """Around an accumulation micro-batch: with ``sync`` False, gradients stay local until the last one
    (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``)."""
    if world <= 1 or sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
            yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor (a sharded gradient norm), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----- state dicts ------------------------------------------------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(module: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on the CPU ({} on the other ranks). Every rank calls it.
    ``trainable_only``: the parameters that require grad alone (a LoRA model's adapter: the frozen base
    is never gathered)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))


def load_full_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a full state dict (every rank holds it) into a sharded model; tied weights may be missing."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(full_state_dict=True, strict=False))


def _trainable_names(module: torch.nn.Module) -> list[str]:
    # the order of make_optimizer's parameters: index i of optimizer.state_dict() is name i
    return [n for n, p in module.named_parameters() if p.requires_grad]


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's whole state on rank 0, in the single-process format (``{"state": {index: …},
    "param_groups": …}``), on the CPU; {} on the other ranks. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(module, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(module))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a single-process AdamW state (every rank holds it) into ``optimizer``. Only the moments
    are taken; the hyperparameters stay the optimizer's own (as ``trainer.make_optimizer`` does)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _trainable_names(module)
    fresh = optimizer.state_dict()["param_groups"]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in fresh]
    by_name = {names[int(i)]: s for i, s in state["state"].items()}
    set_optimizer_state_dict(module, optimizer, {"state": by_name, "param_groups": groups}, options=_options(full_state_dict=True))


def save_sharded_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    """Each rank writes its part of AdamW's state into ``folder`` (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(module, optimizer), checkpoint_id=str(folder))


def load_sharded_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
    """Read AdamW's state that :func:`save_sharded_optimizer` wrote (resharded if the layout changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(module, optimizer, state)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
