"""Build the campaign's parts from its config: the world (prompts, and each tabular prompt's true
game), the oracle, the policy of each version, the solver parameters, and checkpoints in the store."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from data import Store, prompt_id
from oracles.games import load_game, make_game
from oracles.matrix import MatrixOracle, action_names
from oracles.text_world import TextWorldOracle, text_world_prompts
from pipelines.config import CampaignConfig
from solvers import tabular
from solvers.tabular_policy import TabularPolicy


@dataclass
class World:
    """What the campaign is about: its prompts (train and held-out) and, for a tabular world, each
    prompt's true game."""

    config: CampaignConfig

    @cached_property
    def games(self) -> dict[str, np.ndarray]:
        out = {}
        for i, spec in enumerate(self.config.games or []):
            P = load_game(spec.path) if spec.kind == "file" else make_game(spec.kind, spec.n, spec.seed, spec.strength)
            out[f"game-{i}: {spec.kind} n={len(P)}"] = P
        return out

    @cached_property
    def splits(self) -> dict[str, list[str]]:
        if self.config.games:
            return {"train": list(self.games), "eval": []}
        cfg = self.config.prompts
        if cfg.source == "text_world":
            train, held_out = text_world_prompts("train"), text_world_prompts("eval")
        else:
            train, held_out = _read_prompts(cfg.source)
        return {"train": train[: cfg.limit_train], "eval": held_out[: cfg.limit_eval]}

    @property
    def prompts(self) -> list[str]:
        """The training prompts."""
        return self.splits["train"]

    @property
    def eval_prompts(self) -> list[str]:
        return self.splits["eval"]

    def prompt_rows(self) -> list[dict]:
        source = "games" if self.config.games else self.config.prompts.source
        return [
            {"prompt_id": prompt_id(p), "prompt": p, "split": split, "source": source}
            for split, prompts in self.splits.items()
            for p in prompts
        ]

    def reference(self) -> dict[str, np.ndarray]:
        """Tabular μ per prompt: softmax of N(0, spread²) logits, seeded, so cyclic games are not trivial."""
        cfg = self.config.policy
        rng = np.random.default_rng(cfg.seed)
        return {p: np.exp(tabular.normalize(cfg.reference_spread * rng.standard_normal(len(P)))) for p, P in self.games.items()}


def _read_prompts(path: str) -> tuple[list[str], list[str]]:
    """A .txt file (one training prompt per line) or .jsonl ({"prompt": ..., "split": "train"|"eval"})."""
    train, held_out = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                    (held_out if row.get("split", "train") == "eval" else train).append(row["prompt"])
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' (and optional 'split')") from None
            else:
                train.append(line.rstrip("\n"))
    if not train:
        raise ValueError(f"{path}: no training prompts")
    return train, held_out


def build_oracle(config: CampaignConfig, world: World):
    """The campaign's oracle. A ``learned`` model answers every pair; a ``cascade`` is one object for the
    whole campaign (pipelines/preference_models.CampaignCascade): it judges each pair with the learned
    model of the pair's round, then its judge, within that round's budget."""
    cfg = config.oracle
    if cfg.kind == "learned":
        from oracles.learned import LearnedOracle
        from solvers.preference_model import load_preference_model

        model = load_preference_model(cfg.checkpoint, device=cfg.device)
        return LearnedOracle(model, name=model.config.head, batch_size=cfg.batch_size)
    if cfg.kind == "cascade":
        from pipelines.preference_models import CampaignCascade

        return CampaignCascade(config, world)
    return machine_oracle(cfg, world)


def machine_oracle(cfg, world: World):
    """A matrix, text-world or LLM-judge oracle from its config (the campaign's, or a cascade's judge)."""
    if cfg.kind == "matrix":
        return MatrixOracle(world.games, mode=cfg.mode, seed=cfg.seed)
    if cfg.kind == "text_world":
        return TextWorldOracle(mode=cfg.mode, seed=cfg.seed)
    if cfg.kind == "llm_judge":
        from pipelines.secrets import resolve

        return _llm_judge(cfg, resolve(cfg.api_key_secret, cfg.api_key_env))
    raise ValueError(f"unknown oracle kind {cfg.kind!r}")


def machine_oracle_id(cfg, world: World) -> str:
    """``machine_oracle(cfg, world).oracle_id`` without an LLM judge's API key: the key never changes
    answers, so the stages that only read judgments (retraining, diagnostics) need no secret."""
    if cfg.kind == "llm_judge":
        return _llm_judge(cfg, api_key=None).oracle_id
    return machine_oracle(cfg, world).oracle_id


def _llm_judge(cfg, api_key: str | None):
    from oracles.llm_judge import LLMJudge, LLMJudgeConfig

    settings = cfg.model_dump(exclude={"kind", "api_key_secret", "api_key_env"})
    return LLMJudge(LLMJudgeConfig(**settings, api_key=api_key))


def campaign_oracle_ids(config: CampaignConfig, world: World) -> set[str]:
    """The oracles whose judgments this campaign's solver reads: the machine oracle and/or people.

    A cascade's id is the same for every round although its learned model changes (a campaign's
    model versions all live in its store, and round r always uses the one trained before it): each
    stored judgment names the model version that answered in ``detail`` (``answered_by``, ``prefmodel``),
    so the versions stay apart in the data without splitting the campaign's judgments by id."""
    ids = set()
    cfg = config.oracle
    if cfg is not None and cfg.kind == "cascade":
        from pipelines.preference_models import cascade_oracle_id

        ids.add(cascade_oracle_id(config, world))
    elif cfg is not None and cfg.kind == "learned":
        from pipelines.preference_models import learned_oracle_id

        ids.add(learned_oracle_id(cfg.checkpoint))
    elif cfg is not None:
        ids.add(machine_oracle_id(cfg, world))
    if config.humans is not None:
        from pipelines.human import people_oracle_id

        ids.add(people_oracle_id(config))
    return ids


def solver_params(config: CampaignConfig) -> tabular.Params:
    s = config.solver
    return tabular.Params(s.algorithm, s.beta, s.eta, s.history, tuple(s.weights) if s.weights else None, s.schedule)


def phases(config: CampaignConfig) -> tuple[str, ...]:
    """The sample → judge → update phases of one round: extragradient solvers need a midpoint."""
    return ("midpoint", "update") if config.solver.algorithm in tabular.TWO_PHASE else ("update",)


# ----- versions, policies and checkpoints ----------------------------------------------------------------


def version(round: int, phase: str = "update") -> str:
    """Round r turns v{r−1} into v{r}; an extragradient round passes through v{r−1}-mid."""
    return f"v{round - 1}-mid" if phase == "midpoint" else f"v{round}"


_MIXTURE = "-mixture"


def mixture_version(version: str) -> str:
    """The label of Nash-MD's opponents y' ~ π^{1−m} μ^m sampled with π = ``version`` (no checkpoint)."""
    return version + _MIXTURE


def is_mixture(label: str) -> bool:
    return label.endswith(_MIXTURE)


def sampling_policy(label: str) -> str:
    """The policy version behind a responses' ``policy_version`` label: itself, or a mixture's π."""
    return label.removesuffix(_MIXTURE)


def checkpoint_dir(version: str) -> str:
    return f"checkpoints/{version}"


def work_dir(version: str) -> str:
    """Where the update that makes ``version`` keeps its step checkpoints until it finishes."""
    return f"checkpoints/.work-{version}"


def has_checkpoint(store: Store, version: str) -> bool:
    """Complete checkpoints only: the marker is written last."""
    return store.exists(f"{checkpoint_dir(version)}/_COMPLETE")


def save_checkpoint(store: Store, version: str, write) -> str:
    """``write(folder)`` saves a policy into a local folder; this puts it in the store so that a reader
    never takes a half-written checkpoint for a complete one: a temporary folder is moved into place,
    then the marker is written."""
    final = checkpoint_dir(version)
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "ckpt")
        write(staged)
        publish_folder(store, staged, final)
    store.write_bytes(f"{final}/_COMPLETE", b"")
    return store.path(final)


def publish_folder(store: Store, staged: str, final: str) -> None:
    """Copy the local folder ``staged`` to ``final`` in the store: on local disk into a temporary
    sibling, then renamed (a leftover at ``final`` from a crashed save is replaced); on an object store
    file by file. Callers mark it complete afterwards (a marker written last)."""
    if store.is_local:
        target = store.local_path(final)
        if os.path.exists(target):  # a leftover of a crashed save: it never got its marker
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        moving = f"{os.path.dirname(target)}/.tmp-{uuid.uuid4().hex}"
        shutil.copytree(staged, moving)
        os.rename(moving, target)
        return
    for root, _, files in os.walk(staged):
        for name in files:
            local = os.path.join(root, name)
            with open(local, "rb") as f:
                store.write_bytes(f"{final}/{os.path.relpath(local, staged)}", f.read())


def checkpoint_folder(store: Store, version: str, tmp: str) -> str:
    """A local folder holding a complete checkpoint (the store's own folder when it is local)."""
    if not has_checkpoint(store, version):
        raise FileNotFoundError(f"{store.path(checkpoint_dir(version))}: no complete checkpoint of policy {version}")
    return local_folder(store, checkpoint_dir(version), tmp)


def local_folder(store: Store, relpath: str, tmp: str) -> str:
    """The store's folder ``relpath`` on local disk: itself when the store is local, else copied into ``tmp``."""
    if store.is_local:
        return store.local_path(relpath)
    import pyarrow.fs as pafs

    base = store.path(relpath)
    for info in store.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File:
            dest = os.path.join(tmp, info.path[len(base) + 1 :])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with store.fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                out.write(src.read())
    return tmp


def lm_config(config: CampaignConfig, *, training: bool = False):
    """The causal-LM settings; for training, float32 weights (bf16 autocast keeps fp32 master weights)."""
    from solvers.causal_lm import CausalLMConfig

    p = config.policy
    return CausalLMConfig(
        temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, too_long=p.too_long, device=p.device, dtype="float32" if training else "auto",
        lean_forward=p.lean_forward,
    )


def ensure_reference(store: Store, config: CampaignConfig, world: World) -> None:
    """Write v0 (the reference and first policy) into the store once, so every round and every
    process reads the same reference, whatever it was built from."""
    if has_checkpoint(store, "v0"):
        return
    if config.policy.kind == "tabular":
        policy = TabularPolicy.from_reference({p: action_names(len(P)) for p, P in world.games.items()}, world.reference())
        save_checkpoint(store, "v0", policy.save)
        return
    from solvers import checkpoint as lm_checkpoint
    from solvers.causal_lm import CausalLMPolicy, tiny_policy

    cfg = config.policy
    policy = tiny_policy(seed=cfg.tiny_seed, config=lm_config(config)) if cfg.model == "tiny" else CausalLMPolicy.load(cfg.model, lm_config(config))
    save_checkpoint(store, "v0", lambda folder: lm_checkpoint.save_checkpoint(folder, policy.model, policy.tokenizer))


def load_policy(store: Store, version: str, config: CampaignConfig, world: World, *, with_optimizer: bool = False):
    """The policy of a version (and, for a causal LM with ``with_optimizer``, AdamW's saved state)."""
    ensure_reference(store, config, world)
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint_folder(store, version, tmp)
        if config.policy.kind == "tabular":
            policy, optimizer = TabularPolicy.load(folder), None
        else:
            from solvers import checkpoint as lm_checkpoint

            policy, optimizer = lm_checkpoint.load_checkpoint(folder, lm_config(config, training=with_optimizer))
    return (policy, optimizer) if with_optimizer else policy
