"""The update stage of a causal-LM campaign: build the trainer's examples from the store (judgments,
texts, cached log-probs), run one update from the anchor, and save the new version.

Log-probs of a response under μ and under past iterates come from the ``logprobs`` table; whatever is
missing is scored once, in batched no-grad passes, and stored, so no forward pass runs twice.
"""

from __future__ import annotations

import shutil
import tempfile

import pandas as pd

from data import Store
from pipelines.components import World, is_mixture, load_policy, save_checkpoint, version, work_dir
from pipelines.config import CampaignConfig


def ensure_logprobs(store: Store, policy, policy_version: str, responses: pd.DataFrame, *, round: int) -> pd.Series:
    """log π_version(y|x) for each response (indexed by response_id), scoring only what the store lacks."""
    cached = store.read("logprobs")
    cached = cached[cached["policy_version"] == policy_version].set_index("response_id")["logp"]
    missing = responses[~responses["response_id"].isin(cached.index)]
    if len(missing):
        logps = policy.score(list(missing["prompt"]), list(missing["text"]), finished=list(missing["finish_reason"] == "stop"), tokens=token_lists(missing["token_ids"]))
        new = pd.DataFrame({"response_id": missing["response_id"].to_numpy(), "policy_version": policy_version, "round": round, "logp": logps})
        store.write("logprobs", new)
        cached = pd.concat([cached, new.set_index("response_id")["logp"]])
    return cached.loc[responses["response_id"]]


def token_lists(column: pd.Series) -> list:
    """The store's token_ids column as lists of ints, None where a response has only its text."""
    return [None if ids is None else ids.tolist() for ids in column]


def training_pairs(store: Store, config: CampaignConfig, rows: pd.DataFrame, prompts: pd.DataFrame, *, round: int, sampled_version: str, oracle_ids: set[str]) -> pd.DataFrame:
    """The judged pairs the update trains on: this round's pairs of the phase's samples, plus earlier
    rounds' pairs when ``trainer.window`` asks for them. Training prompts only; abstentions dropped.
    ``rows``: the store's responses by response_id; ``prompts``: its prompts by prompt_id."""
    window = config.trainer.window
    first = 1 if window == 0 else max(1, round - window + 1)
    comps = store.read("comparisons", rounds=range(first, round + 1))
    comps = comps[comps["oracle_id"].isin(oracle_ids) & comps["p_a"].notna()]
    pairs = comps.assign(
        prompt=comps["prompt_id"].map(prompts["prompt"]),
        split=comps["prompt_id"].map(prompts["split"]),
        version_a=comps["a_id"].map(rows["policy_version"]),
        version_b=comps["b_id"].map(rows["policy_version"]),
    )
    # Nash-MD's pairs hold one sample of the phase's version and one of its mixture, in either order
    current = (pairs["round"] == round) & ((pairs["version_a"] == sampled_version) | (pairs["version_b"] == sampled_version))
    pairs = pairs[(pairs["split"] == "train") & (current | (pairs["round"] < round))]
    return pairs.reset_index(drop=True)


def update_causal_lm(store: Store, config: CampaignConfig, world: World, *, round: int, phase: str, sampled_version: str, oracle_ids: set[str]) -> dict:
    from pipelines.stages import with_update_metrics
    from solvers import checkpoint as lm_checkpoint
    from solvers import losses
    from solvers.trainer import ONE_RESPONSE, Example, TrainerConfig, update

    new, anchor_version, algorithm = version(round, phase), version(round - 1), config.solver.algorithm
    policy, optimizer_state = load_policy(store, anchor_version, config, world, with_optimizer=True)
    rows = store.read("responses").set_index("response_id")
    prompts = store.read("prompts").set_index("prompt_id")
    pairs = training_pairs(store, config, rows, prompts, round=round, sampled_version=sampled_version, oracle_ids=oracle_ids)
    if pairs.empty:
        raise ValueError(f"round {round} {phase}: no judged pairs to train on (all abstained or none stored); the policy stays at {anchor_version}")
    used = pd.unique(pd.concat([pairs["a_id"], pairs["b_id"]]))
    # Nash-MD's loss scores y ~ π_t only: its mixture opponents y' need no log-probs
    ids = [i for i in used if not is_mixture(rows.at[i, "policy_version"])]
    responses = rows.loc[ids].reset_index()
    responses["prompt"] = responses["prompt_id"].map(prompts["prompt"])

    logp = {anchor_version: ensure_logprobs(store, policy, anchor_version, responses, round=round)}
    loss_config = losses.make_config(algorithm, **config.solver.loss)
    # MNPO's H past iterates are π_{t}, π_{t−1}, …: the anchor and H − 1 older versions (v0 at the start)
    older = len(loss_config.weights) - 1 if algorithm == "mnpo" else 0
    history = [version(max(r, 0)) for r in range(round - 2, round - 2 - older, -1)]
    for v in ["v0", *history]:
        if v not in logp:
            logp[v] = ensure_logprobs(store, load_policy(store, v, config, world), v, responses, round=round)
    finished = rows["finish_reason"] == "stop"
    tokens = pd.Series(token_lists(rows.loc[used, "token_ids"]), index=used)

    def pair_of(v, r):
        return (float(logp[v][r.a_id]), float(logp[v][r.b_id]))

    examples = per_response_examples(pairs, rows, logp, anchor_version, finished, tokens, set(ids)) if algorithm in ONE_RESPONSE else [
        Example(
            prompt=r.prompt,
            y=rows.at[r.a_id, "text"],
            y_other=rows.at[r.b_id, "text"],
            p_hat=float(r.p_a),
            ref_logp=pair_of("v0", r),
            prev_logp=pair_of(anchor_version, r),
            older_logp=tuple(pair_of(v, r) for v in history),
            finished=(bool(finished[r.a_id]), bool(finished[r.b_id])),
            tokens=(tokens[r.a_id], tokens[r.b_id]),
            id=r.comparison_id,
        )
        for r in pairs.itertuples(index=False)
    ]
    t = config.trainer
    trainer_config = TrainerConfig(
        loss=algorithm,
        loss_config=loss_config,
        lr=t.lr,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        epochs=t.epochs,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        compile=t.compile,
        checkpoint_every=t.checkpoint_every,
        device=config.policy.device,
        seed=config.seed + round,
    )
    # step checkpoints of an unfinished update live beside the round's checkpoints, so a killed update resumes
    work = store.local_path(work_dir(new)) if store.is_local else tempfile.mkdtemp(prefix="nashflow-update-")
    result = update(policy, examples, trainer_config, optimizer_state=optimizer_state, checkpoint_dir=work)
    metrics = {"judged_pairs_used": len(examples), **result.summary}
    write = lambda folder: lm_checkpoint.save_checkpoint(folder, policy.model, policy.tokenizer, {"optimizer": result.optimizer_state})  # noqa: E731
    path = save_checkpoint(store, new, with_update_metrics(write, metrics))
    shutil.rmtree(work, ignore_errors=True)
    return {"version": new, "checkpoint": path, **metrics}


def per_response_examples(pairs: pd.DataFrame, rows: pd.DataFrame, logp: dict, anchor_version: str, finished: pd.Series, tokens: pd.Series, scored: set) -> list:
    """SPPO and Nash-MD train per response y (those in ``scored``), on its mean win-rate against what
    it was judged against, in either order: SPPO's P̂(y ≻ π_t) over the prompt's other samples,
    Nash-MD's P̂(y ≻ y') against its mixture opponent (both orders averaged)."""
    from solvers.trainer import Example

    wins = pd.concat(
        [
            pd.DataFrame({"response_id": pairs["a_id"], "prompt": pairs["prompt"], "p": pairs["p_a"]}),
            pd.DataFrame({"response_id": pairs["b_id"], "prompt": pairs["prompt"], "p": 1.0 - pairs["p_a"]}),
        ]
    )
    rates = wins[wins["response_id"].isin(scored)].groupby(["response_id", "prompt"], sort=True)["p"].mean()
    return [
        Example(
            prompt=prompt,
            y=rows.at[rid, "text"],
            y_other=None,
            p_hat=float(rate),
            ref_logp=(float(logp["v0"][rid]),),
            prev_logp=(float(logp[anchor_version][rid]),),
            finished=(bool(finished[rid]), True),
            tokens=(tokens[rid], None),
            id=rid,
        )
        for (rid, prompt), rate in rates.items()
    ]


def win_rate_metrics(p: pd.Series) -> dict:
    """Mean P(policy ≻ reference) with a normal 95% interval over the judged pairs."""
    n = len(p)
    if n == 0:
        return {"eval/win_rate_vs_ref": float("nan"), "eval/win_rate_ci95": float("nan"), "eval/pairs": 0}
    half = 1.96 * float(p.std(ddof=1)) / n**0.5 if n > 1 else float("nan")
    return {"eval/win_rate_vs_ref": float(p.mean()), "eval/win_rate_ci95": half, "eval/pairs": n}
