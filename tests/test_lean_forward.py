"""The lean forward (solvers/lean_forward.py) against the transformers forward it reproduces: logits of a
left-padded batch, decoding with its own KV cache, scoring, and the models it must refuse."""

from dataclasses import fields

import pytest
import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from solvers.causal_lm import CausalLMConfig, CausalLMPolicy, pack
from solvers.lean_forward import LeanForward, supports
from solvers.mixture_sampling import decode, ready_mask

TOKENIZER = ByT5Tokenizer(extra_ids=0)
SIZES = dict(vocab_size=len(TOKENIZER), hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None)

MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-bias": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, num_attention_heads=6, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3-rope-untied-head-dim": lambda: LlamaForCausalLM(
        LlamaConfig(
            **SIZES,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        )
    ),
    "llama-yarn-rope": lambda: LlamaForCausalLM(
        LlamaConfig(**SIZES, num_attention_heads=4, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
    ),
    "llama-linear-rope": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, num_attention_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}
PROMPTS = ["hello", "a longer prompt, to need padding", "x", "hello"]


def build(name: str, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS[name]()
        for p in model.parameters():  # random norm weights and biases, so a mistake in either shows
            if p.dim() == 1:
                p.data.normal_(1.0 if p.shape[0] == SIZES["hidden_size"] else 0.0, 0.3)
    return model.to(dtype).eval()


def padded_batch():
    prompts = [list(TOKENIZER(p)["input_ids"]) for p in PROMPTS]
    responses = [[5, 9, 77], [40], [100, 101, 102, 103, 104], [6, 6]]
    return pack(prompts, responses, pad_id=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_the_transformers_forward_on_a_left_padded_batch(name):
    model = build(name)
    assert supports(model)
    batch = padded_batch()
    runner = LeanForward.of(model)
    width = batch.targets.shape[1]
    with torch.inference_mode():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, logits_to_keep=width).logits
        mask = ready_mask(batch.attention_mask.bool(), batch.input_ids.shape[1], runner.dtype)
        got = runner.forward(batch.input_ids, runner.rope(batch.position_ids), mask, keep=width)
    real = batch.attention_mask[:, -width:].bool()  # pad positions' logits are never used
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_decoding_gives_the_tokens_and_logprobs_of_the_transformers_path(name):
    policy_model, reference = build(name), build(name)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompt_ids = [list(TOKENIZER(p)["input_ids"]) for p in PROMPTS]
    uniforms = torch.rand(len(PROMPTS), 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for models, weights in (([policy_model], [1.0]), ([policy_model, reference], [0.75, 0.25])):
        lean = decode(models, weights, prompt_ids, uniforms, stop_ids={1}, pad_id=0, top_p=0.9)
        plain = decode(models, weights, prompt_ids, uniforms, stop_ids={1}, pad_id=0, top_p=0.9, lean=False)
        assert lean.tokens == plain.tokens and lean.stopped == plain.stopped
        assert max(len(t) for t in lean.tokens) > 3  # decoding went on past the prompt
        torch.testing.assert_close(lean.logp, plain.logp, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lean.logq, plain.logq, atol=1e-4, rtol=1e-5)


def test_the_policy_scores_and_samples_alike_with_and_without_it():
    model = build("llama-gqa-bias")
    lean, plain = (CausalLMPolicy(model, TOKENIZER, CausalLMConfig(max_new_tokens=10, lean_forward=flag)) for flag in (True, False))
    samples = lean.sample(PROMPTS, 3, seed=7)
    assert samples == plain.sample(PROMPTS, 3, seed=7)
    flat = [s for row in samples for s in row]
    args = ([p for p in PROMPTS for _ in range(3)], [s.text for s in flat])
    kwargs = dict(finished=[s.finish_reason == "stop" for s in flat], tokens=[s.token_ids for s in flat])
    scored = lean.score(*args, **kwargs)
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(plain.score(*args, **kwargs)), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(scored), torch.tensor([s.logp for s in flat]), atol=1e-4, rtol=1e-5)


def test_bfloat16_stays_within_bfloat16_rounding_of_the_transformers_forward():
    model = build("llama-gqa-bias", torch.bfloat16)
    batch = padded_batch()
    runner = LeanForward.of(model)
    width = batch.targets.shape[1]
    with torch.inference_mode():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, logits_to_keep=width).logits
        got = runner.forward(batch.input_ids, runner.rope(batch.position_ids), ready_mask(batch.attention_mask.bool(), batch.input_ids.shape[1], torch.bfloat16), keep=width)
    assert got.dtype == torch.bfloat16
    real = batch.attention_mask[:, -width:].bool()
    torch.testing.assert_close(got[real].float(), expected[real].float(), atol=0.1, rtol=0.02)


class ScaledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return 2.0 * super().forward(ids)


def refused(why: str):
    """A model whose forward the lean one does not reproduce, and must therefore leave alone."""
    llama = dict(**SIZES, num_attention_heads=4)
    if why == "forward hook":
        model = build("llama")
        model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    elif why == "forward replaced on an instance":
        model = build("llama")
        norm = model.model.norm
        norm.forward = lambda x: type(norm).forward(norm, x) * 2.0
    elif why == "embedding subclass":
        model = build("llama")
        model.model.embed_tokens = ScaledEmbedding(SIZES["vocab_size"], SIZES["hidden_size"])
    elif why == "gelu":
        model = LlamaForCausalLM(LlamaConfig(**llama, hidden_act="gelu"))
    elif why == "dynamic rope":  # frequencies recomputed from the longest position of each call
        model = LlamaForCausalLM(LlamaConfig(**llama, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}))
    elif why == "longrope":
        half = SIZES["hidden_size"] // 4 // 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half, "long_factor": [4.0] * half, "original_max_position_embeddings": 16}
        model = LlamaForCausalLM(LlamaConfig(**llama, rope_parameters=rope))
    elif why == "mistral sliding window":
        model = MistralForCausalLM(MistralConfig(**SIZES, num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
    elif why == "qwen2 sliding window":
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    elif why == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_embd=32, n_layer=2, n_head=2, n_positions=128))
    else:
        raise ValueError(why)
    return model.eval()


@pytest.mark.parametrize("why", ["forward hook", "forward replaced on an instance", "embedding subclass", "gelu", "dynamic rope", "longrope", "mistral sliding window", "qwen2 sliding window", "gpt2"])
def test_models_it_does_not_reproduce_go_through_their_own_forward(why, monkeypatch):
    model = refused(why)
    assert not supports(model) and LeanForward.of(model) is None
    prompt_ids = [list(TOKENIZER(p)["input_ids"]) for p in PROMPTS]
    uniforms = torch.rand(len(PROMPTS), 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = decode([model], [1.0], prompt_ids, uniforms, stop_ids={1}, pad_id=0, lean=False)

    def not_lean(*args, **kwargs):
        raise AssertionError(f"{why}: decoded through the lean forward")

    monkeypatch.setattr(LeanForward, "forward", not_lean)
    out = decode([model], [1.0], prompt_ids, uniforms, stop_ids={1}, pad_id=0)
    assert out.tokens == plain.tokens and max(len(t) for t in out.tokens) > 1


def test_it_sees_parameter_changes_and_copies_no_weights():
    model = build("llama")
    runner = LeanForward.of(model)
    held = [runner.embed, runner.norm[0], *runner.head, *(t for layer in runner.layers for f in fields(layer) for t in getattr(layer, f.name))]
    tensors = [t for t in held if isinstance(t, torch.Tensor)]
    assert len(tensors) == 2 + 2 * 9 + 1 and {t.data_ptr() for t in tensors} <= {p.data_ptr() for p in model.parameters()}
    batch = padded_batch()
    mask = ready_mask(batch.attention_mask.bool(), batch.input_ids.shape[1], runner.dtype)
    with torch.inference_mode():
        before = runner.forward(batch.input_ids, runner.rope(batch.position_ids), mask)
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
        after = runner.forward(batch.input_ids, runner.rope(batch.position_ids), mask)
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, logits_to_keep=1).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=2e-5, rtol=1e-5)
