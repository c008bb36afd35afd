"""A round's store work as a campaign's store grows: at round 1 and at round N it should cost the same.

    python bench/store_scale.py [--rounds 200] [--prompts 1024] [--k 4] [--tokens 200] [--dir DIR]

Grows a store the way a campaign does, through the stages' own functions with a synthetic policy and
judge (so only the store is measured): per round, `stages.sample_responses` writes prompts × k
responses of ~`tokens` tokens with their token ids and log-probs, `stages.pair_responses` pairs each
prompt's samples in both orders, `stages.judge_pairs` stores 8,192 judgments, `lm_update.update_examples`
reads what the update trains on and scores the reference's log-probs, and the evaluation stage's reads
(`intransitivity` of the round, the rounds table), the merge of the round's small files
(`Store.compact(rounds=[r])`, as `stages.evaluate_policy` does before the row) and its rounds row follow.
Defaults: 4,096 responses, 8,192 comparisons and 8,192 log-probs per round.

Rounds 1 … N − 1 are grown in bulk (``grow_round``: the same rows through ``Store.write``, in the
stages' chunks, without their per-row Python). Then, interleaved ``--repeats`` times so that both see
the same load on shared cores, round 1 of a fresh store and the next round of the grown one are timed,
each in a fresh process (its peak RSS is that round's); medians are reported. Then `nashflow status`
(the whole command, Python start-up included) before and after `nashflow compact` (which finds little
left to merge: each round merged its own files). One JSON line;
`growth_ratio` = round N / round 1 (goal ≤ 1.5), `status_s` (goal ≤ 3). The default run takes about
four minutes and 0.6 GB of disk (reported as `disk_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from data import Store  # noqa: E402
from data.keys import prompt_id  # noqa: E402
from data.schemas import TABLES  # noqa: E402
from data.rounds import rounds_table  # noqa: E402
from oracles.protocol import Judgment  # noqa: E402
from solvers.policy import Sample  # noqa: E402

JUDGED_PER_ROUND = 8192
WORDS = np.array([f"w{i}" for i in range(4096)])


class SyntheticPolicy:
    """Samples of ~``tokens`` random tokens (and their text), with log-probs: what a real sampler stores.
    ``prepare`` makes them before the clock starts, so the timing is the store's work, not the sampler's."""

    def __init__(self, tokens: int):
        self.tokens, self.ready = tokens, None

    def prepare(self, n_prompts: int, k: int, seed: int) -> None:
        self.ready = self._make(n_prompts, k, seed)

    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        return self.ready[: len(prompts)] if self.ready is not None else self._make(len(prompts), k, seed)

    def _make(self, n_prompts: int, k: int, seed: int) -> list[list[Sample]]:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(self.tokens // 2, self.tokens * 3 // 2, size=n_prompts * k)
        out = []
        for i in range(n_prompts):
            group = []
            for j in range(k):
                ids = rng.integers(0, 49152, size=lengths[i * k + j])
                group.append(Sample(" ".join(WORDS[ids % len(WORDS)]), len(ids), "stop", -float(len(ids)), tuple(int(t) for t in ids)))
            out.append(group)
        return out

    def score(self, prompts, responses, *, finished=None, tokens=None) -> list[float]:
        return [-0.5 * len(t or r) for r, t in zip(responses, tokens or [None] * len(responses))]


class SyntheticJudge:
    oracle_id = "synthetic:store-bench:0"

    def judge(self, pairs):
        return [Judgment(p, p_a=float(len(p.a) > len(p.b)), label="a" if len(p.a) > len(p.b) else "b") for p in pairs]


def campaign_config(store: str):
    from pipelines.config import parse_config

    return parse_config(
        {"name": "store-bench", "store": store, "rounds": 1, "prompts": {"source": "text_world"}, "policy": {"kind": "causal_lm"}, "oracle": {"kind": "text_world"}, "solver": {"algorithm": "inpo"}}
    )


def round_store_work(store: Store, round: int, args) -> float:
    """The store work of one round's stages (seconds), through the stages' own functions."""
    import solvers.trainer  # noqa: F401 - imported by update_examples: loaded before the clock starts
    from data.diagnostics import intransitivity
    from pipelines import stages
    from pipelines.lm_update import update_examples

    config, policy = campaign_config(store.uri), SyntheticPolicy(args.tokens)
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    if round == 1:
        store.write("prompts", [dict(prompt_id=prompt_id(p), prompt=p, split="train", source="bench") for p in prompts])
    anchor = f"v{round - 1}"
    policy.prepare(len(prompts), args.k, seed=round)
    started = time.perf_counter()
    stages.sample_responses(store, policy, prompts, round=round, policy_version=anchor, k=args.k, seed=0)
    pairs = stages.pair_responses(store, round=round, policy_version=anchor, strategy="both_orders", skip_identical=False, seed=0)
    stages.judge_pairs(store, SyntheticJudge(), pairs[:JUDGED_PER_ROUND], round=round)
    update_examples(store, config, round=round, phase="update", sampled_version=anchor, oracle_ids={SyntheticJudge.oracle_id}, anchor=policy, load=lambda v: policy)
    metrics = intransitivity(store, rounds=[round], oracle_ids={SyntheticJudge.oracle_id})
    store.compact(rounds=[round])  # as stages.evaluate_policy does before the round's row
    store.write("rounds", [dict(round=round, policy_version=f"v{round}", checkpoint="-", solver="inpo", metrics=json.dumps(metrics), timings="{}")])
    rounds_table(store)
    return time.perf_counter() - started


def grow_round(store: Store, round: int, args, texts: list[str]) -> None:
    """One round's rows written in bulk through ``Store.write`` (validation, key checks, atomic files as
    for any write), shaped as ``round_store_work`` leaves them: the same tables, keys and sizes, without
    the stages' Python per row, so that 200 rounds grow in minutes."""
    from data.keys import comparison_id, response_id

    rng = np.random.default_rng(round)
    anchor, n = f"v{round - 1}", args.prompts * args.k
    pids = [prompt_id(f"prompt {i}") for i in range(args.prompts)]
    owner = [pids[i // args.k] for i in range(n)]
    rids = [response_id(owner[i], anchor, round, i % args.k) for i in range(n)]
    lengths = rng.integers(args.tokens // 2, args.tokens * 3 // 2, size=n)
    tokens = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)], pa.int32()), pa.array(rng.integers(0, 49152, size=int(lengths.sum())), pa.int32()))
    store.write("responses", pa.table({
        "response_id": rids, "round": [round] * n, "policy_version": [anchor] * n, "prompt_id": owner,
        "text": [texts[i % len(texts)] for i in range(n)], "n_tokens": lengths.astype(np.int32), "finish_reason": ["stop"] * n, "token_ids": tokens,
    }))  # fmt: skip
    for version in (anchor, "v0"):  # as the stages write them: at sampling, then at the update
        store.write("logprobs", pa.table({"response_id": rids, "policy_version": [version] * n, "round": [round] * n, "logp": (-lengths.astype(float)).tolist()}))
    pairs = [(owner[i + a], rids[i + a], rids[i + b]) for i in range(0, n, args.k) for a in range(args.k) for b in range(args.k) if a != b][:JUDGED_PER_ROUND]
    judge = SyntheticJudge.oracle_id
    for start in range(0, len(pairs), 2048):  # in the judge stage's chunks
        chunk = pairs[start : start + 2048]
        m = len(chunk)
        store.write("comparisons", pa.table({
            "comparison_id": [comparison_id(p, a, b, judge) for p, a, b in chunk], "round": [round] * m, "prompt_id": [p for p, _, _ in chunk],
            "a_id": [a for _, a, _ in chunk], "b_id": [b for _, _, b in chunk], "oracle_id": [judge] * m, "p_a": rng.integers(0, 2, size=m).astype(float),
            "n_votes": np.ones(m, np.int32), "answered_by": [judge] * m,
        }))  # fmt: skip
    store.compact(rounds=[round])
    store.write("rounds", [dict(round=round, policy_version=f"v{round}", checkpoint="-", solver="inpo", metrics="{}", timings="{}")])


def measure(store_dir: str, round: int, args) -> dict:
    """Round ``round``'s store work in a fresh process: its seconds and the process's peak RSS."""
    cmd = [sys.executable, __file__, "--measure", str(round), "--dir", store_dir, "--prompts", str(args.prompts), "--k", str(args.k), "--tokens", str(args.tokens)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nashflow {' '.join(args)} failed: {proc.stderr}")


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4, help="responses per prompt")
    ap.add_argument("--tokens", type=int, default=200, help="mean response length in tokens")
    ap.add_argument("--dir", default=None, help="where the store grows (default: a temporary folder, removed after)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements of round 1 and round N; medians are reported")
    ap.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure is not None:  # the child process: one round, timed
        seconds = round_store_work(Store(args.dir), args.measure, args)
        print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return

    folder = args.dir or tempfile.mkdtemp(prefix="nashflow-store-scale-")
    store_dir = os.path.join(folder, "store")
    try:
        grow_started = time.perf_counter()
        store = Store(store_dir)
        store.write("prompts", [dict(prompt_id=prompt_id(f"prompt {i}"), prompt=f"prompt {i}", split="train", source="bench") for i in range(args.prompts)])
        texts = [t.text for group in SyntheticPolicy(args.tokens).sample(["p"] * 128, 1, seed=0) for t in group]
        for r in range(1, args.rounds):
            grow_round(store, r, args, texts)
        grow_s = time.perf_counter() - grow_started
        # interleaved, so both see the same load on shared cores: round 1 of a fresh store, then the next
        # round of the grown one (rounds N, N + 1, …), each in a fresh process
        firsts, lasts = [], []
        for i in range(args.repeats):
            firsts.append(measure(os.path.join(folder, f"fresh-{i}"), 1, args))
            lasts.append(measure(store_dir, args.rounds + i, args))
        status_s = median_seconds(lambda: cli("status", store_dir), args.repeats)
        files_before = sum(len(Store(store_dir).files(t)) for t in TABLES)
        disk = disk_bytes(store_dir)
        started = time.perf_counter()
        report = Store(store_dir).compact()
        compact_s = time.perf_counter() - started
        compacted_status_s = median_seconds(lambda: cli("status", store_dir), args.repeats)
        first = statistics.median(m["seconds"] for m in firsts)
        last = statistics.median(m["seconds"] for m in lasts)
        print(
            json.dumps(
                {
                    "bench": "store_scale",
                    "rounds": args.rounds,
                    "responses_per_round": args.prompts * args.k,
                    "comparisons_per_round": JUDGED_PER_ROUND,
                    "logprobs_per_round": 2 * args.prompts * args.k,
                    "repeats": args.repeats,
                    "round1_store_s": round(first, 3),
                    f"round{args.rounds}_store_s": round(last, 3),
                    "growth_ratio": round(last / first, 3),
                    "growth_ratio_per_repeat": [round(b["seconds"] / a["seconds"], 3) for a, b in zip(firsts, lasts)],
                    "status_s": round(status_s, 3),
                    "status_after_compact_s": round(compacted_status_s, 3),
                    "files_before_compact": files_before,
                    "files_after_compact": sum(r["files_after"] for r in report.values()),
                    "compact_s": round(compact_s, 2),
                    "peak_rss_round1_bytes": max(m["peak_rss_bytes"] for m in firsts),
                    f"peak_rss_round{args.rounds}_bytes": max(m["peak_rss_bytes"] for m in lasts),
                    "disk_bytes": disk,
                    "grow_s": round(grow_s, 1),
                }
            )
        )
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
