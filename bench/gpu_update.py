"""Throughput and model FLOPs utilization of the trainer's update step on a GPU. Prints one JSON line.

    python bench/gpu_update.py                  # CUDA: a ~1.1B Llama, 1024-token sequences, bf16, compiled
    python bench/gpu_update.py --no-compile     # the same in eager mode
    python bench/gpu_update.py --smoke          # any machine: a tiny model, 2 CPU processes (gloo, FSDP2), seconds
    python bench/gpu_update.py --processes 4 --sharding fsdp     # 4 GPUs (torchrun, NCCL), FSDP2
    python bench/gpu_update.py --fit            # also: the largest Llama shape whose update fits one GPU
    python bench/gpu_update.py --lora           # a LoRA adapter (r 16, every linear layer) on the frozen model

The model is built from a config (random weights, no download): TinyLlama-1.1B's shape (hidden 2048,
22 layers, 32 heads with 4 key-value heads, MLP 5632, vocabulary 32000, untied output layer). Every
sequence is 1024 tokens (128 prompt + 896 response, no padding). The step is ``trainer.train_step``
with the INPO loss (any loss costs the same: the loss is a few scalars per pair): forward over y and y'
in one pass, backward, gradient clipping, fused AdamW on float32 master weights, bf16 autocast, SDPA
attention, no gradient checkpointing (``--gradient-checkpointing`` trades ~30% speed for memory). On
CUDA the forward is compiled (``TrainerConfig(compile=True)``, about a minute of warm-up), which fuses the elementwise work
(norms, rotary, SiLU, casts) that eager mode runs as separate kernels: ~1.45× the tokens per second.

Measured on one H100 80GB HBM3 (torch 2.11, transformers 5.17), 16 sequences of 1024 tokens per step:

    | forward  | micro-batch       | tokens/s | MFU   |
    | eager    | 4 pairs × 2 accum | 39,700   | 0.249 |
    | eager    | 8 pairs × 1       | 42,500   | 0.267 |
    | compiled | 4 pairs × 2 accum | 58,100   | 0.365 |
    | compiled | 8 pairs × 1       | 60,400   | 0.379 |

    MFU = 6 · N · tokens_per_s / peak

Measured on one H200 (torch 2.11, transformers 5.17, Dec 2026), compiled, 1 micro-batch per step:

    | update           | micro-batch | tokens/s | MFU   | peak memory |
    | full             | 8 pairs     | 62,500   | 0.392 | 44.5 GB     |
    | full             | 16 pairs    | 64,900   | 0.407 | 73.5 GB     |
    | LoRA r16         | 8 pairs     | 66,900   | 0.285 | 37.3 GB     |
    | LoRA r16, eager  | 8 pairs     | 42,600   | 0.181 | 43.2 GB     |

    python bench/gpu_update.py --pairs 16 --grad-accum 1          (and --pairs 8; --lora; --lora --no-compile)

The goal of MFU ≥ 0.45 for the compiled 1B update is not met (0.407 at best). LoRA costs ~4·N per token
against 6·N yet runs only 1.07× faster (not profiled; the likely cost is the adapter's small products
and their elementwise work, which do not fuse into the frozen matrix products). ``setup_and_warmup_s`` (build, compilation, warm-up steps): 81 s with
LoRA, 55 s full.
``--fit`` on the H200 (eager, 1 pair of 1024-token sequences): full fine-tuning fits up to the 8B shape
(8.0B parameters, 129.5 GB peak), LoRA up to the 13B shape (12.4B, 94.2 GB).

N counts the parameters that do matrix products (all but the input embedding, a lookup); attention's
own FLOPs (4–9% more at 1024 tokens, causal or not) are not counted, while the output layer runs only at
response positions (897 of 1024, ~1% of the count): the figure errs low. The peak is the GPU's dense
bf16 rate: 989e12 for H100/H200 (detected by name), 312e12 for A100; ``--peak-flops`` overrides, and
with no known peak ``mfu`` is null. Needs only torch and transformers (and nashflow's ``solvers``).

``--processes N`` runs the same step in N processes (the script starts itself under torchrun; one GPU
each, or gloo on the CPU) with ``--sharding ddp`` or ``fsdp`` (FSDP2 per decoder layer, bf16 with fp32
reduction: solvers/sharding.py): the global batch is N times one process's; ``tokens_per_s`` counts all
processes, ``mfu`` divides by N peaks, ``peak_memory_bytes`` is the most any one GPU allocated.
``--fit`` (CUDA, one process) steps through Llama shapes of growing depth and width (1B, 3B, 8B, 13B)
and reports in ``largest_params_fit`` the largest whose update (micro-batch of 1 pair, AdamW, fp32
master weights) runs on the GPU, full fine-tuning and LoRA (``{"full": …, "lora": …}``); null otherwise.

``--lora`` (``--lora-rank``, default 16) trains a LoRA adapter on every linear layer (solvers/lora.py; needs
``peft``) with the model frozen: no weight gradients and no AdamW state for the base, so a step costs about
4·N (forward 2·N, the gradient through the frozen weights 2·N) plus 6 per adapter parameter, and ``mfu``
counts those FLOPs, not 6·N.
No multi-GPU figure has been measured yet (no GPU was available when this was written).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from update_step import build_policy, run_under_torchrun, synthetic_examples  # noqa: E402

from solvers import trainer  # noqa: E402

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s
MODEL_1B = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}
MODEL_SMOKE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "vocab": 512}
FIT_SHAPES = {  # Llama-3-like shapes by steps of depth and width (vocabulary 128256 from 3B up)
    "1B": MODEL_1B,
    "3B": {"hidden": 3072, "layers": 28, "heads": 24, "kv_heads": 8, "intermediate": 8192, "vocab": 128256},
    "8B": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256},
    "13B": {"hidden": 5120, "layers": 40, "heads": 40, "kv_heads": 8, "intermediate": 13824, "vocab": 128256},
}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def with_adapter(policy, args):
    """The policy as ``--lora`` trains it: a LoRA adapter on every linear layer, the model frozen."""
    if not args.lora:
        return policy
    from solvers import lora

    return lora.for_training(policy, lora.LoraSettings(r=args.lora_rank, alpha=2.0 * args.lora_rank), seed=0)


def step_flops_per_token(model, lora: bool) -> float:
    """6·N for full fine-tuning; with LoRA 4·N for the frozen matrices plus 6 per adapter parameter.
    N: the parameters that do matrix products (all but the input embedding, a lookup)."""
    embedding = model.get_input_embeddings().weight
    matmul = [p for p in model.parameters() if p is not embedding]
    if not lora:
        return 6.0 * sum(p.numel() for p in matmul)
    return sum((6.0 if p.requires_grad else 4.0) * p.numel() for p in matmul)


def measure(policy, args, pairs: int, device: torch.device, seq_len: int, prompt_tokens: int):
    """Warm up, then time ``args.steps`` update steps on one fixed global batch."""
    cfg = trainer.TrainerConfig(
        loss=args.loss,
        lr=1e-6,
        schedule="constant",
        micro_batch_size=pairs,
        grad_accum=args.grad_accum,
        max_steps=1,
        device=device.type,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        sharding=args.sharding,
    )
    n = cfg.global_batch(args.processes)
    examples = synthetic_examples(n, prompt_tokens=prompt_tokens, response_tokens=seq_len - prompt_tokens)
    state = trainer.start_update(policy, examples, cfg)
    batch = list(range(n))
    try:
        for _ in range(args.warmup):
            trainer.train_step(state, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens, start, steps = 0.0, time.perf_counter(), 0
        while steps < args.steps and time.perf_counter() - start < args.max_seconds:
            m = trainer.train_step(state, batch)  # synchronizes once per step (its metrics)
            tokens += m["perf/tokens_per_s"] * m["perf/step_s"]
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return state, steps, tokens, time.perf_counter() - start
    finally:
        trainer.finish_update(state)


def largest_params_fit(args, device: torch.device) -> dict | None:
    """The largest of FIT_SHAPES whose update step runs on this GPU (1 pair per micro-batch, 2 steps),
    by parameter count, full fine-tuning and LoRA; each search stops at the first shape that runs out of memory."""
    return {"full": _largest_fit(argparse.Namespace(**{**vars(args), "lora": False}), device), "lora": _largest_fit(argparse.Namespace(**{**vars(args), "lora": True}), device)}


def _largest_fit(args, device: torch.device) -> dict | None:
    fit, policy = None, None
    for name, shape in FIT_SHAPES.items():
        try:
            with torch.device(device):
                policy = with_adapter(build_policy(**shape, context=args.seq_len + 1, device=device.type), args)
            torch.cuda.reset_peak_memory_stats(device)
            measure(policy, argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1, "max_seconds": 60}), 1, device, args.seq_len, args.seq_len // 8)
            fit = {"shape": name, "params": sum(p.numel() for p in policy.model.parameters()), "peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            policy = None
            gc.collect()
            torch.cuda.empty_cache()
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, short sequences, CPU: checks that the script runs")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per micro-batch (2 sequences each); default 4, smoke 2")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (a step: pairs × grad-accum × 2 sequences)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; default 1024, smoke 64")
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed (allocator, kernels, compile)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--max-seconds", type=float, default=120, help="stop timing after this long")
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--loss", default="inpo")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the forward (default: on CUDA)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--processes", type=int, default=None, help="processes under torchrun (one per GPU); default 1, smoke 2")
    ap.add_argument("--sharding", choices=["ddp", "fsdp"], default=None, help="with processes > 1; default ddp, smoke fsdp")
    ap.add_argument("--fit", action="store_true", help="CUDA, one process: also find the largest Llama shape whose update fits the GPU")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter on every linear layer, the model frozen (needs peft)")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()
    args.processes = args.processes or (2 if args.smoke else 1)
    args.sharding = args.sharding or ("fsdp" if args.smoke else "ddp")
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:  # start this script under torchrun; rank 0 prints the line
        print(json.dumps(run_under_torchrun(args.processes, sys.argv[1:])))
        return
    rank, world = trainer.init_distributed()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    shape = MODEL_1B if cuda else MODEL_SMOKE
    args.compile = cuda if args.compile is None else args.compile
    seq_len = args.seq_len or (1024 if cuda else 64)
    pairs = args.pairs or (4 if cuda else 2)
    prompt_tokens = seq_len // 8
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the few float32 products (none in the hot path)
        torch.backends.cudnn.allow_tf32 = True

    started = time.perf_counter()
    with torch.device(device):  # initialize on the GPU directly: a CPU init of 1.1B weights takes minutes
        policy = with_adapter(build_policy(**shape, context=seq_len + 1, device=device.type), args)
    n_params = sum(p.numel() for p in policy.model.parameters())
    n_matmul = n_params - policy.model.get_input_embeddings().weight.numel()
    flops_per_token = step_flops_per_token(policy.model, args.lora)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    while True:  # out of GPU memory: halve the micro-batch, double the accumulation (same tokens per step)
        try:
            state, steps, tokens, seconds = measure(policy, args, pairs, device, seq_len, prompt_tokens)
            break
        except torch.cuda.OutOfMemoryError:
            if pairs == 1 or world > 1:  # several processes: one rank's retry would leave the others waiting
                raise
        pairs, args.grad_accum = pairs // 2, args.grad_accum * 2
        gc.collect()  # the failed attempt's optimizer state, now that its traceback is gone
        torch.cuda.empty_cache()
    setup_s = time.perf_counter() - started - seconds  # building the model, encoding, warm-up steps

    tokens_per_s = tokens / seconds
    peak = peak_flops(device, args.peak_flops)
    memory = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.destroy_process_group()
    sequences = len(state.plan[0]) * state.data.responses
    del state, policy
    gc.collect()
    fit = largest_params_fit(argparse.Namespace(**{**vars(args), "seq_len": seq_len}), device) if args.fit and cuda and world == 1 else None
    if rank:
        return
    print(json.dumps({
        "bench": "gpu_update",
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(flops_per_token * tokens_per_s / (peak * world), 4) if peak else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "peak_flops": peak,
        "params": n_params,
        "matmul_params": n_matmul,
        "trainable_params": trainable,
        "lora_rank": args.lora_rank if args.lora else None,
        "seq_len": seq_len,
        "sequences_per_step": sequences,
        "micro_batch_pairs": pairs,
        "grad_accum": args.grad_accum,
        "step_s": round(seconds / max(steps, 1), 4),
        "steps_timed": steps,
        "setup_and_warmup_s": round(setup_s, 1),
        "peak_memory_bytes": int(memory.item()) if cuda else None,
        "largest_params_fit": fit,
        "processes": world,
        "sharding": args.sharding if world > 1 else None,
        "loss": args.loss,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch": torch.__version__,
        "smoke": not cuda,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
