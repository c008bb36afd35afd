"""The causal-LM policy on tiny random models: sampling, log-probs, padding, seeds, loading and saving,
and the geometric-mixture sampler against its closed form on a 4-token vocabulary.

Random weights emit arbitrary bytes: nothing here asserts anything about a text's content.
"""

import itertools
import math
import os
import warnings

import pytest
import torch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from solvers.causal_lm import (
    TINY_CHAT_TEMPLATE,
    CausalLMConfig,
    CausalLMPolicy,
    ModelLoadError,
    PromptTooLongError,
    PromptTruncatedWarning,
    pack,
    sequence_logprobs,
    tiny_causal_lm,
    tiny_policy,
    token_logprobs,
)
from solvers.mixture_sampling import choose_tokens, decode
from solvers.policy import Policy

PROMPTS = ["hello", "a longer prompt, to need padding", "x"]


def make_policy(kind: str, config: CausalLMConfig = CausalLMConfig()) -> CausalLMPolicy:
    """The tiny Llama (rotary positions, which a constant shift does not change) or a tiny GPT-2
    (absolute positions: wrong position ids under left padding change its outputs)."""
    if kind == "llama":
        return tiny_policy(config=config)
    tokenizer = ByT5Tokenizer(extra_ids=0)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(gpt2).eval()
    return CausalLMPolicy(model, tokenizer, config)


KINDS = pytest.mark.parametrize("kind", ["llama", "gpt2"])


def ascii_only(policy: CausalLMPolicy) -> CausalLMPolicy:
    """Make the tiny model emit only printable ASCII or EOS (a fixed logit bias on everything else), so
    that sampled tokens decode to text that encodes back to the same tokens."""
    allowed = torch.zeros(policy.model.config.vocab_size, dtype=torch.bool)
    allowed[[policy.eos_id, *range(32 + 3, 127 + 3)]] = True  # ByT5: byte b is token b + 3
    bias = torch.where(allowed, 0.0, -30.0)
    policy.model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out))
    return policy


def naive_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """One unpadded sequence, full float64 log-softmax over the vocabulary at every position."""
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return sum(float(logp[n - 1 + t, tok]) for t, tok in enumerate(response_ids))


# ----- the tiny model ---------------------------------------------------------------------------------


def test_tiny_model_is_small_offline_and_has_pad_and_eos():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model, tokenizer = tiny_causal_lm()
    assert len(tokenizer) == 259 and model.config.vocab_size == 259
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 140_000
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    same, _ = tiny_causal_lm()
    other, _ = tiny_causal_lm(seed=1)
    assert torch.equal(model.lm_head.weight, same.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert isinstance(tiny_policy(), Policy)


def test_prompt_encoding_with_and_without_chat_template():
    plain = tiny_policy()
    assert plain.encode_prompts(["hi"]) == [[ord("h") + 3, ord("i") + 3]]  # no EOS after the prompt
    chat = tiny_policy(chat_template=TINY_CHAT_TEMPLATE)
    assert chat.render("hi") == "user: hi\nassistant: "
    assert chat.encode_prompts(["hi"]) == [[b + 3 for b in b"user: hi\nassistant: "]]
    assert tiny_policy(chat_template=TINY_CHAT_TEMPLATE, config=CausalLMConfig(use_chat_template=False)).render("hi") == "hi"
    assert plain.encode_responses(["ab", "ab"], [True, False]) == [[100, 101, 1], [100, 101]]


# ----- sampling ---------------------------------------------------------------------------------------


def test_sample_shapes_fields_and_seeds():
    policy = tiny_policy(config=CausalLMConfig(max_new_tokens=12, batch_size=4))
    samples = policy.sample(PROMPTS, 3, seed=7)
    assert [len(row) for row in samples] == [3, 3, 3]
    for row in samples:
        for s in row:
            assert isinstance(s.text, str) and s.finish_reason in ("stop", "length")
            assert 1 <= s.n_tokens <= 12
            assert s.finish_reason == "stop" or s.n_tokens == 12
    assert policy.sample(PROMPTS, 3, seed=7) == samples
    assert policy.sample(PROMPTS, 3, seed=8) != samples
    assert len({s.text for row in samples for s in row}) > 5  # the k samples of a prompt differ


@KINDS
def test_a_prompts_samples_do_not_depend_on_its_batch(kind):
    policy = make_policy(kind, CausalLMConfig(max_new_tokens=10, batch_size=5))
    together = policy.sample(PROMPTS, 2, seed=3)
    for i, prompt in enumerate(PROMPTS):
        alone = policy.sample([prompt], 2, seed=3)[0]
        assert [(s.text, s.token_ids, s.finish_reason) for s in alone] == [(s.text, s.token_ids, s.finish_reason) for s in together[i]]
        torch.testing.assert_close(torch.tensor([s.logp for s in alone]), torch.tensor([s.logp for s in together[i]]), atol=1e-4, rtol=1e-5)


def test_greedy_and_nucleus():
    greedy = tiny_policy(config=CausalLMConfig(max_new_tokens=8, temperature=0.0))
    a, b = greedy.sample(["hello"], 2, seed=0)[0]
    assert a == b
    # top_p so small that only the most likely token survives: the same as greedy
    nucleus = tiny_policy(config=CausalLMConfig(max_new_tokens=8, top_p=1e-6))
    assert nucleus.sample(["hello"], 1, seed=5)[0][0].text == a.text


def test_choose_tokens_top_p_keeps_the_smallest_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    seen = set()
    for u in torch.linspace(0, 0.999, 200):
        token, logq = choose_tokens(scores, u.view(1), temperature=1.0, top_p=0.75)
        seen.add(int(token))
        expected = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[int(token)]
        assert math.isclose(float(logq.exp()), expected, rel_tol=1e-9)
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are cut


def test_sampled_logp_equals_score_of_the_text():
    policy = ascii_only(tiny_policy(config=CausalLMConfig(max_new_tokens=16, batch_size=4)))
    samples = policy.sample(PROMPTS, 2, seed=11)
    flat = [(p, s) for p, row in zip(PROMPTS, samples) for s in row]
    assert all(s.logp is not None for _, s in flat)
    scored = policy.score([p for p, _ in flat], [s.text for _, s in flat], finished=[s.finish_reason == "stop" for _, s in flat])
    torch.testing.assert_close(torch.tensor(scored), torch.tensor([s.logp for _, s in flat]), atol=1e-4, rtol=1e-5)
    assert all(s.n_tokens == len(s.text) + (s.finish_reason == "stop") for _, s in flat)


def test_logp_is_of_the_sampled_tokens_when_the_text_does_not_encode_back():
    policy = tiny_policy(config=CausalLMConfig(max_new_tokens=24))
    samples = [(p, s) for p, row in zip(PROMPTS, policy.sample(PROMPTS, 4, seed=0)) for s in row]
    # A random byte model writes bytes that are not UTF-8, which decoding drops: that text has other tokens.
    broken = [(p, s) for p, s in samples if policy.encode_responses([s.text], [s.finish_reason == "stop"])[0] != list(s.token_ids)]
    assert broken and all(len(s.token_ids) == s.n_tokens for _, s in broken)
    prompts, texts, tokens = [p for p, _ in broken], [s.text for _, s in broken], [s.token_ids for _, s in broken]
    of_tokens = policy.score(prompts, texts, tokens=tokens)
    torch.testing.assert_close(torch.tensor(of_tokens), torch.tensor([s.logp for _, s in broken]), atol=1e-4, rtol=1e-5)
    of_text = policy.score(prompts, texts, finished=[s.finish_reason == "stop" for _, s in broken])
    assert all(abs(a - b) > 1e-3 for a, b in zip(of_text, of_tokens))  # the text's own tokens are another sequence


@KINDS
def test_decode_uses_the_kv_cache_and_matches_a_full_forward(kind):
    policy = make_policy(kind)
    model = policy.model
    widths = []
    hook = model.base_model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs.get("input_ids", args[0] if args else None).shape[1]), with_kwargs=True)
    prompt_ids = policy.encode_prompts(PROMPTS)
    uniforms = torch.rand(len(PROMPTS), 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        out = decode([model], [1.0], prompt_ids, uniforms, stop_ids={1}, pad_id=0)
    finally:
        hook.remove()
    assert widths[0] == max(len(p) for p in prompt_ids) and set(widths[1:]) == {1}  # the prefix is never re-read
    assert len(widths) == max(len(t) for t in out.tokens)
    naive = [naive_logprob(model, p, t) for p, t in zip(prompt_ids, out.tokens)]
    torch.testing.assert_close(out.logp, torch.tensor(naive, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.logq, out.logp)  # temperature 1, no nucleus: sampled from π itself


def test_decode_reads_a_repeated_prompt_once_and_samples_each_row_as_alone():
    policy = tiny_policy()
    prompt_ids = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]])
    uniforms = torch.rand(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch_rows = []
    hook = policy.model.base_model.register_forward_pre_hook(lambda module, args, kwargs: batch_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = decode([policy.model], [1.0], prompt_ids, uniforms, stop_ids={1}, pad_id=0)
    finally:
        hook.remove()
    assert batch_rows[0] == 2 and set(batch_rows[1:]) == {4}  # two distinct prompts read, four rows decoded
    alone = [decode([policy.model], [1.0], [p], uniforms[i : i + 1], stop_ids={1}, pad_id=0) for i, p in enumerate(prompt_ids)]
    assert together.tokens == [a.tokens[0] for a in alone] and len({tuple(t) for t in together.tokens}) == 4
    torch.testing.assert_close(together.logp, torch.cat([a.logp for a in alone]), atol=1e-5, rtol=1e-5)


# ----- log-probs --------------------------------------------------------------------------------------


@KINDS
def test_score_matches_a_naive_full_log_softmax_and_ignores_padding(kind):
    policy = make_policy(kind, CausalLMConfig(batch_size=3))
    responses = ["abc", "", "a longer response than the others", "z", "q r"]
    prompts = PROMPTS + PROMPTS[:2]
    finished = [True, True, False, True, False]
    batched = policy.score(prompts, responses, finished=finished)
    alone = [policy.score([p], [r], finished=[f])[0] for p, r, f in zip(prompts, responses, finished)]
    prompt_ids, response_ids = policy.encode(prompts, responses, finished)
    naive = [naive_logprob(policy.model, p, r) for p, r in zip(prompt_ids, response_ids)]
    torch.testing.assert_close(torch.tensor(batched, dtype=torch.float64), torch.tensor(naive, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert batched[2] < batched[0] < 0 and batched[1] < 0  # an empty finished response still has its EOS


def test_token_logprobs_in_chunks_equal_log_softmax_with_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 37, generator=g)).requires_grad_()
    targets = torch.randint(0, 37, (4, 5), generator=g)
    weights = torch.randn(4, 5, generator=g)
    ours = token_logprobs(logits, targets, chunk_elements=3 * 37)  # 7 chunks of 3 positions
    (ours * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    naive = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (naive * weights).sum().backward()
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(grad, logits.grad)
    double = torch.randn(3, 6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, torch.tensor([0, 5, 2]), chunk_elements=6), (double,))
    bf16 = token_logprobs(logits.detach().bfloat16(), targets)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, naive.detach(), atol=0.1, rtol=0.02)


def test_sequence_logprobs_with_gradients_match_the_naive_computation():
    model, _ = tiny_causal_lm()
    prompt_ids = [[10, 11, 12], [13]]
    response_ids = [[40, 41, 1], [42, 43, 44, 45]]
    ours = sequence_logprobs(model, pack(prompt_ids, response_ids, pad_id=0), chunk_elements=259 * 2)
    ours.sum().backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    naive = torch.stack(
        [
            torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1], -1).gather(-1, torch.tensor(r).unsqueeze(-1)).sum()
            for p, r in zip(prompt_ids, response_ids)
        ]
    )
    naive.sum().backward()
    assert ours.shape == (2,) and ours.requires_grad
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    batch = pack(prompt_ids, response_ids, pad_id=0)
    assert batch.targets.shape == (2, 5) and batch.target_mask.sum().item() == 7
    with torch.inference_mode():
        torch.testing.assert_close(sequence_logprobs(model, batch), naive.detach(), atol=1e-5, rtol=1e-5)


# ----- long prompts, loading, saving ------------------------------------------------------------------


def test_a_prompt_over_the_context_is_truncated_with_a_warning_or_refused():
    long_prompt = "y" * 300  # the tiny context is 256 tokens
    policy = tiny_policy(config=CausalLMConfig(max_new_tokens=16))
    with pytest.warns(PromptTruncatedWarning, match="prompt 1 has 300 tokens"):
        ids = policy.encode_prompts(["ok", long_prompt])
    assert len(ids[1]) == 256 - 16
    with pytest.warns(PromptTruncatedWarning):
        assert len(policy.sample([long_prompt], 1, seed=0)[0]) == 1
    strict = tiny_policy(config=CausalLMConfig(max_new_tokens=16, too_long="refuse"))
    with pytest.raises(PromptTooLongError, match="prompt 0 has 300 tokens"):
        strict.sample([long_prompt], 1, seed=0)
    with pytest.raises(PromptTooLongError):
        strict.score(["y" * 250], ["z" * 10])  # fits for sampling, not with this response
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strict.score(["y" * 240], ["z" * 10])


def test_load_errors_say_what_is_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        CausalLMPolicy.load(tmp_path / "nowhere")
    policy = tiny_policy()
    policy.model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        CausalLMPolicy.load(tmp_path / "no-tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        CausalLMPolicy.load(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        CausalLMPolicy.load("nashflow-tests/no-such-model")


def test_save_then_load_gives_the_same_policy(tmp_path):
    policy = tiny_policy(chat_template=TINY_CHAT_TEMPLATE, config=CausalLMConfig(max_new_tokens=8))
    path = tmp_path / "round-1"
    policy.save(path)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1", "round-1.json"]  # its manifest, no partial folder left
    loaded = CausalLMPolicy.load(path, CausalLMConfig(max_new_tokens=8, dtype="float32"))  # as saved, on a GPU too
    assert loaded.chat and loaded.encode_prompts(PROMPTS) == policy.encode_prompts(PROMPTS)
    assert loaded.sample(PROMPTS, 2, seed=1) == policy.sample(PROMPTS, 2, seed=1)
    torch.testing.assert_close(torch.tensor(loaded.score(PROMPTS, ["ab", "c", ""])), torch.tensor(policy.score(PROMPTS, ["ab", "c", ""])))
    with pytest.raises(FileExistsError):
        policy.save(path)
    policy.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1", "round-1.json"]


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch):
    policy = tiny_policy()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(policy.tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        policy.save(tmp_path / "round-2")
    assert list(tmp_path.iterdir()) == []


# ----- the geometric mixture π^{1−m} μ^m --------------------------------------------------------------

V = 4  # tokens: 0 pad, 1 eos, 2 and 3


def tiny_vocab_model(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # far from uniform, so that π, μ and the mixture differ clearly
    return model.eval()


def exact_mixture_logprob(theta, mu, prompt: list[int], tokens: list[int], m: float) -> float:
    """Closed form, recomputing every prefix from scratch: Σ_t log softmax((1−m) log π_θ + m log μ)[y_t]."""
    total = 0.0
    for t, tok in enumerate(tokens):
        ids = torch.tensor([prompt + tokens[:t]])
        with torch.no_grad():
            lt = torch.log_softmax(theta(input_ids=ids).logits[0, -1].double(), -1)
            lm = torch.log_softmax(mu(input_ids=ids).logits[0, -1].double(), -1)
        total += float(torch.log_softmax((1 - m) * lt + m * lm, -1)[tok])
    return total


def test_mixture_sequence_probabilities_equal_the_closed_form():
    theta, mu, m = tiny_vocab_model(0), tiny_vocab_model(1), 0.3
    prompts = [[2], [3, 2, 3, 3], [2, 3]]  # different lengths: padding and positions are exercised
    uniforms = torch.rand(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [prompts[i % 3] for i in range(12)]
    out = decode([theta, mu], [1 - m, m], rows, uniforms, stop_ids={1}, pad_id=0)
    exact = [exact_mixture_logprob(theta, mu, p, t, m) for p, t in zip(rows, out.tokens)]
    torch.testing.assert_close(out.logq, torch.tensor(exact, dtype=torch.float64), atol=1e-5, rtol=1e-6)
    policy_only = [exact_mixture_logprob(theta, mu, p, t, 0.0) for p, t in zip(rows, out.tokens)]
    torch.testing.assert_close(out.logp, torch.tensor(policy_only, dtype=torch.float64), atol=1e-5, rtol=1e-6)
    assert max(abs(a - b) for a, b in zip(exact, policy_only)) > 0.5  # the mixture is not π_θ


def test_mixture_frequencies_match_the_exact_distribution():
    theta, mu, m, n = tiny_vocab_model(0), tiny_vocab_model(1), 0.5, 4000
    prompt = [2, 3]
    # every outcome of at most 2 new tokens: EOS first, or a non-EOS token then anything
    outcomes = [(1,)] + [(a, b) for a, b in itertools.product([0, 2, 3], range(V))]
    exact = {y: math.exp(exact_mixture_logprob(theta, mu, prompt, list(y), m)) for y in outcomes}
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    uniforms = torch.rand(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = decode([theta, mu], [1 - m, m], [prompt] * n, uniforms, stop_ids={1}, pad_id=0)
    counts = {y: 0 for y in outcomes}
    for t in out.tokens:
        counts[tuple(t)] += 1
    for y, p in exact.items():
        assert abs(counts[y] / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (y, counts[y] / n, p)
    theta_only = {y: math.exp(exact_mixture_logprob(theta, mu, prompt, list(y), 0.0)) for y in outcomes}
    assert sum(abs(exact[y] - theta_only[y]) for y in outcomes) > 0.2  # would catch sampling from π_θ alone


def test_mixture_weights_zero_and_one_reduce_to_each_model():
    theta, mu = tiny_vocab_model(0), tiny_vocab_model(1)
    prompts = [[2, 3], [3]]
    uniforms = torch.rand(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(stop_ids={1}, pad_id=0)
    assert decode([theta, mu], [1.0, 0.0], prompts, uniforms, **kw).tokens == decode([theta], [1.0], prompts, uniforms, **kw).tokens
    assert decode([theta, mu], [0.0, 1.0], prompts, uniforms, **kw).tokens == decode([mu], [1.0], prompts, uniforms, **kw).tokens


def test_sample_mixture_on_policies():
    config = CausalLMConfig(max_new_tokens=10)
    policy, reference = tiny_policy(seed=0, config=config), tiny_policy(seed=1, config=config)
    mixed = policy.sample_mixture(reference, PROMPTS, 2, m=0.5, seed=4)
    assert [len(row) for row in mixed] == [2, 2, 2]
    assert policy.sample_mixture(reference, PROMPTS, 2, m=0.5, seed=4) == mixed
    assert mixed != policy.sample(PROMPTS, 2, seed=4)  # its own random stream: y and y' independent
    with pytest.raises(ValueError, match="m must be in"):
        policy.sample_mixture(reference, PROMPTS, 1, m=1.5, seed=0)
