"""Prefect flows: a campaign is a list of rounds; a round is a list of stages.

Each stage is one task over the whole batch calling a plain function of ``pipelines.stages``. Tasks
pass the config and round, never policies or tables: the store is the truth, and Prefect's cache is
off (its default key includes the run id, and the store already makes every stage idempotent).
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import Store
from data.rounds import rounds_table
from oracles.resume import pairs_from_keys
from pipelines import artifacts, batch_judging, human, secrets, stages
from pipelines.config import CampaignConfig
from pipelines.evaluation import save_campaign_config
from pipelines.gpu import gpu_slot, policy_runs_model
from pipelines.oracle_factory import build_oracle, campaign_oracle_ids, oracle_is_queued, oracle_runs_model
from pipelines.progress import reporter
from pipelines.retrying import worth_retrying
from pipelines.sampling_server import version_sampler
from pipelines.versions import load_policy, mixture_version, version, work_dir
from pipelines.world import World


def _sampler_version(config: CampaignConfig, round: int, phase: str) -> str:
    """The first phase samples the anchor π_{r−1}; an extragradient update samples the midpoint."""
    two_phase = len(config.solver.entry.phases) == 2
    return version(round, "midpoint") if (two_phase and phase == "update") else version(round - 1)


@task(
    name="sample-responses", task_run_name="{config.name}-r{round}-{phase}-sample", cache_policy=NO_CACHE,
    retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
)
@secrets.scrub_errors
def sample_task(config: CampaignConfig, round: int, phase: str) -> dict:
    store, world, started = Store(config.store), World(config), time.perf_counter()
    v = _sampler_version(config, round, phase)
    k = config.sampling.samples_per_prompt
    labels = [v, mixture_version(v)] if _against_mixture(config) else [v]
    if not any(stages.unsampled(store, world.prompts, round=round, label=label) for label in labels):  # a resumed round: no model, no server
        get_run_logger().info("round %d %s: %s's responses are already stored", round, phase, v)
        return {"sampled": 0, "already_stored": len(labels) * len(world.prompts) * k}
    with gpu_slot(policy_runs_model(config)), version_sampler(store, config, world, v) as policy:  # a server's model runs on the GPU too
        out = stages.sample_responses(store, policy, world.prompts, round=round, policy_version=v, k=k, seed=config.seed)
        if _against_mixture(config):  # Nash-MD's opponents, from the geometric mixture of π_t and μ
            reference = policy if v == "v0" else load_policy(store, "v0", config, world)  # round 1 samples from μ itself
            mixture = (reference, config.sampling.mixture_weight)
            mixed = stages.sample_responses(store, policy, world.prompts, round=round, policy_version=v, k=k, seed=config.seed, mixture=mixture)
            out = {key: out[key] + mixed[key] for key in out}
    get_run_logger().info(
        "round %d %s: sampled %d responses from %s (%d already stored) in %.1f s", round, phase, out["sampled"], v, out["already_stored"], time.perf_counter() - started
    )
    return out


def _against_mixture(config: CampaignConfig) -> bool:
    """Causal-LM Nash-MD compares samples of π_t with samples of π_t^(1−m) μ^m (a tabular policy's
    exact step takes the mixture itself)."""
    return config.solver.entry.opponent == "mixture" and config.policy.kind == "causal_lm"


@task(name="pair-responses", task_run_name="{config.name}-r{round}-{phase}-pair", cache_policy=NO_CACHE)
def pair_task(config: CampaignConfig, round: int, phase: str) -> list[tuple[str, str, str]]:
    """The phase's ordered pairs as (prompt_id, a_id, b_id): the judge and people read the texts from the
    store. Seeded and sorted by id, so a resumed round pairs alike."""
    v = _sampler_version(config, round, phase)
    pairing = stages.pair_with_mixture if _against_mixture(config) else stages.pair_responses
    pairs = pairing(Store(config.store), round=round, policy_version=v, strategy=config.pairing.strategy, skip_identical=config.pairing.skip_identical, seed=config.seed)
    against = "its mixture's" if _against_mixture(config) else "its own"
    get_run_logger().info("round %d %s: %d ordered pairs of %s's responses with %s (%s)", round, phase, len(pairs), v, against, config.pairing.strategy)
    return stages.pair_keys(pairs)


@task(
    name="judge-pairs", task_run_name="{config.name}-r{round}-{phase}-judge", cache_policy=NO_CACHE,
    retries=2, retry_delay_seconds=5, retry_condition_fn=worth_retrying,
)
@secrets.scrub_errors
def judge_task(config: CampaignConfig, round: int, phase: str, pairs: list) -> dict:
    """``pairs``: pair_task's keys; the texts come from the store."""
    store, world, started = Store(config.store), World(config), time.perf_counter()
    with gpu_slot(oracle_runs_model(config)):  # a learned model; a cascade holds it around its model only
        oracle = build_oracle(config, world)
        progress = artifacts.JudgeProgress(config.name, round, phase, oracle.oracle_id, len(pairs))
        out = stages.judge_pairs(store, oracle, pairs_from_keys(store, pairs, round=round), round=round, on_chunk=progress.update)
    progress.finish(out)
    get_run_logger().info(
        "round %d %s: %s judged %d pairs (%d from the store, %d abstained, %d skipped, $%.4f) in %.1f s",
        round, phase, oracle.oracle_id, out["pref/judged_now"], out["pref/cached"], out["pref/abstained"], out["pref/skipped"], out["cost/usd"],
        time.perf_counter() - started,
    )
    return out


def _unfinished_update(config: CampaignConfig, store: Store, new_version: str) -> str | None:
    """The step checkpoint a killed causal-LM update left in ``work_dir(new_version)``."""
    if config.policy.kind != "causal_lm" or not store.is_local or not store.exists(work_dir(new_version)):
        return None
    from solvers.checkpoint import latest_checkpoint

    last = latest_checkpoint(store.local_path(work_dir(new_version)))
    return str(last) if last else None


# One retry: a failed update resumes from its step checkpoints. A causal LM's update holds the GPU slot,
# for the whole torchrun launch when trainer.processes > 1 (one slot: the worker's GPUs; docs/operations.md).
@task(
    name="update-policy", task_run_name="{config.name}-r{round}-{phase}-update", cache_policy=NO_CACHE,
    retries=1, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
)
def update_task(config: CampaignConfig, round: int, phase: str) -> dict:
    store, world, started = Store(config.store), World(config), time.perf_counter()
    logger = get_run_logger()
    oracle_ids = campaign_oracle_ids(config, world)
    v = _sampler_version(config, round, phase)
    if resumed := _unfinished_update(config, store, version(round, phase)):
        logger.info("round %d %s: an earlier attempt of this update stopped; resuming from its step checkpoint %s", round, phase, resumed)
    with gpu_slot(policy_runs_model(config)):
        out = stages.update_policy(store, config, world, round=round, phase=phase, sampled_version=v, oracle_ids=oracle_ids, log=lambda line: logger.info("%s", line))
    if out.get("already_stored"):
        logger.info("round %d %s: %s is already in the store; nothing to train", round, phase, out["version"])
    else:
        logger.info(
            "round %d %s: %s → %s on %s judged pairs in %.1f s", round, phase, config.solver.algorithm, out["version"], out.get("judged_pairs_used"), time.perf_counter() - started
        )
    return out


@task(name="evaluate-policy", task_run_name="{config.name}-r{round}-evaluate", cache_policy=NO_CACHE)
@secrets.scrub_errors
def evaluate_task(config: CampaignConfig, round: int, stage_metrics: dict, timings: dict) -> dict:
    store = Store(config.store)
    metrics = stages.evaluate_policy(store, config, World(config), round=round, stage_metrics=stage_metrics, timings=timings, hold_gpu=gpu_slot)
    plot = artifacts.plot_metrics(store, rounds_table(store))
    artifacts.publish_round(config.name, round, metrics, timings, plot, store=store, solver=config.solver.algorithm)
    get_run_logger().info("round %d: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/")), round)
    return metrics


@flow(name="alignment-round", flow_run_name="{config.name}-round-{round}")
def alignment_round(config: CampaignConfig, round: int) -> dict:
    """sample → pair → judge → update (twice for extragradient solvers) → evaluate."""
    store = Store(config.store)
    stages.register_prompts(store, World(config))
    watch, stage_metrics = stages.Stopwatch(), {}
    for phase in config.solver.entry.phases:
        prefix = "midpoint/" if phase == "midpoint" else ""
        reporter().stage(round, f"{prefix}sample")
        with watch("sample"):
            sample_task(config, round, phase)
        with watch("pair"):
            pairs = pair_task(config, round, phase)
        reporter().stage(round, f"{prefix}judge")
        to_people, to_machine = human.split_for_people(pairs, config)
        with watch("judge"):
            if not to_machine:
                judged = {}
            elif oracle_is_queued(config):  # an LLM judge through the Batch API: submit, then wait like for people
                judged = batch_judging.await_judge_batches(config, round, phase, to_machine)
            else:
                judged = judge_task(config, round, phase, to_machine)
        if to_people:
            with watch("people"):
                judged |= human.await_people(config, round, to_people)
        stage_metrics.update({prefix + k: v for k, v in judged.items()})
        reporter().stage(round, f"{prefix}update")
        with watch("update"):
            updated = update_task(config, round, phase)
        stage_metrics.update({prefix + k: v for k, v in updated.items() if k.startswith(("loss/", "kl/", "optim/", "pref/", "perf/")) and k != "perf/seconds"})
    if config.oracle is not None and config.oracle.kind == "cascade" and config.oracle.retrain:  # the learned model learns from this round
        from pipelines.retrain import retrain_task

        with watch("retrain"):
            stage_metrics.update(retrain_task(config, round))
    reporter().stage(round, "evaluate")
    return evaluate_task(config, round, stage_metrics, watch.seconds)


@flow(name="alignment-campaign", flow_run_name="{config.name}")
def alignment_campaign(config: CampaignConfig) -> list[dict]:
    """Runs the rounds the store has not finished yet, in order."""
    store = Store(config.store)
    save_campaign_config(store, config)  # what `nashflow eval STORE` reads
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
