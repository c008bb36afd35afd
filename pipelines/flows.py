"""Prefect flows: a campaign is a list of rounds; a round is a list of stages.

Each stage is one task over the whole batch calling a plain function of ``pipelines.stages``. Tasks
pass the config and round, never policies or tables: the store is the truth, and Prefect's cache is
off (its default key includes the run id, and the store already makes every stage idempotent).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import Store
from pipelines import artifacts, stages
from pipelines.components import World, build_oracle, load_policy, phases, version
from pipelines.config import CampaignConfig
from pipelines.progress import reporter


def _sampler_version(config: CampaignConfig, round: int, phase: str) -> str:
    """The first phase samples the anchor π_{r−1}; an extragradient update samples the midpoint."""
    two_phase = len(phases(config)) == 2
    return version(round, "midpoint") if (two_phase and phase == "update") else version(round - 1)


@task(name="sample-responses", task_run_name="{config.name}-r{round}-{phase}-sample", cache_policy=NO_CACHE)
def sample_task(config: CampaignConfig, round: int, phase: str) -> dict:
    store, world = Store(config.store), World(config)
    v = _sampler_version(config, round, phase)
    policy = load_policy(store, v, config, world)
    out = stages.sample_responses(store, policy, world.prompts, round=round, policy_version=v, k=config.sampling.samples_per_prompt, seed=config.seed)
    get_run_logger().info("round %d %s: sampled %d responses from %s (%d already stored)", round, phase, out["sampled"], v, out["already_stored"])
    return out


@task(name="pair-responses", task_run_name="{config.name}-r{round}-{phase}-pair", cache_policy=NO_CACHE)
def pair_task(config: CampaignConfig, round: int, phase: str) -> list:
    v = _sampler_version(config, round, phase)
    pairs = stages.pair_responses(
        Store(config.store), round=round, policy_version=v, strategy=config.pairing.strategy, skip_identical=config.pairing.skip_identical, seed=config.seed
    )
    get_run_logger().info("round %d %s: %d ordered pairs among %s's responses (%s)", round, phase, len(pairs), v, config.pairing.strategy)
    return pairs


@task(name="judge-pairs", task_run_name="{config.name}-r{round}-{phase}-judge", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def judge_task(config: CampaignConfig, round: int, phase: str, pairs: list) -> dict:
    store, world = Store(config.store), World(config)
    oracle = build_oracle(config, world)
    out = stages.judge_pairs(store, oracle, pairs, round=round)
    get_run_logger().info(
        "round %d %s: %s judged %d pairs (%d from the store, %d abstained, $%.4f)",
        round, phase, oracle.oracle_id, out["pref/judged_now"], out["pref/cached"], out["pref/abstained"], out["cost/usd"],
    )
    return out


@task(name="update-policy", task_run_name="{config.name}-r{round}-{phase}-update", cache_policy=NO_CACHE, tags=["gpu"])
def update_task(config: CampaignConfig, round: int, phase: str) -> dict:
    store, world = Store(config.store), World(config)
    oracle_ids = {build_oracle(config, world).oracle_id}
    v = _sampler_version(config, round, phase)
    out = stages.update_policy(store, config, world, round=round, phase=phase, sampled_version=v, oracle_ids=oracle_ids)
    get_run_logger().info("round %d %s: %s → %s on %s judged pairs", round, phase, config.solver.algorithm, out["version"], out.get("judged_pairs_used", "stored"))
    return out


@task(name="evaluate-policy", task_run_name="{config.name}-r{round}-evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: CampaignConfig, round: int, stage_metrics: dict, timings: dict) -> dict:
    store = Store(config.store)
    metrics = stages.evaluate_policy(store, config, World(config), round=round, stage_metrics=stage_metrics, timings=timings)
    plot = artifacts.plot_metrics(store, stages.rounds_table(store))
    artifacts.publish_round(config.name, round, metrics, timings, plot)
    get_run_logger().info("round %d: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/")), round)
    return metrics


@flow(name="alignment-round", flow_run_name="{config.name}-round-{round}")
def alignment_round(config: CampaignConfig, round: int) -> dict:
    """sample → pair → judge → update (twice for extragradient solvers) → evaluate."""
    store = Store(config.store)
    stages.register_prompts(store, World(config))
    watch, stage_metrics = stages.Stopwatch(), {}
    for phase in phases(config):
        prefix = "midpoint/" if phase == "midpoint" else ""
        reporter().stage(round, f"{prefix}sample")
        with watch("sample"):
            sample_task(config, round, phase)
        with watch("pair"):
            pairs = pair_task(config, round, phase)
        reporter().stage(round, f"{prefix}judge")
        with watch("judge"):
            judged = judge_task(config, round, phase, pairs)
        stage_metrics.update({prefix + k: v for k, v in judged.items()})
        reporter().stage(round, f"{prefix}update")
        with watch("update"):
            updated = update_task(config, round, phase)
        stage_metrics.update({prefix + k: v for k, v in updated.items() if k.startswith(("loss/", "kl/", "optim/", "pref/", "perf/")) and k != "perf/seconds"})
    reporter().stage(round, "evaluate")
    return evaluate_task(config, round, stage_metrics, watch.seconds)


@flow(name="alignment-campaign", flow_run_name="{config.name}")
def alignment_campaign(config: CampaignConfig) -> list[dict]:
    """Runs the rounds the store has not finished yet, in order."""
    store = Store(config.store)
    finished = set(store.read("rounds", columns=["round"])["round"])
    results = []
    for r in range(1, config.rounds + 1):
        reporter().round_started(r, config.rounds)
        if r in finished:
            get_run_logger().info("round %d is already in the store; skipping it", r)
            continue
        metrics = alignment_round(config, r)
        reporter().round_finished(r, metrics)
        results.append(metrics)
    return results


def final_policy(config: CampaignConfig):
    return load_policy(Store(config.store), version(config.rounds), config, World(config))
