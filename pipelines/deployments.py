"""Entry points for Prefect deployments (prefect.yaml): each takes a config FILE path and a few
overrides, validates them with the campaign config model, and runs the same flows as ``nashflow run``.

The deployed flows share their names with the flows they run (``alignment-campaign``,
``alignment-round``), so the UI lists a campaign's runs together however they were started, and their
runs are named after the campaign and round. A failure's message ends with what to do; the store keeps
every finished stage, so the answer is almost always "fix the cause and retry the run".
"""

from __future__ import annotations

import json
import os
import shlex
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from data import Store
from pipelines import flows, secrets
from pipelines.config import CampaignConfig, ConfigError, load_config
from pipelines.versions import has_checkpoint, version

# The flow process's working directory is the project folder (prefect.yaml), so relative config and
# store paths mean the same as in `nashflow run`.


def load(config_path: str, *, store: str | None = None, rounds: int | None = None, overrides: dict | None = None) -> CampaignConfig:
    """The campaign config of a deployment run: the file, then ``overrides`` (top-level fields), then
    ``store`` and ``rounds``. A bad value raises ConfigError naming the file and the field."""
    return load_config(config_path, **{**(overrides or {}), "store": store, "rounds": rounds})


def _run_name(suffix: str = "") -> str:
    """The campaign's name (and round), read from the config before the run starts; the file's name if
    the config cannot be read (the run then fails with the reason)."""
    params = flow_run.parameters
    path = params.get("config_path", "config")
    try:
        name = load(path, overrides=params.get("overrides")).name
    except Exception:
        name = os.path.splitext(os.path.basename(path))[0]
    return name + (f"-round-{params['round']}" if suffix == "round" and "round" in params else "")


def _campaign_name() -> str:
    return _run_name()


def _round_name() -> str:
    return _run_name("round")


@flow(name="alignment-campaign", flow_run_name=_campaign_name)
def campaign(config_path: str, store: str | None = None, rounds: int | None = None, overrides: dict | None = None) -> list[dict]:
    """Every round of the campaign in ``config_path`` that its store has not finished, in order.

    ``store`` and ``rounds`` replace the config's; ``overrides`` replaces any other top-level fields
    (e.g. ``{"seed": 3}``)."""
    config = _config_or_explain(config_path, store=store, rounds=rounds, overrides=overrides)
    release_orphans()
    try:
        return flows.alignment_campaign.fn(config)
    except Exception as e:
        raise RuntimeError(_what_to_do(e, config, config_path, None)) from e


@flow(name="alignment-round", flow_run_name=_round_name)
def single_round(config_path: str, round: int, store: str | None = None, overrides: dict | None = None) -> dict:
    """Round ``round`` of the campaign in ``config_path``: sample → pair → judge → update → evaluate,
    doing only what its store lacks (so it also finishes a round that crashed)."""
    config = _config_or_explain(config_path, store=store, overrides=overrides)
    if not 1 <= round <= config.rounds:
        raise ValueError(f"round {round} is outside the campaign's rounds 1..{config.rounds}. What to do: pass a round in that range, or raise `rounds` in {config_path}.")
    if round > 1 and not has_checkpoint(Store(config.store), version(round - 1)):
        raise ValueError(
            f"round {round} starts from policy {version(round - 1)}, which {config.store} does not hold yet. "
            f"What to do: run round {round - 1} first (or the campaign deployment, which runs the missing rounds in order)."
        )
    release_orphans()
    try:
        return flows.alignment_round.fn(config, round)
    except Exception as e:
        raise RuntimeError(_what_to_do(e, config, config_path, round)) from e


def _collect_name() -> str:
    return _run_name() + "-collect-annotations"


@flow(name="collect-annotations", flow_run_name=_collect_name)
def collect_annotations(config_path: str, store: str | None = None, overrides: dict | None = None) -> dict:
    """Pull finished human judgments (pipelines/human.py) and finished batches of an LLM judge in
    ``mode: batch`` (pipelines/batch_judging.py) of the campaign in ``config_path`` into its store, and
    resume the rounds waiting for them. Scheduled every few minutes."""
    from pipelines import batch_judging, human
    from pipelines.oracle_factory import oracle_is_queued

    config = _config_or_explain(config_path, store=store, overrides=overrides)
    batches = oracle_is_queued(config)
    if config.humans is None and not batches:
        raise ConfigError(
            f"{config_path}: humans: this campaign has no Label Studio section and no batch judge (oracle.mode: batch), so there is nothing to collect. "
            "What to do: point config_path at a campaign with `humans:` or a batch judge, or pause this schedule."
        )
    out = {}
    try:
        if batches:
            out["batches"] = batch_judging.collect_judge_batches.fn(config)
        if config.humans is not None:
            out |= human.collect_annotations.fn(config)
    except Exception as e:
        raise RuntimeError(secrets.redact(
            f"collecting for {config.name} failed: {type(e).__name__}: {e}\nWhat to do: check the Label Studio server and the judge API named in "
            f"{config_path} (and their keys); the next scheduled run tries again."
        )) from e
    return out


def _config_or_explain(config_path: str, **kw) -> CampaignConfig:
    try:
        config = load(config_path, **kw)
    except ConfigError as e:
        raise ConfigError(f"{e}\nWhat to do: fix that field in the config file (or the run's overrides) and run the deployment again.") from None
    get_run_logger().info("campaign %s from %s: %d rounds of %s, store %s", config.name, config_path, config.rounds, config.solver.algorithm, config.store)
    return config


def _what_to_do(error: Exception, config: CampaignConfig, config_path: str, round: int | None) -> str:
    where = f"round {round} of {config.name}" if round else f"campaign {config.name}"
    return secrets.redact(
        f"{where} failed: {type(error).__name__}: {error}\n"
        f"What to do: the store ({config.store}) keeps every stage that finished. Fix the cause above, then "
        f"press Retry on this run in the UI or run `{_rerun_command()}`: the rerun does only what is missing."
    )


def _rerun_command() -> str:
    """The command that starts this deployment again with this run's parameters."""
    from prefect.runtime import deployment

    if not deployment.name:
        return "the same flow call again"
    args = [f"-p {k}={shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in flow_run.parameters.items() if v is not None]
    return " ".join([f"prefect deployment run {flow_run.flow_name}/{deployment.name}", *args])


# ----- after a crash ----------------------------------------------------------------------------------


def release_orphans(recent: int = 20) -> int:
    """Mark ``Crashed`` the subflow and task runs that a killed flow process left ``Running``: those of
    earlier attempts of this run (a Retry) and of the latest crashed campaign and round runs.

    A process killed with SIGKILL reports nothing; its worker marks the flow run Crashed, but the runs
    inside it stay Running in the UI for ever (and the server releases the slots of a tag concurrency
    limit only when their task run leaves Running; the GPU slot, held in code, comes back when its
    60 s lease expires: pipelines/gpu.py). Called first thing in a
    run, before any task of its own starts, so every Running child found is an orphan. Returns how many
    runs it marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType, TaskRunFilter
    from prefect.client.schemas.filters import TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    if flow_run.id is None:
        return 0
    me = UUID(flow_run.id)
    live = [StateType.RUNNING, StateType.PENDING]
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["alignment-campaign", "alignment-round"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED]))),
            sort=FlowRunSort.START_TIME_DESC,
            limit=recent,
        )
        roots = [me, *(r.id for r in crashed)]
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=roots), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)))
        )
        subflows = [r for r in subflows if r.id != me]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=roots + [r.id for r in subflows])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live))),
        )
        message = f"its flow process died (killed or lost); flow run {me} found it still running and marked it crashed"
        for t in tasks:  # first the tasks: this releases the concurrency slots they held
            client.set_task_run_state(t.id, Crashed(message=message), force=True)
        for r in subflows:
            client.set_flow_run_state(r.id, Crashed(message=message), force=True)
    if tasks or subflows:
        get_run_logger().warning(
            "marked %d task runs and %d subflow runs of a crashed attempt as crashed (releasing their concurrency slots): %s",
            len(tasks), len(subflows), ", ".join(t.name for t in tasks) or "-",
        )
    return len(tasks) + len(subflows)
