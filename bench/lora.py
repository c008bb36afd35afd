"""One policy update, full fine-tuning against LoRA: seconds per pair, peak memory, checkpoint bytes. One JSON line.

    python bench/lora.py --model FOLDER [--pairs 8] [--response-tokens 32] [--repeats 1] [--threads 2]
    python bench/lora.py --smoke          # the tiny random model: checks that the script runs (seconds)

FOLDER is a plain model folder (e.g. SmolLM2-135M-Instruct as a campaign stores it: its checkpoints/v0).
Each variant runs in a child process of its own, in the order full, LoRA, LoRA, full, … (``--repeats``
of each), so that one variant's memory never counts against the other's: per child, the model is
loaded, ``--pairs`` judged pairs (fixed texts, log-probs under μ = π_t scored once, untimed) are
trained on by one ``solvers.trainer.update`` (INPO, micro-batches of ``--micro-batch`` pairs, after
one untimed warm-up step), and the round's checkpoint is written as the update stage writes it
(the whole model, tokenizer and AdamW state; or the adapter and its AdamW state).

Keys: ``seconds_per_pair_full`` / ``_lora`` (median over repeats), ``peak_bytes_full`` / ``_lora``
(the child's peak resident memory on a CPU, model loading included; CUDA's peak allocation on a
GPU), ``checkpoint_bytes_full`` / ``_lora``, and their ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "the a model answer helps because it is short clear kind and true so people read it twice before they reply".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder (save_pretrained + tokenizer)")
    p.add_argument("--smoke", action="store_true", help="the tiny random model, few pairs: checks that the script runs")
    p.add_argument("--pairs", type=int, default=None, help="judged pairs in the update (default 8; smoke 4)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    p.add_argument("--response-tokens", type=int, default=None, help="words per response (default 32; smoke 8)")
    p.add_argument("--repeats", type=int, default=1, help="children per variant, interleaved; medians reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--target-modules", default="all-linear", help="LoRA targets: 'all-linear' or comma-separated names")
    p.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # a child's job
    args = p.parse_args(argv)
    if not args.smoke and not args.model and not args.variant:
        p.error("give --model FOLDER, or --smoke")
    args.pairs = args.pairs or (4 if args.smoke else 8)
    args.response_tokens = args.response_tokens or (8 if args.smoke else 32)
    return args


def examples(policy, n: int, words: int):
    """n pairs of fixed texts, with log-probs under μ = π_t scored once (as the store's cache holds them)."""
    from solvers.trainer import Example

    prompts = [f"Question {i}: how should one answer a hard question?" for i in range(n)]
    y = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(words)) for i in range(n)]
    y_other = [" ".join(WORDS[(5 * i + 2 * j + 1) % len(WORDS)] for j in range(words)) for i in range(n)]
    logp = policy.score(prompts + prompts, y + y_other)
    return [Example(prompts[i], y[i], y_other[i], p_hat=0.75, ref_logp=(logp[i], logp[n + i]), prev_logp=(logp[i], logp[n + i]), id=f"c{i}") for i in range(n)]


def child(args) -> dict:
    """One variant in this process: load, warm up, one timed update, write its checkpoint."""
    import torch

    from solvers import checkpoint, lora, trainer
    from solvers.causal_lm import CausalLMConfig, CausalLMPolicy
    from solvers.trainer import TrainerConfig

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.smoke
    policy = CausalLMPolicy.load(args.model, CausalLMConfig(device="cuda" if cuda else "cpu", dtype="float32"))
    data = examples(policy, args.pairs, args.response_tokens)
    if args.variant == "lora":
        targets = args.target_modules if args.target_modules == "all-linear" else tuple(args.target_modules.split(","))
        policy = lora.for_training(policy, lora.LoraSettings(r=args.r, alpha=2.0 * args.r, target_modules=targets), seed=0)
    config = TrainerConfig(loss="inpo", lr=1e-5, micro_batch_size=args.micro_batch, schedule="constant", device="cuda" if cuda else "cpu")
    trainer.update(policy, data[: args.micro_batch], dataclasses.replace(config, max_steps=1))  # warm-up: allocations, kernels
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = trainer.update(policy, data, config)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    adapter = lora.is_lora(policy.model)
    with tempfile.TemporaryDirectory() as tmp:  # what the update stage writes as the new version
        folder = checkpoint.save_checkpoint(Path(tmp) / "v1", policy.model, None if adapter else policy.tokenizer, {"optimizer": result.optimizer_state})
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    return {"seconds_per_pair": seconds / len(data), "peak_bytes": peak, "checkpoint_bytes": size, "trainable_parameters": trainable, "device": "cuda" if cuda else "cpu"}


def run_child(args, variant: str, model: str) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--model", model, "--pairs", str(args.pairs), "--micro-batch", str(args.micro_batch)]
    command += ["--response-tokens", str(args.response_tokens), "--threads", str(args.threads), "--r", str(args.r), "--target-modules", args.target_modules]
    command += ["--smoke"] if args.smoke else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {variant} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.smoke:
            from solvers import checkpoint
            from solvers.causal_lm import tiny_causal_lm

            model = os.path.join(tmp, "tiny")
            checkpoint.save_checkpoint(model, *tiny_causal_lm(seed=0))
        order = [v for r in range(args.repeats) for v in (("full", "lora") if r % 2 == 0 else ("lora", "full"))]
        runs: dict[str, list[dict]] = {"full": [], "lora": []}
        for variant in order:
            runs[variant].append(run_child(args, variant, model))
    line = {"model": "tiny" if args.smoke else os.path.basename(os.path.normpath(args.model)), "pairs": args.pairs, "response_words": args.response_tokens, "repeats": args.repeats}
    for variant, rows in runs.items():
        line[f"seconds_per_pair_{variant}"] = statistics.median(r["seconds_per_pair"] for r in rows)
        line[f"peak_bytes_{variant}"] = int(statistics.median(r["peak_bytes"] for r in rows))
        line[f"checkpoint_bytes_{variant}"] = rows[0]["checkpoint_bytes"]
        line[f"trainable_parameters_{variant}"] = rows[0]["trainable_parameters"]
    line["lora_to_full_seconds"] = line["seconds_per_pair_lora"] / line["seconds_per_pair_full"]
    line["lora_to_full_peak"] = line["peak_bytes_lora"] / line["peak_bytes_full"]
    line["lora_to_full_checkpoint"] = line["checkpoint_bytes_lora"] / line["checkpoint_bytes_full"]
    line.update({"device": runs["full"][0]["device"], "threads": args.threads, "lora_r": args.r, "lora_targets": args.target_modules})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
