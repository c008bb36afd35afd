"""Sampling from an OpenAI-compatible server (vLLM in production, `transformers serve` in tests),
scoring locally.

The server writes the k responses; the local causal-LM policy (the same checkpoint the server runs)
computes log π(y|x) of each text, so the store gets the same log-probs as with local sampling (servers
report token log-probs under their own sampling settings, or not at all). The sampling settings
(temperature, top_p, max_new_tokens) are the local policy's, so both sides agree on what π is.

Servers differ in what they honour: vLLM returns n choices for n > 1 and follows a per-request seed;
`transformers serve` (5.x) returns one choice whatever n is and samples only if the model's generation
config says ``do_sample``. So each request asks for what is still missing and the loop tops up, and
every request carries its own seed derived from (seed, prompt, slot): reproducible where the server
follows seeds (and serves requests one at a time, or per-request generators like vLLM).

Each sample keeps token ids, as local samples do: the server's when it sends them (vLLM's
``return_tokens_as_token_ids`` with log-probs), else the text tokenized locally (plus the end-of-sequence
token when it stopped), which is what the local scoring is of. With ``trust_server_logprobs`` the
sample's log-prob is the sum of the server's per-token log-probs instead of a local forward pass; they
must be of the untempered π (vLLM: ``--logprobs-mode raw_logprobs``), and a server that sends none is
refused rather than scored behind the user's back.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data.keys import stable_hash
from solvers.causal_lm import CausalLMPolicy, PromptTooLongError
from solvers.policy import Sample


class SamplerError(RuntimeError):
    """The server failed or answered nonsense; the message names the prompt and the server.
    ``status_code``: the server's HTTP status when it answered with an error (what a retry policy reads)."""

    def __init__(self, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class ServerUnreachable(SamplerError, ConnectionError):
    """No answer at all: the server is down, died mid-request, or timed out (worth another try later)."""


@dataclass(frozen=True)
class OpenAISamplerConfig:
    """Where the server is and how hard to push it (sampling settings come from the local policy)."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the model name the server knows (vLLM: --served-model-name; transformers serve: the folder)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable at run time, never stored
    endpoint: str = "auto"  # "chat", "completions", or "auto": chat when the tokenizer has a chat template
    choices_per_request: int | None = None  # None: ask for all k at once (vLLM); 1 for servers that ignore n
    max_concurrency: int = 16  # requests in flight (one HTTP client collapses above ~32 here)
    timeout_s: float = 120.0
    max_retries: int = 2
    trust_server_logprobs: bool = False  # logp = Σ of the server's per-token log-probs, not a local forward pass

    def __post_init__(self):
        if self.endpoint not in ("auto", "chat", "completions"):
            raise ValueError(f"endpoint must be 'auto', 'chat' or 'completions', got {self.endpoint!r}")
        if self.choices_per_request is not None and self.choices_per_request < 1:
            raise ValueError("choices_per_request must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


class OpenAISampler:
    """The Policy protocol with sampling done by a server and scoring by ``scorer`` (local)."""

    def __init__(self, scorer: CausalLMPolicy, config: OpenAISamplerConfig, *, api_key: str | None = None, client=None):
        """``api_key``: the key itself (resolved by the caller, kept only by the client); None reads
        ``config.api_key_env``."""
        from openai import OpenAI  # imported here: the rest of solvers/ works without the openai package

        self.scorer, self.config = scorer, config
        self.endpoint = config.endpoint if config.endpoint != "auto" else ("chat" if scorer.chat else "completions")
        self.client = client or OpenAI(
            base_url=config.base_url,
            api_key=api_key or os.environ.get(config.api_key_env) or "EMPTY",
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        """k responses per prompt from the server, each with its token ids and log-prob (local, or the server's when trusted)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        # The server cannot cut a chat prompt the way the local policy would: refuse what does not fit.
        room = self.scorer.prompt_room
        for i, ids in enumerate(self.scorer.encode_prompts(prompts, fit=False)):
            if room is not None and len(ids) > room:
                raise PromptTooLongError(f"prompt {i} has {len(ids)} tokens, but the context of {self.scorer.context} leaves room for {room}")
        step = self.config.choices_per_request or k
        units = [(i, start, min(step, k - start)) for i in range(len(prompts)) for start in range(0, k, step)]
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            answers = list(pool.map(lambda u: self._request(prompts[u[0]], u[0], u[1], u[2], seed), units))
        replies: list[list[_Reply]] = [[] for _ in prompts]
        for (i, _, _), got in zip(units, answers):
            replies[i].extend(got)
        flat = [(i, r) for i, row in enumerate(replies) for r in row]
        finished = [r.finish_reason == "stop" for _, r in flat]
        local_ids = self.scorer.encode_responses([r.text for _, r in flat], finished)
        tokens = [r.token_ids if r.token_ids is not None else tuple(ids) for (_, r), ids in zip(flat, local_ids)]
        if self.config.trust_server_logprobs:
            logps = [r.logp for _, r in flat]
        else:
            logps = self.scorer.score([prompts[i] for i, _ in flat], [r.text for _, r in flat], finished=finished, tokens=list(tokens))
        out: list[list[Sample]] = [[] for _ in prompts]
        for (i, r), logp, ids in zip(flat, logps, tokens):
            out[i].append(Sample(text=r.text, n_tokens=len(ids), finish_reason=r.finish_reason, logp=logp, token_ids=ids))
        return out

    def score(self, prompts: list[str], responses: list[str], *, finished: list[bool] | None = None, tokens: list | None = None) -> list[float]:
        return self.scorer.score(prompts, responses, finished=finished, tokens=tokens)

    def save(self, path: str, *, overwrite: bool = False) -> None:
        """Saves the local policy; the server must then be pointed at the new folder."""
        self.scorer.save(path, overwrite=overwrite)

    def _request(self, prompt: str, index: int, start: int, n: int, seed: int) -> list[_Reply]:
        """n replies for one prompt, topping up when the server returns fewer choices."""
        got: list[_Reply] = []
        where = f"prompt {index}: {self.config.base_url} ({self.endpoint})"
        while len(got) < n:
            request_seed = int(stable_hash(seed, prompt, start + len(got), length=4), 16) & 0x7FFFFFFF
            common = dict(
                model=self.config.model,
                n=n - len(got),
                max_tokens=self.scorer.config.max_new_tokens,
                temperature=self.scorer.config.temperature,
                top_p=self.scorer.config.top_p,
                seed=request_seed,
            )
            if self.config.trust_server_logprobs:  # vLLM then names each token by its id: what training needs
                common["extra_body"] = {"return_tokens_as_token_ids": True}
            try:
                if self.endpoint == "chat":
                    if self.config.trust_server_logprobs:
                        common["logprobs"] = True
                    reply = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
                    choices = [_Reply(c.message.content or "", c.finish_reason, *_chat_logprobs(c.logprobs)) for c in reply.choices]
                else:
                    if self.config.trust_server_logprobs:
                        common["logprobs"] = 1
                    reply = self.client.completions.create(prompt=self.scorer.render(prompt), **common)
                    choices = [_Reply(c.text or "", c.finish_reason, *_completion_logprobs(c.logprobs)) for c in reply.choices]
            except Exception as e:  # openai.APIError and its kin, or a reply that is not one
                raise _failure(where, e) from e
            if not choices:
                raise SamplerError(f"{where} returned no choices")
            if self.config.trust_server_logprobs and any(c.logp is None for c in choices):
                raise SamplerError(f"{where} returned no per-token log-probs, which trust_server_logprobs needs; set it to false to score the responses locally")
            got.extend(choices[: n - len(got)])
        return got


@dataclass(frozen=True)
class _Reply:
    """One choice as the server gave it: finish_reason "stop" or "length"; logp and token ids when it sent them."""

    text: str
    finish_reason: str
    logp: float | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "finish_reason", "length" if self.finish_reason == "length" else "stop")


def _chat_logprobs(logprobs) -> tuple[float | None, tuple[int, ...] | None]:
    content = getattr(logprobs, "content", None)
    if not content:
        return None, None
    return sum(t.logprob for t in content), _token_ids([t.token for t in content])


def _completion_logprobs(logprobs) -> tuple[float | None, tuple[int, ...] | None]:
    values = getattr(logprobs, "token_logprobs", None)
    if not values or any(v is None for v in values):
        return None, None
    return sum(values), _token_ids(logprobs.tokens or [])


def _token_ids(tokens: list[str]) -> tuple[int, ...] | None:
    """vLLM's ``token_id:<N>`` names (``return_tokens_as_token_ids``) as ids; None for plain token strings."""
    if not tokens or not all(t.startswith("token_id:") for t in tokens):
        return None
    return tuple(int(t.removeprefix("token_id:")) for t in tokens)


def _failure(where: str, e: Exception) -> SamplerError:
    """The client's error as a SamplerError naming the prompt and server: ServerUnreachable when no answer came."""
    import openai

    message = f"{where} failed: {type(e).__name__}: {e}"
    if isinstance(e, openai.APIConnectionError):  # APITimeoutError too
        return ServerUnreachable(message)
    return SamplerError(message, status_code=getattr(e, "status_code", None))
