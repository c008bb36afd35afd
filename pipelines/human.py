"""People as the oracle: a round submits its pairs to Label Studio and waits for a quorum of votes.

Waiting is graceful either way:
- a round run from a deployment (a top-level flow run) suspends itself (``suspend_flow_run``): no process
  waits. The scheduled ``collect_annotations`` flow pulls finished votes into the store and resumes the
  round once its quorum is reached; the round's body then runs again from the top, and because every
  stage is idempotent it collects rather than resubmits;
- a round run in place (the CLI, a notebook, a subflow of a campaign) polls with a timeout and logs its
  progress.
Votes that arrive after their round moved on are still collected, into their own round.
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import deployment, flow_run

from data import Store
from data.keys import stable_hash
from oracles.protocol import Pair
from oracles.resume import pairs_from_keys, unjudged
from pipelines.config import CampaignConfig
from pipelines.oracle_factory import people_oracle
from pipelines.retrying import worth_retrying

WAITING = "human/waiting"  # store folder: one marker per round suspended for people


def split_for_people(keys: list[tuple[str, str, str]], config: CampaignConfig) -> tuple[list, list]:
    """(pairs for people, pairs for the machine oracle), each a list of the pairing stage's
    (prompt_id, a_id, b_id) keys: a fixed draw per pair, so a rerun splits alike."""
    share = config.humans.share if config.humans else 0.0
    if share >= 1.0:
        return keys, []
    to_people = [int(stable_hash(config.seed, pid, a, b, "people", length=8), 16) / 16**16 < share for pid, a, b in keys]
    return [k for k, h in zip(keys, to_people) if h], [k for k, h in zip(keys, to_people) if not h]


def collect_into_store(store: Store, people) -> dict:
    """Write every finished annotation into the store, each in its own round; returns a summary."""
    got = people.collect()
    written = store.write("comparisons", got.rows())
    return {"collected": len(written), "problems": [p.message for p in got.problems], "got": got}


def submit_and_collect(store: Store, people, pairs: list[Pair], *, round: int) -> dict:
    """Submit the round's pairs not yet judged by ``people`` (idempotent), collect what is finished, and
    say how far the round's quorum is."""
    todo = unjudged(pairs, people.oracle_id, store, rounds=[round])  # people's answers go to their pairs' round
    submitted = people.submit(todo, round=round) if todo else None
    return {**collect_status(store, people, pairs, round=round), "human/submitted_now": submitted.created if submitted else 0}


def collect_status(store: Store, people, pairs: list, *, round: int) -> dict:
    """Collect what people have finished into the store; how far the round's quorum is. ``pairs``: the
    round's pairs or their keys (only their number is read)."""
    collected = collect_into_store(store, people)
    got = collected["got"]
    per_round = got.metrics().get(round, {})
    return {
        "human/pairs": len(pairs),
        "human/submitted_now": 0,
        "human/collected_now": collected["collected"],
        "human/quorum": got.quorum(round=round) if pairs else 1.0,
        "human/problems": len(collected["problems"]),
        **{f"human/{k.removeprefix('human/')}": v for k, v in per_round.items() if isinstance(v, (int, float))},
    }


def wait_in_place(store: Store, config: CampaignConfig, pairs: list, status: dict, *, round: int, log) -> dict:
    """Poll until the round's quorum is reached or ``wait_timeout_s`` passes. The pairs were submitted
    already (``status``: ``submit_and_collect``'s); each poll only collects."""
    deadline = time.monotonic() + config.humans.wait_timeout_s
    people = people_oracle(config)
    while True:
        if status["human/quorum"] >= config.humans.quorum:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"round {round}: people have answered {status['human/quorum']:.0%} of {len(pairs)} pairs, below the quorum of "
                f"{config.humans.quorum:.0%} after {config.humans.wait_timeout_s:.0f} s; run the round again later: it collects, it does not resubmit"
            )
        log.info("round %d: waiting for people: %.0f%% of %d pairs have their votes (quorum %.0f%%)", round, 100 * status["human/quorum"], len(pairs), 100 * config.humans.quorum)
        time.sleep(config.humans.poll_interval_s)
        status = collect_status(store, people, pairs, round=round)


def mark_waiting(store: Store, round: int, flow_run_id: str, *, folder: str = WAITING) -> None:
    """A suspended round's marker (``folder``: people's, or pipelines/batch_judging.py's for batches)."""
    store.write_bytes(f"{folder}/round-{round}.json", json.dumps({"round": round, "flow_run_id": flow_run_id}).encode())


def waiting_rounds(store: Store, *, folder: str = WAITING) -> list[dict]:
    names = [n for n in store.list_files(folder) if n.startswith("round-") and n.endswith(".json")]
    return sorted((json.loads(store.read_bytes(f"{folder}/{n}")) for n in names), key=lambda m: m["round"])


def clear_waiting(store: Store, round: int, *, folder: str = WAITING) -> None:
    store.delete(f"{folder}/round-{round}.json")


# ----- Prefect: waiting for people, and the scheduled collection -----------------------------------------


def can_suspend() -> bool:
    """Only a top-level run of a deployment can be suspended (its worker starts it again on resume)."""
    return bool(deployment.id) and not flow_run.parent_flow_run_id


def await_people(config: CampaignConfig, round: int, pairs: list[tuple[str, str, str]]) -> dict:
    """Submit the round's pairs (the pairing stage's keys) to people and return once a quorum has voted:
    by suspending the run (deployments) or by polling (everything else)."""
    store, log = Store(config.store), get_run_logger()
    status = submit_to_people_task(config, round, pairs)
    log.info("round %d: %d pairs for people (%d submitted now), %.0f%% have their votes", round, len(pairs), status["human/submitted_now"], 100 * status["human/quorum"])
    if status["human/quorum"] < config.humans.quorum and can_suspend():
        mark_waiting(store, round, str(flow_run.id))
        log.info("round %d: suspending until people reach the quorum; the collect-annotations deployment resumes it", round)
        suspend_flow_run(timeout=int(config.humans.suspend_timeout_s), key=f"{config.name}-round-{round}-people-{stable_hash(*sorted(a + b for _, a, b in pairs), length=6)}")
    if status["human/quorum"] < config.humans.quorum:
        status = wait_for_people_task(config, round, pairs, status)
    clear_waiting(store, round)
    return status


@task(
    name="submit-to-people", task_run_name="{config.name}-r{round}-people", cache_policy=NO_CACHE,
    retries=2, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
)
def submit_to_people_task(config: CampaignConfig, round: int, pairs: list) -> dict:
    """``pairs``: the pairing stage's keys; the texts people see come from the store."""
    store = Store(config.store)
    return submit_and_collect(store, people_oracle(config), pairs_from_keys(store, pairs, round=round), round=round)


@task(name="wait-for-people", task_run_name="{config.name}-r{round}-wait-people", cache_policy=NO_CACHE)
def wait_for_people_task(config: CampaignConfig, round: int, pairs: list, status: dict) -> dict:
    return wait_in_place(Store(config.store), config, pairs, status, round=round, log=get_run_logger())


@flow(name="collect-annotations", flow_run_name="{config.name}-collect-annotations")
def collect_annotations(config: CampaignConfig) -> dict:
    """Pull finished human judgments into the store (each into its own round), publish agreement per
    round, and resume every round suspended for people whose quorum is now reached."""
    store, log = Store(config.store), get_run_logger()
    collected = collect_into_store(store, people_oracle(config))
    got = collected["got"]
    for problem in collected["problems"]:
        log.warning("label studio: %s", problem)
    per_round = got.metrics()
    if per_round:
        create_table_artifact(
            key=f"{config.name}-human-agreement".lower().replace("_", "-"),
            table=[{"round": r, **{k: v for k, v in m.items()}} for r, m in sorted(per_round.items())],
            description=f"{config.name}: votes, agreement and Krippendorff's alpha per round",
        )
    resumed = []
    for marker in waiting_rounds(store):
        if got.quorum(round=marker["round"]) >= config.humans.quorum:
            with get_client(sync_client=True) as client:
                client.resume_flow_run(marker["flow_run_id"])
            clear_waiting(store, marker["round"])
            resumed.append(marker["round"])
            log.info("round %d reached its quorum; resumed its run %s", marker["round"], marker["flow_run_id"])
    log.info("collected %d new human judgments; %d pairs still pending", collected["collected"], got.pending())
    return {"collected": collected["collected"], "pending": got.pending(), "resumed_rounds": resumed, "problems": len(collected["problems"])}
