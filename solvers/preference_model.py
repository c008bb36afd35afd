"""Learned preference models: P(a ≻ b | x) from a transformers backbone, trained on the store's comparisons.

One encoder, two heads. e(x, y) ∈ R^d is the backbone's last hidden state pooled over the response
(the mean over the separator, the response's tokens and the end token; or the last token), read from
the sequence  [BOS/CLS] x [SEP] y [EOS]  (whichever of those tokens the tokenizer has):

    pairwise  logit(x, a, b) = g(e_a, e_b) − g(e_b, e_a),   g: an MLP on the concatenation [e_a, e_b]
    bt        logit(x, a, b) = r(e_a) − r(e_b),              r: an MLP to a scalar (Bradley–Terry)

    P(a ≻ b | x) = σ(logit)

Both are antisymmetric by construction, so P(a ≻ b) + P(b ≻ a) = 1 and the order of presentation cannot
bias them. ``predict`` makes it exact in floating point: it computes each unordered pair's logit once
and negates it for the other order, and σ is evaluated on the non-negative side (1 − σ(l) is exact for
σ(l) ≥ ½). BT's P depends only on r_a − r_b, so it orders all responses and must get at least one pair of
every cycle a ≻ b ≻ c ≻ a wrong; the pairwise head is not a difference of scores and can represent the
cycle (an MLP on [e_a, e_b] antisymmetrized: the general case of f(x, a, b) − f(x, b, a)).

Responses are encoded one at a time, not a and b jointly: a prompt's k responses cost k encoder passes
for all k² ordered pairs (``predict`` encodes each distinct (prompt, response) once). A joint
cross-encoder would see finer contrasts at k² passes; this design chooses the cheap oracle.

Training (``train``) is the policy trainer's machinery (solvers/trainer.py, solvers/checkpoint.py):
the same settings (``trainer.StepConfig``), batch plan (shuffled, length-bucketed), micro-batches and
gradient accumulation, AdamW with warm-up and decay, bf16 autocast on CUDA, DDP under torchrun
(``trainer.init_distributed``), step loop with periodic atomic checkpoints that a killed run resumes
from (``trainer.run_steps``), and clipping with a refusal, naming the examples, of a step whose loss is
not finite (``trainer.checked_step``). Only the step itself is this module's. The loss is the vote-weighted binary
cross-entropy against soft labels p̂ = P̂(a ≻ b):

    L = Σ_i w_i · −[p̂_i log σ(l_i) + (1 − p̂_i) log σ(−l_i)] / Σ_i w_i     (w_i = votes, over the global batch)

which for p̂ = k/n votes is the binomial likelihood of the n votes.

What a pipeline calls:

    examples = examples_from_store(store)                       # judgments of every non-learned oracle
    report = fit_preference_model(store, out_dir, init=backbone_or_checkpoint, train_config=...)
    model = load_preference_model(report.path)                  # .predict(...), .fingerprint
    gap = compare_bt_pairwise(examples, backbone=backbone)      # intransitivity/logloss_gap

Retraining after a round is ``fit_preference_model(store, next_dir, init=current_dir)``: it warm-starts
from the current checkpoint (weights and AdamW moments) and trains on everything the expensive oracles
answered so far.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from data.diagnostics import answered_kind, logloss_gap, prediction_metrics
from data.keys import stable_hash
from solvers import checkpoint as ckpt
from solvers import trainer
from solvers.causal_lm import ModelLoadError, _first_line, context_length, tiny_causal_lm

PREFERENCE_FILE = "preference_model.json"  # the head's settings; marks a folder as a preference-model checkpoint
HEAD_FILE = "head/model.safetensors"  # in a subfolder: checkpoint.load_weights reads the top level's weights (the backbone)
FORMAT = 1
HEADS = ("pairwise", "bt")
POOLS = ("mean", "last")
NOT_IN_FINGERPRINT = (ckpt.TRAINER_STATE,)  # the optimizer state does not change answers


class PreferenceDataError(ValueError):
    """Training or evaluation data that cannot be used; the message says why and names examples."""


class CheckpointMismatchError(ValueError):
    """A checkpoint folder that does not match the config asked for, or whose files disagree."""


@dataclass(frozen=True)
class PreferenceModelConfig:
    """The model around the backbone. Every field changes answers: a checkpoint must match all of them."""

    head: str = "pairwise"  # "pairwise" (can represent cycles) or "bt" (Bradley–Terry scalar reward)
    pool: str = "mean"  # "mean": over the separator, response and end tokens; "last": the last token (decoders)
    head_hidden: int = 256  # width of the head's two hidden layers
    max_prompt_tokens: int = 256  # a longer prompt keeps its last tokens
    max_response_tokens: int = 256  # a longer response keeps its first tokens

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if min(self.head_hidden, self.max_prompt_tokens, self.max_response_tokens) < 1:
            raise ValueError("head_hidden, max_prompt_tokens and max_response_tokens must be ≥ 1")


@dataclass(frozen=True)
class PreferenceTrainConfig(trainer.StepConfig):
    """How a preference model trains: the fields of ``trainer.StepConfig`` (AdamW, schedule, batches,
    device, checkpoints, seed: batch order, held-out split, dropout, head initialization), with defaults
    for a preference model, and the held-out evaluation."""

    lr: float = 1e-4  # a tiny random backbone wants ~1e-3
    micro_batch_size: int = 16  # pairs per forward pass per process (2 sequences each)
    eval_share: float = 0.2  # share of prompts held out for evaluation (by a hash of the prompt id: stable across rounds)
    eval_batch_size: int = 64  # sequences per forward pass when predicting

    OPERATIONAL = (*trainer.StepConfig.OPERATIONAL, "eval_share", "eval_batch_size")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}")
        if not 0.0 <= self.eval_share < 1.0:
            raise ValueError(f"eval_share must be in [0, 1), got {self.eval_share}")


@dataclass(frozen=True)
class PairExample:
    """One judged ordered pair: P̂(a ≻ b | prompt) = ``p_a`` resting on ``weight`` votes."""

    prompt_id: str
    prompt: str
    a: str
    b: str
    p_a: float
    weight: float = 1.0
    id: str = ""  # e.g. the comparison id: named in errors


# ----- the model ----------------------------------------------------------------------------------------


class PreferenceModel(torch.nn.Module):
    """A backbone (any ``transformers`` base model: encoder or decoder) with a pairwise or BT head.
    See the module docstring. ``fingerprint`` is the content hash of the checkpoint it was loaded from
    or saved to (None for a model that has not been saved since it last changed)."""

    def __init__(self, backbone, tokenizer, config: PreferenceModelConfig = PreferenceModelConfig(), *, seed: int = 0):
        super().__init__()
        self.backbone, self.tokenizer, self.config = backbone, tokenizer, config
        d = backbone.config.get_text_config().hidden_size
        h = config.head_hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Sequential(
                torch.nn.Linear(2 * d if config.head == "pairwise" else d, h), torch.nn.GELU(),
                torch.nn.Linear(h, h), torch.nn.GELU(),
                torch.nn.Linear(h, 1),
            )  # fmt: skip
        t = tokenizer
        first = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        self.prefix = [first] if first is not None else []
        self.sep_id = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
        end = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        self.suffix = [end] if end is not None else []
        self.pad_id = next((i for i in (t.pad_token_id, t.eos_token_id, 0) if i is not None))
        if self.sep_id is None:
            raise ValueError("the tokenizer has neither a SEP nor an EOS token to separate prompt and response")
        longest = len(self.prefix) + config.max_prompt_tokens + 1 + config.max_response_tokens + len(self.suffix)
        context = context_length(backbone, tokenizer)
        if context is not None and longest > context:
            raise ValueError(f"max_prompt_tokens + max_response_tokens (+ {longest - config.max_prompt_tokens - config.max_response_tokens} special tokens) = {longest} exceeds the backbone's context of {context}")
        self.fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- text → token ids

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], int]]:
        """(token ids, index where the pooled span starts) per (prompt, response): the prompt keeps its
        last ``max_prompt_tokens``, the response its first ``max_response_tokens``."""
        if len(prompts) != len(responses):
            raise ValueError(f"encode: {len(prompts)} prompts and {len(responses)} responses")
        distinct = sorted(set(prompts) | set(responses))  # a prompt's k responses share its tokens: tokenize each text once
        ids = dict(zip(distinct, self.tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []))
        cfg = self.config
        out = []
        for p, r in zip((ids[t] for t in prompts), (ids[t] for t in responses)):
            head = self.prefix + p[len(p) - cfg.max_prompt_tokens :] if len(p) > cfg.max_prompt_tokens else self.prefix + p
            out.append((head + [self.sep_id] + r[: cfg.max_response_tokens] + self.suffix, len(head)))
        return out

    def collate(self, seqs: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``pool_weights`` (each row sums to 1 over the
        positions pooled), on the model's device."""
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        pool = torch.zeros((len(seqs), width))
        for i, (ids, start) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            if self.config.pool == "mean":
                pool[i, start : len(ids)] = 1.0 / (len(ids) - start)
            else:
                pool[i, len(ids) - 1] = 1.0
        device = self.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "pool_weights": pool.to(device)}

    # --- tensors → logits

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        """(n, d) float32: e(x, y) for each row."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return (pool_weights.unsqueeze(-1) * hidden.float()).sum(1)  # elementwise: float32 even under autocast

    def pair_logits(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        """(n,) logit(a ≻ b) from embeddings (n, d): g(e_a, e_b) − g(e_b, e_a), or r(e_a) − r(e_b)."""
        n = e_a.shape[0]
        if self.config.head == "pairwise":
            g = self.head(torch.cat([torch.cat([e_a, e_b], -1), torch.cat([e_b, e_a], -1)])).squeeze(-1).float()
        else:
            g = self.head(torch.cat([e_a, e_b])).squeeze(-1).float()
        return g[:n] - g[n:]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        """(n,) logits for a batch of 2n sequences: rows 0..n−1 are the a's, rows n..2n−1 their b's."""
        e = self.embed(input_ids, attention_mask, pool_weights)
        n = e.shape[0] // 2
        return self.pair_logits(e[:n], e[n:])

    # --- batched inference

    @torch.inference_mode()
    def predict(self, prompts: Sequence[str], a_texts: Sequence[str], b_texts: Sequence[str], *, batch_size: int = 64) -> list[float]:
        """P(a ≻ b | prompt) for aligned lists. Each distinct (prompt, response) is encoded once, in
        length-sorted batches of ``batch_size``; each unordered pair's logit is computed once, so the
        answer for (b, a) is exactly 1 − the answer for (a, b)."""
        if not len(prompts) == len(a_texts) == len(b_texts):
            raise ValueError(f"predict: {len(prompts)} prompts, {len(a_texts)} a's and {len(b_texts)} b's")
        if not prompts:
            return []
        was_training = self.training
        self.eval()
        try:
            keys = sorted(set(zip(prompts, a_texts)) | set(zip(prompts, b_texts)))
            row = {k: i for i, k in enumerate(keys)}
            seqs = self.encode([k[0] for k in keys], [k[1] for k in keys])
            order = sorted(range(len(keys)), key=lambda i: len(seqs[i][0]))
            device = self.device
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
            emb = torch.empty((len(keys), self.backbone.config.get_text_config().hidden_size), device=device)
            with autocast:
                for s in range(0, len(order), batch_size):
                    rows = order[s : s + batch_size]
                    emb[torch.tensor(rows, device=device)] = self.embed(**self.collate([seqs[i] for i in rows]))
            # each unordered pair once, as (lower row, higher row); the other order is its negation
            ia = [row[(p, a)] for p, a in zip(prompts, a_texts)]
            ib = [row[(p, b)] for p, b in zip(prompts, b_texts)]
            canon = sorted({(min(i, j), max(i, j)) for i, j in zip(ia, ib) if i != j})
            logit = {}
            with autocast:
                for s in range(0, len(canon), 4 * batch_size):
                    chunk = canon[s : s + 4 * batch_size]
                    lo = torch.tensor([c[0] for c in chunk], device=device)
                    hi = torch.tensor([c[1] for c in chunk], device=device)
                    logit.update(zip(chunk, self.pair_logits(emb[lo], emb[hi]).double().tolist()))
            out = []
            for i, j in zip(ia, ib):
                l = 0.0 if i == j else logit[(i, j)] if i < j else -logit[(j, i)]  # noqa: E741
                out.append(_prob(l))
            return out
        finally:
            self.train(was_training)

    # --- saving (checkpoint.save_checkpoint calls this, then saves the tokenizer beside it)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        self.backbone.save_pretrained(folder)
        (folder / HEAD_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        (folder / PREFERENCE_FILE).write_text(json.dumps({"format": FORMAT, **asdict(self.config)}, indent=1, sort_keys=True))

    @classmethod
    def from_backbone(cls, source: str | os.PathLike, config: PreferenceModelConfig = PreferenceModelConfig(), *, seed: int = 0, device: str = "auto", dtype: torch.dtype = torch.float32) -> PreferenceModel:
        """A new model (the head random, seeded) on the base model of a local folder or hub id (a
        causal-LM or encoder checkpoint: its LM head, if any, is dropped)."""
        source = str(source)
        local = Path(source).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder: it has no config.json")
        if (local / PREFERENCE_FILE).is_file():
            raise ModelLoadError(f"{source} is a preference-model checkpoint: load it with load_preference_model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            backbone = AutoModel.from_pretrained(source, dtype=dtype)
        except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError here
            raise ModelLoadError(f"cannot load the backbone {source}: {_first_line(e)}") from e
        return cls(backbone, tokenizer, config, seed=seed).to(_device(device))


def tiny_preference_model(config: PreferenceModelConfig = PreferenceModelConfig(head_hidden=64, max_prompt_tokens=64, max_response_tokens=64), *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 256) -> PreferenceModel:
    """A preference model on the tiny byte-level Llama of ``causal_lm.tiny_causal_lm`` (its base model;
    ~100k parameters by default), built from a config: for tests and benchmarks, offline."""
    lm, tokenizer = tiny_causal_lm(seed=seed, hidden=hidden, layers=layers, heads=heads, context=context)
    return PreferenceModel(lm.model, tokenizer, config, seed=seed)


def save_preference_model(model: PreferenceModel, path: str | os.PathLike, *, trainer_state: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a checkpoint folder (atomically, see checkpoint.save_checkpoint) and set its
    ``fingerprint``. Refuses an existing ``path`` unless ``overwrite``."""
    path = ckpt.save_checkpoint(path, model, model.tokenizer, trainer_state, overwrite=overwrite)
    model.fingerprint = checkpoint_fingerprint(path)
    return path


def load_preference_model(path: str | os.PathLike, config: PreferenceModelConfig | None = None, *, device: str = "auto", dtype: torch.dtype = torch.float32) -> PreferenceModel:
    """The model saved at ``path``, with its ``fingerprint``. With ``config``, refuses a checkpoint
    saved with other settings (``CheckpointMismatchError`` naming the fields); a folder whose weights do
    not fit its own config files is refused the same way."""
    path = Path(path)
    saved = _saved_config(path)
    if config is not None and config != saved:
        diff = [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, config {getattr(config, f.name)!r}" for f in fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
        raise CheckpointMismatchError(f"{path} does not match the config: {'; '.join(diff)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        backbone, info = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointMismatchError(f"{path}: cannot load its backbone from its own config.json: {_first_line(e)}") from e
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointMismatchError(f"{path}: the backbone's weights do not fit its config.json: " + "; ".join(f"{k} {sorted(v)[:3]}" for k, v in problems.items()))
    model = PreferenceModel(backbone, tokenizer, saved)
    _load_head(model, path)
    model.fingerprint = checkpoint_fingerprint(path)
    return model.to(_device(device)).eval()


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of everything in the checkpoint folder that changes answers: weights, configs,
    tokenizer (not the optimizer state). Two folders with the same files get the same fingerprint."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in NOT_IN_FINGERPRINT):
        rel = f.relative_to(path).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _saved_config(path: Path) -> PreferenceModelConfig:
    file = path / PREFERENCE_FILE
    if not file.is_file():
        raise ModelLoadError(f"{path} is not a preference-model checkpoint: it has no {PREFERENCE_FILE}" + (" (a backbone folder? use PreferenceModel.from_backbone)" if (path / "config.json").is_file() else ""))
    raw = json.loads(file.read_text())
    if raw.pop("format", None) != FORMAT:
        raise CheckpointMismatchError(f"{file}: unknown format (expected {FORMAT})")
    try:
        return PreferenceModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{file}: {e}") from None


def _load_head(model: PreferenceModel, path: Path) -> None:
    file = path / HEAD_FILE
    if not file.is_file():
        raise CheckpointMismatchError(f"{path} has no head weights ({HEAD_FILE})")
    try:
        model.head.load_state_dict(load_file(file))
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{path}: the head's weights do not fit {PREFERENCE_FILE}: {_first_line(e)}") from None


def _load_weights(model: PreferenceModel, path: Path) -> None:
    """Weights of a checkpoint into an existing model (resuming), in place."""
    try:
        ckpt.load_weights(model.backbone, path)
    except (ValueError, RuntimeError) as e:
        raise CheckpointMismatchError(f"{path}: its backbone weights do not fit this model: {_first_line(e)}") from None
    _load_head(model, path)


# ----- data --------------------------------------------------------------------------------------------


def examples_from_store(
    store, *, rounds=None, oracle_ids: set[str] | None = None, exclude_kinds: Sequence[str] = ("learned",), splits: Sequence[str] | None = ("train",)
) -> list[PairExample]:
    """The store's judgments as training pairs (p_a as soft label, n_votes as weight), of the given
    rounds and oracles (None: all). Judgments made by an oracle whose kind (the first part of its
    ``oracle_id``; through a cascade, the stage's: the ``answered_by`` column) is in ``exclude_kinds``
    are left out: by default a learned model's own answers, so it never trains on itself. Only
    judgments on prompts of ``splits`` are kept: by default training prompts, so evaluation judgments
    (held-out prompts: each round's win-rate, ``nashflow eval``) never train a learned oracle
    (None: every prompt, for diagnostics)."""
    c = store.read("comparisons", rounds=rounds)
    c = c[c["p_a"].notna() & (c["n_votes"] > 0)]
    if splits is not None:
        split = store.read("prompts", columns=["prompt_id", "split"]).set_index("prompt_id")["split"]
        c = c[c["prompt_id"].map(split).isin(set(splits))]
    if oracle_ids is not None:
        c = c[c["oracle_id"].isin(set(oracle_ids))]
    if exclude_kinds:
        c = c[~answered_kind(c).isin(set(exclude_kinds))]
    if c.empty:
        return []
    texts = store.read("responses", columns=["response_id", "text"]).set_index("response_id")["text"]
    prompts = store.read("prompts", columns=["prompt_id", "prompt"]).set_index("prompt_id")["prompt"]
    return [
        PairExample(r.prompt_id, prompts[r.prompt_id], texts[r.a_id], texts[r.b_id], float(r.p_a), float(r.n_votes), r.comparison_id)
        for r in c.itertuples(index=False)
    ]


def check_examples(examples: Sequence[PairExample], *, what: str = "training") -> None:
    """Refuse data a model cannot learn from, naming the culprits: none at all; labels that are not
    probabilities (NaN, outside [0, 1]); weights that are not positive; every label a tie (one class:
    nothing says which response is better). Labels all on one side are fine: the model is
    antisymmetric, so (a, b, 1) teaches the same as (b, a, 0) — a chosen/rejected import looks so."""
    if not examples:
        raise PreferenceDataError(f"no {what} pairs: the store holds no judged comparison of a non-learned oracle (for these rounds/oracles)")
    bad = [e for e in examples if not (isinstance(e.p_a, (int, float)) and math.isfinite(e.p_a) and 0.0 <= e.p_a <= 1.0)]
    if bad:
        raise PreferenceDataError(f"{len(bad)} {what} label(s) are not probabilities in [0, 1] (NaN?): " + ", ".join(f"{e.id or '#' + str(examples.index(e))}: p_a={e.p_a!r}" for e in bad[:5]))
    bad = [e for e in examples if not (math.isfinite(e.weight) and e.weight > 0)]
    if bad:
        raise PreferenceDataError(f"{len(bad)} {what} weight(s) are not positive: " + ", ".join(f"{e.id or '?'}: weight={e.weight!r}" for e in bad[:5]))
    if all(e.p_a == 0.5 for e in examples):
        raise PreferenceDataError(f"single-class {what} data: all {len(examples)} labels are ties (p_a = ½), so nothing says which response is better")


def split_by_prompt(examples: Sequence[PairExample], eval_share: float, *, seed: int = 0) -> tuple[list[PairExample], list[PairExample]]:
    """(train, held out): whole prompts held out, chosen by a hash of (seed, prompt id), so a prompt
    stays on its side as the store grows. At least one prompt on each side when ``eval_share`` > 0."""
    if eval_share <= 0:
        return list(examples), []
    ids = sorted({e.prompt_id for e in examples}, key=lambda p: stable_hash("heldout", seed, p))
    if len(ids) < 2:
        raise PreferenceDataError(f"a held-out split by prompt needs at least 2 prompts; the data has {len(ids)} (set eval_share=0 to train without one)")
    held = set(ids[: min(len(ids) - 1, max(1, round(eval_share * len(ids))))])
    return [e for e in examples if e.prompt_id not in held], [e for e in examples if e.prompt_id in held]


# ----- training ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # metrics per optimizer step (including steps done before a resume)
    summary: dict[str, float]  # loss/bce of the last step and mean over steps; perf/ totals of this run
    optimizer_state: dict  # AdamW's state after the last step
    checkpoint: Path | None  # the last step checkpoint written (None without checkpoint_dir)


@dataclass
class _Run:
    """What one training run carries between steps."""

    config: PreferenceTrainConfig
    module: PreferenceModel
    model: torch.nn.Module  # the module, or its DDP wrapper: what runs forward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    seqs: list[tuple[tuple[list[int], int], tuple[list[int], int]]]  # per example: (a's, b's) (ids, pool start)
    p: torch.Tensor  # (N,) soft labels, float32 on the device
    w: torch.Tensor  # (N,) votes
    votes: list[float]  # the same votes on the host: a batch's total without waiting for the device
    ids: list[str]
    plan: list[list[int]]
    device: torch.device
    autocast: torch.dtype | None
    rank: int = 0
    world: int = 1
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    fingerprint: str = ""


def train(
    model: PreferenceModel,
    examples: Sequence[PairExample],
    config: PreferenceTrainConfig = PreferenceTrainConfig(),
    *,
    optimizer_state: dict | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``examples`` (all of them: split first, see ``split_by_prompt``).

    ``optimizer_state``: AdamW's state to continue from (moments only). ``checkpoint_dir``: where step
    checkpoints go; one that holds a complete checkpoint of this same run (examples and config) is
    resumed from, one of another run is refused. ``on_step(step, metrics)`` after each step. With
    torch.distributed initialized, every process calls this with the same arguments. The data are
    checked before anything runs or is written (``check_examples``).
    """
    check_examples(examples)
    run = _start(model, examples, config, optimizer_state)
    was_training = model.training
    model.train()
    started = time.perf_counter()
    try:
        last, ran = trainer.run_steps(run, _train_step, model.tokenizer, checkpoint_dir=checkpoint_dir, on_step=on_step, load=_load_weights)
    finally:
        model.train(was_training)
        run.optimizer.zero_grad(set_to_none=True)
    model.fingerprint = None  # the weights changed: no longer those of any saved checkpoint
    seconds = time.perf_counter() - started
    pairs = sum(len(batch) for batch in run.plan[run.step - len(ran) : run.step])
    losses = [h["loss/bce"] for h in run.history]
    summary = {
        "loss/bce": losses[-1] if losses else math.nan,
        "loss/bce_mean": sum(losses) / len(losses) if losses else math.nan,
        "perf/seconds": seconds,
        "perf/steps": float(len(run.plan)),
        "perf/pairs_per_s": pairs / seconds if seconds > 0 else 0.0,
    }
    return TrainResult(run.history, summary, run.optimizer.state_dict(), last)


def _start(model: PreferenceModel, examples: Sequence[PairExample], config: PreferenceTrainConfig, optimizer_state: dict | None) -> _Run:
    rank, world, device, autocast = trainer.placement(config)
    module = model.to(device)
    a = module.encode([e.prompt for e in examples], [e.a for e in examples])
    b = module.encode([e.prompt for e in examples], [e.b for e in examples])
    lengths = [max(len(x[0]), len(y[0])) for x, y in zip(a, b)]
    plan = trainer.plan_batches(lengths, config.global_batch(world), epochs=config.epochs, max_steps=config.max_steps, seed=config.seed, bucket_window=config.bucket_window)
    net = module
    if world > 1:  # unused parameters: some backbones carry layers the head never reads (BERT's pooler)
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False, find_unused_parameters=True)
    optimizer, scheduler = trainer.make_optimizer(module.parameters(), config, len(plan), device=device, optimizer_state=optimizer_state)
    fingerprint = config.fingerprint(world, asdict(module.config), *((e.id, e.prompt, e.a, e.b, e.p_a, e.weight) for e in examples))
    votes = [e.weight for e in examples]
    p = torch.tensor([e.p_a for e in examples], dtype=torch.float32, device=device)
    w = torch.tensor(votes, dtype=torch.float32, device=device)
    return _Run(config, module, net, optimizer, scheduler, list(zip(a, b)), p, w, votes, [e.id for e in examples], plan, device, autocast, rank, world, fingerprint=fingerprint)


def _train_step(run: _Run, batch: list[int]) -> dict[str, float]:
    """One optimizer step on one global batch: encode → logits → weighted BCE → backward → step → metrics."""
    cfg = run.config
    trainer.seed_dropout(cfg.seed * 1_000_003 + run.step)  # dropout, if any: replayed identically on resume
    started = time.perf_counter()
    total_w = math.fsum(run.votes[i] for i in batch)  # every process knows the global batch
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # Σ w·loss, Σ w·(right side)
    bad = torch.zeros(len(batch), device=run.device)
    slots = trainer.micro_batches(batch, cfg.micro_batch_size, cfg.grad_accum, run.world)[run.rank :: run.world]
    for k, (positions, rows) in enumerate(slots):
        real = len(positions)  # 0: an empty slot runs row 0 at zero weight, keeping DDP in step
        sync = run.model.no_sync() if run.world > 1 and k < len(slots) - 1 else nullcontext()
        with sync:
            inputs = run.module.collate([run.seqs[i][0] for i in rows] + [run.seqs[i][1] for i in rows])
            with torch.autocast(run.device.type, dtype=run.autocast) if run.autocast else nullcontext():
                logits = run.model(**inputs)
            index = torch.tensor(rows, device=run.device)
            p, w = run.p[index], run.w[index]
            per_pair = F.binary_cross_entropy_with_logits(logits.float(), p, reduction="none")
            loss = (w * per_pair).sum() * (run.world / total_w if real else 0.0)  # the global weighted mean, after DDP's average
            loss.backward()
        if real:
            right = torch.where(p == 0.5, 0.5, ((logits.detach() > 0) == (p > 0.5)).float())
            sums += torch.stack([(w * per_pair.detach()).sum(), (w * right).sum()]).double()
            bad[positions] = (~torch.isfinite(per_pair.detach())).float()
    if run.world > 1:
        for t in (sums, bad):
            dist.all_reduce(t)
    (loss_value, right_value), grad_norm, lr = trainer.checked_step(run, sums / total_w, ["loss/bce", "pref/train_accuracy"], bad, batch, run.ids, "preference model")
    seconds = time.perf_counter() - started
    metrics = {
        "loss/bce": loss_value,
        "pref/train_accuracy": right_value,
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
        "perf/step_s": seconds,
        "perf/pairs_per_s": len(batch) / seconds,
        "step": float(run.step),
    }
    run.history.append(metrics)
    return metrics


def evaluate(model: PreferenceModel, examples: Sequence[PairExample], *, batch_size: int = 64) -> dict:
    """Held-out scores (``data.diagnostics.prediction_metrics``): logloss, logloss_floor, accuracy, ece."""
    check_examples(examples, what="evaluation")
    q = model.predict([e.prompt for e in examples], [e.a for e in examples], [e.b for e in examples], batch_size=batch_size)
    return prediction_metrics([e.p_a for e in examples], q, [e.weight for e in examples])


# ----- what a pipeline calls ------------------------------------------------------------------------------


@dataclass
class FitReport:
    path: Path  # the checkpoint written
    fingerprint: str  # its content hash (what the learned oracle's id carries)
    metrics: dict[str, float | None]  # prefmodel/… (held-out scores, sizes) and perf/…
    history: list[dict[str, float]]


def fit_preference_model(
    store,
    out_dir: str | os.PathLike,
    *,
    init: str | os.PathLike | PreferenceModel,
    model_config: PreferenceModelConfig | None = None,
    train_config: PreferenceTrainConfig = PreferenceTrainConfig(),
    rounds=None,
    oracle_ids: set[str] | None = None,
    exclude_kinds: Sequence[str] = ("learned",),
    checkpoint_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> FitReport:
    """Train a preference model on the store's comparisons, evaluate it on held-out prompts, save it.

    ``init``: a preference-model checkpoint folder (warm start: its weights and AdamW moments; with
    ``model_config`` it must match), a backbone folder or hub id (a new head, ``model_config`` or the
    default), or a PreferenceModel. Training data: ``examples_from_store(store, rounds=…,
    oracle_ids=…, exclude_kinds=…)``, split by prompt (``train_config.eval_share``). Every check (the
    output folder, the data, the checkpoint) runs before anything is trained or written; the
    checkpoint is written atomically at ``out_dir`` (refused if it exists, unless ``overwrite``).
    ``checkpoint_dir``: step checkpoints, so a killed fit resumes when called again; deleted once
    ``out_dir`` is written.

    Metrics: prefmodel/eval_{logloss, logloss_floor, accuracy, ece}, prefmodel/eval_logloss_before
    (warm start: the checkpoint's own score on the same held-out pairs), prefmodel/{train,eval}_pairs,
    prefmodel/train_loss (last step), perf/seconds.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    examples = examples_from_store(store, rounds=rounds, oracle_ids=oracle_ids, exclude_kinds=exclude_kinds)
    check_examples(examples)
    train_set, eval_set = split_by_prompt(examples, train_config.eval_share, seed=train_config.seed)
    check_examples(train_set)
    optimizer_state = None
    if isinstance(init, PreferenceModel):
        model = init
        if model_config is not None and model.config != model_config:
            raise CheckpointMismatchError(f"the model given as init has config {model.config}, not {model_config}")
    elif (Path(init) / PREFERENCE_FILE).is_file():
        model = load_preference_model(init, model_config, device=train_config.device)
        optimizer_state = (ckpt.load_trainer_state(init) or {}).get("optimizer")
    else:
        model = PreferenceModel.from_backbone(init, model_config or PreferenceModelConfig(), seed=train_config.seed, device=train_config.device)
    started = time.perf_counter()
    metrics: dict[str, float | None] = {"prefmodel/train_pairs": float(len(train_set)), "prefmodel/eval_pairs": float(len(eval_set))}
    if eval_set and optimizer_state is not None:
        metrics["prefmodel/eval_logloss_before"] = evaluate(model, eval_set, batch_size=train_config.eval_batch_size)["logloss"]
    result = train(model, train_set, train_config, optimizer_state=optimizer_state, checkpoint_dir=checkpoint_dir)
    metrics["prefmodel/train_loss"] = result.summary["loss/bce"]
    if eval_set:
        scores = evaluate(model, eval_set, batch_size=train_config.eval_batch_size)
        metrics.update({f"prefmodel/eval_{k}": scores[k] for k in ("logloss", "logloss_floor", "accuracy", "ece")})
    metrics["perf/seconds"] = time.perf_counter() - started
    path = save_preference_model(model, out_dir, trainer_state={"optimizer": result.optimizer_state, "metrics": metrics}, overwrite=overwrite)
    if checkpoint_dir is not None:
        ckpt.prune_checkpoints(checkpoint_dir, 0)  # the step checkpoints served their purpose
    return FitReport(path, model.fingerprint, metrics, result.history)


def compare_bt_pairwise(
    examples: Sequence[PairExample],
    *,
    backbone: str | os.PathLike | Callable[[PreferenceModelConfig], PreferenceModel],
    model_config: PreferenceModelConfig = PreferenceModelConfig(),
    train_config: PreferenceTrainConfig = PreferenceTrainConfig(),
) -> dict[str, float]:
    """Train a BT and a pairwise model the same way on the same prompts, and score both on the same
    held-out prompts: intransitivity/logloss_{bt, pairwise, gap} (gap = BT − pairwise: above zero, the
    data holds preferences no scalar reward represents), intransitivity/eval_pairs. ``backbone``: a
    folder or hub id, or a function building a fresh model from a config (tests)."""
    check_examples(examples)
    train_set, eval_set = split_by_prompt(examples, train_config.eval_share or 0.2, seed=train_config.seed)
    check_examples(train_set)
    check_examples(eval_set, what="evaluation")
    predictions = {}
    for head in ("bt", "pairwise"):
        cfg = PreferenceModelConfig(**{**asdict(model_config), "head": head})
        model = backbone(cfg) if callable(backbone) else PreferenceModel.from_backbone(backbone, cfg, seed=train_config.seed, device=train_config.device)
        train(model, train_set, train_config)
        predictions[head] = model.predict([e.prompt for e in eval_set], [e.a for e in eval_set], [e.b for e in eval_set], batch_size=train_config.eval_batch_size)
    gap = logloss_gap([e.p_a for e in eval_set], predictions["bt"], predictions["pairwise"], [e.weight for e in eval_set])
    return {**{f"intransitivity/{k}": v for k, v in gap.items()}, "intransitivity/eval_pairs": float(len(eval_set))}


# ----- small helpers -------------------------------------------------------------------------------------


def _prob(logit: float) -> float:
    """σ(logit), computed so that _prob(l) + _prob(−l) == 1 exactly: σ on the non-negative side, and
    1 − σ(−l) (exact for σ(−l) ≥ ½) on the other."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    return 1.0 - 1.0 / (1.0 + math.exp(logit))


_device = trainer._device  # "auto" → CUDA (this process's GPU under torchrun) when present, else CPU
