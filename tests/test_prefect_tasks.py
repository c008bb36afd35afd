"""What the Prefect tasks add around the stages: retries on transient errors only, the GPU slot around
model work only, and pairing that hands keys (not texts) to the judge. Through real Prefect tasks on the
test session's temporary API (prefect_test_harness)."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import openai
import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data import Store
from oracles.resume import pairs_from_keys
from pipelines import flows, gpu, stages
from pipelines.config import default_config_path, load_config, parse_config
from pipelines.retrying import is_transient, worth_retrying
from pipelines.secrets import SecretNotFound
from pipelines.world import World

pytestmark = pytest.mark.slow


# ----- retries --------------------------------------------------------------------------------------------


def _http_response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", "http://judge.invalid/v1/chat/completions"))


def _openai_status(cls, status: int):
    return cls(f"Error code: {status}", response=_http_response(status), body=None)


TRANSIENT = {
    "connection refused": lambda: ConnectionRefusedError(111, "Connection refused"),
    "timeout": lambda: TimeoutError("timed out"),
    "openai connection": lambda: openai.APIConnectionError(request=httpx.Request("POST", "http://judge.invalid")),
    "openai timeout": lambda: openai.APITimeoutError(request=httpx.Request("POST", "http://judge.invalid")),
    "openai 429": lambda: _openai_status(openai.RateLimitError, 429),
    "openai 503": lambda: _openai_status(openai.InternalServerError, 503),
    "httpx read timeout": lambda: httpx.ReadTimeout("read timed out"),
    "httpx 502": lambda: httpx.HTTPStatusError("bad gateway", request=_http_response(502).request, response=_http_response(502)),
    "store I/O": lambda: OSError("When reading information for key 'campaigns/x': AWS Error NETWORK_CONNECTION"),
}
PERMANENT = {
    "openai auth": lambda: _openai_status(openai.AuthenticationError, 401),
    "openai 404 model": lambda: _openai_status(openai.NotFoundError, 404),
    "openai bad request": lambda: _openai_status(openai.BadRequestError, 400),
    "missing secret": lambda: SecretNotFound("Prefect Secret block 'judge-key' does not exist"),
    "bad config": lambda: ValueError("solver.beta must be positive"),
    "missing checkpoint": lambda: FileNotFoundError("no complete checkpoint of policy v3"),
    "nan loss": lambda: FloatingPointError("loss is NaN"),
    "bug": lambda: RuntimeError("something else"),
}


def _run_failing_once(make_error) -> int:
    """Attempts a task with 2 retries makes when its first attempt raises ``make_error()``."""
    attempts = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=worth_retrying, cache_policy=NO_CACHE)
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise make_error()
        return "ok"

    @flow
    def run() -> None:
        flaky(return_state=True)  # a failed task does not fail this flow

    run()
    return len(attempts)


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_a_transient_error_is_retried(name, prefect_harness):
    assert _run_failing_once(TRANSIENT[name]) == 2


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_a_config_or_data_error_is_not_retried(name, prefect_harness):
    assert _run_failing_once(PERMANENT[name]) == 1


def test_the_allow_list_without_prefect():
    import subprocess

    assert all(is_transient(make()) for make in TRANSIENT.values())
    assert not any(is_transient(make()) for make in PERMANENT.values())
    assert is_transient(subprocess.CalledProcessError(-9, ["torchrun"])) and not is_transient(subprocess.CalledProcessError(1, ["torchrun"]))
    assert not is_transient(PermissionError("store")) and not is_transient(None) and not is_transient(KeyboardInterrupt())


# ----- the GPU slot ---------------------------------------------------------------------------------------


@pytest.fixture
def gpu_limit(prefect_harness, monkeypatch):
    """A fresh concurrency limit of one slot, named for this test, as the GPU limit of this process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"gpu-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(gpu.ENV, name)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    yield name
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)


def _active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_the_slot_is_held_inside_the_block_only_and_is_reentrant(gpu_limit):
    seen = {}

    @task(cache_policy=NO_CACHE)
    def model_work():
        seen["before"] = _active_slots(gpu_limit)
        with gpu.gpu_slot():
            seen["inside"] = _active_slots(gpu_limit)
            with gpu.gpu_slot():  # a model stage inside another: no wait on itself
                seen["nested"] = _active_slots(gpu_limit)
        with gpu.gpu_slot(needed=False):
            seen["not needed"] = _active_slots(gpu_limit)
        seen["after"] = _active_slots(gpu_limit)

    @flow
    def run():
        model_work()

    run()
    assert seen == {"before": 0, "inside": 1, "nested": 1, "not needed": 0, "after": 0}


def test_a_cascade_holds_the_slot_around_its_learned_model_only(gpu_limit):
    """HoldingGpu wraps a cascade's learned stage: the slot is held while it judges, not around the rest."""
    held = []

    class Model:
        oracle_id = "learned:test"

        def judge(self, pairs):
            held.append(_active_slots(gpu_limit))
            return []

    @task(cache_policy=NO_CACHE)
    def judge_stage():
        gpu.HoldingGpu(Model()).judge([])
        held.append(_active_slots(gpu_limit))  # the judge and people would run here

    @flow
    def run():
        judge_stage()

    run()
    assert held == [1, 0]


def test_two_tasks_take_turns_on_the_slot(gpu_limit):
    spans, lock = [], threading.Lock()

    @task(cache_policy=NO_CACHE)
    def model_work(i: int):
        with gpu.gpu_slot():
            start = time.monotonic()
            time.sleep(1.0)
            with lock:
                spans.append((start, time.monotonic()))

    @flow
    def two_at_once():
        futures = [model_work.submit(i) for i in range(2)]
        for f in futures:
            f.result()

    two_at_once()
    (_, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end, f"both held the slot at once: {spans}"


def test_without_a_limit_the_slot_costs_one_lookup_and_says_so_once(prefect_harness, monkeypatch):
    name = f"gpu-missing-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(gpu.ENV, name)
    said = []
    monkeypatch.setattr(gpu, "_said_missing", set())

    class Logger:
        def info(self, msg, *args):
            said.append(msg % args)

    @task(cache_policy=NO_CACHE)
    def model_work() -> float:
        import prefect

        monkeypatch.setattr(prefect, "get_run_logger", Logger)
        start = time.perf_counter()
        for _ in range(5):
            with gpu.gpu_slot():
                pass
        return (time.perf_counter() - start) / 5

    @flow
    def run() -> float:
        return model_work()

    per_slot = run()
    assert per_slot < 0.2, f"{per_slot:.3f} s per slot without a limit"
    assert len(said) == 1 and name in said[0] and "prefect gcl create" in said[0]


def test_outside_a_task_the_slot_does_nothing(monkeypatch):
    monkeypatch.setattr(gpu, "_limit_exists", lambda name: pytest.fail("no API call outside a task run"))
    with gpu.gpu_slot():
        pass


@pytest.fixture
def slot_holders(gpu_limit, monkeypatch):
    """The task runs that acquired the GPU slot, in order."""
    from prefect.concurrency import sync
    from prefect.context import TaskRunContext

    holders, acquire = [], sync.concurrency

    def recording(*args, **kwargs):
        holders.append(TaskRunContext.get().task_run.name)
        return acquire(*args, **kwargs)

    monkeypatch.setattr(sync, "concurrency", recording)
    return holders


def test_a_causal_lm_round_holds_the_slot_to_sample_update_and_evaluate(tmp_path, slot_holders, gpu_limit):
    config = load_config(default_config_path(), store=str(tmp_path / "store"), rounds=1, prompts={"source": "text_world", "limit_train": 4, "limit_eval": 2},
                         sampling={"samples_per_prompt": 3}, evaluation={"samples_per_prompt": 2})  # fmt: skip
    flows.alignment_round(config, 1)
    name = config.name
    # the text-world oracle is no model: the judge stage does not take it; the evaluation takes it to sample
    assert slot_holders == [f"{name}-r1-update-sample", f"{name}-r1-update-update", f"{name}-r1-evaluate"]
    assert _active_slots(gpu_limit) == 0


def test_a_tabular_round_never_takes_the_slot(tmp_path, slot_holders):
    config = parse_config({"name": "tab", "store": str(tmp_path / "store"), "rounds": 1, "games": [{"kind": "random", "n": 4, "seed": 1}],
                           "oracle": {"kind": "matrix", "mode": "exact"}, "solver": {"algorithm": "inpo", "beta": 0.5}, "sampling": {"samples_per_prompt": 4}})  # fmt: skip
    flows.alignment_round(config, 1)
    assert slot_holders == []


# ----- pairing hands keys ---------------------------------------------------------------------------------


def test_pairing_hands_the_judge_keys_and_a_rerun_pairs_alike(tmp_path, prefect_harness):
    config = parse_config({"name": "keys", "store": str(tmp_path / "store"), "rounds": 1, "games": [{"kind": "random", "n": 5, "seed": 2}],
                           "oracle": {"kind": "matrix", "mode": "exact"}, "solver": {"algorithm": "inpo", "beta": 0.5}, "sampling": {"samples_per_prompt": 6}})  # fmt: skip
    store, world = Store(config.store), World(config)

    @flow
    def sample_and_pair():
        stages.register_prompts(store, world)
        flows.sample_task(config, 1, "update")
        return flows.pair_task(config, 1, "update"), flows.pair_task(config, 1, "update")

    keys, again = sample_and_pair()
    assert keys == again and keys, "pairing is seeded: a resumed round gets the same pairs"
    assert all(isinstance(k, tuple) and len(k) == 3 and all(isinstance(x, str) for x in k) for k in keys), "keys, not texts"
    pairs = stages.pair_responses(store, round=1, policy_version="v0", strategy=config.pairing.strategy, skip_identical=True, seed=config.seed)
    assert pairs_from_keys(store, keys, round=1) == pairs, "the judge reads the same texts back from the store"
    with pytest.raises(ValueError, match="not in the store"):
        pairs_from_keys(store, [(keys[0][0], "no-such-response", keys[0][2])], round=1)
