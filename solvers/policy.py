"""The policy protocol: what the pipelines need from a tabular policy and a causal-LM policy alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Sample:
    """One sampled response. ``logp`` is log π(y|x) summed over response tokens when the sampler
    computed it on the way (saves a forward pass), else None. ``token_ids``: the response's tokens as
    the policy sampled them (EOS included when it stopped), when the sampler knows them; its log-probs
    are of these tokens, which the text need not encode back to."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max new tokens)
    logp: float | None = None
    token_ids: tuple[int, ...] | None = None


@runtime_checkable
class Policy(Protocol):
    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        """k responses for each prompt, reproducible for a given seed."""
        ...

    def score(self, prompts: list[str], responses: list[str], *, finished: list[bool] | None = None, tokens: list | None = None) -> list[float]:
        """log π(response | prompt), summed over response tokens, for aligned lists. ``finished[i]``
        False means response i was cut at the length limit (its end-of-sequence token is not scored).
        ``tokens[i]`` (optional, per response or None): the sampled tokens to score instead of the text."""
        ...

    def save(self, path: str) -> None:
        """Write this version to a local folder (complete when this returns)."""
        ...
