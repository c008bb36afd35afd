"""The LLM judge against a real third-party OpenAI-compatible server: ``transformers serve`` with a tiny
random Llama (byte-level ByT5 tokenizer, no download). Its answers are arbitrary bytes: they must become
recorded abstentions, and the batch must complete.

``transformers serve --device cpu`` loads the model with a ``device_map``, which needs ``accelerate``
(the ``bench`` extra); without it the test is skipped and says so.
"""

from __future__ import annotations

import importlib.util

import pytest

from oracles.judge_parse import parse_verdict
from oracles.llm_judge import LLMJudge, LLMJudgeConfig, judge_metrics
from local_servers import transformers_serve
from oracles.protocol import Pair

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers serve --device cpu needs transformers and accelerate (pip install accelerate)",
)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def build_tiny_model(folder) -> None:
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE  # the server applies it; ByT5 has none
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture
def served_model(tmp_path):
    folder = tmp_path / "tiny-judge"
    build_tiny_model(folder)
    with transformers_serve(folder, tmp_path / "serve.log", timeout=90) as base_url:
        yield base_url, str(folder)


def test_arbitrary_output_becomes_abstentions_and_the_batch_completes(served_model, tmp_path):
    base_url, model = served_model  # a server pinned to a folder wants that folder as the model name
    # A short template keeps the prompt at ~250 byte tokens: this server spends ~0.1 s per token here.
    template = tmp_path / "short.txt"
    template.write_text("$prompt\n$response_a\n$response_b\nWhich response is better? Reply A, B or tie.")
    pairs = [Pair("p", "What is 2 + 2?", f"a{i}", "4", f"b{i}", "five" * (i + 1)) for i in range(2)]
    judge = LLMJudge(LLMJudgeConfig(model=model, base_url=base_url, votes=2, temperature=1.0, max_tokens=4, timeout_s=60,
                                    template_path=str(template), backoff_base_s=0.05))
    judgments = judge.judge(pairs)

    assert [j.pair for j in judgments] == pairs
    for j in judgments:
        assert not j.skipped, j.error  # every request was answered: nothing left to ask again
        for order in j.detail["orders"]:
            assert order["requests"] == 2  # it ignores n=2, so each order was asked twice
            assert len(order["answers"]) == 2
            for a in order["answers"]:  # whatever it said was read by the strict parser, never defaulted
                assert a["verdict"] == parse_verdict(a["text"])[0]
                assert a.get("source") != "logprobs"  # it sends no logprobs
        unreadable = [a for o in j.detail["orders"] for a in o["answers"] if a["verdict"] is None]
        if unreadable:
            assert j.p_a is None and j.error.startswith("abstained: ")
    m = judge_metrics(judgments)
    assert m["judge/requests"] == 8 and m["tokens/completion"] > 0
    assert m["judge/abstained"] + m["judge/judged"] == 2
