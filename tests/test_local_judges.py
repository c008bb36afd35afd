"""The local judges on tiny random models built offline: reward_model, pairwise_lm, pairwise_classifier.

Their answers mean nothing (random weights); what is tested is what each kind promises: probabilities
in [0, 1], P(a ≻ b) + P(b ≻ a) = 1 for the two pairwise kinds, the reward model's σ((r_a − r_b)/T),
the same answer twice, the shared-prefix batch equal to one sequence at a time, and a stored score
never computed again.
"""

from __future__ import annotations

import os

import math

import pytest
import torch

from data import Store
from oracles.cascade import Cascade, Confident, OrdersAgree, Stage
from oracles.local_judges import PairwiseClassifierOracle, PairwiseLMOracle, RewardModelOracle, local_judge_id, prompt_tag
from oracles.protocol import Pair, orders_agree
from solvers.causal_lm import TINY_CHAT_TEMPLATE, ModelLoadError, tiny_causal_lm
from solvers.judge_models import PairwiseClassifier, RewardModel, fingerprint, length_batches
from solvers.pairwise_lm import PairwiseLM
from store_contents import seed_responses

PROMPTS = ["What is 2 + 2?", "Name a red fruit."]
ANSWERS = {PROMPTS[0]: ["4", "five", "It is 4, of course.", "22"], PROMPTS[1]: ["apple", "a banana", "Strawberries are red."]}


def all_pairs() -> list[Pair]:
    out = []
    for p in PROMPTS:
        xs = ANSWERS[p]
        out += [Pair(p, p, f"{p}-{i}", x, f"{p}-{j}", y) for i, x in enumerate(xs) for j, y in enumerate(xs) if i != j]
    return out


def tiny_classifier(seed: int = 0):
    """A 2-layer Llama with a one-output classification head and the byte-level tokenizer (pad 0)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = ByT5Tokenizer(extra_ids=0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    return model.eval(), tok


@pytest.fixture(scope="module")
def judge_lm():
    model, tok = tiny_causal_lm(seed=1, chat_template=TINY_CHAT_TEMPLATE, context=2048, hidden=32)
    return PairwiseLM(model, tok, fingerprint="f" * 32)


def test_length_batches_keep_within_the_budget_and_cover_every_index():
    lengths = [5, 100, 7, 50, 50, 3]
    batches = length_batches(lengths, 120)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [1]  # the longest first, alone: two of 100 would be 200 > 120
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 120 or len(b) == 1


def test_pairwise_lm_is_a_probability_antisymmetric_and_deterministic(judge_lm):
    oracle = PairwiseLMOracle(judge_lm)
    pairs = all_pairs()
    first, again = oracle.judge(pairs), oracle.judge(pairs)
    by_key = {(j.pair.a_id, j.pair.b_id): j.p_a for j in first}
    for j, k in zip(first, again):
        assert j.p_a is not None and 0.0 <= j.p_a <= 1.0
        assert j.p_a == k.p_a  # the same batch gives the same answer
        # both orders averaged: P(a ≻ b) + P(b ≻ a) = 1
        assert j.p_a + by_key[(j.pair.b_id, j.pair.a_id)] == pytest.approx(1.0, abs=1e-6)
        ab, ba = (o["p_first"] for o in j.detail["orders"])
        assert j.p_a == pytest.approx((ab + 1 - ba) / 2)
        assert orders_agree(j.detail) is not None
    assert oracle.oracle_id.startswith("pairwise_lm:judge@ffffffffffff:")
    m = oracle.metrics(first)
    assert m["pairwise_lm/pairs"] == len(pairs) and m["pairwise_lm/tokens"] > 0 and 0 <= m["pairwise_lm/first_slot_p"] <= 1


def test_the_shared_prefix_batch_equals_each_sequence_alone(judge_lm):
    """The batched forward (shared prefix, both orders of many pairs) against the model's own forward,
    one conversation at a time: the same probabilities to float rounding."""
    model, tok = judge_lm.model, judge_lm.tokenizer
    oracle = PairwiseLMOracle(judge_lm)
    pairs = all_pairs()[:6] + all_pairs()[-3:]
    convs = [oracle.template.messages(q.prompt, x, y, tag=prompt_tag(q.prompt)) for q in pairs for x, y in ((q.a, q.b), (q.b, q.a))]
    groups = [q.prompt for q in pairs for _ in range(2)]
    naive = PairwiseLM(model, tok, fingerprint="x", share_prefix=False)
    alone = torch.cat([naive.verdict_probs([c]) for c in convs])
    shared = PairwiseLM(model, tok, fingerprint="x", max_batch_tokens=10**6)
    batched = shared.verdict_probs(convs, groups)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-7)
    assert shared.counters.forwards == 1 and naive.counters.forwards == len(convs)
    assert shared.counters.tokens < 0.7 * naive.counters.tokens  # the prompt's prefix was read once per group
    # all_pairs holds (a, b) and (b, a): their conversations are the same two, each read once
    distinct = len({repr(c) for c in convs})
    assert distinct < len(convs) and shared.counters.sequences == distinct
    torch.testing.assert_close(shared.verdict_probs(convs + convs[:4], groups + groups[:4]), torch.cat([alone, alone[:4]]))
    assert shared.counters.sequences == 2 * distinct
    whole = PairwiseLM(model, tok, fingerprint="x", share_prefix=False, max_batch_tokens=10**6)
    torch.testing.assert_close(whole.verdict_probs(convs, groups), alone, rtol=1e-4, atol=1e-7)


def test_a_conversation_longer_than_the_context_is_an_abstention_with_its_reason():
    model, tok = tiny_causal_lm(seed=1, chat_template=TINY_CHAT_TEMPLATE, context=1200, hidden=32)
    oracle = PairwiseLMOracle(PairwiseLM(model, tok, fingerprint="x" * 32))
    short, long = Pair("p", "hi", "a", "x", "b", "y"), Pair("p", "hi", "c", "x" * 2000, "d", "y")
    ok, too_long = oracle.judge([short, long])
    assert ok.p_a is not None
    assert too_long.p_a is None and too_long.error.startswith("abstained: ") and "context" in too_long.error


def test_a_verdict_that_is_not_one_token_is_refused():
    model, tok = tiny_causal_lm(seed=1, hidden=32)
    with pytest.raises(ValueError, match="verdict 'first' is 5 tokens"):
        PairwiseLM(model, tok, fingerprint="x", verdicts=("first", "B"))


def test_pairwise_classifier_is_antisymmetric_and_deterministic():
    model, tok = tiny_classifier()
    oracle = PairwiseClassifierOracle(PairwiseClassifier(model, tok, fingerprint="c" * 32))
    pairs = all_pairs()
    judged = oracle.judge(pairs)
    by_key = {(j.pair.a_id, j.pair.b_id): j.p_a for j in judged}
    logit = PairwiseClassifier(model, tok, fingerprint="c" * 32).logits([pairs[0].prompt], [pairs[0].a], [pairs[0].b])[0]
    assert judged[0].detail["orders"][0]["p_first"] == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-5)
    for j, k in zip(judged, oracle.judge(pairs)):
        assert 0.0 <= j.p_a <= 1.0 and j.p_a == k.p_a
        assert j.p_a + by_key[(j.pair.b_id, j.pair.a_id)] == pytest.approx(1.0, abs=1e-6)


def test_a_classifier_with_two_outputs_is_refused():
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = ByT5Tokenizer(extra_ids=0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=2, pad_token_id=0)
    with pytest.raises(ModelLoadError, match="has 2 outputs"):
        RewardModel(LlamaForSequenceClassification(config), tok, fingerprint="x")


class Forwards:
    """Counts the forward passes of a torch module."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_reward_model_probability_is_the_sigmoid_of_the_reward_difference():
    model, tok = tiny_classifier(seed=3)
    rm = RewardModel(model, tok, fingerprint="r" * 32)
    oracle = RewardModelOracle(rm, temperature=0.5)
    pairs = all_pairs()
    r = dict(zip([q.a_id for q in pairs], rm.score([q.prompt for q in pairs], [q.a for q in pairs])))
    for j in oracle.judge(pairs):
        # σ((r_a − r_b)/T) with T = 0.5: e.g. r_a − r_b = 0.1 gives σ(0.2) ≈ 0.5498
        expected = 1 / (1 + math.exp(-(r[j.pair.a_id] - r[j.pair.b_id]) / 0.5))
        assert j.p_a == pytest.approx(expected, rel=1e-6)
    # transitive by construction: the order by reward decides every pair
    best = max(r, key=r.get)
    assert all(j.p_a >= 0.5 for j in oracle.judge(pairs) if j.pair.a_id == best)


def test_a_stored_score_is_never_computed_again(tmp_path):
    """Round 1 scores its responses; round 2 (a new oracle, as a new task builds it) pairs them with new
    ones: only the new responses run forward, and the store holds one score per (response, oracle)."""
    from data.scores import StoredScores

    store = Store(str(tmp_path / "store"))
    prompt = PROMPTS[0]
    old = seed_responses(store, prompt, ANSWERS[prompt][:3], round=1)
    new = seed_responses(store, prompt, ["four", "IV"], round=2, policy_version="v1")
    texts = dict(zip(old + new, ANSWERS[prompt][:3] + ["four", "IV"]))
    pid = store.read("prompts")["prompt_id"][0]
    pair = lambda a, b: Pair(pid, prompt, a, texts[a], b, texts[b])  # noqa: E731
    model, tok = tiny_classifier(seed=4)
    forwards = Forwards(model)
    rm = RewardModel(model, tok, fingerprint="s" * 32, max_batch_tokens=1)  # one response per forward: forwards count responses
    oracle_id = local_judge_id("reward_model", rm.fingerprint, {"temperature": 1.0}, name="reward")
    first = RewardModelOracle(rm, scores=StoredScores(store, oracle_id))
    round1 = first.judge([pair(old[0], old[1]), pair(old[1], old[2]), pair(old[2], old[0])])
    assert forwards.n == 3 and first.oracle_id == oracle_id
    second = RewardModelOracle(rm, scores=StoredScores(store, oracle_id))  # nothing in memory: the store answers
    forwards.n = 0
    round2 = second.judge([pair(new[0], old[0]), pair(new[1], old[1]), pair(old[0], old[1])])
    assert forwards.n == 2  # the two new responses only
    assert round2[2].p_a == round1[0].p_a  # a stored score gives the same answer
    stored = store.read("scores")
    assert len(stored[stored["oracle_id"] == oracle_id]) == 5
    assert dict(zip(stored["response_id"], stored["round"]))[new[0]] == 2  # in its response's round


def test_the_scores_table_refuses_unknown_responses_and_non_finite_scores(tmp_path):
    from data.store import StoreError

    store = Store(str(tmp_path / "store"))
    (rid,) = seed_responses(store, "p", ["x"], round=1)
    with pytest.raises(StoreError, match="score=nan is not a finite number"):
        store.write("scores", [dict(response_id=rid, oracle_id="o", round=1, score=float("nan"))])
    with pytest.raises(StoreError, match="is not a stored response"):
        store.write("scores", [dict(response_id="nope", oracle_id="o", round=1, score=0.0)])


def test_the_local_judges_are_cascade_stages(judge_lm):
    """A reward model as the cascade's first stage, the local pairwise LM as its judge."""
    model, tok = tiny_classifier(seed=5)
    cascade = Cascade([Stage(RewardModelOracle(RewardModel(model, tok, fingerprint="q" * 32)), accept=Confident(0.45), name="reward"),
                       Stage(PairwiseLMOracle(judge_lm), accept=OrdersAgree(), name="judge")])
    judged = cascade.judge(all_pairs())
    assert {j.detail.get("stage") for j in judged} <= {"reward", "judge"} and all(0 <= j.p_a <= 1 for j in judged if j.p_a is not None)
    routes = [len(j.detail["route"]) for j in judged]
    assert 2 in routes  # a random reward model is rarely 95% sure: the judge saw pairs


def test_fingerprint_follows_the_files(tmp_path):
    model, tok = tiny_classifier()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    before = fingerprint(str(tmp_path / "rm"))
    assert fingerprint(str(tmp_path / "rm")) == before
    (tmp_path / "rm" / "extra.txt").write_text("changed")
    assert fingerprint(str(tmp_path / "rm")) != before
    with pytest.raises(ModelLoadError, match="no such model folder or file"):
        fingerprint(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def saved_judges(tmp_path_factory):
    """A tiny causal LM (with a chat template) and a tiny classifier, saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("judges")
    model, tok = tiny_causal_lm(seed=1, chat_template=TINY_CHAT_TEMPLATE, context=2048, hidden=32)
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    model, tok = tiny_classifier()
    model.save_pretrained(root / "clf")
    tok.save_pretrained(root / "clf")
    return root


def campaign(tmp_path, oracle: dict, **more):
    from pipelines.config import parse_config

    return parse_config({"name": "local", "store": str(tmp_path / "store"), "rounds": 1, "prompts": {"source": "text_world", "limit_train": 2, "limit_eval": 1},
                         "policy": {"kind": "causal_lm"}, "oracle": oracle, "solver": {"algorithm": "inpo"}, **more})


@pytest.mark.parametrize("kind,folder", [("pairwise_lm", "lm"), ("reward_model", "clf"), ("pairwise_classifier", "clf")])
def test_the_factory_builds_each_kind_with_the_id_it_announces(saved_judges, tmp_path, kind, folder):
    from pipelines.oracle_factory import oracle_spec
    from pipelines.world import World

    config = campaign(tmp_path, {"kind": kind, "model": str(saved_judges / folder), "device": "cpu"})
    spec = oracle_spec(config.oracle, config, World(config))
    assert spec.runs_model and spec.oracle_id.startswith(f"{kind}:")
    assert fingerprint(str(saved_judges / folder))[:12] in spec.oracle_id  # the checkpoint's content hash names it
    oracle = spec.build()
    assert oracle.oracle_id == spec.oracle_id
    pairs = all_pairs()[:2]
    if kind == "reward_model":  # its scores go to the store: the responses must be there
        store = Store(config.store)
        ids = seed_responses(store, PROMPTS[0], ANSWERS[PROMPTS[0]][:2], round=1)
        pid = store.read("prompts")["prompt_id"][0]
        pairs = [Pair(pid, PROMPTS[0], ids[0], ANSWERS[PROMPTS[0]][0], ids[1], ANSWERS[PROMPTS[0]][1])]
    assert all(0 <= j.p_a <= 1 for j in oracle.judge(pairs))


def test_a_cascade_takes_a_local_judge_and_reads_its_two_orders(saved_judges, tmp_path):
    from oracles.cascade import OrdersAgree
    from pipelines.preference_models import judge_accept

    cascade = {"kind": "cascade", "judge": {"kind": "pairwise_lm", "model": str(saved_judges / "lm")}, "people": True}
    config = campaign(tmp_path, cascade, humans={"share": 0.0})
    assert isinstance(judge_accept(config.oracle), OrdersAgree)  # people get the pairs whose two orders disagree


def test_bad_local_judge_settings_are_refused_naming_the_field(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="oracle.pairwise_lm.temperature"):
        campaign(tmp_path, {"kind": "pairwise_lm", "model": "m", "temperature": 1.0})
    with pytest.raises(ConfigError, match="oracle.reward_model.temperature: Input should be greater than 0"):
        campaign(tmp_path, {"kind": "reward_model", "model": "m", "temperature": 0})


@pytest.mark.slow
def test_a_local_judge_is_the_first_stage_of_a_cascade_campaign(saved_judges, tmp_path, prefect_harness):
    """oracle.first: a reward model answers the pairs it is sure of, the judge (text_world here) the rest;
    no learned model is written to the store."""
    from pipelines import flows
    from pipelines.config import ConfigError
    from pipelines.oracle_factory import campaign_oracle_ids, oracle_spec
    from pipelines.world import World

    # a random reward model's rewards differ by ~1e-4: a small temperature makes it sure of some pairs
    first = {"kind": "reward_model", "model": str(saved_judges / "clf"), "temperature": 1e-4, "device": "cpu"}
    config = campaign(tmp_path, {"kind": "cascade", "first": first, "confidence": 0.15, "judge": {"kind": "text_world"}},
                      policy={"kind": "causal_lm", "model": "tiny", "max_new_tokens": 8}, sampling={"samples_per_prompt": 3}, evaluation={"samples_per_prompt": 2})  # fmt: skip
    flows.alignment_campaign(config)
    store = Store(config.store)
    world = World(config)
    (cascade_id,) = campaign_oracle_ids(config, world)
    first_id = oracle_spec(config.oracle.first, config, world).oracle_id
    judged = store.read("comparisons", rounds=[1]).query("oracle_id == @cascade_id and p_a.notna()")
    stages = judged.groupby("stage")["answered_by"].unique().to_dict()
    assert set(stages) == {"reward_model", "judge"}, stages  # the reward model was sure of some pairs, not all
    assert list(stages["reward_model"]) == [first_id] and all(a.startswith("text_world:") for a in stages["judge"])
    assert judged["model_version"].isna().all() and not os.path.exists(store.local_path("preference_models"))

    with pytest.raises(ConfigError, match=r"first: a local judge is the first stage, so the learned model's settings \(init, retrain\) have no effect"):
        campaign(tmp_path, {"kind": "cascade", "first": first, "init": "tiny", "retrain": True, "judge": {"kind": "text_world"}})
