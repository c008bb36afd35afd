"""A lean no-grad forward for Llama-family decoders, for sampling and scoring.

The same arithmetic as transformers' Llama, Mistral and Qwen2 (RMSNorm in float32, rotary embedding from
the model's own rotary module, SDPA attention, SwiGLU MLP), called directly on the model's weights: no
module dispatch, no output records, no mask building per call, and a KV cache preallocated for the whole
response (written in place instead of concatenated at every token). On a small model most of the time of
a decoding step goes to that overhead: for ``bench/vs_trl.py``'s 2-layer model on one CPU core, its sample
phase is about 1.9× faster (``--skip-trl`` with and without ``--no-lean-forward``: 1.78 against 3.35 ms per
pair in one pair of runs on a busy 2-core machine).
Logits agree with the transformers forward to float rounding (``tests/test_lean_forward.py``).

Only inference: training goes through the model's own forward (gradient checkpointing, dropout,
compilation, DDP hooks all live there). A model this module does not know, or one changed in a way it
cannot see through (hooks, quantized or adapter layers, sliding-window attention, another activation),
gets ``None`` from ``LeanForward.of`` and goes through transformers as before.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The causal LMs whose forward this module reproduces: class name → the prefix of its parts' class names
# (<prefix>DecoderLayer, <prefix>Attention, <prefix>MLP, <prefix>RMSNorm, <prefix>RotaryEmbedding), all
# looked up in the module that defines the model's class, so a subclass or remote code is not taken for them.
SUPPORTED = {"LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2"}
# Rotary variants whose frequencies do not depend on the sequence ("dynamic" and "longrope" recompute
# them from the longest position of each call, which a decoding step cannot see).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of an nn.Linear


@dataclass(frozen=True)
class _Layer:
    norm1: tuple[torch.Tensor, float]  # (weight, eps) of an RMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    norm2: tuple[torch.Tensor, float]
    gate: Linear
    up: Linear
    down: Linear


class LeanForward:
    """The decoder stack of one supported model, run as plain tensor operations on its weights (no copies:
    changes to the model's parameters are seen at the next call)."""

    @classmethod
    def of(cls, model) -> LeanForward | None:
        """A LeanForward for ``model``, or None when its forward is not one this module reproduces."""
        return cls(model) if supports(model) else None

    def __init__(self, model):
        inner = model.model
        attention = inner.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.embed = inner.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.rotary = inner.rotary_emb
        self.layers = [
            _Layer(
                _norm(layer.input_layernorm),
                *(_linear(getattr(layer.self_attn, f"{name}_proj")) for name in "qkvo"),
                _norm(layer.post_attention_layernorm),
                *(_linear(getattr(layer.mlp, f"{name}_proj")) for name in ("gate", "up", "down")),
            )
            for layer in inner.layers[: model.config.num_hidden_layers]
        ]
        self.norm = _norm(inner.norm)
        self.head = _linear(model.lm_head)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for ``positions`` (rows, n), each (rows, n, 1, head_dim): the model's rotary
        embedding with rotate_half's sign folded into sin, so that rotating x is x·cos + roll(x)·sin."""
        cos, sin = self.rotary(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def new_cache(self, rows: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) buffers of (rows, kv_heads, length, head_dim) for ``forward``."""
        shape = (rows, self.kv_heads, length, self.head_dim)
        return [(torch.empty(shape, dtype=self.dtype, device=self.device), torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]

    def forward(
        self,
        ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        *,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        start: int = 0,
        share: torch.Tensor | None = None,
        keep: int = 1,
    ) -> torch.Tensor:
        """Logits (rows, keep, vocab) of the last ``keep`` positions of ``ids`` (rows, n).

        ``rope``: ``self.rope`` of the tokens' positions. ``mask``: additive, (rows, 1, n, keys), keys =
        start + n with a cache, n without. With ``cache``, the tokens' keys and values are written at
        columns [start, start + n) and attention reads columns [0, start + n). With ``share`` as well, the
        rows are distinct prompts read once (start 0): cache row r receives prompt ``share[r]``'s keys and
        values, and the logits stay one row per distinct prompt.
        """
        rows, n = ids.shape
        if share is not None and start != 0:
            raise ValueError("LeanForward.forward: shared prompts are read at the start of the cache (start 0)")
        if not 1 <= keep <= n:
            raise ValueError(f"LeanForward.forward: keep must be in [1, {n}], got {keep}")
        cos, sin = rope
        half = self.head_dim // 2
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            y = _rms_norm(x, *layer.norm1)
            q = F.linear(y, *layer.q).view(rows, n, self.heads, self.head_dim)
            k = F.linear(y, *layer.k).view(rows, n, self.kv_heads, self.head_dim)
            v = F.linear(y, *layer.v).view(rows, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q = torch.addcmul(q * cos, q.roll(half, -1), sin)
            k = torch.addcmul(k * cos, k.roll(half, -1), sin).transpose(1, 2)
            if cache is not None:
                keys, values = cache[i]
                if share is None:
                    keys[:, :, start : start + n] = k
                    values[:, :, start : start + n] = v
                    k, v = keys[:, :, : start + n], values[:, :, : start + n]
                else:
                    keys[:, :, start : start + n] = k[share]
                    values[:, :, start : start + n] = v[share]
            x = x + F.linear(self._attend(q, k, v, mask), *layer.o)
            y = _rms_norm(x, *layer.norm2)
            x = x + F.linear(F.silu(F.linear(y, *layer.gate)) * F.linear(y, *layer.up), *layer.down)
        return F.linear(_rms_norm(x[:, n - keep :], *self.norm), *self.head)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SDPA of q (rows, n, heads, head_dim) over k, v (rows, kv_heads, keys, head_dim) → (rows, n,
        heads·head_dim). Query head j reads key head j // groups, as transformers' repeat_kv does. No
        ``enable_gqa`` with a mask: on CUDA that falls back to the math kernel (as transformers notes).
        One new token: each key head's group of query heads goes as its queries. More: keys repeated."""
        rows, n = q.shape[:2]
        groups = self.heads // self.kv_heads
        if n == 1:
            out = F.scaled_dot_product_attention(q.reshape(rows, self.kv_heads, groups, self.head_dim), k, v, attn_mask=mask, scale=self.scaling)
            return out.reshape(rows, 1, self.heads * self.head_dim)
        if groups > 1:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(rows, n, self.heads * self.head_dim)


def supports(model) -> bool:
    """Whether ``LeanForward`` computes exactly what ``model``'s own forward does: a supported class
    from transformers itself, every part of the class it expects (no subclass, no quantized or adapter
    layer), no hook and no forward replaced on an instance, full attention in every layer (no sliding
    window), SiLU, SDPA or eager attention, and a rotary embedding fixed per position."""
    prefix = SUPPORTED.get(type(model).__name__)
    modeling = sys.modules.get(type(model).__module__)
    inner = getattr(model, "model", None)
    if prefix is None or modeling is None or not type(model).__module__.startswith("transformers.models.") or inner is None:
        return False
    config = model.config
    if model.training and getattr(config, "attention_dropout", 0.0):
        return False
    if getattr(config, "hidden_act", None) not in ("silu", "swish") or not takes_ready_mask(model):
        return False
    if getattr(getattr(inner, "rotary_emb", None), "rope_type", None) not in STATIC_ROPE:
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or "forward" in vars(m) for m in model.modules()):
        return False  # probes, accelerate's offloading, a forward patched on an instance

    def is_(module, suffix: str) -> bool:
        return type(module) is getattr(modeling, prefix + suffix, None)

    parts = [(inner.norm, "RMSNorm"), (inner.rotary_emb, "RotaryEmbedding")]
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        parts += [(layer, "DecoderLayer"), (attention, "Attention"), (mlp, "MLP"), (layer.input_layernorm, "RMSNorm"), (layer.post_attention_layernorm, "RMSNorm")]
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(p) is not nn.Linear for p in linears):
            return False
    return all(is_(m, suffix) for m, suffix in parts) and type(inner.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


def takes_ready_mask(model) -> bool:
    """Whether the model can be handed a ready 4D additive mask, used as-is by every layer: SDPA or
    eager attention and no layer with a window or chunks of its own. transformers expands a 2D padding
    mask again at every generated token: about a third of a tiny model's per-token time on a CPU."""
    config = model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


def _linear(module: nn.Linear) -> Linear:
    return module.weight, module.bias


def _norm(module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalized in float32, cast back, then scaled by the weight."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
