"""The stages of a round as plain functions over the store. Each first reads what the store already
holds and does only what is missing, so a crashed round resumes by running it again."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from data import Store, comparison_id, prompt_id, response_id
from data.diagnostics import intransitivity, judgment_counts
from data.keys import stable_hash
from oracles.protocol import Pair
from oracles.resume import unjudged
from pipelines.config import CampaignConfig
from pipelines.oracle_factory import campaign_oracle_ids, oracle_spec
from pipelines.versions import checkpoint_dir, has_checkpoint, load_policy, mixture_version, save_checkpoint, stored_update_metrics, version, with_update_metrics
from pipelines.world import World
from solvers import evaluation, tabular
from solvers.tabular_policy import Judged


def register_prompts(store: Store, world: World) -> int:
    return len(store.write("prompts", world.prompt_rows()))


PROMPTS_PER_WRITE = 256  # sample_responses stores each such chunk of prompts at once: a crash loses at most one


def sample_responses(store: Store, policy, prompts: list[str], *, round: int, policy_version: str, k: int, seed: int, mixture=None) -> dict:
    """k responses per prompt from ``policy``, written with their log-probs, ``PROMPTS_PER_WRITE``
    prompts at a time. Prompts that already have this version's responses in this round are not
    sampled again (sample j of a prompt depends only on the seed, the prompt and j, so a resumed
    stage draws what an uninterrupted one would have).

    ``mixture=(reference, m)``: Nash-MD's opponents instead, y' ~ π^{1−m} μ^m token by token, stored
    under ``mixture_version(policy_version)``; their log-probs are still log π(y'|x) of ``policy_version``."""
    label = mixture_version(policy_version) if mixture else policy_version
    todo = unsampled(store, prompts, round=round, label=label)
    seed = int(stable_hash(seed, round, policy_version, length=4), 16)
    sampled = 0
    for start in range(0, len(todo), PROMPTS_PER_WRITE):
        chunk = todo[start : start + PROMPTS_PER_WRITE]
        samples = policy.sample_mixture(mixture[0], chunk, k, m=mixture[1], seed=seed) if mixture else policy.sample(chunk, k, seed=seed)
        sampled += _store_samples(store, policy, chunk, samples, round=round, label=label, policy_version=policy_version)
    return {"sampled": sampled, "already_stored": (len(prompts) - len(todo)) * k}


def unsampled(store: Store, prompts: list[str], *, round: int, label: str) -> list[str]:
    """The prompts with no responses of ``label`` (a version, or its mixture's label) in ``round`` yet."""
    done = set(store.read("responses", rounds=[round], columns=["prompt_id", "policy_version"]).query("policy_version == @label")["prompt_id"])
    return [p for p in prompts if prompt_id(p) not in done]


def _store_samples(store: Store, policy, prompts: list[str], samples: list, *, round: int, label: str, policy_version: str) -> int:
    """Write the samples of ``prompts`` under ``label`` with their log-probs under ``policy_version``."""
    responses, logprobs = [], []
    for prompt, group in zip(prompts, samples):
        pid = prompt_id(prompt)
        for slot, s in enumerate(group):
            rid = response_id(pid, label, round, slot)
            tokens = None if s.token_ids is None else list(s.token_ids)
            responses.append(dict(response_id=rid, round=round, policy_version=label, prompt_id=pid, text=s.text, n_tokens=s.n_tokens, finish_reason=s.finish_reason, token_ids=tokens))
            if s.logp is not None:
                logprobs.append(dict(response_id=rid, policy_version=policy_version, round=round, logp=s.logp))
    scored = {lp["response_id"] for lp in logprobs}
    unscored = [r for r in responses if r["response_id"] not in scored]
    if unscored:  # the sampler could not give log π(y|x) on the way: score once, now
        by_id = {prompt_id(p): p for p in prompts}
        logps = policy.score(
            [by_id[r["prompt_id"]] for r in unscored], [r["text"] for r in unscored], finished=[r["finish_reason"] == "stop" for r in unscored], tokens=[r["token_ids"] for r in unscored]
        )
        logprobs += [dict(response_id=r["response_id"], policy_version=policy_version, round=round, logp=lp) for r, lp in zip(unscored, logps)]
    store.write("responses", responses)
    store.write("logprobs", logprobs)
    return len(responses)


def pair_responses(store: Store, *, round: int, policy_version: str, strategy: str, skip_identical: bool, seed: int) -> list[Pair]:
    """Ordered pairs among each training prompt's responses of one version and round. Deterministic
    (sorted by id, seeded), so recomputing them after a crash gives the same pairs and comparison keys."""
    resp, prompts = _train_responses(store, round, {policy_version})
    rng = np.random.default_rng(int(stable_hash(seed, round, policy_version, "pairs", length=4), 16))
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for pid, rid, text in zip(resp["prompt_id"].tolist(), resp["response_id"].tolist(), resp["text"].tolist()):
        by_prompt.setdefault(pid, []).append((rid, text))  # by response id within a prompt (resp is sorted)
    pairs = []
    for pid in sorted(by_prompt):
        rows = by_prompt[pid]
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                pairs += _ordered(rng, strategy, skip_identical, pid, prompts[pid], rows[i], rows[j])
    return pairs


def pair_with_mixture(store: Store, *, round: int, policy_version: str, strategy: str, skip_identical: bool, seed: int) -> list[Pair]:
    """Nash-MD's pairs: each training prompt's sample j of ``policy_version`` against its sample j of
    the mixture (``sample_responses(..., mixture=...)``), in a seeded random order (or both orders), so
    a judge's position bias does not leak into P̂(y ≻ y'). Deterministic, like ``pair_responses``."""
    mixture = mixture_version(policy_version)
    resp, prompts = _train_responses(store, round, {policy_version, mixture})
    rng = np.random.default_rng(int(stable_hash(seed, round, mixture, "pairs", length=4), 16))
    texts = resp.set_index("response_id")["text"]
    pairs = []
    for pid in sorted(set(resp["prompt_id"])):
        slot = 0
        while (y := response_id(pid, policy_version, round, slot)) in texts.index and (y_mix := response_id(pid, mixture, round, slot)) in texts.index:
            pairs += _ordered(rng, strategy, skip_identical, pid, prompts[pid], (y, texts[y]), (y_mix, texts[y_mix]))
            slot += 1
    return pairs


def _train_responses(store: Store, round: int, versions: set[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """This round's responses of ``versions`` to training prompts (sorted by id), and the prompt texts."""
    resp = store.read("responses", rounds=[round], columns=["response_id", "policy_version", "prompt_id", "text"])
    table = store.read("prompts", columns=["prompt_id", "prompt", "split"])
    train = set(table.loc[table["split"] == "train", "prompt_id"])
    resp = resp[resp["policy_version"].isin(versions) & resp["prompt_id"].isin(train)].sort_values("response_id")
    return resp, dict(zip(table["prompt_id"], table["prompt"]))


def _ordered(rng: np.random.Generator, strategy: str, skip_identical: bool, pid: str, prompt: str, x: tuple, y: tuple) -> list[Pair]:
    """The pair (x, y) of (response_id, text) as the pairing strategy asks: both orders, or one at random."""
    if skip_identical and x[1] == y[1]:
        return []
    if strategy == "both_orders":
        return [Pair(pid, prompt, *x, *y), Pair(pid, prompt, *y, *x)]
    return [Pair(pid, prompt, *x, *y)] if rng.random() < 0.5 else [Pair(pid, prompt, *y, *x)]


def pair_keys(pairs: list[Pair]) -> list[tuple[str, str, str]]:
    """What a pairing stage hands on: each pair's (prompt_id, a_id, b_id); the texts stay in the store."""
    return [(p.prompt_id, p.a_id, p.b_id) for p in pairs]


def judge_pairs(store: Store, oracle, pairs: list[Pair], *, round: int, chunk_size: int = 2048, on_chunk=None) -> dict:
    """Ask the oracle about the pairs it has not judged yet (the store is the cache) and store each
    chunk as soon as it is answered, so an interruption loses at most one chunk. Skipped pairs (e.g. a
    spent budget) are not stored: a later run asks them again."""
    todo = unjudged(pairs, oracle.oracle_id, store, rounds=[round])  # a pair lives in its own round: comparison ids name round-specific responses
    answered = []
    for start in range(0, len(todo), chunk_size):
        chunk = oracle.judge(todo[start : start + chunk_size])
        store.write("comparisons", [j.row(oracle.oracle_id, round) for j in chunk if not j.skipped])
        answered += chunk
        if on_chunk:
            on_chunk(start + len(chunk), len(todo))
    final = [j for j in answered if not j.skipped]
    summary = {
        "pref/pairs": len(pairs),
        "pref/judged_now": len(final),
        "pref/cached": len(pairs) - len(todo),
        "pref/skipped": len(answered) - len(final),
        "pref/abstained": sum(j.p_a is None for j in final),
        "cost/usd": float(sum(j.cost_usd for j in answered)),
    }
    if hasattr(oracle, "metrics"):  # the oracle's own diagnostics (position bias, tokens, …) win
        summary.update(oracle.metrics(answered))
    if todo and not final:
        raise RuntimeError(
            f"round {round}: {oracle.oracle_id} judged none of the {len(todo)} pairs it was asked "
            f"(first reason: {answered[0].error if answered else 'no answer'}); fix the oracle and run the round again"
        )
    return summary


def judged_pairs(store: Store, *, oracle_ids: set[str], up_to_round: int) -> list[Judged]:
    """Every stored judgment of the campaign's oracles up to a round, with texts, for the solver.
    Solvers read only the comparisons table: never a scalar score per response."""
    comps = store.read("comparisons", rounds=range(0, up_to_round + 1), columns=["prompt_id", "a_id", "b_id", "oracle_id", "p_a", "n_votes"])
    table = store.read("prompts").set_index("prompt_id")
    train = set(table.index[table["split"] == "train"])
    comps = comps[comps["oracle_id"].isin(oracle_ids) & comps["p_a"].notna() & comps["prompt_id"].isin(train)]
    if comps.empty:
        return []
    texts = store.read("responses", columns=["response_id", "text"]).set_index("response_id")["text"]
    prompts = table["prompt"]
    return [
        Judged(prompts[r.prompt_id], texts[r.a_id], texts[r.b_id], float(r.p_a), int(r.n_votes))
        for r in comps.itertuples(index=False)
    ]


def update_policy(store: Store, config: CampaignConfig, world: World, *, round: int, phase: str, sampled_version: str, oracle_ids: set[str], log=None) -> dict:
    """The solver's step on the judged pairs; writes the new version's checkpoint (once), with the update's
    metrics beside it. When the checkpoint is already stored, returns those metrics again. ``log(line)``:
    where a causal-LM update launched under torchrun streams its processes' output."""
    new = version(round, phase)
    if has_checkpoint(store, new):
        return {**stored_update_metrics(store, new), "version": new, "already_stored": True}
    if config.policy.kind == "causal_lm":
        from pipelines.lm_update import update_causal_lm

        return update_causal_lm(store, config, world, round=round, phase=phase, sampled_version=sampled_version, oracle_ids=oracle_ids, log=log)
    anchor = load_policy(store, version(round - 1), config, world)
    algorithm = config.solver.entry
    two_phase = phase == "update" and algorithm.half_step is not None
    midpoint = load_policy(store, version(round, "midpoint"), config, world) if two_phase else None
    judged = judged_pairs(store, oracle_ids=oracle_ids, up_to_round=round)
    policy = anchor.update(judged, algorithm, config.solver.tabular_params(), phase, midpoint)
    metrics = {"judged_pairs_used": len(judged)}
    path = save_checkpoint(store, new, with_update_metrics(policy.save, metrics))
    return {"version": new, "checkpoint": path, **metrics}


def ground_truth_metrics(policy, world: World, config: CampaignConfig, round: int) -> dict:
    """How far the policy is from the regularized Nash equilibrium of each prompt's true game, next to
    the exact solver after the same number of iterations (the best the stochastic update can do)."""
    algorithm, params = config.solver.entry, config.solver.tabular_params()
    beta = params.beta
    rows = defaultdict(list)
    for prompt, P in world.games.items():
        pi, mu = policy.distribution(prompt), policy.reference(prompt)
        star = tabular.regularized_nash(P, mu, beta).pi
        exact_pi = algorithm.final(tabular.run(P, mu, algorithm.exact_step, params, round))
        rows["eval/duality_gap"].append(tabular.duality_gap(pi, P, mu, beta))
        rows["eval/duality_gap_exact_solver"].append(tabular.duality_gap(exact_pi, P, mu, beta))
        rows["eval/exploitability"].append(tabular.duality_gap(pi, P))
        rows["eval/kl_to_nash"].append(tabular.kl(star, pi))
        rows["eval/win_rate_vs_ref"].append(float(pi @ P @ mu))
    return {k: float(np.mean(v)) for k, v in rows.items()}


EVAL_SEED_OFFSET = 7919  # held-out samples are drawn with config.seed + this (nashflow eval reuses them)


def sampled_win_rate(store: Store, config: CampaignConfig, world: World, *, round: int, hold_gpu=nullcontext) -> dict:
    """Win-rate of v{round} against the reference v0 on fresh samples of the held-out prompts, judged
    by the campaign's oracle (the ground truth in a synthetic world), with a 95% interval, beside its
    length-controlled win-rate and the response lengths (``vs_reference_metrics``). The samples
    and the judgments are stored like any others (held-out prompts never reach training).

    ``hold_gpu()``: a context held while a model runs (the task's GPU slot): the sampling, and the
    judging when the oracle is a learned model."""
    m, new = config.evaluation.samples_per_prompt, version(round)
    with hold_gpu():
        for v in (new, "v0"):
            policy = load_policy(store, v, config, world)
            sample_responses(store, policy, world.eval_prompts, round=round, policy_version=v, k=m, seed=config.seed + EVAL_SEED_OFFSET)
        del policy  # the judge may need its memory
    eval_ids = [prompt_id(p) for p in world.eval_prompts]
    resp = store.read("responses", rounds=[round], columns=["response_id", "prompt_id", "text", "n_tokens", "finish_reason"], where=pc.field("prompt_id").isin(eval_ids))
    resp = resp.set_index("response_id")
    pairs = []
    for p in world.eval_prompts:
        pid = prompt_id(p)
        for slot in range(m):
            a, b = response_id(pid, new, round, slot), response_id(pid, "v0", round, slot)
            pairs.append(Pair(pid, p, a, resp.at[a, "text"], b, resp.at[b, "text"]))
    spec = oracle_spec(config.oracle, config, world)  # once: a learned oracle's id hashes its checkpoint
    with hold_gpu() if spec.runs_model else nullcontext():
        oracle = spec.build()
        judge_pairs(store, oracle, pairs, round=round)
    comps = store.read("comparisons", rounds=[round], columns=["comparison_id", "p_a"]).set_index("comparison_id")
    keys = [comparison_id(q.prompt_id, q.a_id, q.b_id, oracle.oracle_id) for q in pairs]
    judged = pd.DataFrame({"a_id": [q.a_id for q in pairs], "b_id": [q.b_id for q in pairs], "prompt_id": [q.prompt_id for q in pairs], "p": comps.loc[keys, "p_a"].to_numpy()})
    return vs_reference_metrics(judged.dropna(subset=["p"]), resp)


def vs_reference_metrics(judged: pd.DataFrame, responses: pd.DataFrame) -> dict:
    """The round's ``eval/`` metrics from its judged policy-vs-reference pairs (a_id the policy's
    response, b_id the reference's, p = P(a ≻ b)) and the responses (indexed by id): raw and
    length-controlled win-rate with 95% intervals, and the response lengths of both."""
    if judged.empty:
        return {"eval/win_rate_vs_ref": float("nan"), "eval/win_rate_ci95": float("nan"), "eval/pairs": 0}
    a, b = responses.loc[judged["a_id"]], responses.loc[judged["b_id"]]
    h = evaluation.head_to_head(judged["p"], a["n_tokens"], b["n_tokens"], judged["prompt_id"], a["finish_reason"], b["finish_reason"])
    return {
        "eval/win_rate_vs_ref": h["win_rate"],
        "eval/win_rate_ci95": h["win_rate_ci95"],
        "eval/lc_win_rate_vs_ref": h["lc_win_rate"],
        "eval/lc_win_rate_ci95": h["lc_win_rate_ci95"],
        "eval/length_coef": h["length_coef"],
        "eval/pairs": h["pairs"],
        "eval/mean_tokens": h["mean_tokens"],
        "eval/median_tokens": h["median_tokens"],
        "eval/truncated_share": h["truncated_share"],
        "eval/ref_mean_tokens": h["opponent_mean_tokens"],
        "eval/ref_truncated_share": h["opponent_truncated_share"],
    }


def evaluate_policy(store: Store, config: CampaignConfig, world: World, *, round: int, stage_metrics: dict, timings: dict, hold_gpu=nullcontext) -> dict:
    """Metrics of the round's new policy; writes the round's row (a repeated write adds nothing).
    ``hold_gpu``: as in ``sampled_win_rate``."""
    if config.policy.kind == "tabular":
        evaluation = ground_truth_metrics(load_policy(store, version(round), config, world), world, config, round)
    elif config.oracle is not None and world.eval_prompts:
        evaluation = sampled_win_rate(store, config, world, round=round, hold_gpu=hold_gpu)
    else:  # people alone judge this campaign: no machine to ask about held-out pairs
        evaluation = {}
    # how intransitive this round's judgments are: a share of cyclic triples near zero means a reward
    # model would do; well above it, only a Nash method can represent the preferences. Pairs are drawn
    # within a round, so every judged triple lies in one round: reading only this round's partition
    # loses no triple and keeps the stage's cost flat as the store grows
    cycles = intransitivity(store, rounds=[round], oracle_ids=campaign_oracle_ids(config, world))
    # the round's training judgments as the store holds them: pref/judged_now counts only the last
    # attempt's, which is 0 when a resumed round finds its pairs judged already
    counts = judgment_counts(store, rounds=[round])
    held = {"pref/round_judged": counts["train_answered"], "pref/round_abstained": counts["train"] - counts["train_answered"]}
    metrics = {**stage_metrics, **held, **evaluation, **{k: v for k, v in cycles.items() if v is not None}}
    row = {
        "round": round,
        "policy_version": version(round),
        "checkpoint": store.path(checkpoint_dir(version(round))),
        "solver": config.solver.algorithm,
        "metrics": json.dumps(metrics, sort_keys=True),
        "timings": json.dumps(timings, sort_keys=True),
    }
    # the round's small files (one per write: a judge chunk, a log-prob batch) merged into one per table
    # before the row marks the round finished, so the file count, and what `status` and later rounds
    # open, grows by one per table and round (a round killed before this point redoes it)
    store.compact(rounds=[round])
    store.write("rounds", [row])
    return metrics


class Stopwatch:
    """Seconds per stage, for the round's timings: ``with watch("judge"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
