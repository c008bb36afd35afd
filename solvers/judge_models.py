"""Pretrained preference models run in this process: a Bradley–Terry reward model and a pairwise
cross-encoder (both ``AutoModelForSequenceClassification`` with one output), and what the three local
judges share with ``solvers/pairwise_lm.py``: loading on ``device: auto`` (bf16 on CUDA, fp32 on a
CPU), a content fingerprint of the checkpoint, and batches grouped by length.

The oracle wrappers (``oracles/local_judges.py``) take these objects duck-typed, as ``LearnedOracle``
takes the learned model, so ``oracles/`` never imports ``solvers/``.

    rm = RewardModel.load("path/to/reward-model")
    rm.score(prompts, responses)                    # one scalar r(x, y) per response
    pc = PairwiseClassifier.load("path/to/cross-encoder")
    pc.logits(prompts, firsts, seconds)             # one logit of "first ≻ second" per triple
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path
from string import Template

import torch

from data.prompts import chat_messages
from solvers import model_sources
from solvers.causal_lm import ModelLoadError, _device
from solvers.preference_model import checkpoint_fingerprint

DEFAULT_MAX_BATCH_TOKENS = 16384  # rows × padded width of one forward; memory grows with it
# A cross-encoder reads the prompt and both responses as one text; each checkpoint family has its own
# layout (PairRM: "<|source|>…<|candidate1|>…<|candidate2|>…"), so it is a setting.
DEFAULT_PAIR_TEMPLATE = "$prompt\n\n$first\n\n$second"


def torch_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (a CPU's bf16 matmuls are slower and less exact)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def fingerprint(source: str) -> str:
    """Content hash of a judge's checkpoint: a folder's files, a .gguf file's bytes, a packaged
    model's file; without loading anything. A hub id is refused: its files may change under one name."""
    path = Path(model_sources.resolve(source)).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"{source}: no such model folder or file (a judge's id hashes its files: download a hub model into a folder first)")
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(path.rglob("*")) if f.is_file()) if path.is_dir() else (path.stat().st_mtime_ns, path.stat().st_size)
    return _content_hash(str(path), stamp)


@functools.lru_cache(maxsize=16)
def _content_hash(path: str, stamp: tuple) -> str:
    """Hashed once per process while the files stay as they were (``stamp``: their times and sizes): a
    campaign asks for its oracle's id in several stages, and a model's files are hundreds of MB."""
    if Path(path).is_dir():
        return checkpoint_fingerprint(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, each within ``max_batch_tokens``
    (rows × the longest row): little padding, and the memory peak comes first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class Counters:
    """What a local judge has done since it was built: sequences, tokens read, forward passes, seconds."""

    def __init__(self):
        self.sequences = self.tokens = self.forwards = 0
        self.seconds = 0.0

    def as_dict(self) -> dict:
        return {"sequences": self.sequences, "tokens": self.tokens, "forwards": self.forwards, "seconds": self.seconds}


class _SequenceScorer:
    """An ``AutoModelForSequenceClassification`` with one output, read at batches grouped by length."""

    def __init__(self, model, tokenizer, *, fingerprint: str, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_length: int | None = None):
        if model.config.num_labels != 1:
            raise ModelLoadError(f"{type(model).__name__} has {model.config.num_labels} outputs; a reward model or pairwise classifier here has one (num_labels=1)")
        if tokenizer.pad_token_id is None:  # many reward models ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads each row's last non-pad token
        self.model, self.tokenizer, self.fingerprint = model.eval(), tokenizer, fingerprint
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length or getattr(tokenizer, "model_max_length", None)
        if self.max_length is not None and self.max_length > 1_000_000:  # transformers' "no limit" sentinel
            self.max_length = None
        self.counters = Counters()

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: str = "auto", **kwargs):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = _device(device)
        folder = Path(model_sources.resolve(str(source))).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder (no config.json): a sequence-classification checkpoint saved with save_pretrained")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch_dtype(device)).to(device)
        return cls(model, tokenizer, fingerprint=fingerprint(str(folder)), **kwargs)

    @torch.inference_mode()
    def _outputs(self, texts: list[str]) -> list[float]:
        started = time.perf_counter()
        ids = [self.tokenizer(t, truncation=self.max_length is not None, max_length=self.max_length).input_ids for t in texts]
        out = [0.0] * len(texts)
        for batch in length_batches([len(x) for x in ids], self.max_batch_tokens):
            padded = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(self.device)
            logits = self.model(**padded).logits[:, 0].float().tolist()
            for i, v in zip(batch, logits):
                out[i] = v
            self.counters.forwards += 1
            self.counters.tokens += sum(len(ids[i]) for i in batch)
        self.counters.sequences += len(texts)
        self.counters.seconds += time.perf_counter() - started
        return out


class RewardModel(_SequenceScorer):
    """A Bradley–Terry reward model: r(x, y), one scalar per response. The prompt and response are read
    as a chat (the user's turn, then the assistant's) when the tokenizer has a chat template, else as
    the prompt, a blank line and the response."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self._outputs([self._text(p, y) for p, y in zip(prompts, responses)])

    def _text(self, prompt: str, response: str) -> str:
        messages = chat_messages(prompt)
        if getattr(self.tokenizer, "chat_template", None) is None:
            prompt_text = prompt if messages is None else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            return f"{prompt_text}\n\n{response}"
        turns = (messages or [{"role": "user", "content": prompt}]) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False)


class PairwiseClassifier(_SequenceScorer):
    """A cross-encoder: one logit of "first ≻ second" from the prompt and both responses in one text
    (``template``: ``$prompt``, ``$first``, ``$second``; a single pass, so a ``$`` in a text stays)."""

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_PAIR_TEMPLATE, **kwargs):
        names = set(Template(template).get_identifiers())
        if names != {"prompt", "first", "second"}:
            raise ValueError(f"pairwise classifier template: needs exactly $prompt, $first and $second, got {sorted(names)}")
        super().__init__(model, tokenizer, **kwargs)
        self.template = Template(template)

    def logits(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        return self._outputs([self.template.substitute(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)])
