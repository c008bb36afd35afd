"""Retraining a cascade campaign's learned preference model after each round (see
pipelines/preference_models.py for where its versions live and which round judges with which)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import Store
from data import checkpoints as marks
from pipelines.config import CampaignConfig, config_from_settings
from pipelines.oracle_factory import campaign_oracle_ids
from pipelines.preference_models import MODELS, model_dir, model_for_round, read_manifest, save_model
from pipelines.gpu import gpu_slot
from pipelines.retrying import worth_retrying
from pipelines.versions import local_folder
from pipelines.world import World


def train_config(config: CampaignConfig):
    """The fit's settings; the seed stays the same every round, so the held-out prompts do too."""
    from solvers.preference_model import PreferenceTrainConfig

    return config_from_settings(PreferenceTrainConfig, config.oracle.train, device=config.oracle.device)


def retrain_preference_model(store: Store, config: CampaignConfig, world: World, *, round: int, log=None) -> dict:
    """After round ``round``: a warm start from the model the round judged with, trained on everything the
    campaign's judge and people answered up to this round (never a model's own answers), scored on
    held-out prompts, and saved as preference_models/r<round>, the model of the next round. Returns
    prefmodel/ metrics (a rerun returns the stored ones). With nothing to learn from yet (no judged
    pairs, all ties, too few prompts to hold some out) it writes nothing, says why in ``log``, and the
    next round keeps the current model."""
    if marks.is_complete(store, model_dir(round)):
        return {**read_manifest(store, round)["metrics"], "prefmodel/already_stored": 1.0}
    from solvers import preference_model as pm

    start = model_for_round(store, config, round)
    work = store.local_path(f"{MODELS}/.work-r{round}") if store.is_local else None
    with tempfile.TemporaryDirectory() as tmp:
        init = local_folder(store, model_dir(start), os.path.join(tmp, "init"))
        try:
            report = pm.fit_preference_model(
                store,
                os.path.join(tmp, "fit"),
                init=init,
                train_config=train_config(config),
                rounds=range(0, round + 1),
                oracle_ids=campaign_oracle_ids(config, world),
                checkpoint_dir=work or os.path.join(tmp, "work"),
            )
        except pm.PreferenceDataError as e:
            if log is not None:
                log.warning("round %d: the preference model is not retrained (%s); round %d judges with %s", round, e, round + 1, model_dir(start))
            return {"prefmodel/retrained": 0.0, "prefmodel/version": float(start)}
        metrics = {k: v for k, v in report.metrics.items() if k.startswith("prefmodel/")}
        metrics |= {"prefmodel/seconds": report.metrics["perf/seconds"], "prefmodel/retrained": 1.0, "prefmodel/version": float(round), "prefmodel/from_version": float(start)}
        manifest = {"round": round, "fingerprint": report.fingerprint, "head": json.loads((report.path / pm.PREFERENCE_FILE).read_text())["head"], "from": start, "metrics": metrics}
        save_model(store, round, report.path, manifest)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


# it holds the GPU slot like the policy update; one retry resumes from the step checkpoints
@task(
    name="retrain-preference-model", task_run_name="{config.name}-r{round}-retrain", cache_policy=NO_CACHE,
    retries=1, retry_delay_seconds=10, retry_condition_fn=worth_retrying,
)  # fmt: skip
def retrain_task(config: CampaignConfig, round: int) -> dict:
    store, log = Store(config.store), get_run_logger()
    with gpu_slot():
        out = retrain_preference_model(store, config, World(config), round=round, log=log)
    if out.get("prefmodel/retrained"):
        log.info(
            "round %d: preference model r%d from r%d on %d pairs: held-out log-loss %s (before %s) in %.1f s",
            round, round, int(out["prefmodel/from_version"]), int(out["prefmodel/train_pairs"]),
            _fmt(out.get("prefmodel/eval_logloss")), _fmt(out.get("prefmodel/eval_logloss_before")), out["prefmodel/seconds"],
        )  # fmt: skip
    return out


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
