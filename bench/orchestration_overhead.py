"""What Prefect orchestration costs per round: the same campaign run through the Prefect flows (against a
real `prefect server` this script starts on a free loopback port) and as the plain stage functions in
the same order, in one process. Prints one JSON line.

    python bench/orchestration_overhead.py [--config examples/tabular_nash_mp.yaml] [--rounds 4] [--repeats 2]

The Prefect path pays, per round, a subflow run, one task run per stage (a constant number, not one per
comparison), the GPU slot of each model stage (a causal-LM config; the tabular default runs no model),
the round's artifacts and the log shipping. The
difference between the two paths, divided by the rounds, is that fixed per-round cost. The default
config's rounds take a few seconds, so the key ``overhead_fraction`` reports that fixed cost against a
round of ``--round-seconds`` (60) of real work, as the goal is stated; ``overhead_fraction_measured``
is the fraction on the config itself. A config whose rounds really take a minute (e.g. the demo with
more prompts) measures the goal directly: then both fractions agree.

Not counted: starting the server (once per machine) and a worker's flow process (a few seconds once
per deployment run, i.e. per campaign, not per round); both paths start warm (one round each first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _start_server(home: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": url}
    log = open(os.path.join(home, "server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _stop(proc)
    raise SystemExit(f"the Prefect server did not start; see {home}/server.log")


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def plain_round(config, r: int) -> None:
    """alignment_round's stages as plain function calls, in the flow's order (no Prefect at all)."""
    from data import Store
    from data.rounds import rounds_table
    from pipelines import artifacts, stages
    from pipelines.flows import _sampler_version
    from pipelines.oracle_factory import build_oracle, campaign_oracle_ids
    from pipelines.versions import load_policy
    from pipelines.world import World

    store, world = Store(config.store), World(config)
    stages.register_prompts(store, world)
    watch, stage_metrics = stages.Stopwatch(), {}
    for phase in config.solver.entry.phases:
        v = _sampler_version(config, r, phase)
        with watch("sample"):
            policy = load_policy(store, v, config, world)
            stages.sample_responses(store, policy, world.prompts, round=r, policy_version=v, k=config.sampling.samples_per_prompt, seed=config.seed)
        with watch("pair"):
            pairs = stages.pair_responses(store, round=r, policy_version=v, strategy=config.pairing.strategy, skip_identical=config.pairing.skip_identical, seed=config.seed)
        with watch("judge"):
            judged = stages.judge_pairs(store, build_oracle(config, world), pairs, round=r)
        stage_metrics.update(judged)
        with watch("update"):
            stages.update_policy(store, config, world, round=r, phase=phase, sampled_version=v, oracle_ids=campaign_oracle_ids(config, world))
    stages.evaluate_policy(store, config, world, round=r, stage_metrics=stage_metrics, timings=watch.seconds)
    artifacts.plot_metrics(store, rounds_table(store))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "tabular_nash_mp.yaml"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="each path runs this many times; the fastest counts")
    ap.add_argument("--round-seconds", type=float, default=60.0, help="the round length the headline fraction is stated for")
    ap.add_argument("--no-gpu-limit", action="store_true", help="skip `prefect gcl create gpu-<hostname> --limit 1` (the README's setup creates it)")
    args = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="nashflow-bench-overhead-")
    home = os.path.join(scratch, "prefect")
    os.makedirs(home)
    os.environ.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    server, url = _start_server(home)
    os.environ["PREFECT_API_URL"] = url
    try:
        if not args.no_gpu_limit:
            from pipelines.gpu import limit_name

            subprocess.run([sys.executable, "-m", "prefect", "gcl", "create", limit_name(), "--limit", "1"], check=True, capture_output=True, env=os.environ)
        from pipelines import flows
        from pipelines.config import load_config

        def config_at(store: str, rounds: int):
            return load_config(args.config, store=os.path.join(scratch, store), rounds=rounds)

        # warm both paths (imports, the first flow run's client setup, caches): one round each
        plain_round(config_at("warm-plain", 1), 1)
        flows.alignment_round(config_at("warm-prefect", 1), 1)

        plain, prefect_s, runs = [], [], []
        for rep in range(args.repeats):
            config = config_at(f"plain-{rep}", args.rounds)
            start = time.perf_counter()
            for r in range(1, args.rounds + 1):
                plain_round(config, r)
            plain.append(time.perf_counter() - start)

            config = config_at(f"prefect-{rep}", args.rounds)
            start = time.perf_counter()
            flows.alignment_campaign(config)
            prefect_s.append(time.perf_counter() - start)
            runs.append(config)

        task_runs, comparisons = _count_task_runs(url, runs[-1])
    finally:
        _stop(server)
        shutil.rmtree(scratch, ignore_errors=True)

    per_round_plain = min(plain) / args.rounds
    per_round_prefect = min(prefect_s) / args.rounds
    fixed = per_round_prefect - per_round_plain
    print(
        json.dumps(
            {
                "bench": "orchestration_overhead",
                "config": os.path.relpath(args.config, ROOT),
                "rounds": args.rounds,
                "plain_s_per_round": round(per_round_plain, 3),
                "prefect_s_per_round": round(per_round_prefect, 3),
                "overhead_s_per_round": round(fixed, 3),
                "overhead_fraction": round(fixed / args.round_seconds, 4),
                "overhead_fraction_basis": f"fixed per-round overhead measured here / a {args.round_seconds:g} s round of real work",
                "overhead_fraction_measured": round(fixed / per_round_plain, 4),
                "task_runs_per_round": task_runs,
                "comparisons_per_round": comparisons,
                "gpu_limit": not args.no_gpu_limit,
                "plain_s": [round(x, 2) for x in plain],
                "prefect_s": [round(x, 2) for x in prefect_s],
                "cpus": os.cpu_count(),
            }
        )
    )


def _count_task_runs(url: str, config) -> tuple[list[int], list[int]]:
    """Task runs of each round's subflow run, read back from the server; and comparisons stored per round."""
    import httpx

    from data import Store

    with httpx.Client(base_url=url, timeout=30) as api:
        rounds = api.post("/flow_runs/filter", json={"flow_runs": {"name": {"like_": f"{config.name}-round-"}}, "sort": "START_TIME_DESC", "limit": config.rounds}).json()
        counts = {r["name"]: len(api.post("/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [r["id"]]}}}).json()) for r in rounds}
    comps = Store(config.store).read("comparisons")
    per_round = comps.groupby("round").size()
    return [counts[f"{config.name}-round-{r}"] for r in range(1, config.rounds + 1)], [int(per_round.get(r, 0)) for r in range(1, config.rounds + 1)]


if __name__ == "__main__":
    main()
