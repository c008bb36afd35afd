"""A round whose LLM judge goes through the Batch API (``oracle: {kind: llm_judge, mode: batch}``): the
judge stage submits the round's pairs as batches (oracles/batch_judge.py) and the round waits for them
the way a round waits for people (pipelines/human.py):

- a round run from a deployment (a top-level flow run) suspends itself: no process waits for hours.
  The scheduled ``collect-annotations`` deployment collects finished batches into the store (and
  resubmits failed requests) and resumes the round once none of its batches is pending; the round's
  body runs again from the top, finds its batches recorded in the store and collects instead of
  submitting again;
- a round run in place (the CLI, a notebook, a subflow of a campaign) polls every
  ``batch.poll_interval_s`` up to ``batch.wait_timeout_s``, then fails saying how to go on.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run

from data import Store
from data.keys import comparison_id, stable_hash
from oracles.resume import pairs_from_keys
from pipelines import secrets
from pipelines.config import CampaignConfig
from pipelines.human import can_suspend, clear_waiting, mark_waiting, waiting_rounds
from pipelines.oracle_factory import build_oracle, oracle_spec
from pipelines.retrying import worth_retrying
from pipelines.world import World

WAITING = "judge_batches/waiting"  # store folder: one marker per round suspended for its batches


def await_judge_batches(config: CampaignConfig, round: int, phase: str, pairs: list[tuple[str, str, str]]) -> dict:
    """Submit the phase's pairs (the pairing stage's keys) as batches and return once none is pending:
    by suspending the run (deployments) or by polling (everything else). Returns the judge stage's
    metrics (``pref/…``, ``cost/usd``, ``batch/…``)."""
    store, log, settings = Store(config.store), get_run_logger(), config.oracle.batch
    status = submit_judge_batch_task(config, round, phase, pairs)
    log.info(
        "round %d %s: %d pairs for the batch judge (%d submitted now in %d new batches, %d over the budget); %d pairs pending",
        round, phase, len(pairs), status["batch/pairs_submitted"], status["batch/batches_created"], status["batch/over_budget"], status["batch/pending"],
    )
    if status["batch/pending"] and can_suspend():
        mark_waiting(store, round, str(flow_run.id), folder=WAITING)
        log.info("round %d: suspending until its batches are done; the collect-annotations deployment collects them and resumes it", round)
        suspend_flow_run(timeout=int(settings.suspend_timeout_s), key=f"{config.name}-round-{round}-{phase}-batch-{stable_hash(*sorted(a + b for _, a, b in pairs), length=6)}")
    if status["batch/pending"]:
        status = wait_for_judge_batch_task(config, round, phase, status)
    clear_waiting(store, round, folder=WAITING)
    return {**status, **judged_summary(store, config, pairs, round=round)}


@task(
    name="submit-judge-batch", task_run_name="{config.name}-r{round}-{phase}-judge-batch", cache_policy=NO_CACHE,
    retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
)
@secrets.scrub_errors
def submit_judge_batch_task(config: CampaignConfig, round: int, phase: str, pairs: list) -> dict:
    """Submit what has no judgment and no batch yet (idempotent: a resumed round finds its batches),
    then collect what has finished."""
    store = Store(config.store)
    judge = build_oracle(config, World(config))
    submitted = judge.submit(pairs_from_keys(store, pairs, round=round), round=round)
    judge.collect()
    return {**{f"batch/{k}": v for k, v in submitted.items()}, **judge.status(round=round)}


@task(name="wait-for-judge-batch", task_run_name="{config.name}-r{round}-{phase}-wait-judge-batch", cache_policy=NO_CACHE)
@secrets.scrub_errors
def wait_for_judge_batch_task(config: CampaignConfig, round: int, phase: str, status: dict) -> dict:
    """Collect every ``poll_interval_s`` until none of the round's batches is pending, or fail after
    ``wait_timeout_s`` saying how to go on (the batches keep running at the provider)."""
    settings, log = config.oracle.batch, get_run_logger()
    judge = build_oracle(config, World(config))
    deadline = time.monotonic() + settings.wait_timeout_s
    while status["batch/pending"]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"round {round}: {status['batch/pending']} pairs are still in batches after {settings.wait_timeout_s:.0f} s. "
                "What to do: the batches keep running at the provider; run the round again later (it collects them and submits "
                "nothing twice), or run it from the round deployment, which suspends while the collect-annotations deployment waits"
            )
        log.info("round %d %s: waiting for the batch judge: %d pairs pending", round, phase, status["batch/pending"])
        time.sleep(settings.poll_interval_s)
        judge.collect()
        status = {**status, **judge.status(round=round)}
    return status


def judged_summary(store: Store, config: CampaignConfig, pairs: list[tuple[str, str, str]], *, round: int) -> dict:
    """The phase's pairs as the store holds them: judged, abstained, left out (given up or over the
    budget, asked again by a later run), and their cost at the batch price."""
    oracle_id = oracle_spec(config.oracle, config, World(config)).oracle_id
    wanted = {comparison_id(pid, a, b, oracle_id) for pid, a, b in pairs}
    comps = store.read("comparisons", rounds=[round], columns=["comparison_id", "p_a", "cost_usd"])
    mine = comps[comps["comparison_id"].isin(wanted)]
    return {
        "pref/pairs": len(pairs),
        "pref/judged": int(mine["p_a"].notna().sum()),
        "pref/abstained": int(mine["p_a"].isna().sum()),
        "pref/skipped": len(pairs) - len(mine),
        "cost/usd": float(mine["cost_usd"].sum()),
    }


def resume_run(flow_run_id: str) -> None:
    with get_client(sync_client=True) as client:
        client.resume_flow_run(flow_run_id)


@flow(name="collect-judge-batches", flow_run_name="{config.name}-collect-judge-batches")
def collect_judge_batches(config: CampaignConfig) -> dict:
    """Collect every finished batch of the campaign's batch judge into the store (failed requests
    resubmitted or asked online) and resume every round suspended for batches that has none pending."""
    store, log = Store(config.store), get_run_logger()
    judge = build_oracle(config, World(config))
    got = judge.collect()
    resumed = []
    for marker in waiting_rounds(store, folder=WAITING):
        if judge.pending(round=marker["round"]) == 0:
            resume_run(marker["flow_run_id"])
            clear_waiting(store, marker["round"], folder=WAITING)
            resumed.append(marker["round"])
            log.info("round %d: its batches are done; resumed its run %s", marker["round"], marker["flow_run_id"])
    log.info("collected %d judgments from finished batches; %d pairs still in batches", len(got), judge.pending())
    return {"collected": len(got), "pending": judge.pending(), "resumed_rounds": resumed}
