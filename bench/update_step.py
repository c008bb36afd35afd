"""Cost of one trainer update step of each NLHF loss, as a ratio to the floor. Prints one JSON line.

    python bench/update_step.py [--repeats 7] [--hidden 128] [--layers 4] [--vocab 8192] [--threads 1]
    python bench/update_step.py --processes 2 [--repeats 3]     # 2 processes (torchrun, gloo) over 1

The step is ``trainer.train_step`` on a fixed global batch of 8 pairs, each sequence 128 tokens (32
prompt + 96 response): packing, the policy's forward and backward (y and y' in one pass; one response
for SPPO and Nash-MD), the loss, gradient clipping, AdamW and the schedule, and the metrics.

The floor is what any method pays when the reference and past iterates come from the log-prob cache:
one plain forward + backward of the same model over the same packed sequences, keeping logits at the
response positions only (as the trainer does), a summed cross-entropy of the response tokens
(``F.cross_entropy``), then the same AdamW step. So ``ratio_to_floor`` − 1 is the trainer's own
overhead (packing, the chunked log-softmax, the loss, clipping, the schedule, metrics). ``ratio_to_fwd_bwd``
is the same step against the floor without its optimizer step.

Both are timed in the same process, interleaved: each of ``repeats`` rounds (after a warm-up round)
times the floors and then one step of every loss, and divides within the round, so that the load of
shared cores hits both sides alike; the medians over rounds are reported. The model is a small Llama
built from a config (random weights, no download, 2.9M parameters by default, a third of them in the
output layer) behind a byte-level tokenizer: a small model makes the trainer's fixed costs weigh more,
not less; one step takes about half a second on one CPU core.

``--processes N``: the INPO step in N processes (torchrun, gloo, DDP, one thread each) against one
process, on the same global batch (micro-batch pairs/N; the one process accumulates N micro-batches):
``processes_over_one`` is the median over repeats of (N-process step time / one-process step time),
each repeat timing the one process, then a fresh torchrun launch (its start-up is not timed). On 2
shared cores expect no speed-up: about 1 plus the all-reduce of the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from solvers import algorithms, trainer  # noqa: E402
from solvers.causal_lm import CausalLMConfig, CausalLMPolicy, pack  # noqa: E402


def build_policy(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, context: int, device: str, dtype=torch.float32) -> CausalLMPolicy:
    """A random Llama from a config behind a byte-level tokenizer (the model's vocabulary may be larger
    than the tokenizer's: the extra logits cost what a real vocabulary's would)."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return CausalLMPolicy(model, tokenizer, CausalLMConfig(device=device, max_new_tokens=min(64, context - 1)))


def synthetic_examples(n: int, *, prompt_tokens: int, response_tokens: int, seed: int = 0) -> list[trainer.Example]:
    """n pairs whose prompts have ``prompt_tokens`` byte tokens and whose responses have
    ``response_tokens`` (EOS included), with every cached quantity any loss needs."""
    g = torch.Generator().manual_seed(seed)

    def text(length: int) -> str:
        return "".join(chr(c) for c in torch.randint(97, 123, (length,), generator=g).tolist())

    def logps() -> tuple[float, float]:
        return tuple((-2.0 * response_tokens + torch.randn(2, generator=g)).tolist())

    return [
        trainer.Example(
            text(prompt_tokens), text(response_tokens - 1), text(response_tokens - 1),
            p_hat=float(torch.rand(1, generator=g)), p_hat_other=0.5,
            ref_logp=logps(), prev_logp=logps(), older_logp=(logps(),), id=f"c{i}",
        )  # fmt: skip
        for i in range(n)
    ]


def floor_step(model, optimizer, seqs) -> None:
    """Forward + backward of the same packed sequences with a plain summed cross-entropy of the
    response tokens, then AdamW: the least any update on these tokens can cost."""
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids, use_cache=False, logits_to_keep=seqs.targets.shape[1])
    targets = seqs.targets.masked_fill(~seqs.target_mask, -100)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--response-tokens", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--losses", default=",".join(n for n, a in algorithms.ALGORITHMS.items() if a.loss is not None))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadier timings on shared cores)")
    ap.add_argument("--processes", type=int, default=1, help="N > 1: time the step in N processes over 1 instead")
    ap.add_argument("--steps", type=int, default=5, help="--processes: timed steps per repeat and side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.processes > 1:
        return processes_over_one(args)
    names = args.losses.split(",")

    seq = args.prompt_tokens + args.response_tokens
    policy, examples = bench_model(args)
    batch = list(range(args.pairs))

    # one update state per loss (its own AdamW), all over the same model; the batch is the whole set
    states = {}
    for name in names:
        cfg = trainer.TrainerConfig(loss=name, lr=1e-6, schedule="constant", micro_batch_size=args.pairs, max_steps=args.repeats + 1, device="cpu")
        states[name] = trainer.start_update(policy, examples, cfg)
        states[name].module.train()
    # the floor over the same sequences: 2 per pair, or 1 for the one-response losses
    floors = {}
    for k in sorted({states[n].data.responses for n in names}):
        data = next(states[n].data for n in names if states[n].data.responses == k)
        floors[k] = pack(*data.sequences(batch), pad_id=policy.pad_id)
    floor_opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-6)

    # interleaved: each round times the floors, then every loss's step; a ratio is taken within a round
    # (the same load on shared cores), and the median over rounds is reported
    ratios: dict[str, list[float]] = {name: [] for name in names}
    ratios_fb: dict[str, list[float]] = {name: [] for name in names}
    step_s: dict[str, list[float]] = {name: [] for name in names}
    floor_s: dict[int, list[float]] = {k: [] for k in floors}
    for r in range(args.repeats + 1):  # round 0 warms up
        floor = {k: timed(lambda: floor_step(policy.model, floor_opt, seqs)) for k, seqs in floors.items()}
        fwd_bwd = {k: timed(lambda: floor_step(policy.model, _NoStep(policy.model), seqs)) for k, seqs in floors.items()}
        for name in names:
            t = timed(lambda: trainer.train_step(states[name], batch))
            if r:
                k = states[name].data.responses
                step_s[name].append(t)
                ratios[name].append(t / floor[k])
                ratios_fb[name].append(t / fwd_bwd[k])
        if r:
            for k in floors:
                floor_s[k].append(floor[k])
    policy.model.eval()

    med = statistics.median
    print(json.dumps({
        "bench": "update_step",
        "ratio_to_floor": {n: round(med(v), 3) for n, v in ratios.items()},
        "ratio_to_fwd_bwd": {n: round(med(v), 3) for n, v in ratios_fb.items()},
        "step_s": {n: round(med(v), 4) for n, v in step_s.items()},
        "floor_s": {("pairs" if k == 2 else "one_response"): round(med(v), 4) for k, v in floor_s.items()},
        "goal": 1.3,
        "model": {"params": sum(p.numel() for p in policy.model.parameters()), "hidden": args.hidden, "layers": args.layers, "vocab": policy.model.config.vocab_size},
        "batch": {"pairs": args.pairs, "seq_len": seq},
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }))  # fmt: skip


def processes_over_one(args) -> None:
    policy, examples = bench_model(args)
    if "WORLD_SIZE" in os.environ:  # a rank of the launch below: time the steps, rank 0 prints them
        rank, world = trainer.init_distributed()
        seconds = timed_steps(policy, examples, args, world=world)
        if rank == 0:
            print(json.dumps({"step_s": seconds}), flush=True)
        torch.distributed.destroy_process_group()
        return
    ratios, one_s, many_s = [], [], []
    for _ in range(args.repeats):
        one = statistics.median(timed_steps(policy, examples, args, world=1))
        many = statistics.median(run_under_torchrun(args.processes, sys.argv[1:])["step_s"])
        ratios.append(many / one)
        one_s.append(one)
        many_s.append(many)
    med = statistics.median
    print(json.dumps({
        "bench": "update_step_processes",
        "processes_over_one": round(med(ratios), 3),
        "step_s": {"1": round(med(one_s), 4), str(args.processes): round(med(many_s), 4)},
        "processes": args.processes,
        "batch": {"pairs": args.pairs, "seq_len": args.prompt_tokens + args.response_tokens, "micro_batch_pairs": args.pairs // args.processes},
        "model": {"params": sum(p.numel() for p in policy.model.parameters()), "hidden": args.hidden, "layers": args.layers},
        "repeats": args.repeats,
        "device": "cpu",
    }))  # fmt: skip


def bench_model(args):
    seq = args.prompt_tokens + args.response_tokens
    policy = build_policy(hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=args.hidden // 64, intermediate=int(2.75 * args.hidden), vocab=args.vocab, context=seq + 1, device="cpu")
    return policy, synthetic_examples(args.pairs, prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens)


def timed_steps(policy, examples, args, *, world: int) -> list[float]:
    """Seconds of each of ``args.steps`` INPO steps (after one untimed) on the whole global batch,
    split into ``args.processes`` micro-batches: one per process, or all accumulated by one."""
    micro = args.pairs // args.processes
    cfg = trainer.TrainerConfig(loss="inpo", lr=1e-6, schedule="constant", micro_batch_size=micro, grad_accum=args.processes // world, max_steps=args.steps + 1, device="cpu")
    model = policy.model
    policy.model = type(model)(model.config)  # a fresh copy, so DDP's wrapping leaves the shared model alone
    policy.model.load_state_dict(model.state_dict())
    state = trainer.start_update(policy, examples, cfg)
    batch = list(range(args.pairs))
    trainer.train_step(state, batch)
    seconds = [timed(lambda: trainer.train_step(state, batch)) for _ in range(args.steps)]
    policy.model = model
    return seconds


def run_under_torchrun(processes: int, argv: list[str]) -> dict:
    """Run this script in ``processes`` processes (torchrun, one machine) and return the JSON object
    that rank 0 printed last. Its start-up (imports, the rendezvous) is not in what it measures."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", sys.argv[0], *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


class _NoStep:
    """An optimizer that only clears gradients: the floor without its AdamW step."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


if __name__ == "__main__":
    main()
