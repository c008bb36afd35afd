"""Intransitivity diagnostics and prediction scores, on hand-worked comparisons."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from data.diagnostics import cycle_share, intransitivity, intransitivity_verdict, judgment_counts, logloss_gap, pair_preferences, prediction_metrics
from data.export import preference_pairs
from data.keys import prompt_id, response_id
from data.store import Store
from store_contents import seed_responses


def rows(prompt: str, judged: list[tuple[str, str, float, int]]) -> list[dict]:
    return [{"prompt_id": prompt, "a_id": a, "b_id": b, "p_a": p, "n_votes": n} for a, b, p, n in judged]


def frame(*parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for part in parts for r in part])


CYCLE = rows("p1", [("x", "y", 0.8, 3), ("y", "z", 0.7, 3), ("z", "x", 0.6, 3)])  # x ≻ y ≻ z ≻ x
CHAIN = rows("p2", [("x", "y", 0.8, 3), ("y", "z", 0.7, 3), ("x", "z", 0.9, 3)])  # x ≻ y ≻ z, x ≻ z


def test_a_cycle_and_a_chain():
    assert cycle_share(frame(CYCLE)) == {"cycle_share": 1.0, "triples": 1, "cyclic_triples": 1, "prompts": 1}
    assert cycle_share(frame(CHAIN))["cycle_share"] == 0.0
    both = cycle_share(frame(CYCLE, CHAIN))
    assert (both["cycle_share"], both["triples"], both["prompts"]) == (0.5, 2, 2)


def test_four_responses_rock_paper_scissors_and_a_loser():
    # x ≻ y ≻ z ≻ x, and w loses to all three: of the 4 triples only {x, y, z} is a cycle
    loser = rows("p1", [("w", "x", 0.1, 1), ("w", "y", 0.2, 1), ("z", "w", 0.9, 1)])
    assert cycle_share(frame(CYCLE, loser)) == {"cycle_share": 0.25, "triples": 4, "cyclic_triples": 1, "prompts": 1}


def test_both_orders_and_oracles_pooled_by_votes():
    # (x, y) at 0.8 on 3 votes and (y, x) at 0.6 on 1 vote: P(x ≻ y) = (3·0.8 + 1·0.4) / 4 = 0.7 on 4 votes
    pooled = pair_preferences(frame(rows("p", [("x", "y", 0.8, 3), ("y", "x", 0.6, 1)])))
    assert len(pooled) == 1
    assert (pooled["i"][0], pooled["j"][0], pooled["votes"][0]) == ("x", "y", 4.0)
    assert pooled["p"][0] == pytest.approx(0.7)
    # a reversed judgment that overturns the majority breaks the cycle: P(z ≻ x) = (3·0.6 + 5·0.2) / 8 = 0.35
    overturned = rows("p1", [("x", "z", 0.8, 5)])
    assert cycle_share(frame(CYCLE, overturned))["cycle_share"] == 0.0


def test_votes_ties_margins_and_missing_judgments():
    few = rows("p1", [("x", "y", 0.8, 3), ("y", "z", 0.7, 3), ("z", "x", 0.6, 1)])
    assert cycle_share(frame(few), min_votes=2) == {"cycle_share": None, "triples": 0, "cyclic_triples": 0, "prompts": 0}
    assert cycle_share(frame(few), min_votes=1)["cycle_share"] == 1.0
    tie = rows("p1", [("x", "y", 0.8, 3), ("y", "z", 0.7, 3), ("z", "x", 0.5, 3)])
    assert cycle_share(frame(tie)) == {"cycle_share": 0.0, "triples": 1, "cyclic_triples": 0, "prompts": 1}
    assert cycle_share(frame(CYCLE), min_margin=0.15)["cycle_share"] == 0.0  # the 0.6 edge is too close to ½
    assert cycle_share(frame(CYCLE), min_margin=0.05)["cycle_share"] == 1.0
    abstained = rows("p1", [("x", "y", float("nan"), 0)]) + CYCLE[1:]
    assert cycle_share(frame(abstained))["triples"] == 0
    with pytest.raises(ValueError, match="min_margin"):
        cycle_share(frame(CYCLE), min_margin=0.5)


def test_prediction_metrics_by_hand():
    # p = (1, 0, ½), q = (0.8, 0.6, 0.5), w = (1, 1, 2)
    m = prediction_metrics([1.0, 0.0, 0.5], [0.8, 0.6, 0.5], [1, 1, 2])
    # log-loss: (−ln 0.8 − ln 0.4 + 2·ln 2) / 4
    assert m["logloss"] == pytest.approx((-math.log(0.8) - math.log(0.4) + 2 * math.log(2)) / 4)
    assert m["logloss_floor"] == pytest.approx(2 * math.log(2) / 4)  # only the tie has entropy
    assert m["accuracy"] == pytest.approx(0.5)  # 0.8 is on 1's side, 0.6 is not on 0's; the tie is not counted
    # bins of 0.1: |0.8 − 1|·1 + |0.6 − 0|·1 + |0.5 − 0.5|·2, over the total weight 4
    assert m["ece"] == pytest.approx((0.2 + 0.6) / 4)
    assert (m["pairs"], m["votes"]) == (3, 4.0)
    gap = logloss_gap([1.0, 0.0], [0.5, 0.5], [0.9, 0.1])
    assert gap["logloss_gap"] == pytest.approx(math.log(2) + math.log(0.9))
    with pytest.raises(ValueError, match="p_pred"):
        prediction_metrics([1.0], [float("nan")])
    with pytest.raises(ValueError, match="no pairs"):
        prediction_metrics([], [])


def test_intransitivity_reads_a_store_and_leaves_out_learned_answers(tmp_path):
    store = Store(tmp_path / "store")
    pid = prompt_id("Write about tea.")
    ids = dict(zip("xyz", seed_responses(store, "Write about tea.", list("xyz"), round=0)))

    def row(a, b, p, oracle, answered_by=None):
        return {"comparison_id": f"c-{a}{b}{oracle}", "round": 0, "prompt_id": pid, "a_id": ids[a], "b_id": ids[b], "oracle_id": oracle, "p_a": p, "n_votes": 3, "answered_by": answered_by}

    judge = "llm_judge:j:abc123"
    cascade = "cascade:c:def456"
    store.write("comparisons", [
        row("x", "y", 0.8, judge), row("y", "z", 0.7, judge),
        # through the cascade: answered by the judge (counts) and by a learned model (left out)
        row("z", "x", 0.6, cascade, judge),
        row("x", "z", 0.9, cascade, "learned:pairwise@0123:aaaaaa"),
    ])  # fmt: skip
    assert intransitivity(store) == {"intransitivity/cycle_share": 1.0, "intransitivity/triples": 1, "intransitivity/cyclic_triples": 1, "intransitivity/prompts": 1}
    assert intransitivity(store, oracle_ids={judge})["intransitivity/triples"] == 0


def test_judgment_counts_add_up_to_what_each_command_counts(tmp_path):
    store = Store(tmp_path / "store")
    ids = dict(zip("xyz", seed_responses(store, "Write about tea.", list("xyz"), round=1)))
    # a held-out prompt: the win-rate's policy-vs-reference pair of round 2
    epid = prompt_id("A line about paper:")
    store.write("prompts", [dict(prompt_id=epid, prompt="A line about paper:", split="eval", source="test")])
    new, ref = response_id(epid, "v2", 2, 0), response_id(epid, "v0", 2, 0)
    store.write("responses", [dict(response_id=r, round=2, policy_version=v, prompt_id=epid, text=t) for r, v, t in ((new, "v2", "aaa"), (ref, "v0", "b"))])
    judge, cascade = "llm_judge:j:abc123", "cascade:c:def456"

    def row(rnd, pid, a, b, p, oracle=judge, answered_by=None):
        return {"comparison_id": f"c-{a}{b}{oracle}", "round": rnd, "prompt_id": pid, "a_id": a, "b_id": b, "oracle_id": oracle, "p_a": p, "n_votes": 0 if p is None else 3, "answered_by": answered_by}

    tea = prompt_id("Write about tea.")
    store.write("comparisons", [
        row(1, tea, ids["x"], ids["y"], 0.8),
        row(1, tea, ids["y"], ids["x"], 0.5),  # the other order of the same pair: a second judgment, a tie
        row(1, tea, ids["y"], ids["z"], None),  # abstained
        row(1, tea, ids["x"], ids["z"], 0.9, cascade, "learned:pairwise@0123:aaaaaa"),
        row(2, epid, new, ref, 0.7),
    ])  # fmt: skip
    counts = judgment_counts(store)
    assert counts == {"judgments": 5, "train": 4, "eval": 1, "abstained": 1, "train_answered": 3, "eval_answered": 1, "ties": 1, "learned": 1, "rounds": [1, 2]}
    assert counts["judgments"] == counts["train"] + counts["eval"]
    # nashflow export: every answered judgment, training and evaluation alike, ties only when asked
    assert len(preference_pairs(store)) == counts["judgments"] - counts["abstained"] - counts["ties"] == 3
    assert len(preference_pairs(store, include_ties=True)) == counts["judgments"] - counts["abstained"]
    # nashflow status --fit-gap: every answered judgment but a learned model's
    from solvers.preference_model import examples_from_store

    assert len(examples_from_store(store, splits=None)) == counts["judgments"] - counts["abstained"] - counts["learned"] == 3
    # a round's row: its training judgments with an answer, and its abstentions
    assert {k: judgment_counts(store, rounds=[1])[k] for k in ("train_answered", "train", "eval")} == {"train_answered": 2 + 1, "train": 4, "eval": 0}


@pytest.mark.parametrize(
    "gap, share, triples, verdict",
    [
        (0.04, 0.2, 144, "signs of intransitive preferences: 20% of 144 judged triples cycle"),
        (0.0375, 0.0, 144, "inconclusive: the pairwise model fits better"),  # the demo: a gap, but no cycle
        (0.001, 0.2, 144, "inconclusive: 20% of 144 judged triples cycle, but the pairwise model does not fit"),
        (0.001, 0.0, 144, "no sign of intransitivity: no judged triple cycles"),
        (0.04, None, 0, "inconclusive: the pairwise model fits better"),
        (-0.01, None, 0, "no sign of intransitivity"),
    ],
)
def test_the_verdict_follows_from_both_figures(gap, share, triples, verdict):
    said = intransitivity_verdict(gap, share, triples, eval_pairs=78)
    assert verdict in said
    assert ("Nash methods matter" in said) == (gap > 0.01 and (share or 0) > 0.05)
