"""Evaluation under a judge that likes long answers: a version of equal quality whose answers are
longer wins raw comparisons, and the length-controlled win-rate (AlpacaEval 2) should say ½; plus the
exact maximal lottery (tabular.maximal_lottery) against brute-force support enumeration on random
antisymmetric games. Prints one JSON line.

    python bench/eval_length_bias.py [--prompts 400] [--samples 25] [--length-gap 12] [--strength 1]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oracles.length_bias import length_biased_judgments  # noqa: E402
from solvers import evaluation, tabular  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--length-gap", type=float, default=12.0, help="tokens by which the version's answers are longer on average")
    ap.add_argument("--strength", type=float, default=1.0, help="the judge's length bonus, in logits at most")
    ap.add_argument("--games", type=int, default=50, help="random antisymmetric games for the maximal-lottery check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = length_biased_judgments(prompts=args.prompts, samples=args.samples, quality_gap=0.0, length_gap=args.length_gap, strength=args.strength, seed=args.seed)
    t0 = time.perf_counter()
    raw, raw_half = evaluation.win_rate(d["p"])
    lc = evaluation.lc_win_rate(d["p"], d["length_diff"], d["prompt_ids"])
    lc_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    error = 0.0
    for g in range(args.games):
        n = 3 + g % 8
        X = np.triu(rng.uniform(-0.5, 0.5, (n, n)), 1)
        M = X - X.T
        error = max(error, float(np.abs(tabular.maximal_lottery(M) - tabular.maximal_lottery_by_supports(M)).max()))
    print(
        json.dumps(
            {
                "pairs": len(d["p"]),
                "length_gap": args.length_gap,
                "strength": args.strength,
                "raw_win_rate": round(raw, 4),
                "raw_ci95": round(raw_half, 4),
                "lc_win_rate": round(lc["lc_win_rate"], 4),
                "lc_ci95": round(lc["lc_ci95"], 4),
                "true_win_rate": round(d["true_win_rate"], 4),
                "length_coef": round(lc["length_coef"], 4),
                "lc_seconds": round(lc_seconds, 3),
                "maximal_lottery_games": args.games,
                "maximal_lottery_error": error,
            }
        )
    )


if __name__ == "__main__":
    main()
