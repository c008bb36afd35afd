"""nashflow operated the normal way, against a REAL Prefect server: the module fixture starts
`prefect server start` on a free loopback port with its own PREFECT_HOME, creates the work pool and the
GPU concurrency limit (`gpu-<hostname>`), deploys from prefect.yaml with `prefect deploy`, and starts a process worker.
Everything is checked through the server's REST API, as the UI reads it.

The crash tests kill the worker's flow process with SIGKILL in the middle of the judge stage and in the
middle of a causal-LM update, press Retry (what the UI's button does), and check the store: no comparison
lost or stored twice, no checkpoint half-written. tests/server_flows.py holds the test-only flow that
slows a stage down so the kill lands inside it.

The object-store test runs a campaign with its store on a local S3-compatible server (moto, from PyPI);
without moto it is skipped on a developer's machine and fails in CI.

A Prefect server that cannot start fails these tests (CI included): Prefect is a dependency, so it can
always start here. The other tests use prefect_test_harness (conftest.py) and are not affected: nothing
here sets PREFECT_API_URL in the test process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from local_servers import free_port, log_tail, stop, wait_until_up

from data import Store
from pipelines.versions import has_checkpoint

pytestmark = [pytest.mark.prefect_server, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
POOL = "nashflow"  # the pool prefect.yaml names
BLOCK_SECRET = "dummy-block-secret-7f3a91c2e5"  # values that must never reach the API
ENV_SECRET = "dummy-env-secret-b84d20e6f1"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "nashflow-test", "AWS_SECRET_ACCESS_KEY": "nashflow-test", "AWS_DEFAULT_REGION": "us-east-1"}
STAGES = ("sample", "pair", "judge", "update")
GPU_LIMIT = f"gpu-{socket.gethostname()}"  # the README's limit: one per machine (pipelines/gpu.py)


# ----- the server, the worker, the API ------------------------------------------------------------------


@dataclass
class Server:
    url: str  # the API, …/api
    env: dict
    home: Path
    http: httpx.Client

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def post(self, path: str, body: dict | None = None):
        for _ in range(5):  # a busy SQLite-backed server answers 503 now and then: ask again
            r = self.http.post(path, json=body or {})
            if r.status_code != 503:
                break
            time.sleep(1.0)
        assert r.status_code < 300, f"POST {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    def get(self, path: str):
        for _ in range(5):  # as post
            r = self.http.get(path)
            if r.status_code != 503:
                break
            time.sleep(1.0)
        assert r.status_code < 300, f"GET {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def all(self, path: str, body: dict) -> list:
        """Every row of a /filter endpoint (they page at the server's default limit)."""
        rows, offset = [], 0
        while True:
            page = self.post(path, {**body, "offset": offset, "limit": 200})
            rows += page
            if len(page) < 200:
                return rows
            offset += 200

    def deployment(self, flow: str, name: str) -> dict:
        return self.get(f"/deployments/name/{flow}/{name}")

    def run(self, flow: str, name: str, **parameters) -> str:
        dep = self.deployment(flow, name)
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout: float = 180, until=TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in until:
                return run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {timeout} s\n{self.tail_logs()}")

    def retry(self, run_id: str) -> None:
        """What the UI's Retry button does: schedule the same flow run again; the worker picks it up."""
        self.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry (test)"}, "force": True})

    def subflows(self, run_id: str) -> list[dict]:
        return self.all("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "sort": "START_TIME_ASC"})

    def task_runs(self, *flow_run_ids: str) -> list[dict]:
        return self.all("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": list(flow_run_ids)}}, "sort": "EXPECTED_START_TIME_ASC"})

    def artifacts(self, *flow_run_ids: str) -> list[dict]:
        rows = self.all("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": list(flow_run_ids)}}, "sort": "CREATED_DESC"})
        return rows[::-1]  # oldest first

    def logs(self, *flow_run_ids: str) -> list[str]:
        body = {"logs": {"flow_run_id": {"any_": list(flow_run_ids)}}} if flow_run_ids else {}
        return [row["message"] for row in self.all("/logs/filter", {**body, "sort": "TIMESTAMP_ASC"})]

    def logs_with(self, flow_run_ids: list[str], *needles: str, timeout: float = 20) -> str:
        """The runs' logs once every needle is in them (a flow process sends its last logs in a batch
        as it exits, which can be after the run reads as finished); as they are after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            text = "\n".join(self.logs(*flow_run_ids))
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def tail_logs(self) -> str:
        out = []
        for name in ("server.log", "worker.log"):
            path = self.home / name
            if path.exists():
                out.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)


def _cli(env: dict, *args: str, timeout: float = 120) -> str:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    print(f"prefect {' '.join(args)}: {time.monotonic() - started:.1f} s")
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **{k: v for k, v in os.environ.items() if k != "NASHFLOW_GPU_LIMIT"},
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # the worker polls every second (default 10)
        "PWD": str(REPO),  # prefect deploy records the working directory
        "NASHFLOW_TEST_JUDGE_KEY": ENV_SECRET,  # an oracle secret in the worker's environment
        **S3_CREDENTIALS,  # for the local S3-compatible server of the object-store test
    }
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(home / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    http = httpx.Client(base_url=url, timeout=30)
    srv = Server(url, env, home, http)
    try:
        proc = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        took = wait_until_up(f"{url}/health", proc, what=f"the Prefect server on 127.0.0.1:{port}", timeout=90, logs=srv.tail_logs)
        print(f"prefect server start: healthy after {took:.1f} s")
        _cli(env, "work-pool", "create", POOL, "--type", "process")
        _cli(env, "global-concurrency-limit", "create", GPU_LIMIT, "--limit", "1")
        _cli(env, "--no-prompt", "deploy", "--all")  # prefect.yaml, as the README says
        _cli(env, "--no-prompt", "deploy", "tests/server_flows.py:server_round", "--name", "test", "--pool", POOL)
        start("worker", "worker", "start", "--pool", POOL, "--name", "test-worker")
        yield srv
    finally:
        try:  # flow processes the worker started and a failed test left running
            for run in srv.all("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}}):
                _kill_flow_process(run)
        except Exception:
            pass
        for proc in reversed(procs):
            stop(proc)
        http.close()


def _kill_flow_process(run: dict) -> None:
    """SIGKILL the worker's flow process of ``run`` (its infrastructure pid), checking it is one."""
    pid = int(str(run.get("infrastructure_pid") or "0").rsplit(":", 1)[-1])
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if "prefect" in cmdline:
        os.kill(pid, signal.SIGKILL)


# ----- configs and store helpers ----------------------------------------------------------------------


def _write_config(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _stored_rows(store: Path, table: str) -> list[str]:
    """Every key in every Parquet file of a table, duplicates included (the store's reader drops them)."""
    ids = []
    for f in sorted((store / table).rglob("*.parquet")):
        ids += pq.read_table(f).column(f"{table[:-1]}_id").to_pylist()
    return ids


def _wait_for(what: str, condition, timeout: float = 120, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _kill_when(server: Server, run_id: str, what: str, condition) -> None:
    """Wait until ``condition()`` holds while the run is still running, then SIGKILL its flow process."""

    def ready():
        run = server.flow_run(run_id)
        assert run["state"]["type"] not in TERMINAL, f"the run ended ({run['state']['type']}) before {what}"
        return run["state"]["type"] == "RUNNING" and condition()

    _wait_for(what, ready)
    _kill_flow_process(server.flow_run(run_id))
    t = time.monotonic()
    crashed = server.wait(run_id, timeout=60)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    # Prefect 3.9 reports the crash twice: the runner at once, the worker a few seconds later (its line
    # "Check whether the flow run exceeded its memory allocation" in the run's logs). A Retry pressed in
    # between is overturned by the second report, so wait for that line, as a person would.
    server.logs_with([run_id], "Check whether the flow run exceeded its memory allocation", timeout=20)
    print(f"crash reported twice after {time.monotonic() - t:.1f} s")


# ----- the tests ---------------------------------------------------------------------------------------


def test_deployments_come_from_prefect_yaml(server):
    campaign = server.deployment("alignment-campaign", "campaign")
    assert campaign["work_pool_name"] == POOL
    assert campaign["parameter_openapi_schema"]["required"] == ["config_path"]
    (schedule,) = campaign["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False  # an example, paused
    one = server.deployment("alignment-round", "round")
    assert set(one["parameter_openapi_schema"]["required"]) == {"config_path", "round"}
    assert one["parameters"] == {"config_path": "examples/tabular_inpo.yaml", "round": 1}
    collect = server.deployment("collect-annotations", "collect-annotations")
    (schedule,) = collect["schedules"]
    assert schedule["schedule"]["interval"] == 300 and schedule["active"] is False
    limits = server.post("/v2/concurrency_limits/filter")
    assert [(limit["name"], limit["limit"]) for limit in limits] == [(GPU_LIMIT, 1)]


def test_campaign_deployment_runs_and_shows_each_stage(server, tmp_path):
    store = tmp_path / "store"
    run_id = server.run("alignment-campaign", "campaign", config_path="examples/tabular_inpo.yaml", store=str(store), rounds=2)
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    assert run["name"] == "tabular-inpo"

    rounds = server.subflows(run_id)
    assert [(r["name"], r["state"]["type"]) for r in rounds] == [("tabular-inpo-round-1", "COMPLETED"), ("tabular-inpo-round-2", "COMPLETED")]
    for r, sub in enumerate(rounds, 1):
        tasks = server.task_runs(sub["id"])
        expected = [f"tabular-inpo-r{r}-update-{s}" for s in STAGES] + [f"tabular-inpo-r{r}-evaluate"]
        assert [t["name"] for t in tasks] == expected, "one task per stage, whatever the number of comparisons"
        assert {t["state"]["type"] for t in tasks} == {"COMPLETED"}

    expected_lines = ("campaign tabular-inpo from examples/tabular_inpo.yaml: 2 rounds of inpo", "round 1 update: sampled 12 responses from v0 (0 already stored) in",
                     "round 2 update: matrix:matrix:", "judged 22 pairs (0 from the store, 0 abstained, 0 skipped, $0.0000) in", "round 2 update: inpo → v2 on 43 judged pairs in",
                     "round 2: eval/duality_gap=")  # fmt: skip
    logs = server.logs_with([run_id, *(r["id"] for r in rounds)], *expected_lines)
    for expected in expected_lines:
        assert expected in logs

    arts = server.artifacts(*(r["id"] for r in rounds))
    by_key = {}
    for a in arts:
        by_key.setdefault(a["key"], []).append(a)
    assert set(by_key) == {"tabular-inpo-round-1-metrics", "tabular-inpo-round-2-metrics", "tabular-inpo-summary", "tabular-inpo-judge-progress"}
    table = json.loads(by_key["tabular-inpo-round-2-metrics"][0]["data"]) if isinstance(by_key["tabular-inpo-round-2-metrics"][0]["data"], str) else by_key["tabular-inpo-round-2-metrics"][0]["data"]
    metrics = {row["metric"]: row["value"] for row in table}
    assert float(metrics["eval/duality_gap"]) > 0 and metrics["pref/judged_now"] == "22" and "perf/seconds_judge" in metrics
    summaries = [a["data"] for a in by_key["tabular-inpo-summary"]]
    assert [s.splitlines()[0] for s in summaries] == ["## tabular-inpo — round 1 (inpo)", "## tabular-inpo — round 2 (inpo)"]
    assert "| eval/duality_gap |" in summaries[1] and "](data:image/png;base64," in summaries[1], "the plot is shown in the summary"
    assert [a["data"] for a in by_key["tabular-inpo-judge-progress"]] == [100.0, 100.0]
    assert "22 judged now, 0 from the store" in by_key["tabular-inpo-judge-progress"][1]["description"]

    from data.rounds import rounds_table

    assert list(rounds_table(Store(str(store)))["round"]) == [1, 2]


def test_a_bad_parameter_fails_naming_the_field_and_what_to_do(server):
    run_id = server.run("alignment-round", "round", config_path="examples/tabular_inpo.yaml", round=1, overrides={"solver": {"beta": -1}})
    run = server.wait(run_id)
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert "examples/tabular_inpo.yaml: solver.beta: Input should be greater than 0" in message and "What to do:" in message, message


def test_collect_annotations_without_people_says_what_to_do(server):
    run_id = server.run("collect-annotations", "collect-annotations", config_path="examples/tabular_inpo.yaml")
    run = server.wait(run_id)
    assert run["state"]["type"] == "FAILED" and run["name"] == "tabular-inpo-collect-annotations"
    assert "has no Label Studio section" in run["state"]["message"] and "What to do:" in run["state"]["message"]


def test_killed_in_the_judge_stage_then_retried_loses_and_duplicates_no_comparison(server, tmp_path):
    # 2 games × 24 samples in both orders = 1104 pairs: five oracle calls of ≤256 pairs, 1.5 s each
    store = tmp_path / "store"
    raw = {"name": "crash-judge", "store": str(store), "rounds": 1, "oracle": {"kind": "matrix", "mode": "exact"}, "solver": {"algorithm": "inpo", "beta": 0.5},
           "games": [{"kind": "random", "n": 8, "seed": 1}, {"kind": "random", "n": 8, "seed": 2}], "sampling": {"samples_per_prompt": 24},
           "pairing": {"strategy": "both_orders", "skip_identical": False}}  # fmt: skip
    run_id = server.run("nashflow-test-round", "test", config_path=_write_config(tmp_path, raw), round=1, store=str(store), mode="slow-judge", seconds=1.5)
    _kill_when(server, run_id, "the first judged chunk in the store", lambda: bool(_stored_rows(store, "comparisons")))
    before = _stored_rows(store, "comparisons")
    assert 0 < len(before) < 1104, "the kill landed in the middle of the judge stage"
    assert not (store / "checkpoints" / "v1").exists()

    server.retry(run_id)
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    after = _stored_rows(store, "comparisons")
    assert len(after) == len(set(after)) == 1104, "every pair judged once and stored once"
    assert set(before) <= set(after)
    retried = f"judged {1104 - len(before)} pairs ({len(before)} from the store"
    released = "marked 1 task runs and 0 subflow runs of a crashed attempt as crashed"
    logs = server.logs_with([run_id], retried, released)
    assert retried in logs, "the retry asked the oracle only what was missing"
    assert released in logs
    states = {t["name"] + ":" + t["state"]["type"] for t in server.task_runs(run_id)}
    assert "crash-judge-r1-update-judge:CRASHED" in states and "crash-judge-r1-update-judge:COMPLETED" in states
    assert not any(s.endswith(":RUNNING") for s in states), "no task run is left 'Running' in the UI"
    assert has_checkpoint(Store(str(store)), "v1")


def test_killed_in_the_update_then_retried_resumes_from_its_step_checkpoint(server, tmp_path):
    from solvers.causal_lm import load_checkpoint
    from solvers.checkpoint import latest_checkpoint

    store = tmp_path / "store"
    raw = {"name": "crash-update", "store": str(store), "rounds": 1, "prompts": {"source": "text_world", "limit_train": 6, "limit_eval": 2},
           "policy": {"kind": "causal_lm", "model": "tiny", "max_new_tokens": 8}, "oracle": {"kind": "text_world", "mode": "exact"},
           "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}}, "sampling": {"samples_per_prompt": 4}, "evaluation": {"samples_per_prompt": 2},
           "trainer": {"lr": 0.002, "micro_batch_size": 4, "checkpoint_every": 1}}  # fmt: skip  # 36 pairs: 9 optimizer steps
    run_id = server.run("nashflow-test-round", "test", config_path=_write_config(tmp_path, raw), round=1, store=str(store), mode="slow-train", seconds=1.0)
    work = store / "checkpoints" / ".work-v1"
    _kill_when(server, run_id, "a step checkpoint of the update", lambda: latest_checkpoint(work) is not None)
    assert not (store / "checkpoints" / "v1").exists(), "the kill landed before the update finished"
    comparisons = _stored_rows(store, "comparisons")

    server.retry(run_id)
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    logs = server.logs_with([run_id], "resuming from its step checkpoint", "inpo → v1 on 36 judged pairs")
    assert "resuming from its step checkpoint" in logs and "inpo → v1 on 36 judged pairs" in logs
    assert has_checkpoint(Store(str(store)), "v1") and not work.exists()
    policy, optimizer = load_checkpoint(store / "checkpoints" / "v1")  # a complete, loadable checkpoint
    assert optimizer and all(p.isfinite().all() for p in policy.model.parameters())
    after = _stored_rows(store, "comparisons")
    assert len(after) == len(set(after)) and set(comparisons) <= set(after)
    update_runs = [t for t in server.task_runs(run_id) if t["name"].endswith("-update")]
    assert [t["state"]["type"] for t in update_runs] == ["CRASHED", "COMPLETED"]
    slots = server.post("/v2/concurrency_limits/filter")
    assert [limit["active_slots"] for limit in slots] == [0], "the killed update's GPU slot came back (its lease expired) and the retry's gave its own back"


def test_two_updates_never_hold_the_gpu_at_once(server, tmp_path):
    """Two causal-LM rounds start together; their updates (each 4 s longer) take turns on the GPU limit.
    The update tasks may both be Running (one waits inside for the slot); the work in the slot never overlaps."""
    runs = []
    for name in ("gpu-a", "gpu-b"):
        raw = {"name": name, "store": str(tmp_path / name), "rounds": 1, "prompts": {"source": "text_world", "limit_train": 4, "limit_eval": 2},
               "policy": {"kind": "causal_lm", "model": "tiny", "max_new_tokens": 8}, "oracle": {"kind": "text_world", "mode": "exact"},
               "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}}, "sampling": {"samples_per_prompt": 3}, "evaluation": {"samples_per_prompt": 2}}  # fmt: skip
        runs.append(server.run("nashflow-test-round", "test", config_path=_write_config(tmp_path, raw), round=1, store=str(tmp_path / name), mode="slow-update", seconds=4.0))
    for run_id in runs:
        run = server.wait(run_id)
        assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    logs = server.logs_with(runs, "slow update held", timeout=20)
    spans = sorted((float(a), float(b)) for a, b in re.findall(r"slow update held the GPU from ([0-9.]+) to ([0-9.]+)", logs))
    assert len(spans) == 2, logs[-2000:]
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end, f"the updates overlapped: {spans}"
    assert [limit["active_slots"] for limit in server.post("/v2/concurrency_limits/filter")] == [0]


@pytest.fixture(scope="module")
def judge_key_block(server) -> str:
    """A Prefect Secret block holding the judge's (dummy) key, created as a user would."""
    name = "nashflow-test-judge-key"
    code = f"from prefect.blocks.system import Secret; Secret(value={BLOCK_SECRET!r}).save({name!r}, overwrite=True)"
    done = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return name


def _assert_no_secret_anywhere(server: Server, run_ids: list[str], store: Path) -> None:
    """Neither dummy value in any log, artifact, flow or task run (parameters, state messages), state
    history, or file of the store."""
    tasks = server.task_runs(*run_ids)
    seen = {
        "logs": server.logs(),  # every log the server holds, the worker's included
        "artifacts": server.all("/artifacts/filter", {}),
        "flow runs": server.all("/flow_runs/filter", {}),
        "task runs": tasks,
        "states": [s for r in run_ids for s in server.get(f"/flow_run_states/?flow_run_id={r}")]
        + [s for t in tasks for s in server.get(f"/task_run_states/?task_run_id={t['id']}")],
        "store": [p.read_bytes().decode("latin-1") for p in store.rglob("*") if p.is_file()],
    }
    for where, rows in seen.items():
        text = json.dumps(rows)
        assert BLOCK_SECRET not in text and ENV_SECRET not in text, f"a secret value reached the {where}"


def test_a_judge_key_from_a_secret_block_reaches_the_judge_and_nothing_else(server, judge_key_block, tmp_path):
    """The round deployment with an LLM judge (a local OpenAI-compatible stub that accepts only the
    block's key): the key goes from the Secret block to the judge's requests, and nowhere else."""
    from openai_stub import StubConfig, StubServer

    store = tmp_path / "store"
    with StubServer(StubConfig(api_key=BLOCK_SECRET)) as judge:
        raw = {"name": "judged", "store": str(store), "rounds": 1, "games": [{"kind": "random", "n": 6, "seed": 11}], "solver": {"algorithm": "inpo", "beta": 0.5},
               "oracle": {"kind": "llm_judge", "model": "stub-judge", "base_url": judge.base_url, "api_key_secret": judge_key_block, "api_key_env": None,
                          "prices": {"stub-judge": [1.0, 2.0]}},
               "sampling": {"samples_per_prompt": 6}}  # fmt: skip
        run_id = server.run("alignment-round", "round", config_path=_write_config(tmp_path, raw), round=1)
        run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    assert judge.auth_headers == {f"Bearer {BLOCK_SECRET}"} and judge.requests > 0
    logs = server.logs_with([run_id], "round 1: eval/")
    judged = re.search(r"llm_judge:\S+ judged (\d+) pairs \(0 from the store, 0 abstained, 0 skipped, \$([0-9.]+)\) in", logs)
    assert judged and int(judged[1]) > 0 and float(judged[2]) > 0, "the judge stage logs its oracle, counts and cost"
    _assert_no_secret_anywhere(server, [run_id], store)


def test_a_careless_client_cannot_put_a_secret_in_logs_or_states(server, judge_key_block, tmp_path):
    """An oracle whose client logs the key and fails quoting it (tests/server_flows.py): what reaches
    the API shows *** instead, and the run's message still says what to do."""
    store = tmp_path / "store"
    run_id = server.run("nashflow-test-round", "test", config_path="examples/tabular_inpo.yaml", round=1, store=str(store), mode="careless-oracle",
                        secret_block=judge_key_block, secret_env="NASHFLOW_TEST_JUDGE_KEY")  # fmt: skip
    run = server.wait(run_id)
    assert run["state"]["type"] == "FAILED"
    assert "Incorrect API key provided: ***|***" in run["state"]["message"] and "What to do:" in run["state"]["message"]
    assert "run `prefect deployment run nashflow-test-round/test -p config_path=examples/tabular_inpo.yaml -p round=1 -p store=" in run["state"]["message"]
    logs = server.logs_with([run_id], "Bearer ")
    assert "resolved the judge's key from block nashflow-test-judge-key" in logs, "the secrets were resolved"
    assert "Bearer ***|***" in logs, "the careless line was sent, masked"
    _assert_no_secret_anywhere(server, [run_id], store)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A local S3-compatible server (moto, from PyPI) on a free loopback port: host:port."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        from label_studio_fixtures import unavailable

        unavailable("moto[server] is not installed (pip install 'moto[server]'): the object-store test needs a local S3-compatible server")
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc, what="the S3 server (moto)", timeout=60, logs=lambda: log_tail(log_path), status=None, poll=0.3)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def test_campaign_with_its_store_on_an_object_store(server, s3_endpoint, monkeypatch):
    """The store as an s3:// URI (pyarrow's S3 filesystem): the worker's flow reads and writes every
    table, checkpoint and plot there; credentials come from the worker's environment, not the URI."""
    import pyarrow.fs as pafs

    from data.rounds import rounds_table

    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://nashflow-test/campaigns/tabular-inpo?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
    fs.create_dir("nashflow-test")  # the bucket; the store itself never creates one
    run_id = server.run("alignment-campaign", "campaign", config_path="examples/tabular_inpo.yaml", store=uri, rounds=2)
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{server.tail_logs()}"
    store = Store(uri)
    assert not store.is_local and list(rounds_table(store)["round"]) == [1, 2]
    assert has_checkpoint(store, "v2") and store.exists("plots/metrics.png")
    comparisons = store.read("comparisons")
    assert len(comparisons) and comparisons["comparison_id"].is_unique


# ----- people: a deployment's round suspends and the collect-annotations deployment resumes it ------------


def _suspended_round(server, tmp_path, name: str, **judges) -> tuple[str, str]:
    """Round 1 of a cyclic tabular world, run by the round deployment with ``judges`` (``humans`` and/or
    ``oracle``) until it suspends; returns the config's path and the round's flow-run id."""
    raw = {
        "name": name,
        "store": str(tmp_path / "store"),
        "rounds": 1,
        "games": [{"kind": "cyclic", "n": 5}],
        "policy": {"kind": "tabular", "reference_spread": 0.0},  # uniform: the samples differ
        "solver": {"algorithm": "inpo", "beta": 0.5},
        "sampling": {"samples_per_prompt": 5},
        "pairing": {"strategy": "all_pairs"},
        **judges,
    }
    path = _write_config(tmp_path, raw)
    run_id = server.run("alignment-round", "round", config_path=path, round=1)
    run = server.wait(run_id, timeout=180, until={"PAUSED", *TERMINAL})
    assert run["state"]["type"] == "PAUSED" and run["state"]["name"] == "Suspended", (run["state"], server.tail_logs())
    return path, run_id


@pytest.mark.label_studio
def test_a_round_suspended_for_people_is_resumed_by_collect_annotations(server, label_studio, tmp_path):
    """The round deployment submits its pairs to Label Studio and suspends (no process waits); people
    answer; the collect-annotations deployment stores their votes and resumes the round, whose body
    runs again from the top and finishes without resubmitting anything."""
    from label_studio_sdk import LabelStudio

    from oracles.label_studio_tasks import choice_result

    name = f"people-{os.getpid()}-{int(time.time()) % 100000}"
    humans = {"share": 1.0, "url": label_studio.url, "api_key_env": "LABEL_STUDIO_API_KEY", "quorum": 1.0}
    path, run_id = _suspended_round(server, tmp_path, name, humans=humans)

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    (project,) = [p for p in client.projects.list() if p.title == f"nashflow {name}"]
    tasks = list(client.tasks.list(project=project.id, fields="all", page_size=1000))
    assert tasks
    for t in tasks:  # the person prefers the response shown on the left
        client.annotations.create(id=t.id, result=choice_result("left"), lead_time=2.0)

    collect_id = server.run("collect-annotations", "collect-annotations", config_path=path)
    assert server.wait(collect_id, timeout=120)["state"]["type"] == "COMPLETED", server.tail_logs()
    run = server.wait(run_id, timeout=240)
    assert run["state"]["type"] == "COMPLETED", server.tail_logs()
    store = tmp_path / "store"
    comparisons = _stored_rows(store, "comparisons")
    assert len(comparisons) == len(tasks) == len(set(comparisons))
    assert len(list(client.tasks.list(project=project.id, page_size=1000))) == len(tasks)  # nothing resubmitted
    assert has_checkpoint(Store(str(store)), "v1")


# ----- an LLM judge through the Batch API: the round suspends and collect-annotations resumes it ----------


def test_a_round_suspended_for_its_judge_batches_is_resumed_by_collect_annotations(server, tmp_path):
    """The round deployment submits its pairs as a batch (to the local stub's Files and Batches API) and
    suspends; the first batch expires with half its requests unanswered, the collector resubmits them,
    and once nothing is pending it resumes the round, whose body runs again from the top, collects
    and finishes: every pair stored once, one batch per record."""
    from openai_stub import StubConfig, StubServer

    with StubServer(StubConfig(api_key=ENV_SECRET, batch_delay_s=2.0, expire_batches=1)) as stub:
        oracle = {"kind": "llm_judge", "model": "stub-judge", "base_url": stub.base_url, "api_key_env": "NASHFLOW_TEST_JUDGE_KEY", "mode": "batch"}
        path, run_id = _suspended_round(server, tmp_path, f"batch-{os.getpid()}-{int(time.time()) % 100000}", oracle=oracle)
        for _ in range(10):  # the scheduled collector
            time.sleep(2.5)
            collect_id = server.run("collect-annotations", "collect-annotations", config_path=path)
            assert server.wait(collect_id, timeout=120)["state"]["type"] == "COMPLETED", server.tail_logs()
            if server.flow_run(run_id)["state"]["type"] != "PAUSED":
                break
        run = server.wait(run_id, timeout=240)
        assert run["state"]["type"] == "COMPLETED", server.tail_logs()
        keys = [b["metadata"]["nashflow_key"] for b in stub.batches.values()]
    assert len(keys) == len(set(keys)) == 2, "the expired batch's rest in one more batch, no batch twice"
    store = tmp_path / "store"
    records = [json.loads(f.read_text()) for f in (store / "judge_batches").glob("round-1/*.json")]
    asked = {tuple(k) for r in records if r["generation"] == 0 for k in r["pairs"]}
    comparisons = _stored_rows(store, "comparisons")
    assert asked and len(comparisons) == len(set(comparisons)) == len(asked), "every pair of the round stored once"
    assert has_checkpoint(Store(str(store)), "v1")
