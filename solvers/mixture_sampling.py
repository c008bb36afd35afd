"""The token loop that samples responses: from one model, or from a token-level geometric mixture.

Nash-MD (Munos et al., arXiv 2312.00886, §7) samples the opponent y' from the geometric mixture of the
policy π_θ and the reference μ, normalized per token:

    π_m(y_t | x, y_<t) ∝ π_θ(y_t | x, y_<t)^{1−m} · μ(y_t | x, y_<t)^m,
    i.e. logits_mix = (1−m)·log_softmax(logits_θ) + m·log_softmax(logits_μ).

Plain sampling is the same loop with one model and weight 1, so there is one loop to trust. Each model
keeps its own KV cache: the prompt goes through each model once, then one token per step (the popular
implementation re-ran both models over the whole prefix at every token). Rows with the same prompt (the k
samples of a prompt) share it: each distinct prompt is read once and its cache rows copied. Each model
runs its own forward with a transformers DynamicCache.

Randomness comes from uniforms the caller draws per row (inverse-CDF sampling): a row's tokens then
depend only on its own uniforms and its own logits, not on which other rows share the batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Decoded:
    """What the loop produced for each row (row order as given)."""

    tokens: list[list[int]]  # response tokens, ending with the stop token when the row stopped
    stopped: list[bool]  # True: hit a stop token; False: ran out of new tokens
    logp: torch.Tensor  # (rows,) float64: log π(y|x) under the FIRST model, untempered (Σ over tokens)
    logq: torch.Tensor  # (rows,) float64: log-prob of y under the distribution actually sampled from


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (rows, longest): sequences aligned on the right,
    so that every row's next token goes in the same column. Positions count real tokens only, so a
    sequence gets the same positions whatever padding its batch needs."""
    width = max(len(s) for s in sequences)
    # whole rows built in Python, one tensor each: a tensor per row costs more than the lists
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def ready_mask(keep: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, queries, width) additive mask for the last ``queries`` positions of left-padded rows
    whose real tokens are ``keep`` (rows, width) bool: causal over real tokens. A pad position attends
    to itself only, so that no row of the softmax is empty (an empty one gives NaN in its cache)."""
    width = keep.shape[1]
    q = torch.arange(width - queries, width, device=keep.device).unsqueeze(-1)
    k = torch.arange(width, device=keep.device)
    allowed = ((k <= q) & keep[:, None, :]) | (k == q)
    return additive(allowed, dtype).unsqueeze(1)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's most negative number elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def distinct_rows(prompt_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(the first row of each distinct prompt, for each row the number of its prompt among those)."""
    number: dict[tuple, int] = {}
    firsts, share = [], []
    for row, p in enumerate(prompt_ids):
        if (key := tuple(p)) not in number:
            number[key] = len(firsts)
            firsts.append(row)
        share.append(number[key])
    return firsts, share


def takes_ready_mask(model) -> bool:
    """Whether the model can be handed a ready 4D additive mask, used as-is by every layer: SDPA or
    eager attention and no layer with a window or chunks of its own. transformers expands a 2D padding
    mask again at every generated token: about a third of a tiny model's per-token time on a CPU."""
    config = model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache``.
    A LoRA model (peft) passes it on to its base model's forward, whose signature says which."""
    base = model.get_base_model() if hasattr(type(model), "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def choose_tokens(scores: torch.Tensor, u: torch.Tensor, *, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by inverse CDF: the first token whose cumulative probability exceeds u.

    scores: (rows, vocab) log-weights (need not be normalized); u: (rows,) uniforms in [0, 1).
    Returns (tokens (rows,), log-probability of each chosen token under the tempered, nucleus-truncated
    distribution (rows,), float64). temperature 0 means greedy (log-probability 0).
    """
    if temperature == 0:
        return scores.argmax(-1), torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    logq = torch.log_softmax(scores.double() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus (Holtzman et al., arXiv 1904.09751): keep the smallest set of most likely tokens whose
        # mass reaches top_p; the most likely token is always kept.
        logq, order = logq.sort(dim=-1, descending=True)
        mass_before = logq.exp().cumsum(-1) - logq.exp()
        logq = logq.masked_fill(mass_before >= top_p, float("-inf"))
        logq = logq - logq.logsumexp(-1, keepdim=True)
    cdf = logq.exp().cumsum(-1)
    index = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
    chosen_logq = logq.gather(-1, index).squeeze(-1)
    tokens = order.gather(-1, index).squeeze(-1) if top_p < 1.0 else index.squeeze(-1)
    return tokens, chosen_logq


@torch.inference_mode()
def decode(
    models: list,
    weights: list[float],
    prompt_ids: list[list[int]],
    uniforms: torch.Tensor,
    *,
    stop_ids: set[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Decoded:
    """Sample one response per prompt row from softmax(Σ_i weights[i]·log_softmax(logits_i)), tempered
    and nucleus-truncated, with one KV cache per model.

    ``uniforms`` is (rows, max_new_tokens): row r's t-th token uses uniforms[r, t]; its width is the
    number of new tokens. All models must share one vocabulary and sit on one device.
    """
    if len(models) != len(weights) or not models:
        raise ValueError(f"decode: {len(models)} models but {len(weights)} weights")
    rows, max_new_tokens = uniforms.shape
    if rows != len(prompt_ids) or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("decode: need one non-empty prompt per row of uniforms")
    device = next(models[0].parameters()).device
    ids, mask, positions = left_pad(prompt_ids, pad_id, device)
    keep = torch.cat([mask.bool(), torch.ones((rows, max_new_tokens), dtype=torch.bool, device=device)], dim=-1)
    steppers = [_Steps(m, keep, positions) for m in models]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    logp = torch.zeros(rows, dtype=torch.float64, device=device)
    logq = torch.zeros(rows, dtype=torch.float64, device=device)
    generated = []
    uniforms = uniforms.to(device)
    # t = 0 reads each distinct prompt once (rows ``distinct``); ``share`` then copies its cache rows to every row with that prompt
    distinct, share = (torch.tensor(x, device=device) for x in distinct_rows(prompt_ids))
    for t in range(max_new_tokens):
        # Each model sees only the tokens it has not seen yet: the prompts at t = 0, then one token per row.
        logits = [s.prompts(ids[distinct], distinct, share) if t == 0 else s.token(ids, t) for s in steppers]
        step = [torch.log_softmax(x.float(), dim=-1) for x in logits]
        if len({s.shape[-1] for s in step}) > 1:
            raise ValueError(f"decode: the models' vocabularies differ ({[s.shape[-1] for s in step]})")
        scores = step[0] if len(step) == 1 and weights[0] == 1.0 else sum(w * s for w, s in zip(weights, step))
        token, token_logq = choose_tokens(scores, uniforms[:, t], temperature=temperature, top_p=top_p)
        token = token.masked_fill(done, pad_id)
        logp += step[0].gather(-1, token.unsqueeze(-1)).squeeze(-1).double().masked_fill_(done, 0.0)
        logq += token_logq.masked_fill(done, 0.0)
        generated.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
        ids = token.unsqueeze(-1)

    table = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(rows)]
    tokens, stopped = [], []
    for row in table:
        end = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        tokens.append(row if end is None else row[: end + 1])
        stopped.append(end is not None)
    return Decoded(tokens=tokens, stopped=stopped, logp=logp.cpu(), logq=logq.cpu())


class _Steps:
    """One model's logits through its own forward and a transformers DynamicCache.

    ``keep`` (rows, prompt width + new tokens) bool marks real tokens; ``positions`` (rows, prompt width)
    are the prompt tokens' positions."""

    def __init__(self, model, keep: torch.Tensor, positions: torch.Tensor):
        self.model, self.keep, self.positions, self.width = model, keep, positions, positions.shape[1]
        self.cache = DynamicCache(config=model.config)
        self.cache_name = cache_kwarg(model)
        self.dtype = next(model.parameters()).dtype if takes_ready_mask(model) else None
        self.step_mask = keep.long() if self.dtype is None else additive(keep, self.dtype)

    def prompts(self, ids, distinct, share) -> torch.Tensor:
        """Logits (rows, vocab) after the prompts: ``ids`` are the distinct prompts (rows ``distinct``),
        row r's is ``share[r]``."""
        seen = self.keep[distinct, : self.width]
        mask = seen.long() if self.dtype is None else ready_mask(seen, self.width, self.dtype)
        logits = self._forward(ids, mask, self.positions[distinct])
        self.cache.reorder_cache(share)
        return logits[share]

    def token(self, ids, t: int) -> torch.Tensor:
        """Logits (rows, vocab) after new token t − 1 of every row (``ids`` (rows, 1))."""
        seen = self.width + t
        mask = self.step_mask[:, :seen] if self.dtype is None else self.step_mask[:, None, None, :seen]
        return self._forward(ids, mask, self.positions[:, -1:] + t)

    def _forward(self, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache})
        return out.logits[:, -1]
