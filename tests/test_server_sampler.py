"""Sampling through a server chosen in the campaign config (``policy.sampler``): a server the sample stage
starts on the round's checkpoint (`transformers serve`, or tests/openai_stub.py run as a process), and a
server the user runs (the stub in a thread). The client is solvers/openai_sampler.py; the process and
port handling is pipelines/sampling_server.py."""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data import Store, prompt_id
from openai_stub import StubConfig, StubServer
from pipelines import flows, stages
from pipelines.config import ConfigError, default_config_path, load_config
from pipelines.retrying import is_transient
from pipelines.sampling_server import ServerStartError
from pipelines.versions import load_policy
from pipelines.world import World
from solvers.causal_lm import TINY_CHAT_TEMPLATE, CausalLMConfig, tiny_policy
from solvers.openai_sampler import OpenAISampler, OpenAISamplerConfig, SamplerError, ServerUnreachable

STUB = Path(__file__).with_name("openai_stub.py")
PYTHON = shlex.quote(sys.executable)


def campaign(tmp_path, sampler: dict, *, model: str = "tiny", **overrides):
    """A one-round INPO campaign on the tiny model: 4 training prompts × 2 samples, 2 held-out prompts."""
    return load_config(
        default_config_path(),
        store=str(tmp_path / "store"),
        rounds=1,
        prompts={"source": "text_world", "limit_train": 4, "limit_eval": 2},
        policy={"kind": "causal_lm", "model": model, "max_new_tokens": 8, "sampler": sampler},
        sampling={"samples_per_prompt": 2},
        evaluation={"samples_per_prompt": 2},
        **overrides,
    )


def stored_rows(root, table: str) -> int:
    """Rows in a table's Parquet files as written (readers drop duplicates; this does not)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, table)) for f in names if f.endswith(".parquet")]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def train_responses(store: Store, version: str = "v0"):
    train = {prompt_id(p) for p in World(load_config(default_config_path(), store=store.uri, prompts={"source": "text_world", "limit_train": 4, "limit_eval": 2})).prompts}
    responses = store.read("responses", rounds=[1])
    return responses[(responses["policy_version"] == version) & responses["prompt_id"].isin(train)]


def running(marker: str) -> list[str]:
    """Command lines of this machine's processes that mention ``marker`` (a test's own temporary path)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            found.append(cmd)
    return found


# ----- the config ---------------------------------------------------------------------------------------


def test_the_config_names_what_is_wrong_with_a_server_sampler(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.sampler: give exactly one of command .* or base_url"):
        campaign(tmp_path, {"kind": "server"})
    with pytest.raises(ConfigError, match=r"policy\.sampler: command must contain \{port\}"):
        campaign(tmp_path, {"kind": "server", "command": "vllm serve {checkpoint}"})
    with pytest.raises(ConfigError, match=r"policy\.sampler: nash_md samples its opponents .* mixture .* use sampler kind: local"):
        campaign(tmp_path, {"kind": "server", "base_url": "http://127.0.0.1:1/v1"}, solver={"algorithm": "nash_md"})
    assert campaign(tmp_path, {"kind": "local"}).policy.sampler.kind == "local"
    assert campaign(tmp_path, {"kind": "server", "command": "vllm serve {checkpoint} --port {port}"}).policy.sampler.max_concurrency == 16


def test_which_sampler_failures_a_task_retries():
    assert is_transient(ServerUnreachable("prompt 0: server failed: APIConnectionError"))  # it died: start it again
    assert is_transient(SamplerError("prompt 0: 503", status_code=503))
    assert not is_transient(SamplerError("prompt 0: 400", status_code=400))
    assert not is_transient(ServerStartError("policy.sampler.command exited with 2"))  # the same every time


# ----- the client's server log-probs ----------------------------------------------------------------------


def test_trusted_server_logprobs_are_stored_and_missing_ones_refused():
    policy = tiny_policy(chat_template=TINY_CHAT_TEMPLATE, config=CausalLMConfig(max_new_tokens=4))
    with StubServer(StubConfig(max_choices=1)) as server:
        trusting = OpenAISampler(policy, OpenAISamplerConfig(base_url=server.base_url, model="m", max_retries=0, trust_server_logprobs=True))
        samples = trusting.sample(["hello"], 2, seed=0)
    # the stub answers one verdict token with P = ½ for two empty responses: log ½ per sample
    assert [s.logp for s in samples[0]] == [math.log(0.5)] * 2
    assert all(s.token_ids == tuple(policy.encode_responses([s.text])[0]) for s in samples[0])  # no ids from the server: tokenized here
    with StubServer(StubConfig(logprobs=False)) as server:
        trusting = OpenAISampler(policy, OpenAISamplerConfig(base_url=server.base_url, model="m", max_retries=0, trust_server_logprobs=True))
        with pytest.raises(SamplerError, match="no per-token log-probs, which trust_server_logprobs needs"):
            trusting.sample(["hello"], 1, seed=0)


# ----- a server the user runs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_campaign_samples_from_the_users_server_by_version_name(tmp_path, prefect_harness, monkeypatch):
    key = "sk-sampler-key-never-stored"
    monkeypatch.setenv("NASHFLOW_TEST_SAMPLER_KEY", key)
    # it answers chat requests only, alternately B and A (its k-th draw over all requests): one request in
    # flight gives each prompt two different answers, so the round has pairs to judge
    with StubServer(StubConfig(api_key=key, max_choices=1)) as server:
        server.keep_bodies = True
        config = campaign(tmp_path, {"kind": "server", "base_url": server.base_url, "api_key_env": "NASHFLOW_TEST_SAMPLER_KEY", "max_concurrency": 1, "endpoint": "chat"})
        flows.alignment_campaign(config)
    store = Store(config.store)
    responses = train_responses(store)
    assert len(responses) == 4 * 2 and stored_rows(config.store, "responses") == len(store.read("responses"))
    assert set(responses["text"]) <= {"A", "B", "tie"}  # what the stub says: these came from the server
    assert {b["model"] for b in server.bodies} == {"v0"}  # the version is the model name
    assert sorted(b["n"] for b in server.bodies) == [1] * 4 + [2] * 4  # n=k, topped up: the stub returns one choice
    assert len({b["seed"] for b in server.bodies}) == 8
    assert server.auth_headers == {f"Bearer {key}"}
    # token ids tokenized locally (plus EOS: it stopped), and the local policy scored those tokens
    policy = load_policy(store, "v0", config, World(config))
    for r in responses.itertuples():
        assert list(r.token_ids) == policy.encode_responses([r.text], [r.finish_reason == "stop"])[0]
    logp = store.read("logprobs").set_index(["response_id", "policy_version"])["logp"]
    prompts = store.read("prompts").set_index("prompt_id")["prompt"]
    expected = policy.score(list(prompts[responses["prompt_id"]]), list(responses["text"]), finished=list(responses["finish_reason"] == "stop"), tokens=list(responses["token_ids"]))
    assert [logp[(rid, "v0")] for rid in responses["response_id"]] == pytest.approx(expected)
    for d, _, names in os.walk(config.store):  # the key went to the server and nowhere else
        for f in names:
            assert key.encode() not in Path(d, f).read_bytes(), f


# ----- a server the stage starts ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="`transformers serve` 5.x loads models with a device_map, which needs `accelerate`")
def test_a_round_samples_through_transformers_serve_started_on_its_checkpoint(tmp_path, prefect_harness):
    folder = tmp_path / "tiny-chat"
    tiny_policy(chat_template=TINY_CHAT_TEMPLATE).save(folder)  # the server answers chat requests through the template
    command = f"OMP_NUM_THREADS=1 {PYTHON} -m transformers.cli.transformers serve {{checkpoint}} --device cpu --host 127.0.0.1 --port {{port}}"
    # it returns one choice whatever n is and seeds its whole process: one request at a time
    config = campaign(tmp_path, {"kind": "server", "command": command, "max_concurrency": 1, "startup_timeout_s": 120}, model=str(folder))
    flows.alignment_round(config, 1)
    store = Store(config.store)
    responses = train_responses(store)
    assert len(responses) == 4 * 2 and stored_rows(config.store, "responses") == len(store.read("responses"))
    assert (responses["n_tokens"] == responses["token_ids"].map(len)).all() and responses["n_tokens"].between(1, 8 + 1).all()
    assert responses.groupby("prompt_id")["text"].nunique().gt(1).any()  # the server sampled (do_sample), with a seed per slot
    assert not running(str(tmp_path))  # the server is stopped, its whole process group
    assert store.read("rounds")["round"].tolist() == [1]


@pytest.mark.slow
def test_a_server_that_dies_mid_round_is_started_again_and_nothing_is_stored_twice(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.setattr(stages, "PROMPTS_PER_WRITE", 2)  # 2 prompts × 2 samples per write: 4 requests (one choice each)
    once = tmp_path / "died-once"
    # its first life answers 5 requests and exits at the 6th (in the second write); the second life does not die
    command = f"{PYTHON} {shlex.quote(str(STUB))} --port {{port}} --model {{checkpoint}} --max-choices 1 --die-after 5 --once {shlex.quote(str(once))}"
    config = campaign(tmp_path, {"kind": "server", "command": command, "endpoint": "chat", "max_concurrency": 1, "max_retries": 0, "startup_timeout_s": 60})
    store = Store(config.store)
    stages.register_prompts(store, World(config))
    out = flows.sample_task(config, 1, "update")
    assert once.exists()
    assert out == {"sampled": 4, "already_stored": 4}  # the retry sampled only what the first attempt had not stored
    assert len(train_responses(store)) == 8 and stored_rows(config.store, "responses") == 8
    assert stored_rows(config.store, "logprobs") == 8
    assert not running(str(tmp_path))


@pytest.mark.slow
def test_a_server_command_that_exits_at_once_fails_with_its_output_on_one_line(tmp_path, prefect_harness):
    fail = "import sys; sys.stderr.write('loading\\nOSError: no config.json in the folder\\n'); sys.exit(3)"
    config = campaign(tmp_path, {"kind": "server", "command": f"{PYTHON} -c {shlex.quote(fail)} {{checkpoint}} {{port}}"})
    stages.register_prompts(Store(config.store), World(config))
    with pytest.raises(ServerStartError) as e:
        flows.sample_task(config, 1, "update")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("policy.sampler.command exited with 3 before it answered on http://127.0.0.1:")
    assert message.endswith("loading | OSError: no config.json in the folder")
    assert stored_rows(config.store, "responses") == 0
