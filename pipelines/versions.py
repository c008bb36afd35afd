"""Policy versions and where they live in the store: version names (and Nash-MD's mixture labels), the
checkpoint layout, writing a checkpoint so that a reader never takes a half-written one, and loading
a version's policy.

    checkpoints/v<N>/        the policy after round N (v0: the reference), as its writer saved it: a whole
                             model, or (``policy.lora``) an adapter alone, loaded on top of its base
    checkpoints/v<N>.json    its manifest, written last: only a version with a manifest exists
                             (data/checkpoints.py; a store written before has checkpoints/v<N>/_COMPLETE);
                             an adapter's names its base version (``"base": "v0"``)
    checkpoints/.work-v<N>/  step checkpoints of the unfinished update that makes v<N>
    checkpoints/.job-v<N>/   that update's job when it runs under torchrun (trainer.processes > 1)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

from data import Store
from data import checkpoints as marks
from oracles.matrix import action_names
from pipelines.config import CampaignConfig, config_from_settings
from pipelines.world import World
from solvers.tabular_policy import TabularPolicy


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


def job_dir(version: str) -> str:
    """Where an update launched under torchrun keeps its job (examples, configs, rank 0's result)."""
    return f"checkpoints/.job-{version}"


def has_checkpoint(store: Store, version: str) -> bool:
    """Complete checkpoints only: the manifest is written last."""
    return marks.is_complete(store, checkpoint_dir(version))


def save_checkpoint(store: Store, version: str, write, *, base: str | None = None) -> str:
    """``write(folder)`` saves a policy into a local folder; this puts it in the store so that a reader
    never takes a half-written checkpoint for a complete one: a temporary folder is moved into place,
    then the manifest is written. ``base``: the version an adapter checkpoint is loaded on top of."""
    final = checkpoint_dir(version)
    with tempfile.TemporaryDirectory() as tmp:
        staged = os.path.join(tmp, "ckpt")
        write(staged)
        publish_folder(store, staged, final)
    marks.mark_complete(store, final, {"version": version, **({"base": base} if base else {})})
    return store.path(final)


def base_version(store: Store, version: str) -> str:
    """The version an adapter checkpoint is loaded on top of (its manifest's ``base``; v0 by default)."""
    return marks.read_manifest(store, checkpoint_dir(version)).get("base", "v0")


def publish_folder(store: Store, staged: str, final: str) -> None:
    """Copy the local folder ``staged`` to ``final`` in the store: on local disk into a temporary
    sibling, then renamed (a leftover at ``final`` from a crashed save is replaced); on an object store
    file by file. Callers mark it complete afterwards (``data.checkpoints.mark_complete``: written last)."""
    if store.is_local:
        target = store.local_path(final)
        if os.path.exists(target):  # a leftover of a crashed save: it never got its manifest
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


def served_folder(store: Store, version: str, tmp: str) -> str:
    """The local model folder a sampling server is started on for ``version``: its checkpoint folder, or
    for a version stored as an adapter its base with the adapter merged in (written under ``tmp``), since
    a server loads a plain model."""
    from solvers import lora  # torch: a server samples a causal LM only

    folder = checkpoint_folder(store, version, os.path.join(tmp, "version"))
    if lora.is_adapter_folder(folder):
        merged = os.path.join(tmp, "merged")
        lora.save_merged(checkpoint_folder(store, base_version(store, version), os.path.join(tmp, "base")), folder, merged)
        return merged
    return folder


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
    from solvers.causal_lm import CausalLMPolicy, tiny_policy  # torch and transformers: only for a causal LM

    cfg = config.policy
    policy = tiny_policy(seed=cfg.tiny_seed, config=lm_config(config)) if cfg.model == "tiny" else CausalLMPolicy.load(cfg.model, lm_config(config))
    save_checkpoint(store, "v0", lambda folder: lm_checkpoint.save_checkpoint(folder, policy.model, policy.tokenizer))


def lora_settings(config: CampaignConfig):
    """``policy.lora`` as solvers/lora.py's settings, or None (full fine-tuning)."""
    from solvers.lora import LoraSettings

    lora = getattr(config.policy, "lora", None)
    return None if lora is None else config_from_settings(LoraSettings, lora)


def load_policy(store: Store, version: str, config: CampaignConfig, world: World, *, with_optimizer: bool = False):
    """The policy of a version (and, for a causal LM with ``with_optimizer``, AdamW's saved state). An
    adapter version is its base's model with the adapter on top."""
    ensure_reference(store, config, world)
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint_folder(store, version, os.path.join(tmp, "version"))
        if config.policy.kind == "tabular":
            policy, optimizer = TabularPolicy.load(folder), None
        else:
            from solvers import lora
            from solvers.causal_lm import load_checkpoint

            lm = lm_config(config, training=with_optimizer)
            if lora.is_adapter_folder(folder):
                base = checkpoint_folder(store, base_version(store, version), os.path.join(tmp, "base"))
                policy, optimizer = lora.load_checkpoint(base, folder, lm)
            else:
                policy, optimizer = load_checkpoint(folder, lm)
    return (policy, optimizer) if with_optimizer else policy


def export_model(store: Store, version: str, out: str) -> str:
    """Write ``version`` as a plain model folder a user can serve or publish (``save_pretrained`` and
    the tokenizer): an adapter version merged into its base, a whole-model version copied without its
    optimizer state. Refuses an existing ``out``; a folder appears at ``out`` only once complete."""
    from solvers import lora
    from solvers.checkpoint import TRAINER_STATE

    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new folder")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=parent, prefix=".export-") as staging:
        folder = checkpoint_folder(store, version, os.path.join(tmp, "version"))
        staged = os.path.join(staging, "model")
        if lora.is_adapter_folder(folder):
            base = checkpoint_folder(store, base_version(store, version), os.path.join(tmp, "base"))
            lora.save_merged(base, folder, staged)
        else:
            shutil.copytree(folder, staged, ignore=shutil.ignore_patterns(TRAINER_STATE, UPDATE_METRICS))
        os.rename(staged, out)
    return out


UPDATE_METRICS = "update_metrics.json"  # in a checkpoint's folder: the metrics of the update that made it


def with_update_metrics(write, metrics: dict):
    """A checkpoint writer (``save_checkpoint``'s ``write``) that also puts the update's ``metrics`` in the
    folder: the checkpoint is written once, so a resumed round that finds it stored reports the loss of
    the update that made it instead of none."""

    def write_with_metrics(folder: str) -> None:
        write(folder)
        with open(os.path.join(folder, UPDATE_METRICS), "w") as f:
            json.dump(metrics, f, sort_keys=True)

    return write_with_metrics


def stored_update_metrics(store: Store, policy_version: str) -> dict:
    """What ``with_update_metrics`` kept beside a checkpoint ({} for one saved before it existed)."""
    path = f"{checkpoint_dir(policy_version)}/{UPDATE_METRICS}"
    return json.loads(store.read_bytes(path)) if store.exists(path) else {}
