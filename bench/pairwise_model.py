"""A pairwise preference model against Bradley–Terry on intransitive data, and inference speed. Prints one JSON line.

    python bench/pairwise_model.py [--epochs 6] [--threads 1] [--repeats 5]

The data: the letter world of oracles/text_world.py — ``TextWorldOracle`` with three annotator
groups, each preferring more of one letter (a, b, c); responses are short strings mostly of one letter
with some of the next, so majorities go round (P = ⅔ on each edge of a cycle). 24 training prompts and
8 held-out prompts (other topics, other strings), 6 responses each, every pair judged exactly (soft
labels on 3 votes). ``cycle_share`` is ``data.diagnostics.cycle_share`` of the training comparisons.

Both models: the tiny byte-level Llama of ``solvers.causal_lm.tiny_causal_lm`` (2 layers, 64 wide,
built from a config, offline) with a 64-wide head, trained the same way (AdamW 3e-3, constant after 10
warm-up steps, 32 pairs a step). ``logloss_*`` are held-out, vote-weighted, soft-label log-losses;
``logloss_floor`` is the labels' own entropy, the least any model can reach. On these data BT can do
no better than ½ on every cycle's pairs.

``pairs_per_s``: ``predict`` over all ordered pairs of 8 responses to each of 64 prompts (3,584 pairs,
512 distinct responses: each is encoded once), the median of ``repeats`` timed calls after a warm-up.
``pairs_per_s_unshared``: the same number of pairs, each with two responses of its own (2 encodings a
pair). ``*_cuda``: the same on the GPU (bf16 autocast) when one is present.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from data.diagnostics import cycle_share  # noqa: E402
from data.keys import prompt_id  # noqa: E402
from oracles.text_world import TextWorldOracle, letter_texts, letter_world, text_world_prompts  # noqa: E402
from solvers import preference_model as pm  # noqa: E402

MODEL = pm.PreferenceModelConfig(head_hidden=64, max_prompt_tokens=32, max_response_tokens=32)
CYCLE = ("aaaabb", "bbbbcc", "ccccaa")  # bbbbcc ≻ aaaabb ≻ ccccaa ≻ bbbbcc, each ⅔


def examples(world: TextWorldOracle, split: str, *, k: int, seed: int) -> list[pm.PairExample]:
    rng = random.Random(seed)
    out = []
    for p in text_world_prompts(split):
        ys = letter_texts(rng, k)
        for i in range(k):
            for j in range(i + 1, k):
                a, b = (ys[i], ys[j]) if rng.random() < 0.5 else (ys[j], ys[i])
                out.append(pm.PairExample(prompt_id(p), p, a, b, world.prob(a, b), 3.0, f"{p}|{a}|{b}"))
    return out


def throughput(model: pm.PreferenceModel, *, shared: bool, repeats: int) -> float:
    rng = random.Random(5)
    prompts, a, b = [], [], []
    for n in range(64):
        ys = letter_texts(rng, 8)
        for i in range(8):
            for j in range(8):
                if i != j:
                    m = len(prompts)  # unshared: each pair's two responses carry its own number
                    prompts.append(f"Prompt number {n}.")
                    a.append(ys[i] if shared else f"{ys[i]}{m}a")
                    b.append(ys[j] if shared else f"{ys[j]}{m}b")
    model.predict(prompts, a, b, batch_size=256)  # warm-up
    times = []
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.predict(prompts, a, b, batch_size=256)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return len(prompts) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    world = letter_world()
    train_set = examples(world, "train", k=6, seed=0)
    held_out = examples(world, "eval", k=6, seed=1)
    judged = pd.DataFrame([{"prompt_id": e.prompt_id, "a_id": e.a, "b_id": e.b, "p_a": e.p_a, "n_votes": e.weight} for e in train_set])
    config = pm.PreferenceTrainConfig(lr=3e-3, schedule="constant", warmup_steps=10, micro_batch_size=32, epochs=args.epochs, eval_share=0, device="cpu", seed=args.seed)

    out: dict = {"bench": "pairwise_model", "train_pairs": len(train_set), "eval_pairs": len(held_out)}
    out["cycle_share"] = cycle_share(judged)["cycle_share"]
    models = {}
    for head in ("bt", "pairwise"):
        models[head] = pm.tiny_preference_model(pm.PreferenceModelConfig(**{**MODEL.__dict__, "head": head}), seed=args.seed)
        result = pm.train(models[head], train_set, config)
        scores = pm.evaluate(models[head], held_out)
        out[f"logloss_{head}"] = round(scores["logloss"], 5)
        out[f"accuracy_{head}"] = round(scores["accuracy"], 4)
        out[f"train_s_{head}"] = round(result.summary["perf/seconds"], 2)
        out["logloss_floor"] = round(scores["logloss_floor"], 5)
        X, Y, Z = CYCLE
        p = models[head].predict(["Write about tea."] * 3, [Y, Z, X], [X, Y, Z])
        out[f"cycle_reproduced_{head}"] = all(q > 0.5 for q in p)
    out["logloss_gap"] = round(out["logloss_bt"] - out["logloss_pairwise"], 5)
    model = models["pairwise"]
    out["pairs_per_s"] = round(throughput(model, shared=True, repeats=args.repeats), 1)
    out["pairs_per_s_unshared"] = round(throughput(model, shared=False, repeats=args.repeats), 1)
    out["threads"] = args.threads
    if torch.cuda.is_available():
        model.to("cuda")
        out["pairs_per_s_cuda"] = round(throughput(model, shared=True, repeats=args.repeats), 1)
        out["pairs_per_s_unshared_cuda"] = round(throughput(model, shared=False, repeats=args.repeats), 1)
        out["device"] = torch.cuda.get_device_name(0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
