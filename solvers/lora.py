"""LoRA adapters (peft) on a causal-LM policy: the one place that holds a model by its adapter.

LoRA (Hu et al., arXiv 2106.09685) trains W = W₀ + (α/r)·B A beside each frozen target matrix W₀ (A: r × in,
B: out × r, B = 0 at the start, so a fresh adapter leaves the model as it was). A campaign with
``policy.lora`` keeps one copy of the base weights W₀ (its v0) and, per version, only A and B:

- the reference μ is the base with the adapter disabled (:func:`running` with no adapter);
- a past iterate (MNPO's π_{t−1}, …) is its adapter run on the same base (:func:`running`, :class:`AdapterScorer`);
- a version's checkpoint is the adapter (:func:`save_adapter`), named with the base it belongs to by the
  store's manifest; loading a version is base + adapter (:func:`attach`); :func:`merged` folds B A into
  W₀ for a plain model a user can serve.

Every version's adapter is the whole difference from the base: round t trains the adapter of v_{t−1}
further, with its AdamW state, as a full fine-tune trains the weights. Whatever wraps the model for
several processes (DDP, FSDP) wraps the PeftModel: its trainable parameters are the adapter's only.

peft is imported only where an adapter is made or read, so a machine without it (the GPU machine of
bench/gpu_update.py) still imports the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sys
import warnings
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from solvers import causal_lm, checkpoint
from solvers.causal_lm import CausalLMConfig, CausalLMPolicy

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINED = "default"  # the adapter a policy trains and saves (peft's default name)
OTHER = "other-iterate"  # the name a past iterate's adapter runs under, only inside ``running``


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape (``policy.lora`` in a campaign config)."""

    r: int = 8  # rank of B A
    alpha: float = 16.0  # scale α: the update is (α/r)·B A
    dropout: float = 0.0  # dropout on the adapter's input while training
    target_modules: tuple[str, ...] | str = "all-linear"  # module names (e.g. ("q_proj", "v_proj")) or "all-linear" (every linear layer but the output head)

    def __post_init__(self):
        if self.r < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs r ≥ 1, alpha > 0 and dropout in [0, 1); got r={self.r}, alpha={self.alpha}, dropout={self.dropout}")

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM")

    def differences(self, model: PeftModel) -> list[str]:
        """What differs between these settings and the adapter ``model`` trains (empty: none)."""
        have, want = model.peft_config[TRAINED], self.peft_config()
        pairs = {"r": (have.r, want.r), "alpha": (have.lora_alpha, want.lora_alpha), "dropout": (have.lora_dropout, want.lora_dropout)}
        # peft keeps "all-linear" resolved to the module names it found: names are compared only with names
        if not isinstance(have.target_modules, str) and not isinstance(want.target_modules, str):
            pairs["target_modules"] = (sorted(have.target_modules), sorted(want.target_modules))
        return [f"{k}: stored {a}, configured {b}" for k, (a, b) in pairs.items() if a != b]


def is_lora(model) -> bool:
    """Whether ``model`` is a base model with a LoRA adapter (a PeftModel; none without peft imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds an adapter (and needs its base) rather than a whole model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def wrap(model, settings: LoraSettings, *, seed: int = 0) -> PeftModel:
    """``model`` with a new trainable adapter (B = 0: it computes what ``model`` did); only the adapter's
    parameters require gradients. A is drawn from ``seed`` (the global RNG is left as it was)."""
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, settings.peft_config())
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"policy.lora.target_modules: {e}") from None
    return peft_model.to(next(model.parameters()).device)


def for_training(policy: CausalLMPolicy, settings: LoraSettings | None, *, seed: int = 0) -> CausalLMPolicy:
    """The policy an update trains: a whole model as it is without ``settings``; with them, a new adapter
    on a whole model (the first update starts from the base), or the policy's own adapter, trained further.
    Refuses an adapter whose shape differs from ``settings``, or one with no ``settings`` at all: a
    campaign trains one adapter shape, so a changed config is an error rather than silently ignored."""
    if not is_lora(policy.model):
        return policy if settings is None else CausalLMPolicy(wrap(policy.model, settings, seed=seed), policy.tokenizer, policy.config)
    if settings is None:
        raise ValueError("policy.lora is not set, but the version being updated is a LoRA adapter: set policy.lora as the campaign had it")
    if differences := settings.differences(policy.model):
        raise ValueError(f"policy.lora differs from the adapter this campaign trains ({'; '.join(differences)}): keep its settings, or start a new store")
    return policy


def attach(model, folder: str | os.PathLike, *, trainable: bool = True) -> PeftModel:
    """The base ``model`` with the adapter saved in ``folder`` (:func:`save_adapter`), trainable or not."""
    from peft import PeftModel

    with _quiet():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def save_adapter(model: PeftModel, folder: str | os.PathLike) -> None:
    """The trained adapter alone (its config and weights, safetensors) into ``folder``."""
    model.save_pretrained(str(folder), selected_adapters=[TRAINED])


def load_weights(model: PeftModel, folder: str | os.PathLike) -> None:
    """Copy the adapter weights saved in ``folder`` into ``model``'s trained adapter, in place (a step
    checkpoint's, when a killed update resumes); refuses weights the adapter lacks or does not get."""
    from peft import set_peft_model_state_dict

    state = load_file(Path(folder) / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(model, state, adapter_name=TRAINED)
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{TRAINED}." in k]
    if unexpected or missing:
        raise ValueError(f"{folder}: adapter weights do not fit the model's adapter (unexpected {unexpected[:3]}, missing {missing[:3]})")


def model_state(model: PeftModel, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter weights saved in ``folder`` under ``model``'s own state-dict names (its trained
    adapter's), for a sharded model, which loads a whole state dict on every rank."""
    saved = load_file(Path(folder) / ADAPTER_WEIGHTS)
    names = {name: name.replace(f".{TRAINED}.", ".") for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(names.values()) - set(saved)), sorted(set(saved) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"{folder}: adapter weights do not fit the model's adapter (unexpected {unexpected[:3]}, missing {missing[:3]})")
    return {name: saved[key] for name, key in names.items()}


@contextmanager
def _quiet() -> Iterator[None]:
    """peft 0.21 reads a property transformers 5.2x deprecated (a FutureWarning per adapter made): not ours to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass
class Adapter:
    """An adapter read into memory: its peft config and weights (as saved: names without the adapter's)."""

    config: LoraConfig
    weights: dict[str, torch.Tensor] = field(repr=False)


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """The adapter saved in ``folder``, in memory (the folder may be a temporary copy)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    return Adapter(config, load_file(Path(folder) / ADAPTER_WEIGHTS))


@contextmanager
def running(model: PeftModel, adapter: Adapter | None) -> Iterator[None]:
    """Within the block ``model`` computes with ``adapter`` instead of its trained one; with None, with
    no adapter at all: the base model, i.e. the reference μ. The trained adapter, and which parameters
    require gradients, are as before afterwards."""
    from peft import set_peft_model_state_dict

    if adapter is None:
        with model.disable_adapter():
            yield
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model.add_adapter(OTHER, adapter.config)
    try:
        set_peft_model_state_dict(model, adapter.weights, adapter_name=OTHER)
        model.set_adapter(OTHER, inference_mode=True)
        yield
    finally:
        model.set_adapter(TRAINED)
        model.delete_adapter(OTHER)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)


@dataclass
class AdapterScorer:
    """Scores as ``policy`` (its model a PeftModel) does with ``adapter`` running instead of its own
    (None: the base, μ): another version's log-probs without a second copy of the base weights."""

    policy: CausalLMPolicy
    adapter: Adapter | None

    def score(self, *args, **kwargs) -> list[float]:
        with running(self.policy.model, self.adapter):
            return self.policy.score(*args, **kwargs)


def merged(model: PeftModel):
    """A plain model (the base class, no peft) computing what base + adapter does: W₀ + (α/r)·B A folded
    into each target matrix. ``model`` is consumed: its base weights now hold the merged ones."""
    return model.merge_and_unload()


def load_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, config: CausalLMConfig | None = None) -> tuple[CausalLMPolicy, dict | None]:
    """(policy, optimizer state or None) of a version saved as an adapter: the base checkpoint's model
    and tokenizer with the adapter on top (trainable), as ``causal_lm.load_checkpoint`` for a whole model."""
    policy, _ = causal_lm.load_checkpoint(base, config)
    state = checkpoint.load_trainer_state(adapter)
    return CausalLMPolicy(attach(policy.model, adapter), policy.tokenizer, policy.config), (state or {}).get("optimizer")


def save_merged(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> None:
    """Base + adapter merged (float32, on the CPU) into a plain model folder ``out``: ``save_pretrained``
    and the base's tokenizer, loadable without peft."""
    policy, _ = load_checkpoint(base, adapter, CausalLMConfig(device="cpu", dtype="float32"))
    merged(policy.model).save_pretrained(str(out))
    policy.tokenizer.save_pretrained(str(out))
