"""Build the campaign's parts from its config: the world (prompts and their games), the oracle, the
initial policy, the solver parameters, and checkpoints in the store."""

from __future__ import annotations

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
from pipelines.config import CampaignConfig
from solvers import tabular
from solvers.tabular_policy import TabularPolicy


@dataclass
class World:
    """What the campaign is about: its prompts and, for the tabular world, each prompt's true game."""

    config: CampaignConfig

    @cached_property
    def games(self) -> dict[str, np.ndarray]:
        out = {}
        for i, spec in enumerate(self.config.games):
            P = load_game(spec.path) if spec.kind == "file" else make_game(spec.kind, spec.n, spec.seed, spec.strength)
            out[f"game-{i}: {spec.kind} n={len(P)}"] = P
        return out

    @property
    def prompts(self) -> list[str]:
        return list(self.games)

    def prompt_rows(self) -> list[dict]:
        return [{"prompt_id": prompt_id(p), "prompt": p, "split": "train", "source": "games"} for p in self.prompts]

    def reference(self) -> dict[str, np.ndarray]:
        """μ per prompt: softmax of N(0, spread²) logits, seeded, so that cyclic games are not trivial."""
        cfg = self.config.policy
        rng = np.random.default_rng(cfg.seed)
        return {p: np.exp(tabular.normalize(cfg.reference_spread * rng.standard_normal(len(P)))) for p, P in self.games.items()}


def build_oracle(config: CampaignConfig, world: World):
    cfg = config.oracle
    if cfg.kind == "matrix":
        return MatrixOracle(world.games, mode=cfg.mode, seed=cfg.seed)
    raise ValueError(f"unknown oracle kind {cfg.kind!r}")


def initial_policy(config: CampaignConfig, world: World) -> TabularPolicy:
    return TabularPolicy.from_reference({p: action_names(len(P)) for p, P in world.games.items()}, world.reference())


def solver_params(config: CampaignConfig) -> tabular.Params:
    s = config.solver
    return tabular.Params(s.algorithm, s.beta, s.eta, s.history, tuple(s.weights) if s.weights else None, s.schedule)


def phases(config: CampaignConfig) -> tuple[str, ...]:
    """The sample → judge → update phases of one round: extragradient solvers need a midpoint."""
    return ("midpoint", "update") if config.solver.algorithm in tabular.TWO_PHASE else ("update",)


# ----- versions and checkpoints ------------------------------------------------------------------------


def version(round: int, phase: str = "update") -> str:
    """Round r turns v{r−1} into v{r}; an extragradient round passes through v{r−1}-mid."""
    return f"v{round - 1}-mid" if phase == "midpoint" else f"v{round}"


def checkpoint_dir(version: str) -> str:
    return f"checkpoints/{version}"


def has_checkpoint(store: Store, version: str) -> bool:
    """Complete checkpoints only: the marker is written last."""
    return store.exists(f"{checkpoint_dir(version)}/_COMPLETE")


def save_checkpoint(store: Store, version: str, policy) -> str:
    """Save a policy so that a reader never takes a half-written checkpoint for a complete one:
    write into a temporary folder, move it into place, then write the marker."""
    final = checkpoint_dir(version)
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "ckpt")
        policy.save(staged)
        if store._local:
            target = store.local_path(final)
            if os.path.exists(target):  # a leftover of a crashed save: it never got its marker
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            moving = f"{os.path.dirname(target)}/.tmp-{uuid.uuid4().hex}"
            shutil.copytree(staged, moving)
            os.rename(moving, target)
        else:
            for root, _, files in os.walk(staged):
                for name in files:
                    local = os.path.join(root, name)
                    with open(local, "rb") as f:
                        store.write_bytes(f"{final}/{os.path.relpath(local, staged)}", f.read())
    store.write_bytes(f"{final}/_COMPLETE", b"")
    return store.path(final)


def load_checkpoint(store: Store, version: str, config: CampaignConfig, world: World) -> TabularPolicy:
    if version == "v0":
        return initial_policy(config, world)
    if not has_checkpoint(store, version):
        raise FileNotFoundError(f"{store.path(checkpoint_dir(version))}: no complete checkpoint of policy {version}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = _fetch(store, checkpoint_dir(version), tmp)
        return TabularPolicy.load(folder)


def _fetch(store: Store, relpath: str, tmp: str) -> str:
    if store._local:
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
