"""Every oracle of a campaign, built from its config: one entry per oracle kind (matrix, text_world,
llm_judge, learned, the local judges reward_model, pairwise_lm and pairwise_classifier, cascade) and
people (Label Studio).

An entry returns an ``OracleSpec``: the oracle's id and ``build()``, made together from the same
settings, so an id cannot drift from the oracle it names. The id is known without building: no secret
is resolved (an LLM judge's API key, Label Studio's token never change answers) and no weights are
loaded (a learned model's id is its checkpoint's fingerprint), so the stages that only read judgments
(retraining, diagnostics) need neither.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import Store
from data.scores import StoredScores
from oracles.learned import LearnedOracle
from oracles.matrix import MatrixOracle
from oracles.text_world import TextWorldOracle
from pipelines.config import CampaignConfig
from pipelines.preference_models import CampaignCascade, cascade_oracle_id
from pipelines.secrets import resolve
from pipelines.world import World


@dataclass(frozen=True)
class OracleSpec:
    """An oracle before it is built: its ``oracle_id``, and ``build()`` (resolves secrets, loads models)."""

    oracle_id: str
    build: Callable[[], Any]
    runs_model: bool = False  # a torch model in this process (it holds the GPU slot while it judges)
    queued: bool = False  # submit / collect / pending (a batch judge): the round waits for it as for people


def oracle_spec(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    """The oracle that ``cfg`` (the campaign's ``oracle``, or a cascade's ``judge``) describes."""
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown oracle kind {cfg.kind!r}")
    return KINDS[cfg.kind](cfg, config, world)


def build_oracle(config: CampaignConfig, world: World):
    """The campaign's oracle. A ``learned`` model answers every pair; a ``cascade`` is one object for the
    whole campaign (pipelines/preference_models.CampaignCascade): it judges each pair with the learned
    model of the pair's round, then its judge, within that round's budget."""
    return oracle_spec(config.oracle, config, world).build()


def campaign_oracle_ids(config: CampaignConfig, world: World) -> set[str]:
    """The oracles whose judgments this campaign's solver reads: the machine oracle and/or people.

    A cascade's id is the same for every round although its learned model changes (a campaign's
    model versions all live in its store, and round r always uses the one trained before it): each
    stored judgment names the model version that answered in ``detail`` (``answered_by``, ``prefmodel``),
    so the versions stay apart in the data without splitting the campaign's judgments by id."""
    ids = set()
    if config.oracle is not None:
        ids.add(oracle_spec(config.oracle, config, world).oracle_id)
    if config.humans is not None:
        ids.add(people_spec(config).oracle_id)
    return ids


def oracle_runs_model(config: CampaignConfig) -> bool:
    """Whether the campaign's oracle is a model run in this process (a ``learned`` model): its tasks
    hold the GPU slot while it judges. A ``cascade`` holds it around its learned stage only
    (``gpu.HoldingGpu``), not around its judge or people."""
    return config.oracle is not None and oracle_spec(config.oracle, config, World(config)).runs_model


def oracle_is_queued(config: CampaignConfig) -> bool:
    """Whether the campaign's oracle is a queued one (an LLM judge in ``mode: batch``): the judge stage
    submits and the round waits (pipelines/batch_judging.py)."""
    return config.oracle is not None and oracle_spec(config.oracle, config, World(config)).queued


def people_oracle(config: CampaignConfig):
    """The campaign's Label Studio oracle; URL and token are read where it runs, never stored."""
    return people_spec(config).build()


# ----- one entry per kind ----------------------------------------------------------------------------------


def _built(oracle) -> OracleSpec:
    """A synthetic oracle: cheap to build, no secrets, so its id is the built one's."""
    return OracleSpec(oracle.oracle_id, lambda: oracle)


def _matrix(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    return _built(MatrixOracle(world.games, mode=cfg.mode, seed=cfg.seed))


def _text_world(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    return _built(TextWorldOracle(mode=cfg.mode, seed=cfg.seed))


def _llm_judge(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    from oracles.llm_judge import LLMJudge, LLMJudgeConfig  # httpx and the judge's templates: only when used

    settings = cfg.model_dump(exclude={"kind", "api_key_secret", "api_key_env", "mode", "batch"})

    def judge(api_key: str | None) -> LLMJudge:
        return LLMJudge(LLMJudgeConfig(**settings, api_key=api_key))

    oracle_id = judge(None).oracle_id  # the same in both modes: the mode changes where and when, not the answer
    if cfg.mode == "batch":
        from oracles.batch_judge import BatchJudge, BatchSettings

        b = cfg.batch
        batch = BatchSettings(discount=b.discount, on_failure=b.on_failure, max_resubmits=b.max_resubmits)
        return OracleSpec(oracle_id, lambda: BatchJudge(judge(resolve(cfg.api_key_secret, cfg.api_key_env)), Store(config.store), batch), queued=True)
    return OracleSpec(oracle_id, lambda: judge(resolve(cfg.api_key_secret, cfg.api_key_env)))


class _Fingerprint:
    """Stands in for a model when only its oracle id is wanted (the id needs the fingerprint, not the weights)."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def predict(self, prompts, a_texts, b_texts):
        raise NotImplementedError("an id-only stand-in does not predict")


def _learned(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    """A preference-model checkpoint folder: its id from its files alone (nothing is loaded)."""
    from solvers.preference_model import PREFERENCE_FILE, checkpoint_fingerprint, load_preference_model

    settings = Path(cfg.checkpoint).expanduser() / PREFERENCE_FILE
    if not settings.is_file():
        raise ValueError(f"oracle.checkpoint: {cfg.checkpoint} is not a preference-model checkpoint (it has no {PREFERENCE_FILE})")
    head = json.loads(settings.read_text())["head"]

    def build() -> LearnedOracle:
        model = load_preference_model(cfg.checkpoint, device=cfg.device)
        return LearnedOracle(model, name=model.config.head, batch_size=cfg.batch_size)

    return OracleSpec(LearnedOracle(_Fingerprint(checkpoint_fingerprint(cfg.checkpoint)), name=head).oracle_id, build, runs_model=True)


@functools.lru_cache(maxsize=1)
def _loaded(load: Callable, source: str, fingerprint: str, **settings):
    """The last local judge model loaded in this process, kept: a round builds its oracle in the judge
    and the evaluation stage, and a .gguf model takes most of a minute to dequantize. ``fingerprint``
    is in the key so changed files load again."""
    return load(source, **settings)


def _reward_model(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    from oracles.local_judges import REWARD_MODEL, RewardModelOracle, local_judge_id
    from solvers.judge_models import RewardModel, fingerprint

    digest = fingerprint(cfg.model)
    oracle_id = local_judge_id(REWARD_MODEL, digest, {"temperature": cfg.temperature}, name="reward")

    def build() -> RewardModelOracle:
        model = _loaded(RewardModel.load, cfg.model, digest, device=cfg.device, max_batch_tokens=cfg.max_batch_tokens)
        return RewardModelOracle(model, scores=StoredScores(Store(config.store), oracle_id), temperature=cfg.temperature)

    return OracleSpec(oracle_id, build, runs_model=True)


def _pairwise_lm(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    from oracles.judge_template import load_template
    from oracles.local_judges import PAIRWISE_LM, PairwiseLMOracle, local_judge_id, pairwise_lm_settings
    from solvers.judge_models import fingerprint
    from solvers.pairwise_lm import PairwiseLM

    digest, template = fingerprint(cfg.model), load_template(cfg.template_path)

    def build() -> PairwiseLMOracle:
        model = _loaded(PairwiseLM.load, cfg.model, digest, device=cfg.device, verdicts=cfg.verdicts, max_batch_tokens=cfg.max_batch_tokens, share_prefix=cfg.share_prefix)
        return PairwiseLMOracle(model, template=template)

    return OracleSpec(local_judge_id(PAIRWISE_LM, digest, pairwise_lm_settings(template, cfg.verdicts), name="judge"), build, runs_model=True)


def _pairwise_classifier(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    from oracles.local_judges import PAIRWISE_CLASSIFIER, PairwiseClassifierOracle, local_judge_id
    from solvers.judge_models import PairwiseClassifier, fingerprint

    digest = fingerprint(cfg.model)

    def build() -> PairwiseClassifierOracle:
        return PairwiseClassifierOracle(_loaded(PairwiseClassifier.load, cfg.model, digest, device=cfg.device, template=cfg.template, max_batch_tokens=cfg.max_batch_tokens))

    return OracleSpec(local_judge_id(PAIRWISE_CLASSIFIER, digest, {"template": cfg.template}, name="classifier"), build, runs_model=True)


def _cascade(cfg, config: CampaignConfig, world: World) -> OracleSpec:
    judge = oracle_spec(cfg.judge, config, world)
    people = people_spec(config) if cfg.people else None
    first = oracle_spec(cfg.first, config, world) if cfg.first is not None else None
    oracle_id = cascade_oracle_id(config, judge.oracle_id, people.oracle_id if people else None, first.oracle_id if first else None)
    return OracleSpec(oracle_id, lambda: CampaignCascade(config, world, judge=judge, people=people, first=first))


def people_spec(config: CampaignConfig) -> OracleSpec:
    from oracles.label_studio import LabelStudioConfig, LabelStudioOracle  # httpx: only with people

    h = config.humans
    settings = LabelStudioConfig(campaign=config.name, overlap=h.overlap, project_id=h.project_id)

    def build() -> LabelStudioOracle:
        url = h.url or os.environ.get(h.url_env)
        if not url:
            raise ValueError(f"humans: no Label Studio URL (set humans.url or the environment variable {h.url_env})")
        return LabelStudioOracle(settings, url=url, api_key=resolve(h.api_key_secret, h.api_key_env))

    return OracleSpec(settings.oracle_id, build)


KINDS: dict[str, Callable[..., OracleSpec]] = {
    "matrix": _matrix, "text_world": _text_world, "llm_judge": _llm_judge, "learned": _learned,
    "reward_model": _reward_model, "pairwise_lm": _pairwise_lm, "pairwise_classifier": _pairwise_classifier, "cascade": _cascade,
}
