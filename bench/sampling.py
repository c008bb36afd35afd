"""Sampling tokens/s of a real model three ways, same prompts, batch and lengths. Prints one JSON line.

    python bench/sampling.py [--model smollm2|FOLDER] [--prompts 8] [--k 4] [--max-new-tokens 48] [--repeats 3] [--threads 2]
    python bench/sampling.py --smoke      # the tiny random model, a few tokens: checks the script runs

- ``in_process_tokens_per_s``: ``CausalLMPolicy.sample`` with the policy's default settings (what
  ``policy.sampler: {kind: local}`` runs), k samples of each prompt, log π(y|x) computed on the way.
- ``server_tokens_per_s``: ``OpenAISampler.sample`` against `transformers serve` started on the same
  model folder by pipelines/sampling_server.py (what ``policy.sampler: {kind: server, command: …}``
  runs), including the local scoring of the texts that fills the log-prob cache (``server_scoring_share``
  says how much of its time that is); the server's start-up is not counted (``server_startup_s``).
- ``hf_generate_tokens_per_s``: transformers' ``generate`` on the whole batch (prompts × k, left-padded),
  sampling at temperature 1, no log-probs.

Tokens are the generated tokens up to and including the end-of-sequence token (the server's: the text
tokenized locally, plus EOS when it stopped). All three sample at temperature 1 and top_p 1 with the same
max_new_tokens, prompts rendered by the tokenizer's chat template. The three are timed in turn in each
repeat, their order rotating, so a slow spell of shared cores hits all; medians are reported. The server
gets ``--threads`` threads (OMP_NUM_THREADS), as the in-process samplers do.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pipelines.sampling_server import started_server  # noqa: E402
from solvers import checkpoint  # noqa: E402
from solvers.causal_lm import TINY_CHAT_TEMPLATE, CausalLMConfig, CausalLMPolicy, tiny_policy  # noqa: E402
from solvers.mixture_sampling import left_pad  # noqa: E402
from solvers.openai_sampler import OpenAISampler, OpenAISamplerConfig  # noqa: E402

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "..", "examples", "prompts", "instructions.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a model folder, or anything policy.model takes (smollm2: dequantized from its package once)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="samples per prompt; batch = prompts × k sequences")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=None, help="server requests in flight (default: the batch)")
    p.add_argument("--serve-args", default="", help="more `transformers serve` options, e.g. --continuous-batching")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--smoke", action="store_true", help="the tiny random model, 2 prompts × 2 samples × 8 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.k, args.max_new_tokens, args.repeats = 2, 2, 8, 1
    return args


def model_folder(args, tmp: str) -> str:
    """A plain model folder the server can load: --model itself, or the model saved once into ``tmp``."""
    if not args.smoke and os.path.isfile(os.path.join(args.model, "config.json")):
        return args.model
    folder = os.path.join(tmp, "model")
    if args.smoke:
        policy = tiny_policy(chat_template=TINY_CHAT_TEMPLATE, config=CausalLMConfig(device="cpu"))
    else:
        policy = CausalLMPolicy.load(args.model, CausalLMConfig(device="cpu", dtype="float32"))
    checkpoint.save_checkpoint(folder, policy.model, policy.tokenizer)
    return folder


def hf_generate(policy: CausalLMPolicy, prompts: list[str], k: int, seed: int) -> int:
    """``generate`` on prompts × k sequences at once; returns the generated tokens (through EOS)."""
    ids = [p for p in policy.encode_prompts(prompts) for _ in range(k)]
    input_ids, attention_mask, _ = left_pad(ids, policy.pad_id)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = policy.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=policy.config.max_new_tokens, pad_token_id=policy.pad_id, eos_token_id=sorted(policy.stop_ids),
        )
    tokens = 0
    for row in out[:, input_ids.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in policy.stop_ids), None)
        tokens += len(row) if stop is None else stop + 1
    return tokens


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with open(PROMPTS_FILE) as f:
        texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    prompts = [texts[i % len(texts)] for i in range(args.prompts)]
    batch = args.prompts * args.k
    config = CausalLMConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, device="cpu")
    with tempfile.TemporaryDirectory(prefix="nashflow-bench-sampling-") as tmp:
        folder = model_folder(args, tmp)
        policy = CausalLMPolicy.load(folder, config)
        command = f"OMP_NUM_THREADS={args.threads} {shlex.quote(sys.executable)} -m transformers.cli.transformers serve {{checkpoint}} --device cpu --host 127.0.0.1 --port {{port}} --log-level warning {args.serve_args}"
        started = time.perf_counter()
        with started_server(command, folder, log_path=os.path.join(tmp, "serve.log"), timeout_s=args.startup_timeout) as base_url:
            startup_s = time.perf_counter() - started
            # transformers serve returns one choice per request: ask for one at a time, the batch in flight
            server = OpenAISampler(policy, OpenAISamplerConfig(base_url=base_url, model=folder, choices_per_request=1, max_concurrency=args.concurrency or batch, timeout_s=600))
            server.sample(prompts[:1], 1, seed=0)  # warm-up: the first request loads what the server loads lazily
            policy.sample(prompts[:1], 1, seed=0)
            hf_generate(policy, prompts[:1], 1, seed=0)

            def in_process(seed):
                return sum(s.n_tokens for row in policy.sample(prompts, args.k, seed=seed) for s in row), 0.0

            def served(seed):
                samples = [s for row in server.sample(prompts, args.k, seed=seed) for s in row]
                flat_prompts = [p for p in prompts for _ in range(args.k)]
                start = time.perf_counter()  # what the local scoring inside sample() cost, timed again on its own
                policy.score(flat_prompts, [s.text for s in samples], finished=[s.finish_reason == "stop" for s in samples], tokens=[s.token_ids for s in samples])
                return sum(s.n_tokens for s in samples), time.perf_counter() - start

            def generate(seed):
                return hf_generate(policy, prompts, args.k, seed), 0.0

            methods = {"in_process": in_process, "server": served, "hf_generate": generate}
            rates: dict[str, list[float]] = {name: [] for name in methods}
            scoring_share: list[float] = []
            for r in range(args.repeats):
                names = list(methods)
                for name in names[r % 3 :] + names[: r % 3]:
                    start = time.perf_counter()
                    tokens, scoring_s = methods[name](seed=1 + r)
                    seconds = time.perf_counter() - start - scoring_s  # sample() alone (its own scoring included, the re-timing not)
                    rates[name].append(tokens / seconds)
                    if name == "server":
                        scoring_share.append(scoring_s / seconds)
    line = {
        "bench": "sampling",
        "in_process_tokens_per_s": round(statistics.median(rates["in_process"]), 2),
        "server_tokens_per_s": round(statistics.median(rates["server"]), 2),
        "hf_generate_tokens_per_s": round(statistics.median(rates["hf_generate"]), 2),
        "server_scoring_share": round(statistics.median(scoring_share), 3),
        "server_startup_s": round(startup_s, 1),
        "runs": {name: [round(v, 2) for v in values] for name, values in rates.items()},
        "settings": {
            "model": "tiny random Llama (smoke)" if args.smoke else args.model,
            "prompts": args.prompts,
            "samples_per_prompt": args.k,
            "batch": batch,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "server": f"transformers serve {args.serve_args}".strip() + f", {args.concurrency or batch} requests in flight, one choice each",
            "torch": torch.__version__,
        },
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
