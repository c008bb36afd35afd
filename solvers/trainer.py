"""One policy update per round: an NLHF loss on the accumulated comparisons, with cached log-probs.

The caller (a pipeline stage, a notebook) reads the store and passes one :class:`Example` per judged
pair: the prompt, the texts of y and y', P̂, and the log-probs of y and y' under the reference μ and the
past iterates π_t, π_{t−1}, … from the ``logprobs`` table. Only the policy π_θ runs forward, with
gradients, once per micro-batch (y and y' in one pass); μ and the past iterates are never run here.

    result = update(policy, examples, TrainerConfig(loss="inpo", lr=1e-6), checkpoint_dir=work)

One optimizer step (:func:`train_step`) reads top to bottom: score → loss → backward → step → metrics.
Around it: AdamW with warm-up and linear/cosine decay, gradient clipping, micro-batches with gradient
accumulation, batches bucketed by length, bf16 autocast on CUDA, DDP or FSDP2 when torch.distributed is
initialized (``torchrun``; gloo on CPU, NCCL on GPUs; :func:`init_distributed`; ``sharding``:
solvers/sharding.py; solvers/update_job.py is the entry point a launch runs), periodic atomic
checkpoints that a killed update resumes from (solvers/checkpoint.py), and a clear error naming the
examples of a batch whose loss is not finite.

Global batch = micro_batch_size × grad_accum × world size pairs; the loss of a step is the mean of the
per-pair losses over the global batch whatever the split, so one process with grad_accum = 2 and two
processes with grad_accum = 1 follow the same loss curve.

Metrics per step (and their means over the update in ``UpdateResult.summary``):
  loss/<name>, pref/… — the loss's own (see ``solvers.algorithms.ALGORITHMS[name].loss.metrics``)
  kl/ref              — mean over the responses scored of log π_θ(y|x) − log μ(y|x) (y ~ π_t: ≈ KL(π_t‖μ))
  kl/anchor           — mean of log π_θ(y|x) − log π_t(y|x): how far the update has moved (when π_t is cached)
  optim/lr, optim/grad_norm (before clipping)
  perf/tokens_per_s (non-pad tokens through the policy, all processes), perf/step_s, perf/padding (pad share)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.keys import stable_hash
from solvers import algorithms, lora, losses, sharding
from solvers import checkpoint as ckpt
from solvers.causal_lm import CausalLMPolicy, pack, sequence_logprobs


@dataclass(frozen=True)
class StepConfig:
    """What every trainer here shares: AdamW and its schedule, batches, device and precision, step
    checkpoints, seed. Derived values (global batch, number of steps) are computed in one place:
    :meth:`global_batch` and :func:`plan_batches`."""

    lr: float = 1e-6  # AdamW's peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW β1, β2
    eps: float = 1e-8  # AdamW ε
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr over this many steps
    schedule: str = "linear"  # after warm-up: "constant", "linear" or "cosine" decay to min_lr_ratio·lr at the end
    min_lr_ratio: float = 0.0  # the decay's floor, as a fraction of lr
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (None: no clipping; the norm is still reported)
    micro_batch_size: int = 4  # pairs per forward pass per process
    grad_accum: int = 1  # micro-batches per optimizer step per process
    epochs: int = 1  # passes over the examples (reshuffled each epoch)
    max_steps: int | None = None  # optimizer steps (None: epochs × ⌈examples / global batch⌉); more than one epoch's worth cycles on
    bucket_window: int = 8  # sort examples by length within windows of this many global batches (0: no sorting); less padding, slightly less random batches
    device: str = "auto"  # "auto": CUDA (the local rank's GPU) when present, else CPU; or an explicit device
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" (autocast) or "fp32". Parameters keep their dtype (load them in float32 for fp32 master weights)
    checkpoint_every: int = 0  # with a checkpoint_dir: write a checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 1  # complete step checkpoints kept in checkpoint_dir (older ones are deleted after a newer one is complete)
    seed: int = 0  # order of examples, and torch's RNG per step (dropout)

    # how a run is carried out, not what it computes: left out of the fingerprint that resuming checks
    OPERATIONAL = ("device", "checkpoint_every", "keep_checkpoints", "micro_batch_size", "grad_accum")

    def __post_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if min(self.micro_batch_size, self.grad_accum, self.epochs, self.keep_checkpoints) < 1:
            raise ValueError("micro_batch_size, grad_accum, epochs and keep_checkpoints must be ≥ 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1 or None, got {self.max_steps}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.checkpoint_every < 0 or self.bucket_window < 0:
            raise ValueError("lr must be > 0; warmup_steps, checkpoint_every and bucket_window ≥ 0")

    def global_batch(self, world_size: int = 1) -> int:
        """Pairs per optimizer step, over all processes."""
        return self.micro_batch_size * self.grad_accum * world_size

    def fingerprint(self, world_size: int, *data) -> str:
        """Identifies a run (this config's non-operational fields, the global batch and ``data``) for resuming."""
        settings = sorted((k, v) for k, v in asdict(self).items() if k not in self.OPERATIONAL)
        return stable_hash(settings, self.global_batch(world_size), *data)


@dataclass(frozen=True)
class TrainerConfig(StepConfig):
    """How one policy update runs: the loss, and the fields of :class:`StepConfig`. A pair in
    ``micro_batch_size`` is 2 sequences (1 for the per-response algorithms, SPPO and Nash-MD); ``lr``'s
    default is at LLM scale (a tiny random model wants ~1e-3)."""

    loss: str = "inpo"  # an algorithm of solvers.algorithms with a language-model loss
    loss_config: Any = None  # its loss's config, e.g. losses.INPOConfig(eta=0.01); None: the loss's defaults
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile the policy's forward (CUDA; first steps slower)
    sharding: str = "ddp"  # several processes: "ddp" (each holds the whole model) or "fsdp" (FSDP2: each holds 1/N of it); solvers/sharding.py

    OPERATIONAL = (*StepConfig.OPERATIONAL, "compile", "sharding")

    def __post_init__(self):
        super().__post_init__()
        if self.sharding not in sharding.SHARDINGS:
            raise ValueError(f"sharding must be one of {', '.join(sharding.SHARDINGS)}, got {self.sharding!r}")
        spec = self.algorithm.loss
        if self.loss_config is not None and not isinstance(self.loss_config, spec.config):
            raise TypeError(f"loss_config for {self.loss} must be a {spec.config.__name__}, got {type(self.loss_config).__name__}")
        if "ref_logp_tokens" in spec.inputs and getattr(self.loss_cfg, "kl", None) == "token":
            raise ValueError(f"{self.loss} with kl='token' needs per-token reference log-probs; the log-prob cache keeps sequence sums: use kl='sequence'")

    @property
    def algorithm(self) -> algorithms.Algorithm:
        return algorithms.with_loss(self.loss)

    @property
    def loss_cfg(self):
        """The loss's config (its defaults when ``loss_config`` is None)."""
        return self.loss_config if self.loss_config is not None else self.algorithm.loss.config()


@dataclass(frozen=True)
class Example:
    """One judged pair (y, y') of responses to ``prompt``, with what the loss needs from the store.
    Log-probs are sums over response tokens, as ``CausalLMPolicy.score`` computes them (EOS included
    when the response finished), given as (of y, of y').

    Which fields a loss needs: all but SPPO: ``ref_logp``; INPO, MNPO, Nash-MP, SPPO: ``prev_logp``;
    MNPO: ``older_logp`` (fewer than H − 1 older iterates: the oldest given is repeated, as
    ``tabular.mnpo_step`` does); EGPO, Nash-MP: ``p_hat_other``. SPPO and Nash-MD score y only (y_other may
    be None); SPPO's ``p_hat`` is the win-rate P̂(y ≻ π_t) averaged over the prompt's other samples.
    """

    prompt: str
    y: str
    y_other: str | None  # y'
    p_hat: float  # P̂(y ≻ y'); EGPO/Nash-MP: P̂(y ≻ y''); SPPO: P̂(y ≻ π_t)
    p_hat_other: float | None = None  # EGPO/Nash-MP: P̂(y' ≻ y''); None means y'' = y' (½)
    ref_logp: tuple[float, ...] | None = None  # log μ(y|x), log μ(y'|x)
    prev_logp: tuple[float, ...] | None = None  # log π_t(y|x), log π_t(y'|x): the round's anchor
    older_logp: tuple[tuple[float, ...], ...] = ()  # MNPO: (log π_{t−1}(y), log π_{t−1}(y')), (… π_{t−2} …), …
    finished: tuple[bool, bool] = (True, True)  # whether y, y' stopped by themselves (their tokens end with EOS)
    tokens: tuple[Sequence[int] | None, Sequence[int] | None] = (None, None)  # y's, y''s sampled tokens (trained on instead of the text's)
    id: str = ""  # e.g. the comparison id: named in errors


@dataclass
class UpdateResult:
    """What an update returns."""

    history: list[dict[str, float]]  # metrics per optimizer step (including steps done before a resume)
    summary: dict[str, float]  # means over the steps of loss/, pref/, kl/; perf/ totals of this run
    optimizer_state: dict  # AdamW's state after the last step: save it with the round's checkpoint
    checkpoint: Path | None  # the last complete checkpoint written (None without checkpoint_dir)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient of a batch was NaN or infinite; the step was not applied."""

    def __init__(self, message: str, *, step: int, example_ids: list[str], indices: list[int], checkpoint: Path | None):
        super().__init__(message)
        self.step, self.example_ids, self.indices, self.checkpoint = step, example_ids, indices, checkpoint


# ----- the update -------------------------------------------------------------------------------------


def update(
    policy: CausalLMPolicy | tuple,
    examples: Sequence[Example],
    config: TrainerConfig,
    *,
    optimizer_state: dict | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> UpdateResult:
    """Train ``policy.model`` in place on ``examples``; see the module docstring.

    ``policy``: a CausalLMPolicy, or (model, tokenizer). ``optimizer_state``: AdamW's state from the
    previous update (e.g. ``causal_lm.load_checkpoint``'s); its moments are kept, the hyperparameters
    come from ``config``. ``checkpoint_dir``: where this update's step checkpoints go; if it already
    holds a complete one of the same update (same examples and config), the update resumes from it and
    skips the steps done. ``on_step(step, metrics)`` is called after each step (and its checkpoint).
    With torch.distributed initialized, every process calls this with the same arguments.
    """
    state = start_update(policy, examples, config, optimizer_state=optimizer_state)
    started = time.perf_counter()
    try:
        # a LoRA model's step checkpoints hold its adapter alone (the tokenizer and base weights never change)
        if state.fsdp:  # every rank reads the whole checkpoint and keeps its shard
            load = lambda module, path: sharding.load_full_model_state(module, lora.model_state(module, path) if state.adapter else ckpt.read_weights(path))  # noqa: E731
        else:
            load = lora.load_weights if state.adapter else None
        last, ran = run_steps(state, train_step, None if state.adapter else state.policy.tokenizer, checkpoint_dir=checkpoint_dir, on_step=on_step, load=load)
    finally:
        finish_update(state)
    tokens = sum(h["perf/tokens_per_s"] * h["perf/step_s"] for h in ran)
    seconds = time.perf_counter() - started
    summary = _means(state.history)
    summary.update({"perf/seconds": seconds, "perf/steps": float(len(state.plan)), "perf/tokens_per_s": tokens / seconds if seconds > 0 else 0.0})
    # FSDP: gathered onto rank 0 (the other ranks get {}), in the single-process format
    optimizer_state = sharding.full_optimizer_state(state.module, state.optimizer) if state.fsdp else state.optimizer.state_dict()
    return UpdateResult(state.history, summary, optimizer_state, last)


@dataclass
class UpdateState:
    """Everything one update carries between steps."""

    config: TrainerConfig
    policy: CausalLMPolicy
    module: torch.nn.Module  # the policy's model (what is saved; sharded in place under FSDP)
    model: torch.nn.Module  # what runs forward: the module, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: EncodedExamples
    plan: list[list[int]]  # example indices of each step's global batch
    device: torch.device
    autocast: torch.dtype | None  # bf16 autocast, or None
    rank: int = 0
    world: int = 1
    step: int = 0  # optimizer steps done
    history: list[dict[str, float]] = field(default_factory=list)
    fingerprint: str = ""  # identifies the update (examples + config) for resuming
    was_training: bool = False
    fsdp: bool = False  # the module's parameters are sharded over the processes (FSDP2)
    adapter: bool = False  # the module is a LoRA model: its checkpoints hold the adapter alone


def start_update(policy: CausalLMPolicy | tuple, examples: Sequence[Example], config: TrainerConfig, *, optimizer_state: dict | None = None) -> UpdateState:
    """Encode the examples, plan the batches, put the model on its device (DDP-wrapped or sharded with
    FSDP2 when torch.distributed is initialized: ``config.sharding``) and build AdamW and its schedule
    over the parameters that require grad."""
    if isinstance(policy, tuple):
        policy = CausalLMPolicy(*policy)
    rank, world, device, autocast = placement(config)
    data = encode_examples(policy, examples, config)
    plan = plan_batches(data.lengths, config.global_batch(world), epochs=config.epochs, max_steps=config.max_steps, seed=config.seed, bucket_window=config.bucket_window)

    module = policy.model
    was_training = module.training
    module.train()
    if config.gradient_checkpointing:  # transformers ≥ 5.2x renamed it activation checkpointing
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = sharding.wrap(module, config.sharding, device, world)  # FSDP2 moves each shard to the device itself
    fsdp = sharding.is_sharded(module)
    if config.compile:
        model = torch.compile(model)

    optimizer, scheduler = make_optimizer(module.parameters(), config, len(plan), device=device, optimizer_state=None if fsdp else optimizer_state)
    if fsdp and optimizer_state is not None:
        sharding.load_full_optimizer_state(module, optimizer, optimizer_state)
    fingerprint = config.fingerprint(world, *((e.id, e.prompt, e.y, e.y_other, e.p_hat, e.p_hat_other, e.ref_logp, e.prev_logp, e.older_logp, e.finished, e.tokens) for e in examples))
    return UpdateState(config, policy, module, model, optimizer, scheduler, data, plan, device, autocast, rank, world, fingerprint=fingerprint, was_training=was_training, fsdp=fsdp, adapter=lora.is_lora(module))


def train_step(state: UpdateState, batch: list[int]) -> dict[str, float]:
    """One optimizer step on one global batch (example indices): score → loss → backward → step →
    metrics. This process runs its micro-batches; gradients are averaged over processes by DDP or FSDP2."""
    cfg, data, n = state.config, state.data, len(batch)
    seed_dropout(cfg.seed * 1_000_003 + state.step)  # dropout, if any: replayed identically on resume
    started = time.perf_counter()
    sums = torch.zeros(len(data.metric_names), dtype=torch.float64, device=state.device)
    bad = torch.zeros(n, device=state.device)  # 1 where the per-pair loss is not finite
    tokens = [0.0, 0.0]  # non-pad tokens and all positions through the model (counted on the host)
    my_slots = micro_batches(batch, cfg.micro_batch_size, cfg.grad_accum, state.world)[state.rank :: state.world]
    for a, (positions, rows) in enumerate(my_slots):
        real = len(positions)  # 0: an empty slot keeps DDP in step with a zero-weight copy of row 0
        with sharding.gradient_sync(state.module if state.fsdp else state.model, state.world, sync=a == len(my_slots) - 1):
            # score: log π_θ(y|x) (and log π_θ(y'|x)): the only forward pass, the only one with gradients
            seqs = pack(*data.sequences(rows), pad_id=state.policy.pad_id)
            if real:
                tokens = [tokens[0] + seqs.attention_mask.sum().item(), tokens[1] + seqs.attention_mask.numel()]
            with torch.autocast(state.device.type, dtype=state.autocast) if state.autocast else nullcontext():
                logp = sequence_logprobs(state.model, seqs, chunk_elements=state.policy.config.chunk_elements)
            logp = logp.view(data.responses, len(rows)).T  # (rows, 1 or 2): column 0 is y, column 1 is y'
            # loss: Δ_θ = log π_θ(y) − log π_θ(y') against the cached Δ_ref, Δ_t, … and P̂
            inputs = data.loss_inputs(logp, rows)
            per_pair, metrics = losses.compute(cfg.algorithm.loss, inputs, cfg.loss_cfg)
            loss = per_pair.sum() * (state.world / n if real else 0.0)  # the mean over the global batch, after DDP's (FSDP2's) average
            # backward
            loss.backward()
        if real:
            metrics.update(data.kl_metrics(logp, rows))
            sums += torch.stack([metrics[k].double() for k in data.metric_names]) * real
            bad[positions[0] : positions[0] + real] = (~torch.isfinite(per_pair.detach())).float()
    # step: reduce over processes, clip, refuse a non-finite step, then AdamW and the schedule
    tokens = torch.tensor(tokens, dtype=torch.float64, device=state.device)
    if state.world > 1:
        for t in (sums, bad, tokens):
            dist.all_reduce(t)
    values, grad_norm, lr = checked_step(state, sums / n, data.metric_names, bad, batch, data.ids, cfg.loss)
    # metrics
    seconds = time.perf_counter() - started
    real_tokens, positions = tokens.tolist()
    metrics = dict(zip(data.metric_names, values))
    metrics.update({
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
        "perf/step_s": seconds,
        "perf/tokens_per_s": real_tokens / seconds,
        "perf/padding": 1 - real_tokens / positions,
        "step": float(state.step),
    })
    state.history.append(metrics)
    return metrics


def checked_step(run, means: torch.Tensor, names: list[str], bad: torch.Tensor, batch: list[int], ids: list[str], what: str) -> tuple[list[float], float, float]:
    """Clip the gradients (already reduced over processes), then wait for the device once to read the
    metrics' ``means`` (named ``names``), the gradient norm and ``bad`` (1 per example of ``batch`` whose
    loss is not finite). A step with anything not finite is not applied: NonFiniteLossError names its
    examples (``ids``, per example index; ``what`` says whose loss). Otherwise AdamW's and the schedule's
    step, and ``run.step`` + 1. Returns (means, gradient norm, the learning rate the step used).
    ``run``: module, optimizer, scheduler, config, step, plan."""
    max_norm = run.config.max_grad_norm if run.config.max_grad_norm is not None else math.inf
    grad_norm = sharding.full_value(torch.nn.utils.clip_grad_norm_(run.module.parameters(), max_norm))  # FSDP2: over every shard
    *values, norm, n_bad = torch.cat([means.double(), grad_norm.reshape(1).double(), bad.sum().reshape(1).double()]).tolist()
    if n_bad > 0 or not all(math.isfinite(v) for v in [*values, norm]):
        run.optimizer.zero_grad(set_to_none=True)
        raise _non_finite(run, batch, bad, ids, what, [k for k, v in zip([*names, "optim/grad_norm"], [*values, norm]) if not math.isfinite(v)])
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return values, norm, lr


def seed_dropout(seed: int) -> None:
    """Seed the generators dropout draws from: the CPU's and, once initialized, CUDA's. (torch.manual_seed
    also queues seeds for every other backend, recording a stack trace each time: ~1 ms per step.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def finish_update(state: UpdateState) -> None:
    """Leave the policy's model as it came (eval mode, no gradient checkpointing), minus its new weights."""
    if state.config.gradient_checkpointing:
        disable = getattr(state.module, "activation_checkpointing_disable", None) or state.module.gradient_checkpointing_disable
        disable()
    state.module.train(state.was_training)
    state.optimizer.zero_grad(set_to_none=True)


def run_steps(run, step: Callable, tokenizer, *, checkpoint_dir: str | os.PathLike | None = None, on_step: Callable | None = None, load: Callable | None = None) -> tuple[Path | None, list[dict[str, float]]]:
    """The loop of a training run: resume from ``checkpoint_dir`` when it holds a checkpoint of this run
    (``load`` reads its weights; see ``checkpoint.resume_step``), then ``step(run, batch)`` for each
    remaining batch of ``run.plan``, with a checkpoint every ``run.config.checkpoint_every`` steps and
    after the last, and ``on_step(step, metrics)`` after each. A step whose loss is not finite is
    raised again naming the last complete checkpoint. Returns (that checkpoint or None, the metrics of
    the steps this call ran). ``run``: what ``checked_step`` and ``checkpoint.save_step`` need."""
    last = ckpt.resume_step(checkpoint_dir, run, load=load) if checkpoint_dir is not None else None
    first, every = len(run.history), run.config.checkpoint_every
    try:
        while run.step < len(run.plan):
            metrics = step(run, run.plan[run.step])
            if checkpoint_dir is not None and (run.step == len(run.plan) or (every and run.step % every == 0)):
                last = ckpt.save_step(checkpoint_dir, run, tokenizer)
            if on_step is not None:
                on_step(run.step, metrics)
    except NonFiniteLossError as e:  # say which checkpoint is the last good one
        raise NonFiniteLossError(f"{e} Last complete checkpoint: {last or 'none written'}.", step=e.step, example_ids=e.example_ids, indices=e.indices, checkpoint=last) from None
    return last, run.history[first:]


def placement(config: StepConfig) -> tuple[int, int, torch.device, torch.dtype | None]:
    """(rank, world size, device, autocast dtype or None) of this process under ``config``."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _device(config.device)
    autocast = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda") else None
    return rank, world, device, autocast


# ----- examples → token ids and cached tensors --------------------------------------------------------


@dataclass
class EncodedExamples:
    """The examples tokenized once, and their cached quantities as tensors (float64 differences of
    the cached log-probs, then float32 on the device)."""

    ids: list[str]
    prompt_ids: list[list[list[int]]]  # [response k][example i]: prompt tokens fitted around response k
    response_ids: list[list[list[int]]]  # [response k][example i]
    lengths: list[int]  # tokens of example i's longest sequence (for bucketing)
    cached: dict[str, torch.Tensor]  # loss inputs that come from the store: delta_ref, p_hat, …
    ref: torch.Tensor | None  # (N, responses) log μ of the scored responses
    prev: torch.Tensor | None  # (N, responses) log π_t of the scored responses
    loss: str
    metric_names: list[str]  # what a step reports from the loss and kl_metrics, in a fixed order

    @property
    def responses(self) -> int:
        return len(self.response_ids)

    def sequences(self, rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids) of the rows' scored responses: all y first, then all y'."""
        return (
            [self.prompt_ids[k][i] for k in range(self.responses) for i in rows],
            [self.response_ids[k][i] for k in range(self.responses) for i in rows],
        )

    def loss_inputs(self, logp: torch.Tensor, rows: list[int]) -> dict[str, torch.Tensor]:
        """The loss's tensors for these rows: Δ_θ (or log π_θ(y)) from ``logp`` (rows, responses),
        with gradients, and everything else from the cache."""
        index = torch.tensor(rows).to(logp.device, non_blocking=True)
        inputs = {name: t[index] for name, t in self.cached.items()}
        if self.responses == 2:
            inputs["delta"] = logp[:, 0] - logp[:, 1]  # Δ_θ(y, y')
        inputs["logp"] = logp[:, 0]  # SPPO: log π_θ(y)
        # Nash-MD with the sequence KL estimator depends on log π_θ(y) and log μ(y) only through their
        # sums over tokens, so one "token" per response holding the sum gives the same loss and gradient.
        inputs["logp_tokens"] = logp[:, :1]
        return inputs

    def kl_metrics(self, logp: torch.Tensor, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(rows).to(logp.device, non_blocking=True)
        out = {}
        if self.ref is not None:
            out["kl/ref"] = (logp.detach().double() - self.ref[index]).mean()
        if self.prev is not None:
            out["kl/anchor"] = (logp.detach().double() - self.prev[index]).mean()
        return out


# Which Example fields each loss input is built from.
_NEEDS = {
    "delta": ("y_other",),
    "delta_ref": ("y_other", "ref_logp"),
    "delta_prev": ("y_other", "prev_logp"),
    "delta_hist": ("y_other", "prev_logp"),
    "prev_logp": ("prev_logp",),
    "ref_logp_tokens": ("ref_logp",),
}


def encode_examples(policy: CausalLMPolicy, examples: Sequence[Example], config: TrainerConfig) -> EncodedExamples:
    """Tokenize the examples as ``policy.score`` does (so Δ_θ and the cached log-probs are of the same
    tokens) and gather the cached quantities the loss needs; refuses an example that lacks one."""
    if not examples:
        raise ValueError("update: no examples")
    name, spec = config.loss, config.algorithm.loss
    k = 1 if config.algorithm.per_response else 2
    for i, e in enumerate(examples):
        for inp in spec.inputs:
            for f in _NEEDS.get(inp, ()):
                value = getattr(e, f)
                if value is None or (f.endswith("_logp") and len(value) < k):
                    what = f"{f} for y and y'" if k == 2 and f != "y_other" else f
                    raise ValueError(f"{name} needs {what} (from the store's log-prob cache) for every example; example {i} ({e.id or 'no id'}) has {value!r}")
    texts = [[e.y for e in examples]] + ([[e.y_other for e in examples]] if k == 2 else [])
    prompt_ids, response_ids = [], []
    for j, responses in enumerate(texts):
        p, r = policy.encode([e.prompt for e in examples], responses, [e.finished[j] for e in examples], [e.tokens[j] for e in examples])
        prompt_ids.append(p)
        response_ids.append(r)
    lengths = [max(len(prompt_ids[j][i]) + len(response_ids[j][i]) for j in range(k)) for i in range(len(examples))]

    def column(get) -> torch.Tensor:
        return torch.tensor([get(e) for e in examples], dtype=torch.float64)

    has = lambda f: all(getattr(e, f) is not None and len(getattr(e, f)) >= k for e in examples)  # noqa: E731
    ref = torch.stack([column(lambda e: e.ref_logp[j]) for j in range(k)], 1) if has("ref_logp") else None
    prev = torch.stack([column(lambda e: e.prev_logp[j]) for j in range(k)], 1) if has("prev_logp") else None
    cached = {"p_hat": column(lambda e: e.p_hat), "win_rate": column(lambda e: e.p_hat)}
    cached["p_hat_other"] = column(lambda e: 0.5 if e.p_hat_other is None else e.p_hat_other)
    if ref is not None:
        cached["ref_logp_tokens"] = ref[:, :1]
        cached["mask"] = torch.ones(len(examples), 1)
        if k == 2:
            cached["delta_ref"] = ref[:, 0] - ref[:, 1]
    if prev is not None:
        cached["prev_logp"] = prev[:, 0]
        if k == 2:
            cached["delta_prev"] = prev[:, 0] - prev[:, 1]
            if "delta_hist" in spec.inputs:  # MNPO: columns Δ_t, Δ_{t−1}, …, Δ_{t−H+1}; the oldest known repeated
                for i, e in enumerate(examples):
                    if any(len(lp) < 2 for lp in e.older_logp):
                        raise ValueError(f"{name}: older_logp holds (log π_{{t−j}}(y), log π_{{t−j}}(y')) pairs; example {i} ({e.id or 'no id'}) has {e.older_logp!r}")
                older = [[(lp[0] - lp[1]) for lp in e.older_logp] for e in examples]
                H = config.loss_cfg.history
                cols = [[d] + o for d, o in zip(cached["delta_prev"].tolist(), older)]
                cached["delta_hist"] = torch.tensor([(c + [c[-1]] * H)[:H] for c in cols], dtype=torch.float64)
    device = _device(config.device)
    cached = {key: (t.to(device) if key == "mask" else t.float().to(device)) for key, t in cached.items()}
    metric_names = list(spec.metrics) + (["kl/ref"] if ref is not None and "kl/ref" not in spec.metrics else []) + (["kl/anchor"] if prev is not None else [])
    return EncodedExamples(
        [e.id for e in examples], prompt_ids, response_ids, lengths, cached,
        None if ref is None else ref.to(device), None if prev is None else prev.to(device), name, metric_names,
    )  # fmt: skip


# ----- batches ---------------------------------------------------------------------------------------


def plan_batches(lengths: Sequence[int], global_batch: int, *, epochs: int = 1, max_steps: int | None = None, seed: int = 0, bucket_window: int = 8) -> list[list[int]]:
    """The example indices of every optimizer step's global batch, deterministic in ``seed``.

    Each epoch shuffles the examples; with ``bucket_window`` > 0, each window of that many global
    batches is sorted by length, cut into global batches (so a micro-batch holds similar lengths: less
    padding), and the batches of the window are shuffled back into a random order. An epoch's last
    batch may be smaller. ``max_steps`` cuts the plan or cycles on into more epochs."""
    n = len(lengths)
    per_epoch = math.ceil(n / global_batch)
    steps = max_steps if max_steps is not None else epochs * per_epoch
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        g = torch.Generator().manual_seed(int(stable_hash("plan", seed, epoch, length=8), 16))
        order = torch.randperm(n, generator=g).tolist()
        window = bucket_window * global_batch if bucket_window else n
        for s in range(0, n, window):
            chunk = order[s : s + window]
            if bucket_window:
                chunk = sorted(chunk, key=lambda i: lengths[i])
            batches = [chunk[b : b + global_batch] for b in range(0, len(chunk), global_batch)]
            if bucket_window:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            plan.extend(batches)
        epoch += 1
    return plan[:steps]


def micro_batches(batch: list[int], micro: int, accum: int, world: int) -> list[tuple[list[int], list[int]]]:
    """Split a global batch into accum × world slots, slot a·world + r going to process r at
    accumulation step a: (positions in the batch, example indices). Slots are contiguous, so a sorted
    batch gives each slot similar lengths, and the processes at one accumulation step similar work.
    A short batch is spread evenly; a slot left empty holds row 0 with no positions (zero weight)."""
    slots = accum * world
    if len(batch) > micro * slots:
        raise ValueError(f"a batch of {len(batch)} does not fit {slots} slots of {micro}")
    base, extra = divmod(len(batch), slots)
    out, start = [], 0
    for s in range(slots):
        size = base + (s < extra)
        positions = list(range(start, start + size))
        out.append((positions, [batch[p] for p in positions] if size else [batch[0]]))
        start += size
    return out


def make_optimizer(parameters, config, total_steps: int, *, device: torch.device, optimizer_state: dict | None = None):
    """(AdamW, its warm-up/decay schedule) over the trainable ``parameters``, from ``config``'s lr, betas,
    eps, weight_decay, warmup_steps, schedule and min_lr_ratio (any config with those fields: the
    preference-model trainer shares this). Fused AdamW on CUDA. From ``optimizer_state`` only the
    moments are kept: lr, betas, … come from this config, not from the last update."""
    params = [p for p in parameters if p.requires_grad]
    fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
    # one kernel for all parameters (fused on CUDA, foreach elsewhere), not a Python loop over them
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, fused=fused or None, foreach=None if fused else True)
    if optimizer_state is not None:
        fresh = optimizer.state_dict()
        optimizer.load_state_dict({"state": _copy(optimizer_state["state"]), "param_groups": fresh["param_groups"]})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
    return optimizer, scheduler


def lr_factor(step: int, config: TrainerConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``config.lr``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    shape = 1 - progress if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


# ----- processes and devices ---------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL when CUDA is present (one GPU per process), else gloo. Returns (rank, world size); (0, 1)
    and nothing started when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device(device: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; a bare "cuda" means this process's GPU (LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def _non_finite(run, batch: list[int], bad: torch.Tensor, ids: list[str], what: str, names: list[str]) -> NonFiniteLossError:
    positions = [i for i, b in enumerate(bad.tolist()) if b > 0] or list(range(len(batch)))
    indices = [batch[p] for p in positions]
    named = [ids[i] or f"#{i}" for i in indices]
    cause = "the loss of these examples" if bad.sum() > 0 else f"{', '.join(names)} of this batch (its losses were finite)"
    shown = ", ".join(named[:20]) + (f" and {len(named) - 20} more" if len(named) > 20 else "")
    message = (
        f"{what}: {cause} is not finite at step {run.step + 1} of {len(run.plan)}: examples {shown} "
        f"(indices {indices[:20]}). The update stopped before applying that step; the model holds step {run.step}'s weights."
    )
    return NonFiniteLossError(message, step=run.step + 1, example_ids=named, indices=indices, checkpoint=None)


def _means(history: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in (history[0] if history else {}) if k.split("/")[0] in ("loss", "pref", "kl")]
    return {k: sum(h[k] for h in history) / len(history) for k in keys}


def _copy(obj):
    """A deep copy of an optimizer state (the tensors cloned), so training never writes into it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj
