"""Iterations and seconds for each exact solver to reach KL(π*‖π_t) < 1e-6 on a random n = 1000 game,
next to Nash-MP's theoretical bound ⌈log(KL_0/1e-6) / log(1+2β)⌉. Prints one JSON line.

    python bench/tabular.py [--n 1000] [--max-iterations 20000]
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oracles.games import random_game  # noqa: E402
from solvers import algorithms, tabular  # noqa: E402

TARGET = 1e-6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iterations", type=int, default=20_000)
    args = ap.parse_args()
    P = random_game(args.n, args.seed)
    mu = np.exp(tabular.normalize(np.random.default_rng(args.seed).standard_normal(args.n)))
    results = []
    for beta in (0.01, 0.1, 1.0):
        star = tabular.regularized_nash(P, mu, beta).pi
        kl0 = tabular.kl(star, mu)
        for algorithm, entry in algorithms.ALGORITHMS.items():
            if not entry.has_tabular or entry.averaged:
                continue  # no exact dynamics, or unregularized (SPPO): it does not converge to the β-regularized equilibrium
            options = {"schedule": "decay"} if "schedule" in entry.tabular_fields else {}  # Nash-MD's constant step is biased
            params = entry.params(beta, **options)
            start, reached = time.perf_counter(), None
            for t, pi in enumerate(tabular.iterate(P, mu, entry.exact_step, params)):
                if tabular.kl(star, pi) < TARGET:
                    reached = t
                    break
                if t >= args.max_iterations:
                    break
            row = {
                "algorithm": algorithm,
                "beta": beta,
                "eta": params.eta,
                "iterations": reached,
                "reached": reached is not None,
                "seconds": round(time.perf_counter() - start, 4),
            }
            if algorithm == "nash_mp":
                row["bound_iterations"] = math.ceil(math.log(kl0 / TARGET) / math.log(1 + 2 * beta))
            results.append(row)
    print(json.dumps({"bench": "tabular", "n": args.n, "target_kl": TARGET, "max_iterations": args.max_iterations, "results": results}))


if __name__ == "__main__":
    main()
