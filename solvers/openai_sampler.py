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
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data.keys import stable_hash
from solvers.causal_lm import CausalLMPolicy, PromptTooLongError
from solvers.policy import Sample


class SamplerError(RuntimeError):
    """The server failed or answered nonsense; the message names the prompt and the server."""


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

    def __post_init__(self):
        if self.endpoint not in ("auto", "chat", "completions"):
            raise ValueError(f"endpoint must be 'auto', 'chat' or 'completions', got {self.endpoint!r}")
        if self.choices_per_request is not None and self.choices_per_request < 1:
            raise ValueError("choices_per_request must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


class OpenAISampler:
    """The Policy protocol with sampling done by a server and scoring by ``scorer`` (local)."""

    def __init__(self, scorer: CausalLMPolicy, config: OpenAISamplerConfig, *, client=None):
        from openai import OpenAI  # imported here: the rest of solvers/ works without the openai package

        self.scorer, self.config = scorer, config
        self.endpoint = config.endpoint if config.endpoint != "auto" else ("chat" if scorer.chat else "completions")
        self.client = client or OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env) or "EMPTY",
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        """k responses per prompt from the server, each with its local log-prob."""
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
        texts: list[list[tuple[str, str]]] = [[] for _ in prompts]
        for (i, _, _), got in zip(units, answers):
            texts[i].extend(got)
        flat = [(i, text, reason) for i, row in enumerate(texts) for text, reason in row]
        finished = [reason == "stop" for _, _, reason in flat]
        logps = self.scorer.score([prompts[i] for i, _, _ in flat], [t for _, t, _ in flat], finished=finished)
        lengths = [len(ids) for ids in self.scorer.encode_responses([t for _, t, _ in flat], finished)]
        out: list[list[Sample]] = [[] for _ in prompts]
        for (i, text, reason), logp, n in zip(flat, logps, lengths):
            out[i].append(Sample(text=text, n_tokens=n, finish_reason=reason, logp=logp))
        return out

    def score(self, prompts: list[str], responses: list[str], *, finished: list[bool] | None = None, tokens: list | None = None) -> list[float]:
        return self.scorer.score(prompts, responses, finished=finished, tokens=tokens)

    def save(self, path: str, *, overwrite: bool = False) -> None:
        """Saves the local policy; the server must then be pointed at the new folder."""
        self.scorer.save(path, overwrite=overwrite)

    def _request(self, prompt: str, index: int, start: int, n: int, seed: int) -> list[tuple[str, str]]:
        """n (text, finish_reason) for one prompt, topping up when the server returns fewer choices."""
        got: list[tuple[str, str]] = []
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
            try:
                if self.endpoint == "chat":
                    reply = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
                    choices = [(c.message.content or "", c.finish_reason) for c in reply.choices]
                else:
                    reply = self.client.completions.create(prompt=self.scorer.render(prompt), **common)
                    choices = [(c.text or "", c.finish_reason) for c in reply.choices]
            except Exception as e:  # openai.APIError and its kin, or a reply that is not one
                raise SamplerError(f"prompt {index}: {self.config.base_url} ({self.endpoint}) failed: {type(e).__name__}: {e}") from e
            if not choices:
                raise SamplerError(f"prompt {index}: {self.config.base_url} ({self.endpoint}) returned no choices")
            got.extend((text, "length" if reason == "length" else "stop") for text, reason in choices[: n - len(got)])
        return got
