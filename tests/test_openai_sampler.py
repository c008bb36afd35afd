"""The OpenAI-compatible sampler: against a small in-test server whose answers are known (how requests
are built, topped up, seeded, scored, and how failures read), and against `transformers serve` running
the tiny model (which needs the `accelerate` package to start)."""

import importlib.util
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from local_servers import transformers_serve
from solvers.causal_lm import TINY_CHAT_TEMPLATE, CausalLMConfig, CausalLMPolicy, PromptTooLongError, tiny_policy
from solvers.openai_sampler import OpenAISampler, OpenAISamplerConfig, SamplerError
from solvers.policy import Policy

PROMPTS = ["hello", "tell me more"]


def fake_text(prompt: str, seed: int) -> tuple[str, str]:
    """What the fake server answers: known from the prompt and the request's seed."""
    return f"{prompt[:4]}-{seed % 997}", "length" if seed % 3 == 0 else "stop"


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1: returns at most ``max_choices`` choices, records
    every request, and answers 500 while ``fail`` is set."""

    def __init__(self, max_choices: int = 1):
        self.max_choices, self.fail, self.requests = max_choices, False, []
        app = FastAPI()
        app.post("/v1/chat/completions")(self._answer)
        app.post("/v1/completions")(self._answer)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    async def _answer(self, request: Request):
        body = await request.json()
        body["path"] = request.url.path
        self.requests.append(body)
        if self.fail:
            return JSONResponse({"error": {"message": "the GPU caught fire"}}, status_code=500)
        chat = body["path"].endswith("chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        choices = []
        for c in range(min(body.get("n", 1), self.max_choices)):
            text, reason = fake_text(prompt, body["seed"] + c)
            choice = {"index": c, "finish_reason": reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        kind = "chat.completion" if chat else "text_completion"
        return {"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": choices, "usage": usage}

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def sampler(url: str, *, chat: bool = True, max_new_tokens: int = 8, **options) -> OpenAISampler:
    policy = tiny_policy(chat_template=TINY_CHAT_TEMPLATE if chat else None, config=CausalLMConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9))
    return OpenAISampler(policy, OpenAISamplerConfig(base_url=url, model="tiny", max_retries=0, **options))


def check_scored_locally(s: OpenAISampler, prompts: list[str], samples) -> None:
    flat = [(p, x) for p, row in zip(prompts, samples) for x in row]
    finished = [x.finish_reason == "stop" for _, x in flat]
    expected = s.scorer.score([p for p, _ in flat], [x.text for _, x in flat], finished=finished)
    assert [x.logp for _, x in flat] == expected
    assert [x.n_tokens for _, x in flat] == [len(ids) for ids in s.scorer.encode_responses([x.text for _, x in flat], finished)]


def test_a_server_with_one_choice_per_request_is_topped_up():
    with FakeServer(max_choices=1) as server:
        s = sampler(server.url)
        assert isinstance(s, Policy) and s.endpoint == "chat"
        samples = s.sample(PROMPTS, 3, seed=5)
        requests = list(server.requests)
        assert s.sample(PROMPTS, 3, seed=5) == samples
    assert [len(row) for row in samples] == [3, 3]
    assert len(requests) == 6 and sorted(r["n"] for r in requests) == [1, 1, 2, 2, 3, 3]
    for prompt, row in zip(PROMPTS, samples):
        sent = [r for r in requests if r["messages"] == [{"role": "user", "content": prompt}]]
        assert [(x.text, x.finish_reason) for x in row] == [fake_text(prompt, r["seed"]) for r in sorted(sent, key=lambda r: -r["n"])]
    assert len({r["seed"] for r in requests}) == 6  # every slot its own seed
    assert all(r["max_tokens"] == 8 and r["temperature"] == 0.7 and r["top_p"] == 0.9 and r["model"] == "tiny" for r in requests)
    check_scored_locally(s, PROMPTS, samples)


def test_a_server_that_honours_n_gets_one_request_per_prompt():
    with FakeServer(max_choices=10) as server:
        samples = sampler(server.url).sample(PROMPTS, 4, seed=0)
        assert len(server.requests) == 2 and [r["n"] for r in server.requests] == [4, 4]
        assert [len(row) for row in samples] == [4, 4]
        server.requests.clear()
        sampler(server.url, choices_per_request=1).sample(PROMPTS, 4, seed=0)
        assert len(server.requests) == 8 and {r["n"] for r in server.requests} == {1}


def test_without_a_chat_template_the_completions_endpoint_gets_the_plain_prompt():
    with FakeServer() as server:
        s = sampler(server.url, chat=False)
        samples = s.sample(PROMPTS, 2, seed=1)
    assert s.endpoint == "completions"
    assert {r["path"] for r in server.requests} == {"/v1/completions"}
    assert sorted({r["prompt"] for r in server.requests}) == sorted(PROMPTS)
    check_scored_locally(s, PROMPTS, samples)


def test_a_failing_server_is_named_and_the_key_is_not(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    with FakeServer() as server:
        server.fail = True
        s = sampler(server.url)
        with pytest.raises(SamplerError, match=r"prompt \d: http://127\.0\.0\.1:\d+/v1 \(chat\) failed") as e:
            s.sample(PROMPTS, 1, seed=0)
    assert "sk-very-secret" not in str(e.value)


def test_a_prompt_over_the_context_is_refused_before_any_request():
    with FakeServer() as server:
        with pytest.raises(PromptTooLongError, match="prompt 1"):
            sampler(server.url).sample(["ok", "y" * 300], 1, seed=0)
        assert server.requests == []


# ----- against `transformers serve` -------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="`transformers serve` 5.x loads models with a device_map, which needs `accelerate`")
def test_against_transformers_serve(tmp_path):
    policy = tiny_policy(chat_template=TINY_CHAT_TEMPLATE, config=CausalLMConfig(max_new_tokens=12))
    folder = tmp_path / "tiny"
    policy.save(folder)
    with transformers_serve(folder, tmp_path / "serve.log", timeout=45, env={"OMP_NUM_THREADS": "1"}) as base_url:
        # It answers one choice per request and seeds the whole process: one request at a time.
        s = OpenAISampler(policy, OpenAISamplerConfig(base_url=base_url, model=str(folder), choices_per_request=1, max_concurrency=1))
        samples = s.sample(PROMPTS, 3, seed=2)
        again = s.sample(PROMPTS, 3, seed=2)
        # Greedy on both sides: the server must see the prompt exactly as the local policy renders it.
        local_greedy = CausalLMPolicy(policy.model, policy.tokenizer, CausalLMConfig(max_new_tokens=12, temperature=0.0))
        served_greedy = OpenAISampler(local_greedy, s.config).sample(PROMPTS, 1, seed=0)
    assert [len(row) for row in samples] == [3, 3]
    assert all(x.finish_reason in ("stop", "length") and x.n_tokens <= 12 + 1 for row in samples for x in row)
    assert again == samples  # the server follows the per-request seeds
    assert all(len({x.text for x in row}) > 1 for row in samples)  # and samples (do_sample in the tiny model's generation config)
    check_scored_locally(s, PROMPTS, samples)
    assert [row[0].text for row in served_greedy] == [row[0].text for row in local_greedy.sample(PROMPTS, 1, seed=0)]
