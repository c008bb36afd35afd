"""A causal language model as a policy: batched sampling, per-sequence log-probs, load and save.

log π(y|x) is always the sum over the response's tokens of log π(y_t | x, y_<t), where x is the prompt as
the model sees it (the tokenizer's chat template around it when the tokenizer has one) and y ends with the
end-of-sequence token when the response stopped by itself: that token is what the policy learns about
length from. A sampled response keeps the tokens the policy produced (``Sample.token_ids``, a column of the
store's responses) and its log-probs are of those tokens: the text, which judges read, need not encode
back to them (bytes that are not UTF-8 and special tokens are dropped by decoding). A response known only
by its text (from an OpenAI-compatible server, say) is scored as the text's tokenization.

Two ways to get log-probs, one formula (``sequence_logprobs``):
- ``CausalLMPolicy.score`` — no grad, batched and length-sorted: what fills the store's log-prob cache.
- ``sequence_logprobs`` on a ``pack``-ed batch — with grad: what the trainer calls.
Both run the model's own forward (transformers'; a LoRA model's through peft).
Neither materializes a float32 log-softmax over the vocabulary for the whole batch: logits are kept only
at response positions and normalized chunk by chunk (``token_logprobs``).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from data.keys import stable_hash
from data.prompts import chat_messages
from solvers import checkpoint, model_sources
from solvers.mixture_sampling import decode, left_pad
from solvers.policy import Sample

# A minimal chat template for tiny models (`transformers serve` needs one to answer chat requests).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what is missing."""


class PromptTooLongError(ValueError):
    """A prompt (or prompt + response) that does not fit the model's context, with too_long="refuse"."""


class PromptTruncatedWarning(UserWarning):
    """A prompt cut to fit the model's context (too_long="truncate"); its last tokens are kept."""


@dataclass(frozen=True)
class CausalLMConfig:
    """How a causal-LM policy samples and scores."""

    temperature: float = 1.0  # sampling temperature; 0 = greedy. Log-probs are always of the untempered π
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this mass (1 = all)
    max_new_tokens: int = 64  # response length cap (finish_reason "length" when hit)
    batch_size: int = 32  # sequences per forward pass, sampling and scoring alike
    too_long: str = "truncate"  # a prompt over the context: "truncate" (keep its end, warn) or "refuse"
    use_chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu; or float32 / bfloat16 / float16
    chunk_elements: int = 2**24  # logits normalized per chunk of this many floats (64 MiB in float32)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.chunk_elements < 1:
            raise ValueError("max_new_tokens, batch_size and chunk_elements must be positive")
        if self.too_long not in ("truncate", "refuse"):
            raise ValueError(f"too_long must be 'truncate' or 'refuse', got {self.too_long!r}")


# ----- log-probs --------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[target] per row, in float32 (float64 for float64 logits), chunk by chunk.

    d/dlogits (logit_target − logsumexp) = onehot(target) − softmax: the backward rebuilds the softmax
    per chunk from the saved logsumexp instead of keeping a float32 copy of the logits.
    """

    @staticmethod
    def forward(ctx, logits, targets, rows_per_chunk):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 → fp32; fp64 stays
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for s in range(0, logits.shape[0], rows_per_chunk):
            lse[s : s + rows_per_chunk] = logits[s : s + rows_per_chunk].to(dtype).logsumexp(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows_per_chunk = rows_per_chunk
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(dtype) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.rows_per_chunk):
            e = s + ctx.rows_per_chunk
            g = grad[s:e].to(lse.dtype).unsqueeze(-1)
            chunk = (logits[s:e].to(lse.dtype) - lse[s:e].unsqueeze(-1)).exp_().mul_(-g)
            chunk.scatter_add_(-1, targets[s:e].unsqueeze(-1), g)
            grad_logits[s:e] = chunk
        return grad_logits, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, chunk_elements: int = 2**24) -> torch.Tensor:
    """log softmax(logits)[..., target]: logits (..., vocab) in any float dtype, targets (...) →
    (...) float32 (float64 for float64 logits), never holding more than ``chunk_elements`` upcast
    logits at once, forward or backward."""
    vocab = logits.shape[-1]
    flat = _TokenLogprobs.apply(logits.reshape(-1, vocab), targets.reshape(-1), max(1, chunk_elements // vocab))
    return flat.view(targets.shape)


@dataclass
class TokenBatch:
    """Prompt + response sequences, left-padded, with the response tokens as targets.

    Every sequence ends in the last column, so the response tokens of all rows sit in the last
    ``width − 1`` columns: the model needs logits only there (``logits_to_keep``). Column j of
    ``targets`` is the token predicted by the j-th kept logit; the last kept logit predicts nothing.
    """

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    position_ids: torch.Tensor  # (batch, seq)
    targets: torch.Tensor  # (batch, width) with width = longest response + 1
    target_mask: torch.Tensor  # (batch, width) bool: a response token

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "position_ids", "targets", "target_mask")))


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int) -> TokenBatch:
    """Build the batch for ``sequence_logprobs``. Every prompt needs at least one token (the first
    response token is predicted from the prompt's last one)."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"pack: {len(prompt_ids)} prompts and {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("pack: a prompt has no tokens; nothing would predict its response's first token")
    input_ids, attention_mask, position_ids = left_pad([p + r for p, r in zip(prompt_ids, response_ids)], pad_id)
    width = max(len(r) for r in response_ids) + 1
    targets = torch.tensor([[pad_id] * (width - 1 - len(r)) + list(r) + [pad_id] for r in response_ids], dtype=torch.long)
    target_mask = torch.tensor([[False] * (width - 1 - len(r)) + [True] * len(r) + [False] for r in response_ids])
    return TokenBatch(input_ids, attention_mask, position_ids, targets, target_mask)


def sequence_logprobs(model, batch: TokenBatch, *, chunk_elements: int = 2**24) -> torch.Tensor:
    """(batch,) float32: Σ_t log π(y_t | x, y_<t) over each row's response tokens. Differentiable
    when grad is enabled; the caller chooses (``torch.inference_mode()`` for caching)."""
    batch = batch.to(next(model.parameters()).device)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=batch.targets.shape[1],
    ).logits
    per_token = token_logprobs(logits, batch.targets, chunk_elements=chunk_elements)
    return (per_token * batch.target_mask).sum(-1)


# ----- the policy -------------------------------------------------------------------------------------


class CausalLMPolicy:
    """A transformers causal LM and its tokenizer behind the Policy protocol (solvers/policy.py)."""

    def __init__(self, model, tokenizer, config: CausalLMConfig = CausalLMConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (gen_eos[0] if gen_eos else None)
        if self.eos_id is None:
            raise ModelLoadError("the tokenizer and the generation config name no end-of-sequence token: responses could never stop")
        self.stop_ids = {self.eos_id, *gen_eos}
        # The pad id only fills masked positions; any token would do, so no token is added to the tokenizer.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.context = context_length(model, tokenizer)
        self.chat = config.use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        # A Python tokenizer costs as much as a tiny model's forward pass: a policy encodes each text once
        # (a prompt recurs in every pair of the update, and in every round where one policy lives on).
        self._tokens = functools.lru_cache(maxsize=2**13)(lambda text, special: tuple(tokenizer(text, add_special_tokens=special).input_ids))
        if self.context is not None and config.max_new_tokens >= self.context:
            raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in a context of {self.context} tokens")

    @classmethod
    def load(cls, source: str | os.PathLike, config: CausalLMConfig = CausalLMConfig()) -> CausalLMPolicy:
        """From a local folder (``save_pretrained`` + tokenizer), a hub id (from the local cache when
        HF_HUB_OFFLINE=1), a .gguf file or a packaged model's name (``load_model``)."""
        model, tokenizer = load_model(source, device=config.device, dtype=config.dtype)
        return cls(model, tokenizer, config)

    # --- text ↔ token ids

    def render(self, prompt: str) -> str:
        """The prompt as the model sees it: the chat template around it when the tokenizer has one.
        A chat prompt (``data.prompts.chat_text``: its messages as JSON) is its messages through the
        template, or, without one, each message on its own line as ``role: content``."""
        messages = chat_messages(prompt)
        if not self.chat:
            return prompt if messages is None else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        messages = messages or [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def prompt_room(self) -> int | None:
        """How many prompt tokens fit before a response of max_new_tokens (None: no limit)."""
        return None if self.context is None else self.context - self.config.max_new_tokens

    def encode_prompts(self, prompts: list[str], *, room: list[int] | None = None, fit: bool = True) -> list[list[int]]:
        """Prompt token ids, each fitted by the too_long rule into its ``room`` (default:
        ``prompt_room``); ``fit=False`` returns them whole."""
        rooms = room if room is not None else [self.prompt_room] * len(prompts)
        if not fit:
            rooms = [None] * len(prompts)
        out = []
        for i, (prompt, r) in enumerate(zip(prompts, rooms, strict=True)):
            if self.chat:  # the template writes any special tokens itself
                ids = list(self._tokens(self.render(prompt), False))
            else:  # the tokenizer's own convention (a BOS for Llama), minus a trailing EOS (T5-style)
                ids = list(self._tokens(self.render(prompt), True))
                if ids and ids[-1] == self.tokenizer.eos_token_id:
                    ids = ids[:-1]
            if not ids:
                raise ValueError(f"prompt {i} ({prompt!r}) encodes to no tokens")
            out.append(self._fit(ids, r, i))
        return out

    def encode_responses(self, responses: list[str], finished: list[bool] | None = None, tokens: list | None = None) -> list[list[int]]:
        """Response token ids: ``tokens[i]`` where given (as sampled, EOS included when it stopped),
        else the text's tokens plus EOS when the response finished by itself (``finished`` default: all did)."""
        finished = [True] * len(responses) if finished is None else finished
        tokens = [None] * len(responses) if tokens is None else tokens
        return [
            list(ids) if ids is not None else [*self._tokens(text, False), *([self.eos_id] if stop else [])]
            for text, stop, ids in zip(responses, finished, tokens, strict=True)
        ]

    def encode(self, prompts: list[str], responses: list[str], finished: list[bool] | None = None, tokens: list | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Aligned (prompt ids, response ids) for scoring or training; each prompt fitted into what
        its response leaves of the context."""
        response_ids = self.encode_responses(responses, finished, tokens)
        room = None
        if self.context is not None:
            for i, r in enumerate(response_ids):
                if len(r) >= self.context:
                    raise PromptTooLongError(f"response {i} has {len(r)} tokens: no room for its prompt in a context of {self.context}")
            room = [self.context - len(r) for r in response_ids]
        return self.encode_prompts(prompts, room=room), response_ids

    def _fit(self, ids: list[int], room: int | None, index: int) -> list[int]:
        if room is None or len(ids) <= room:
            return ids
        message = f"prompt {index} has {len(ids)} tokens, but the context of {self.context} tokens leaves room for {room}"
        if self.config.too_long == "refuse":
            raise PromptTooLongError(message + " (too_long='refuse')")
        warnings.warn(PromptTruncatedWarning(message + f": keeping its last {room} tokens"), stacklevel=3)
        return ids[-room:]

    # --- the Policy protocol

    def sample(self, prompts: list[str], k: int, *, seed: int) -> list[list[Sample]]:
        """k responses per prompt. Sample j of a prompt depends only on (seed, prompt, j) and the
        config, not on the other prompts in the call (so equal prompts get equal samples)."""
        return self._sample([self.model], [1.0], prompts, k, seed=seed, stream="policy")

    def sample_mixture(self, reference: CausalLMPolicy, prompts: list[str], k: int, *, m: float, seed: int) -> list[list[Sample]]:
        """k responses per prompt from the token-level geometric mixture π^{1−m} μ^m of this policy π
        and ``reference`` μ (Nash-MD, arXiv 2312.00886 §7); see solvers/mixture_sampling.py.

        Uses another random stream than ``sample``, so y ~ π and y' ~ mixture drawn with one seed are
        independent. ``Sample.logp`` is log π(y'|x) under this policy."""
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"mixture weight m must be in [0, 1], got {m}")
        if self.model.config.get_text_config().vocab_size != reference.model.config.get_text_config().vocab_size:
            raise ValueError("sample_mixture: the policy and the reference have different vocabularies")
        return self._sample([self.model, reference.model], [1.0 - m, m], prompts, k, seed=seed, stream="mixture")

    def score(self, prompts: list[str], responses: list[str], *, finished: list[bool] | None = None, tokens: list | None = None) -> list[float]:
        """log π(response | prompt) for aligned lists, without gradients, in length-sorted batches.
        ``finished[i]`` False means response i was cut at max_new_tokens (no EOS); default all True.
        ``tokens[i]``, where given, are response i's sampled tokens (``Sample.token_ids``): scored instead of the text's."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts and {len(responses)} responses")
        prompt_ids, response_ids = self.encode(prompts, responses, finished, tokens)
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        out = [0.0] * len(prompts)
        with torch.inference_mode():
            for s in range(0, len(order), self.config.batch_size):
                rows = order[s : s + self.config.batch_size]
                batch = pack([prompt_ids[i] for i in rows], [response_ids[i] for i in rows], pad_id=self.pad_id)
                logp = sequence_logprobs(self.model, batch, chunk_elements=self.config.chunk_elements)
                for i, v in zip(rows, logp.tolist()):
                    out[i] = v
        return out

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Model (safetensors) and tokenizer into the folder ``path``, atomically: see
        ``solvers.checkpoint.save_checkpoint``. Refuses an existing ``path`` unless ``overwrite``."""
        checkpoint.save_checkpoint(path, self.model, self.tokenizer, overwrite=overwrite)

    # --- sampling

    def _sample(self, models: list, weights: list[float], prompts: list[str], k: int, *, seed: int, stream: str) -> list[list[Sample]]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        prompt_ids = self.encode_prompts(prompts)
        rows = sorted(((i, j) for i in range(len(prompts)) for j in range(k)), key=lambda r: len(prompt_ids[r[0]]))
        out: list[list[Sample | None]] = [[None] * k for _ in prompts]
        for s in range(0, len(rows), self.config.batch_size):
            chunk = rows[s : s + self.config.batch_size]
            uniforms = torch.stack([self._uniforms(seed, stream, prompts[i], j) for i, j in chunk])
            decoded = decode(
                models,
                weights,
                [prompt_ids[i] for i, _ in chunk],
                uniforms,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
            )
            for (i, j), tokens, stopped, logp in zip(chunk, decoded.tokens, decoded.stopped, decoded.logp.tolist()):
                out[i][j] = self._as_sample(tokens, stopped, logp)
        return out

    def _uniforms(self, seed: int, stream: str, prompt: str, slot: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(stable_hash(seed, stream, prompt, slot, length=8), 16))
        return torch.rand(self.config.max_new_tokens, generator=g, dtype=torch.float64)

    def _as_sample(self, tokens: list[int], stopped: bool, logp: float) -> Sample:
        text = self.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
        return Sample(text=text, n_tokens=len(tokens), finish_reason="stop" if stopped else "length", logp=logp, token_ids=tuple(tokens))


# ----- loading and tiny models ------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, config: CausalLMConfig | None = None) -> tuple[CausalLMPolicy, dict | None]:
    """(policy, optimizer state or None) from a checkpoint folder: what a round's update starts from.
    Pass the optimizer state to ``trainer.update(..., optimizer_state=...)`` to keep AdamW's moments.
    The weights load in float32 unless ``config`` says otherwise: they are the master weights that
    bf16 autocast trains (``CausalLMConfig``'s own default would give bf16 on CUDA)."""
    policy = CausalLMPolicy.load(path, config or CausalLMConfig(dtype="float32"))
    state = checkpoint.load_trainer_state(path)
    return policy, (state or {}).get("optimizer")


def context_length(model, tokenizer) -> int | None:
    """The most tokens the model reads at once: its position limit, or the tokenizer's if smaller
    (tokenizers with no limit report a huge number)."""
    config = model.config.get_text_config()
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    return min(limits) if limits else None


def load_model(source: str | os.PathLike, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a local folder, a hub id, a .gguf file (dequantized into a plain model
    that saves as a folder), or a packaged model's name (``smollm2``: solvers/model_sources.py), with a
    clear error for what is missing."""
    device = _device(device)
    torch_dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    try:
        source = model_sources.resolve(str(source))
        local = Path(source).expanduser()
        if model_sources.is_gguf(source):
            try:
                local = model_sources.converted(local, dtype=torch_dtype)
                source = str(local)
            except model_sources.CacheUnwritable as e:  # dequantize into memory, as every load will
                warnings.warn(f"cannot keep the converted {source} in {model_sources.cache_dir()} ({e}); set NASHFLOW_CACHE to a writable folder")
                model, tokenizer = model_sources.load_gguf(local, dtype=torch_dtype)
                return model.to(device).eval(), tokenizer
    except model_sources.ModelSourceError as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:  # transformers' GGUF reader: an architecture it cannot read, a damaged file
        raise ModelLoadError(f"cannot load the GGUF file {source}: {_first_line(e)}") from e
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder: it has no config.json")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{source} has a model but no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one beside it with tokenizer.save_pretrained"
            )
        source = str(local)
    elif local.exists():
        raise ModelLoadError(f"{source} is a file, not a model folder (a GGUF file's name ends in .gguf)")
    elif not _HUB_ID.fullmatch(source):
        raise ModelLoadError(f"model folder {source} does not exist")
    where = "folder" if local.is_dir() else "hub id"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers raises OSError, ValueError or EnvironmentError here
        hint = "" if local.is_dir() else f"; there is no folder {source} here either" + (" (HF_HUB_OFFLINE=1: only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        raise ModelLoadError(f"cannot load the tokenizer of {where} {source}: {_first_line(e)}{hint}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model of {where} {source}: {_first_line(e)}") from e
    return model.to(device).eval(), tokenizer


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def tiny_causal_lm(*, seed: int = 0, chat_template: str | None = None, context: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, extra_ids: int = 0):
    """(model, tokenizer): a byte-level tokenizer that needs no files and a small random Llama, for
    tests and the demo; works offline. Defaults: 2 layers, 64 hidden, 259-token vocabulary, ~115k
    parameters. ``extra_ids`` = 0 drops ByT5's 125 sentinel tokens, which decode to nothing (a random
    model would emit them a third of the time). Global RNG state is left as it was."""
    tokenizer = ByT5Tokenizer(extra_ids=extra_ids)  # pad = 0, eos = 1, unk = 2, byte b = b + 3
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # `transformers serve` (and generate) sample only when the model's generation config says so.
    model.generation_config.do_sample = True
    return model.eval(), tokenizer


def tiny_policy(*, seed: int = 0, chat_template: str | None = None, config: CausalLMConfig = CausalLMConfig(), **sizes) -> CausalLMPolicy:
    """A CausalLMPolicy around ``tiny_causal_lm`` (sizes: context, hidden, layers, heads, extra_ids)."""
    model, tokenizer = tiny_causal_lm(seed=seed, chat_template=chat_template, **sizes)
    return CausalLMPolicy(model.to(_device(config.device)), tokenizer, config)
