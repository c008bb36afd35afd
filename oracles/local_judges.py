"""Pretrained preference models run in this process as oracles: a reward model, a causal LM read as a
pairwise judge, a pairwise cross-encoder.

    RewardModelOracle(reward_model, scores=StoredScores(store, …))   P(a ≻ b) = σ((r_a − r_b) / T)
    PairwiseLMOracle(pairwise_lm)                                     the verdict tokens' probabilities
    PairwiseClassifierOracle(classifier)                              σ(logit(a ≻ b))

The models (solvers/judge_models.py, solvers/pairwise_lm.py) are duck-typed, as in oracles/learned.py,
so oracles/ never imports solvers/; each has a ``fingerprint`` (a content hash of its checkpoint) that
goes into ``oracle_id``, so two checkpoints' judgments never mix.

- **Both orders** for the two pairwise kinds: P(a ≻ b) = (P(first | a, b) + 1 − P(first | b, a)) / 2,
  which cancels a position bias (Zheng et al. 2023, arXiv:2306.05685, §3.4) and makes
  P(a ≻ b) + P(b ≻ a) = 1. Both orders go into one call of the model (one batch), and each is kept in
  ``detail["orders"]`` as the LLM judge keeps them, so the cascade's ``OrdersAgree`` reads them alike.
- **The reward model** is transitive by construction (a Bradley–Terry model, arXiv:2203.02155 eq. 1):
  the baseline users know, which cannot represent A ≻ B ≻ C ≻ A. It scores each response once per
  checkpoint: ``scores`` (any object with ``lookup(ids) -> {id: r}`` and ``save({id: r})``, e.g.
  data/scores.py's ``StoredScores``) is read first and only missing responses run forward.
- The pairwise LM reads the LLM judge's template (oracles/judge_template.py) through the model's chat
  template. Its fence tag is drawn from the prompt, not at random, so the answer is deterministic and
  every pair of a prompt starts with the same tokens (the model encodes that prefix once).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from data.keys import stable_hash
from oracles.judge_template import JudgeTemplate, load_template
from oracles.protocol import Judgment, Pair, make_oracle_id

REWARD_MODEL, PAIRWISE_LM, PAIRWISE_CLASSIFIER = "reward_model", "pairwise_lm", "pairwise_classifier"


class ScoreCache(Protocol):
    def lookup(self, response_ids: list[str]) -> dict[str, float]: ...

    def save(self, scores: dict[str, float]) -> None: ...


class MemoryScores:
    """A ``ScoreCache`` in memory (a notebook, a benchmark): the process remembers, the store does not."""

    def __init__(self):
        self.scores: dict[str, float] = {}

    def lookup(self, response_ids: list[str]) -> dict[str, float]:
        return {i: self.scores[i] for i in response_ids if i in self.scores}

    def save(self, scores: dict[str, float]) -> None:
        self.scores.update(scores)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _checked(pair: Pair, p: float, latency: float, detail: dict) -> Judgment:
    """A judgment, or an abstention with its reason when the model's number is not a probability."""
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        return Judgment(pair, None, n_votes=0, latency_s=latency, error=f"abstained: {detail.pop('why', None) or f'the model gave {p!r}'}", detail=detail)
    return Judgment(pair, p, latency_s=latency, detail=detail)


def _counters(model) -> dict:
    return model.counters.as_dict() if hasattr(model, "counters") else {}


def _local_metrics(kind: str, model, since: dict, judgments: list[Judgment]) -> dict:
    """<kind>/pairs, /abstained, /mean_margin; and what the model did since ``since`` (its counters when
    the oracle was built; a process keeps one model for many oracles): /forwards, /tokens, /seconds, so
    ``judge_pairs``' summary shows a local judge's cost in time, not dollars."""
    answered = [j.p_a for j in judgments if j.p_a is not None]
    return {
        f"{kind}/pairs": len(judgments),
        f"{kind}/abstained": len(judgments) - len(answered),
        f"{kind}/mean_margin": sum(abs(p - 0.5) for p in answered) / len(answered) if answered else None,
        **{f"{kind}/{k}": v - since.get(k, 0) for k, v in _counters(model).items() if k in ("forwards", "tokens", "seconds")},
    }


class RewardModelOracle:
    """P(a ≻ b) = σ((r_a − r_b) / temperature), each response scored once (see the module docstring)."""

    def __init__(self, model, *, scores: ScoreCache | None = None, temperature: float = 1.0, name: str = "reward"):
        if not temperature > 0:
            raise ValueError(f"reward_model: temperature must be > 0, got {temperature}")
        self.model, self.temperature = model, temperature
        self.scores = scores if scores is not None else MemoryScores()
        self._since = _counters(model)
        self.oracle_id = local_judge_id(REWARD_MODEL, model.fingerprint, {"temperature": temperature}, name=name)

    def __repr__(self) -> str:
        return f"RewardModelOracle({self.oracle_id!r})"

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        if not pairs:
            return []
        started = time.perf_counter()
        texts = {}
        for p in pairs:
            texts.setdefault(p.a_id, (p.prompt, p.a))
            texts.setdefault(p.b_id, (p.prompt, p.b))
        r = self.scores.lookup(list(texts))
        missing = [i for i in texts if i not in r]
        if missing:
            new = dict(zip(missing, (float(x) for x in self.model.score([texts[i][0] for i in missing], [texts[i][1] for i in missing]))))
            self.scores.save({i: x for i, x in new.items() if math.isfinite(x)})
            r |= new
        latency = (time.perf_counter() - started) / len(pairs)
        out = []
        for p in pairs:
            ra, rb = r[p.a_id], r[p.b_id]
            if math.isfinite(ra - rb):
                out.append(_checked(p, _sigmoid((ra - rb) / self.temperature), latency, {"r_a": ra, "r_b": rb}))
            else:
                out.append(_checked(p, math.nan, latency, {"why": f"a reward is not finite ({ra!r}, {rb!r})"}))
        return out

    def metrics(self, judgments: list[Judgment]) -> dict:
        return _local_metrics(REWARD_MODEL, self.model, self._since, judgments)


class BothOrdersOracle:
    """A model that reads both responses: ``p_first(prompts, firsts, seconds)`` gives, per triple,
    P(first ≻ second) (NaN: it could not answer) and what else to keep of that order's answer; every
    pair is asked in both orders in one call."""

    def __init__(self, kind: str, model, p_first: Callable[[list[str], list[str], list[str]], list[tuple[float, dict]]], settings: dict, name: str):
        self.kind, self.model, self._p_first = kind, model, p_first
        self._since = _counters(model)
        self.oracle_id = local_judge_id(kind, model.fingerprint, settings, name=name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.oracle_id!r})"

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        if not pairs:
            return []
        started = time.perf_counter()
        n = len(pairs)
        p = self._p_first([q.prompt for q in pairs] * 2, [q.a for q in pairs] + [q.b for q in pairs], [q.b for q in pairs] + [q.a for q in pairs])
        latency = (time.perf_counter() - started) / n
        out = []
        for k, q in enumerate(pairs):
            (ab, ab_more), (ba, ba_more) = p[k], p[n + k]
            detail = {"orders": [{"order": o, "p_first": x if math.isfinite(x) else None, **more} for o, x, more in (("ab", ab, ab_more), ("ba", ba, ba_more))]}
            if not (math.isfinite(ab) and math.isfinite(ba)):  # one order alone would carry the position bias back in
                detail["why"] = "the model gave no probability for an order (a sequence longer than its context?)"
            out.append(_checked(q, (ab + 1.0 - ba) / 2.0, latency, detail))
        return out

    def metrics(self, judgments: list[Judgment]) -> dict:
        """``_local_metrics``, and <kind>/first_slot_p: the mean P(first ≻ second) over both orders
        (0.5 for a judge with no position bias; both orders cancel it in P(a ≻ b) either way)."""
        orders = [o["p_first"] for j in judgments for o in j.detail.get("orders", []) if o["p_first"] is not None]
        return {**_local_metrics(self.kind, self.model, self._since, judgments), f"{self.kind}/first_slot_p": sum(orders) / len(orders) if orders else None}


def local_judge_id(kind: str, fingerprint: str, settings: dict, *, name: str) -> str:
    """``<kind>:<name>@<fingerprint[:12]>:<hash>``: the checkpoint readable in the store, and the hash of
    it and of the settings that change answers (``settings``)."""
    return make_oracle_id(kind, f"{name}@{fingerprint[:12]}", {"fingerprint": fingerprint, **settings})


class PairwiseLMOracle(BothOrdersOracle):
    """A causal LM asked the LLM judge's question; P(first) from its verdict tokens' probabilities."""

    def __init__(self, model, *, template: JudgeTemplate | None = None, name: str = "judge"):
        self.template = template or load_template()
        super().__init__(PAIRWISE_LM, model, self._p_first_lm, pairwise_lm_settings(self.template, model.verdicts), name)

    def _p_first_lm(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[tuple[float, dict]]:
        """p₁ / (p₁ + p₂) of the verdict tokens, renormalized over the two as the LLM judge reads top
        log-probs; ``p_verdicts`` keeps (p₁, p₂) under the whole vocabulary: a small sum means the model
        would not answer with a verdict at all (greedy decoding would write something else)."""
        tags = {p: prompt_tag(p) for p in prompts}
        conversations = [self.template.messages(p, a, b, tag=_tag_absent(tags[p], p, a, b)) for p, a, b in zip(prompts, firsts, seconds)]
        probs = self.model.verdict_probs(conversations, groups=prompts)
        return [(p1 / (p1 + p2), {"p_verdicts": [p1, p2]} if math.isfinite(p1 + p2) else {}) for p1, p2 in probs.tolist()]


def pairwise_lm_settings(template: JudgeTemplate, verdicts: tuple[str, str]) -> dict:
    return {"template": template.digest, "verdicts": list(verdicts)}


class PairwiseClassifierOracle(BothOrdersOracle):
    """A cross-encoder's logit for "first ≻ second": P(first) = σ(logit)."""

    def __init__(self, model, *, name: str = "classifier"):
        super().__init__(PAIRWISE_CLASSIFIER, model, self._p_first_logit, {"template": model.template.template}, name)

    def _p_first_logit(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[tuple[float, dict]]:
        return [(_sigmoid(x), {"logit": x}) if math.isfinite(x) else (math.nan, {}) for x in self.model.logits(prompts, firsts, seconds)]


def prompt_tag(prompt: str) -> str:
    """The fence tag of a prompt's judge conversations: fixed per prompt (see the module docstring)."""
    return stable_hash("judge-tag", prompt, length=8)


def _tag_absent(tag: str, *texts: str) -> str:
    """``tag``, or a tag derived from it that none of ``texts`` contains (a response cannot close its fence)."""
    while any(tag in t for t in texts):
        tag = stable_hash("judge-tag", tag, length=8)
    return tag
