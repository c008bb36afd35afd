"""The cascade oracle with synthetic stand-ins: a table for the learned model, a position-biased judge
built on the letter world (its two orders disagree where the truth is close to ½), and people who
answer later. Routing, budgets, what the store records, metrics, and retraining the learned model on
what the expensive oracles answered."""

from __future__ import annotations

from dataclasses import replace

import pytest

from data.store import Store
from oracles.budget import Budget
from oracles.cascade import Cascade, Confident, OrdersAgree, Stage
from oracles.learned import LearnedOracle
from oracles.protocol import NOT_JUDGED, Judgment, Pair, make_oracle_id
from oracles.text_world import letter_world
from solvers import preference_model as pm
from store_contents import store_pairs
from preference_fixtures import FAST, SMALL, as_examples, backbone_folder, world_pairs

WORLD = letter_world()
SPLIT = replace(FAST, eval_share=0.2)  # fit_preference_model holds out a fifth of the prompts


class TableModel:
    """A stand-in learned model: P(a ≻ b) from a table (½ for pairs it does not know)."""

    def __init__(self, table: dict[tuple[str, str], float], fingerprint: str = "f" * 32):
        self.table, self.fingerprint = table, fingerprint

    def predict(self, prompts, a_texts, b_texts):
        return [self.table.get((a, b), 0.5) for a, b in zip(a_texts, b_texts)]


class BiasedJudge:
    """An LLM-judge stand-in on the letter world: it asks both orders, favours the first slot by
    ``bias`` in each, and records them as oracles/llm_judge.py does (``detail["orders"]``); the mean of
    the two orders is the truth. Where the truth is within ``bias`` of ½ the two orders disagree."""

    def __init__(self, bias: float = 0.1, usd: float = 0.002):
        self.bias, self.usd, self.calls = bias, usd, []
        self.oracle_id = make_oracle_id("llm_judge", "biased", {"bias": bias})

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        self.calls.append(list(pairs))
        out = []
        for pair in pairs:
            p = WORLD.prob(pair.a, pair.b)
            ab, ba = min(1.0, p + self.bias), min(1.0, 1 - p + self.bias)
            orders = [{"order": "ab", "p_first": ab}, {"order": "ba", "p_first": ba}]
            out.append(Judgment(pair, (ab + 1 - ba) / 2, n_votes=2, cost_usd=self.usd, latency_s=0.5, detail={"orders": orders}))
        return out


class People:
    """A queued-oracle stand-in: pairs submitted now are answered (with the truth) when collected."""

    oracle_id = make_oracle_id("label_studio", "people", {"overlap": 1})

    def __init__(self):
        self.submitted: list[tuple[Pair, int]] = []

    def submit(self, pairs: list[Pair], *, round: int) -> None:
        self.submitted += [(p, round) for p in pairs]

    def collect(self) -> list[Judgment]:
        return [Judgment(p, WORLD.prob(p.a, p.b), detail={"round": r}) for p, r in self.submitted]

    def pending(self) -> int:
        return 0


def setup(n_confident: int = 10, **budgets):
    pairs = world_pairs("train", prompts=2)  # 30 pairs
    table = {(p.a, p.b): (0.9 if WORLD.prob(p.a, p.b) > 0.5 else 0.1) for p in pairs[:n_confident]}
    table |= {(p.a, p.b): 0.55 for p in pairs[n_confident:]}
    learned, judge, people = LearnedOracle(TableModel(table)), BiasedJudge(), People()
    cascade = Cascade([
        Stage(learned, accept=Confident(0.3)),
        Stage(judge, accept=OrdersAgree(), budget=budgets.get("judge")),
        Stage(people, budget=budgets.get("people")),
    ])  # fmt: skip
    return pairs, learned, judge, people, cascade


def close_to_half(pair: Pair) -> bool:  # where the judge's two orders disagree (bias 0.1)
    return abs(WORLD.prob(pair.a, pair.b) - 0.5) < 0.1


def test_routes_by_confidence_then_agreement():
    pairs, learned, judge, people, cascade = setup()
    got = cascade.judge(pairs)
    assert len(got) == len(pairs) and [j.pair for j in got] == pairs
    unsure = pairs[10:]
    assert judge.calls == [unsure]  # one batched call, with exactly the pairs the model was unsure of
    disagree = [p for p in unsure if close_to_half(p)]
    assert 0 < len(disagree) < len(unsure)  # the test covers both branches
    assert [p for p, _ in people.submitted] == disagree and {r for _, r in people.submitted} == {0}
    for pair, j in zip(pairs, got):
        if pair in pairs[:10]:
            assert (j.detail["answered_by"], j.p_a, j.cost_usd, j.skipped) == (learned.oracle_id, learned.model.table[(pair.a, pair.b)], 0.0, False)
            assert [r["stage"] for r in j.detail["route"]] == ["learned"]
        elif pair in disagree:
            assert j.skipped and j.p_a is None and j.detail["pending"] == People.oracle_id and "answered_by" not in j.detail
            assert j.error.startswith("not judged: sent to label_studio")
            assert j.cost_usd == pytest.approx(0.002)  # the judge was asked before people were
            assert [r["stage"] for r in j.detail["route"]] == ["learned", "llm_judge", "label_studio"]
        else:
            assert (j.detail["answered_by"], j.skipped, j.n_votes) == (judge.oracle_id, False, 2)
            assert j.p_a == pytest.approx(WORLD.prob(pair.a, pair.b)) and j.cost_usd == pytest.approx(0.002) and 0.5 <= j.latency_s < 0.6  # the route's latencies add up
            assert j.detail["answer"]["orders"][0]["order"] == "ab"  # the judge's own record, kept


def test_budgets_per_stage_and_round():
    pairs, _, judge, people, cascade = setup(judge=Budget(pairs=8), people=Budget(pairs=2, usd=1.0, usd_per_pair=0.4))
    got = cascade.judge(pairs)
    assert sum(len(c) for c in judge.calls) == 8 and judge.calls[0] == pairs[10:18]
    over = [j for j in got[18:]]
    assert all(j.skipped and "llm_judge budget for round 0 (8 pairs) is spent" in j.error for j in over)
    # people: 2 pairs fit (2 · $0.40 ≤ $1), the others that reached them are not judged
    assert len(people.submitted) == 2
    reached = [j for j in got[10:18] if j.skipped]
    assert len(reached) > 2 and sum("pending" in j.detail for j in reached) == 2
    assert all("label_studio budget" in j.error for j in reached if "pending" not in j.detail)
    # a second call in the same round finds the budgets spent; a new round starts afresh
    assert cascade.judge(pairs[10:12])[0].error.startswith("not judged: the llm_judge budget")
    cascade.start_round(1)
    again = cascade.judge(pairs[18:20])
    assert judge.calls[-1] == pairs[18:20] and not any("budget" in (j.error or "") for j in again)


def test_a_stage_can_pass_the_pairs_past_its_budget_on():
    pairs, learned, judge, people, _ = setup()
    cascade = Cascade([
        Stage(learned, accept=Confident(0.3)),
        Stage(judge, accept=OrdersAgree(), budget=Budget(pairs=8), over_budget="pass_on"),
        Stage(people),
    ])  # fmt: skip
    got = cascade.judge(pairs)
    assert judge.calls == [pairs[10:18]]
    # people get the pairs the judge was unsure of, then those past its budget, in order
    assert [p for p, _ in people.submitted] == [p for p in pairs[10:18] if close_to_half(p)] + pairs[18:]
    for j in got[18:]:
        assert j.skipped and j.detail["pending"] == People.oracle_id and j.cost_usd == 0.0
        assert [r["stage"] for r in j.detail["route"]] == ["learned", "llm_judge", "label_studio"]
        step = j.detail["route"][1]
        assert step["over_budget"] and step["passed_on"] and "accepted" not in step
        assert step["error"] == f"{NOT_JUDGED}the llm_judge budget for round 0 (8 pairs) is spent; passed on"
    m = cascade.metrics(got)
    assert m["cascade/cost_usd/llm_judge"] == pytest.approx(8 * 0.002) and m["cascade/budget_left_pairs/llm_judge"] == 0
    assert m["cascade/share/not_judged"] == 0
    # the rule changes coverage, not answers: the id stays that of the stopping cascade
    assert cascade.oracle_id == setup()[4].oracle_id
    with pytest.raises(ValueError, match="passes pairs past its budget on, but it is the last stage"):
        Cascade([Stage(learned), Stage(judge, budget=Budget(pairs=1), over_budget="pass_on")])
    with pytest.raises(ValueError, match="over_budget must be one of"):
        Stage(judge, over_budget="drop")


def test_a_usd_budget_admits_by_worst_case_and_counts_true_costs():
    # worst case $0.003 a pair, true cost $0.002: 3 pairs fit $0.011, then 1 and 1 more as true costs settle
    pairs, _, judge, _, cascade = setup(judge=Budget(usd=0.011, usd_per_pair=0.003))
    cascade.judge(pairs)
    assert [len(c) for c in judge.calls] == [3, 1, 1]
    assert cascade.stages[1].budget.spent_usd == pytest.approx(0.010)
    with pytest.raises(ValueError, match="usd_per_pair"):
        Stage(judge, budget=Budget(usd=1.0))


def test_the_store_records_who_answered_and_metrics_show_share_and_cost(tmp_path):
    pairs, learned, judge, people, cascade = setup(people=Budget(usd_per_pair=0.5, usd=100.0))
    got = cascade.judge(pairs)
    store = Store(tmp_path / "store")
    store_pairs(store, pairs)
    store.write("comparisons", [j.row(cascade.oracle_id, 0) for j in got if not j.skipped])
    stored = store.read("comparisons")
    by = stored["answered_by"].value_counts().to_dict()
    assert (stored["stage"].dropna() != "").all() and all(route[-1]["accepted"] for route in stored["route"])
    pending = sum(j.skipped for j in got)
    assert by == {learned.oracle_id: 10, judge.oracle_id: 20 - pending} and set(stored["oracle_id"]) == {cascade.oracle_id}
    m = cascade.metrics(got)
    assert m["cascade/pairs"] == 30
    assert m["cascade/share/learned"] == pytest.approx(10 / 30)
    assert m["cascade/share/llm_judge"] == pytest.approx((20 - pending) / 30)
    assert m["cascade/share/pending"] == pytest.approx(pending / 30) and m["cascade/share/label_studio"] == 0
    assert m["cascade/share/not_judged"] == 0
    assert m["cascade/cost_usd/learned"] == 0 and m["cascade/cost_usd/llm_judge"] == pytest.approx(20 * 0.002)
    assert m["cascade/cost_usd/label_studio"] == pytest.approx(pending * 0.5)
    assert m["cascade/cost_usd"] == pytest.approx(20 * 0.002 + pending * 0.5)
    assert m["cascade/budget_left_usd/label_studio"] == pytest.approx(100.0 - pending * 0.5)
    # the id names the stages' oracles and rules (a new model version or threshold: a new id), not budgets
    same = Cascade([Stage(learned, accept=Confident(0.3)), Stage(judge, accept=OrdersAgree(), budget=Budget(pairs=1)), Stage(people)])
    assert same.oracle_id == cascade.oracle_id
    assert Cascade([Stage(learned, accept=Confident(0.2)), Stage(judge, accept=OrdersAgree()), Stage(people)]).oracle_id != cascade.oracle_id
    newer = LearnedOracle(TableModel({}, fingerprint="e" * 32))
    assert Cascade([Stage(newer, accept=Confident(0.3)), Stage(judge, accept=OrdersAgree()), Stage(people)]).oracle_id != cascade.oracle_id


def test_bad_cascades_are_refused():
    _, learned, judge, people, _ = setup()
    with pytest.raises(ValueError, match="must be the last stage"):
        Cascade([Stage(people), Stage(judge)])
    with pytest.raises(ValueError, match="distinct names"):
        Cascade([Stage(judge), Stage(judge)])
    with pytest.raises(TypeError, match="neither an Oracle"):
        Cascade([Stage(object())])
    with pytest.raises(ValueError, match="margin"):
        Confident(0.7)
    with pytest.raises(ValueError, match="fingerprint"):
        LearnedOracle(TableModel({}, fingerprint=None))


def test_retraining_on_what_the_expensive_oracles_answered_improves_the_model(tmp_path):
    pairs = world_pairs("train", seed=0)  # 24 prompts × 15 pairs
    held_out = as_examples(WORLD, world_pairs("eval", seed=1))
    store = Store(tmp_path / "store")
    store_pairs(store, pairs)
    judge, people = BiasedJudge(), People()
    # round 0: a few judged pairs to start from, and a first model trained on them
    store.write("comparisons", [j.row(judge.oracle_id, 0) for j in judge.judge(pairs[:45])])
    first = pm.fit_preference_model(store, tmp_path / "m0", init=backbone_folder(tmp_path / "backbone"), model_config=SMALL, train_config=SPLIT)
    model0 = pm.load_preference_model(first.path)
    assert model0.fingerprint == first.fingerprint
    # round 1: the cascade, then people's answers collected
    cascade = Cascade([Stage(LearnedOracle(model0), accept=Confident(0.15)), Stage(judge, accept=OrdersAgree()), Stage(people)])
    cascade.start_round(1)
    got = cascade.judge(pairs[45:])
    store.write("comparisons", [j.row(cascade.oracle_id, 1) for j in got if not j.skipped])
    store.write("comparisons", [j.row(people.oracle_id, j.detail["round"]) for j in people.collect()])
    shares = cascade.metrics(got)
    assert shares["cascade/share/llm_judge"] > 0.3 and shares["cascade/share/pending"] > 0  # the model was unsure
    # retrain from the first model on everything but the learned model's own answers
    second = pm.fit_preference_model(store, tmp_path / "m1", init=first.path, train_config=SPLIT)
    learned_answers = sum(j.detail.get("stage") == "learned" for j in got)
    assert second.metrics["prefmodel/train_pairs"] + second.metrics["prefmodel/eval_pairs"] == len(pairs) - learned_answers
    assert second.metrics["prefmodel/eval_logloss"] < second.metrics["prefmodel/eval_logloss_before"]
    model1 = pm.load_preference_model(second.path)
    before, after = pm.evaluate(model0, held_out), pm.evaluate(model1, held_out)
    assert after["logloss"] < before["logloss"] - 0.01 and after["logloss"] < after["logloss_floor"] + 0.01, (before, after)
    assert LearnedOracle(model1).oracle_id != LearnedOracle(model0).oracle_id
