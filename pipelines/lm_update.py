"""The update stage of a causal-LM campaign: build the trainer's examples from the store (judgments,
texts, cached log-probs), run one update from the anchor, and save the new version.

Log-probs of a response under μ and under past iterates come from the ``logprobs`` table; whatever is
missing is scored once, in batched no-grad passes, and stored, so no forward pass runs twice.

With ``trainer.processes`` N > 1 the update runs under torchrun instead of in this process
(:func:`launched_update`): the examples go to a job folder beside the update's step checkpoints
(``checkpoints/.job-v<N>/``), N processes of ``solvers.update_job`` train, rank 0 writes the new
policy into the job folder, and this stage publishes it into the store as any other checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from data import Store
from pipelines.config import CampaignConfig, TrainerSettings, config_from_settings
from pipelines.versions import base_version, checkpoint_folder, is_mixture, job_dir, lm_config, load_policy, lora_settings, save_checkpoint, version, with_update_metrics, work_dir
from pipelines.world import World

_log = logging.getLogger(__name__)


def ensure_logprobs(store: Store, policy, policy_version: str, responses: pd.DataFrame, *, round: int) -> pd.Series:
    """log π_version(y|x) for each response (indexed by response_id), scoring only what the store lacks.

    A response's log-probs are computed in its own round or a later one, so only the partitions from
    the oldest response's round to ``round`` are read, and in them only this version's rows."""
    import pyarrow.compute as pc

    ids = responses["response_id"].tolist()
    where = (pc.field("policy_version") == policy_version) & pc.field("response_id").isin(ids)
    first = int(responses["round"].min()) if len(responses) else round
    cached = store.read("logprobs", rounds=range(first, round + 1), columns=["response_id", "logp"], where=where).set_index("response_id")["logp"]
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


def window_rounds(config: CampaignConfig, round: int) -> range:
    """The rounds whose judged pairs an update trains on (``trainer.window``; 0: every round so far)."""
    window = config.trainer.window
    return range(1 if window == 0 else max(1, round - window + 1), round + 1)


def training_pairs(store: Store, config: CampaignConfig, rows: pd.DataFrame, prompts: pd.DataFrame, *, round: int, sampled_version: str, oracle_ids: set[str]) -> pd.DataFrame:
    """The judged pairs the update trains on: this round's pairs of the phase's samples, plus earlier
    rounds' pairs when ``trainer.window`` asks for them. Training prompts only; abstentions dropped.
    ``rows``: the responses of those rounds by response_id; ``prompts``: the prompts by prompt_id."""
    comps = store.read("comparisons", rounds=window_rounds(config, round), columns=["comparison_id", "round", "prompt_id", "a_id", "b_id", "oracle_id", "p_a"])
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


def update_causal_lm(
    store: Store, config: CampaignConfig, world: World, *, round: int, phase: str, sampled_version: str, oracle_ids: set[str], log: Callable[[str], None] | None = None
) -> dict:
    from solvers import checkpoint as lm_checkpoint
    from solvers import lora, sharding
    from solvers.trainer import TrainerConfig, update

    new, anchor_version, algorithm = version(round, phase), version(round - 1), config.solver.entry
    processes, log = config.trainer.processes, log or _log.info
    if processes > 1:
        sharding.check_processes(processes, config.policy.device)  # before any work: a launch that cannot run fails now
    policy, optimizer_state = load_policy(store, anchor_version, config, world, with_optimizer=True)
    policy = lora.for_training(policy, lora_settings(config), seed=config.seed + round)
    examples = update_examples(
        store, config, round=round, phase=phase, sampled_version=sampled_version, oracle_ids=oracle_ids, anchor=policy, load=other_versions(store, config, world, policy)
    )
    trainer_config = config_from_settings(
        TrainerConfig, config.trainer, pipeline_only=TrainerSettings.PIPELINE_ONLY, loss=algorithm.name, loss_config=config.solver.loss, device=config.policy.device, seed=config.seed + round
    )
    # step checkpoints of an unfinished update live beside the round's checkpoints, so a killed update resumes
    work = store.local_path(work_dir(new)) if store.is_local else tempfile.mkdtemp(prefix="nashflow-update-")
    adapter = lora.is_lora(policy.model)  # the checkpoint is the adapter alone; the tokenizer is its base's
    if processes > 1:
        del policy, optimizer_state  # the processes load the anchor themselves: free this process's copy (and its GPU memory) first
        _release_memory()
        job = Path(store.local_path(job_dir(new)) if store.is_local else tempfile.mkdtemp(prefix="nashflow-job-"))
        summary, result_folder = launched_update(store, config, examples, trainer_config, round=round, anchor_version=anchor_version, new=new, work=work, job=job, log=log)
        write = lambda folder: shutil.copytree(result_folder, folder)  # noqa: E731
    else:
        result = update(policy, examples, trainer_config, optimizer_state=optimizer_state, checkpoint_dir=work)
        summary, job = result.summary, None
        write = lambda folder: lm_checkpoint.save_checkpoint(folder, policy.model, None if adapter else policy.tokenizer, {"optimizer": result.optimizer_state})  # noqa: E731
    metrics = {"judged_pairs_used": len(examples), **summary}
    path = save_checkpoint(store, new, with_update_metrics(write, metrics), base="v0" if adapter else None)
    for folder in (work, job):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return {"version": new, "checkpoint": path, **metrics}


def other_versions(store: Store, config: CampaignConfig, world: World, anchor):
    """``update_examples``' ``load``: what scores another version than the anchor. With LoRA, the anchor's
    own base weights serve them all: μ (v0) is the base with the adapter off, a past iterate its adapter
    run in place of the anchor's; otherwise (or for a whole-model version) the version is loaded."""
    from solvers import lora

    if not lora.is_lora(anchor.model):
        return lambda v: load_policy(store, v, config, world)

    def load(v: str):
        if v == "v0":
            return lora.AdapterScorer(anchor, None)
        with tempfile.TemporaryDirectory() as tmp:
            folder = checkpoint_folder(store, v, tmp)
            if lora.is_adapter_folder(folder) and base_version(store, v) == "v0":
                return lora.AdapterScorer(anchor, lora.read_adapter(folder))
        return load_policy(store, v, config, world)

    return load


def launched_update(
    store: Store, config: CampaignConfig, examples: list, trainer_config, *, round: int, anchor_version: str, new: str, work: str, job: Path, log: Callable[[str], None]
) -> tuple[dict, Path]:
    """The update under torchrun: ``trainer.processes`` processes of ``solvers.update_job`` on the job
    folder ``job`` (the examples, the configs), starting from the anchor's checkpoint and keeping step
    checkpoints in ``work`` (a retried launch resumes from them). Returns (the update's summary, the
    folder where rank 0 wrote the new policy's checkpoint). With ``policy.lora`` the processes put the
    anchor's adapter (or round 1's new one, drawn from the same seed as in process) on its base."""
    from pipelines.torchrun import run_module
    from solvers import lora, update_job

    n, how = config.trainer.processes, config.trainer.sharding
    with tempfile.TemporaryDirectory() as tmp:
        anchor = checkpoint_folder(store, anchor_version, os.path.join(tmp, "anchor"))  # a copy on local disk when the store is remote
        base = checkpoint_folder(store, base_version(store, anchor_version), os.path.join(tmp, "base")) if lora.is_adapter_folder(anchor) else None
        update_job.write_job(
            job, examples, trainer_config, anchor=anchor, base=base, policy=lm_config(config, training=True), lora=lora_settings(config), lora_seed=config.seed + round, checkpoint_dir=work
        )  # fmt: skip
        log(f"{anchor_version} → {new}: {len(examples)} examples, {n} processes ({how}), job folder {job}")
        run_module("solvers.update_job", [str(job)], n, error_dir=job / update_job.ERRORS, log=log, what=f"the update to {new} ({n} processes, {how})")
    return json.loads((job / update_job.METRICS).read_text())["summary"], job / update_job.RESULT


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def update_examples(store: Store, config: CampaignConfig, *, round: int, phase: str, sampled_version: str, oracle_ids: set[str], anchor, load) -> list:
    """The trainer's examples for one update: the judged pairs of its window, their texts and tokens,
    and the log-probs the algorithm's loss reads, scored once where the store lacks them (``anchor``:
    the policy being updated; ``load(version)``: another version's policy, loaded only if needed).
    Reads only the rounds of ``trainer.window``."""
    from solvers.trainer import Example

    anchor_version, algorithm = version(round - 1), config.solver.entry
    rows = store.read("responses", rounds=window_rounds(config, round)).set_index("response_id")
    prompts = store.read("prompts").set_index("prompt_id")
    pairs = training_pairs(store, config, rows, prompts, round=round, sampled_version=sampled_version, oracle_ids=oracle_ids)
    if pairs.empty:
        raise ValueError(f"round {round} {phase}: no judged pairs to train on (all abstained or none stored); the policy stays at {anchor_version}")
    used = pd.unique(pd.concat([pairs["a_id"], pairs["b_id"]]))
    # Nash-MD's loss scores y ~ π_t only: its mixture opponents y' need no log-probs
    ids = [i for i, v in zip(used, rows.loc[used, "policy_version"].tolist()) if not is_mixture(v)]
    responses = rows.loc[ids].reset_index()
    responses["prompt"] = responses["prompt_id"].map(prompts["prompt"])

    logp = {anchor_version: ensure_logprobs(store, anchor, anchor_version, responses, round=round)}
    # the past iterates a loss reads besides the anchor π_t (MNPO: π_{t−1}, …, π_{t−H+1}; v0 at the start)
    older = algorithm.older_iterates(config.solver.loss)
    history = [version(max(r, 0)) for r in range(round - 2, round - 2 - older, -1)]
    for v in ["v0", *history]:
        if v not in logp:
            logp[v] = ensure_logprobs(store, load(v), v, responses, round=round)
    # plain dicts for the per-pair loop: a pandas lookup per field and pair costs seconds at 8k pairs
    texts = dict(zip(rows.index, rows["text"]))
    finished = dict(zip(rows.index, (rows["finish_reason"] == "stop").tolist()))
    tokens = dict(zip(used, token_lists(rows.loc[used, "token_ids"])))
    logp = {v: dict(zip(series.index, series.to_numpy(dtype=float).tolist())) for v, series in logp.items()}
    if algorithm.per_response:
        return per_response_examples(pairs, texts, logp, anchor_version, finished, tokens, set(ids))

    def pair_of(v, r):
        return (logp[v][r.a_id], logp[v][r.b_id])

    return [
        Example(
            prompt=r.prompt,
            y=texts[r.a_id],
            y_other=texts[r.b_id],
            p_hat=float(r.p_a),
            ref_logp=pair_of("v0", r),
            prev_logp=pair_of(anchor_version, r),
            older_logp=tuple(pair_of(v, r) for v in history),
            finished=(finished[r.a_id], finished[r.b_id]),
            tokens=(tokens[r.a_id], tokens[r.b_id]),
            id=r.comparison_id,
        )
        for r in pairs.itertuples(index=False)
    ]


def per_response_examples(pairs: pd.DataFrame, texts: dict, logp: dict, anchor_version: str, finished: dict, tokens: dict, scored: set) -> list:
    """SPPO and Nash-MD train per response y (those in ``scored``), on its mean win-rate against what
    it was judged against, in either order: SPPO's P̂(y ≻ π_t) over the prompt's other samples,
    Nash-MD's P̂(y ≻ y') against its mixture opponent (both orders averaged). ``texts``, ``finished``,
    ``tokens`` and each ``logp[version]`` map a response id to its value."""
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
            y=texts[rid],
            y_other=None,
            p_hat=float(rate),
            ref_logp=(logp["v0"][rid],),
            prev_logp=(logp[anchor_version][rid],),
            finished=(finished[rid], True),
            tokens=(tokens[rid], None),
            id=rid,
        )
        for (rid, prompt), rate in rates.items()
    ]
