"""A causal LM as a local pairwise judge: the probabilities of the two verdict tokens ("A", "B") as the
next token after a judge conversation that holds both responses.

    lm = PairwiseLM.load("smollm2")                       # a folder, a .gguf file or a packaged model
    probs = lm.verdict_probs(conversations, groups)       # (n, 2): p(first verdict), p(second verdict)

The caller (``oracles/local_judges.py``) renders the conversations (the LLM judge's template) and asks
both orders of each pair in the same call; P(first ≻ second) = p₁ / (p₁ + p₂), the verdict tokens'
probabilities renormalized over the two, as the LLM judge reads a server's top log-probs.

Speed (``bench/local_judge.py``): sequences are batched by length and both orders of many pairs go in
one forward; only the last position's logits are computed; a sequence asked twice (the pairs (a, b)
and (b, a) of the ``both_orders`` pairing hold the same two conversations) is read once. Conversations of one ``group`` (the pairs
of one prompt) start with the same tokens — the template's head, the prompt — so that common prefix is
encoded once per group and its keys and values (transformers' own cache) copied to every sequence of
the group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable

import torch

from solvers.causal_lm import context_length, load_model
from solvers.judge_models import DEFAULT_MAX_BATCH_TOKENS, Counters, fingerprint, length_batches
from solvers.mixture_sampling import cache_kwarg, left_pad


class PairwiseLM:
    """A causal LM and its tokenizer, read as a judge (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        fingerprint: str,
        verdicts: tuple[str, str] = ("A", "B"),
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        share_prefix: bool = True,
    ):
        self.model, self.tokenizer, self.fingerprint = model.eval(), tokenizer, fingerprint
        self.verdicts = tuple(verdicts)
        self.verdict_ids = [self._single_token(v) for v in verdicts]
        self.max_batch_tokens = max_batch_tokens
        self.share_prefix = share_prefix
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.context = context_length(model, tokenizer)
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self.counters = Counters()

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: str = "auto", **kwargs) -> PairwiseLM:
        model, tokenizer = load_model(source, device=device, dtype="auto")  # bf16 on CUDA, fp32 on a CPU
        return cls(model, tokenizer, fingerprint=fingerprint(str(source)), **kwargs)

    def _single_token(self, verdict: str) -> int:
        ids = self.tokenizer(verdict, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"verdict {verdict!r} is {len(ids)} tokens for this tokenizer; a verdict must be one token (e.g. 'A' and 'B')")
        return ids[0]

    def encode(self, conversation: list[dict]) -> list[int]:
        """The conversation's tokens up to where the judge's answer starts."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in conversation) + "\n"
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.inference_mode()
    def verdict_probs(self, conversations: list[list[dict]], groups: list[Hashable] | None = None) -> torch.Tensor:
        """(n, 2) float32: the probabilities of the two verdict tokens as the next token of each
        conversation; NaN for one longer than the model's context. ``groups``: conversations likely to
        start alike (the pairs of one prompt); None: all in one group."""
        started = time.perf_counter()
        groups = [0] * len(conversations) if groups is None else list(groups)
        # a pair asked in both orders by the pairing stage (both_orders) repeats the other pair's sequences
        unique: dict[tuple, int] = {}
        where = [unique.setdefault((g, tuple(self.encode(c))), len(unique)) for c, g in zip(conversations, groups)]
        ids, groups = [list(x) for _, x in unique], [g for g, _ in unique]
        out = torch.full((len(ids), 2), float("nan"))
        fits = [i for i, x in enumerate(ids) if self.context is None or len(x) <= self.context]
        for batch in length_batches([len(ids[i]) for i in fits], self.max_batch_tokens):
            rows = [fits[k] for k in batch]
            if self.share_prefix:
                logits = self._shared_prefix_logits([ids[i] for i in rows], [groups[i] for i in rows])
            else:
                logits = self._whole_logits([ids[i] for i in rows])
            out[rows] = torch.softmax(logits.float(), dim=-1)[:, self.verdict_ids].cpu()
            self.counters.forwards += 1
        self.counters.sequences += len(ids)
        self.counters.seconds += time.perf_counter() - started
        return out[where]

    def _whole_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """(rows, vocab): the next-token logits after each whole sequence, in one forward."""
        input_ids, attention_mask, positions = left_pad(seqs, self.pad_id, self.device)
        self.counters.tokens += sum(map(len, seqs))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]

    def _shared_prefix_logits(self, seqs: list[list[int]], groups: list[Hashable]) -> torch.Tensor:
        """As ``_whole_logits``, but each group's common prefix is read once: a forward over the distinct
        prefixes fills a key-value cache, whose rows are then repeated for every sequence of their group,
        and a forward over the rest of each sequence reads them. Both parts are left-padded, so a row's
        tokens are [pads, prefix, pads, rest]; the mask skips the pads and positions count real tokens only."""
        names = list(dict.fromkeys(groups))
        members = {g: [i for i, h in enumerate(groups) if h == g] for g in names}
        # the longest prefix common to a group, leaving every sequence at least its last token to read
        cut = {g: _common_prefix([seqs[i] for i in members[g]], limit=min(len(seqs[i]) for i in members[g]) - 1) for g in names}
        prefixes = [seqs[members[g][0]][: cut[g]] or [self.pad_id] for g in names]  # one masked pad reads as nothing
        share = torch.tensor([names.index(g) for g in groups], device=self.device)
        p_ids, p_keep, p_positions = left_pad(prefixes, self.pad_id, self.device)
        p_keep = p_keep * torch.tensor([cut[g] > 0 for g in names], device=self.device)[:, None]
        name = cache_kwarg(self.model)
        cache = self.model(input_ids=p_ids, attention_mask=p_keep, position_ids=p_positions, use_cache=True, logits_to_keep=1)[name]
        cache.batch_select_indices(share)  # a group's prefix rows, once per sequence of the group
        r_ids, r_keep, _ = left_pad([s[cut[g] :] for s, g in zip(seqs, groups)], self.pad_id, self.device)
        keep = torch.cat([p_keep[share], r_keep], dim=1)
        positions = (keep.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1] :]
        self.counters.tokens += sum(cut.values()) + sum(len(s) - cut[g] for s, g in zip(seqs, groups))
        return self.model(input_ids=r_ids, attention_mask=keep, position_ids=positions, use_cache=True, logits_to_keep=1, **{name: cache}).logits[:, -1]


def _common_prefix(seqs: list[list[int]], *, limit: int) -> int:
    """The length of the longest prefix all ``seqs`` share, at most ``limit``."""
    n = 0
    first = seqs[0]
    while n < limit and all(s[n] == first[n] for s in seqs[1:]):
        n += 1
    return n
