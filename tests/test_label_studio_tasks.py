"""The human oracle's arithmetic, without a server: agreement, votes → P(a ≻ b), sides, integrity."""

import pytest

from oracles.agreement import krippendorff_alpha_nominal, percent_agreement
from oracles.label_studio import LabelStudioConfig, LabelStudioOracle
from oracles.label_studio_tasks import choice_result, collect_tasks, pair_key, read_task, side_of_a, task_data
from oracles.protocol import Pair

OID = "label_studio:people:test"


# ----- agreement --------------------------------------------------------------------------------
def test_alpha_hand_worked_on_a_b_tie():
    units = [["a", "a"], ["a", "b"], ["b", "b"], ["tie", "a"], ["a", "a", "b"], ["b"]]
    # Coincidences: a unit with m values adds 1/(m-1) per ordered pair of values; ["b"] has no pair.
    #   ["a","a"]: o_aa += 2      ["a","b"]: o_ab, o_ba += 1     ["b","b"]: o_bb += 2
    #   ["tie","a"]: o_ta, o_at += 1      ["a","a","b"] (m=3): o_aa += 2*1/2, o_ab += 2/2, o_ba += 2/2
    # o_aa=3 o_ab=2 o_at=1 | o_ba=2 o_bb=2 | o_ta=1  →  n_a=6, n_b=4, n_tie=1, n=11
    # sum_{c≠k} o_ck = 2+1+2+1 = 6;  sum_{c≠k} n_c n_k = 2(6·4 + 6·1 + 4·1) = 68
    # alpha = 1 - (n-1)·6/68 = 1 - 60/68 = 2/17
    assert krippendorff_alpha_nominal(units) == pytest.approx(2 / 17)
    # Percent agreement per unit: 1, 0, 1, 0, 1/3 (one agreeing pair of three); mean 7/15.
    assert percent_agreement(units) == pytest.approx(7 / 15)


def test_alpha_matches_krippendorffs_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
    # 12 units, nominal values 1..5, None for a missing value; the paper gives alpha = 0.743.
    n = None
    table = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*table)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_alpha_perfect_and_undefined():
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b", "b"], ["tie", "tie"]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # one value only: no expected disagreement
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None and percent_agreement([["a"], []]) is None


# ----- tasks and votes -------------------------------------------------------------------------------
def _pair(i: int) -> Pair:
    return Pair("p1", "Say hi", f"ra{i}", f"hello {i}", f"rb{i}", f"hey {i}")


def _pair_on(side: str) -> Pair:
    return next(p for p in map(_pair, range(100)) if side_of_a(pair_key(p, OID)) == side)


def _ann(id, user, side=None, *, cancelled=False, reason=None):
    result = choice_result(side) if side else []
    if reason:
        result.append({"from_name": "reason", "to_name": "prompt", "type": "textarea", "value": {"text": [reason]}})
    return {"id": id, "completed_by": user, "result": result, "was_cancelled": cancelled, "lead_time": 2.5, "created_at": "2026-01-01T00:00:10Z"}


def test_votes_map_back_through_the_side_a_was_shown_on():
    for side in ("left", "right"):
        pair = _pair_on(side)
        data = task_data(pair, round=4, oracle_id=OID)
        assert data[side] == pair.a and data["a_side"] == side and data["round"] == 4
        clicks = [_ann(1, 10, side), _ann(2, 11, "tie", reason="same"), _ann(3, 12, "left" if side == "right" else "right"), _ann(4, 13, cancelled=True)]
        task, problems = read_task(7, data, clicks, None, oracle_id=OID)
        assert problems == []
        j = task.judgment()
        # a, tie, b — the skipped one is no vote: P = (1 + 0.5 + 0) / 3
        assert j.detail["votes"] == ["a", "tie", "b"] and j.n_votes == 3 and j.p_a == pytest.approx(0.5)
        assert j.pair == pair and j.detail["round"] == 4 and j.detail["annotators"] == [10, 11, 12]
        assert j.detail["reasons"] == ["same"] and j.detail["lead_time_s"] == [2.5, 2.5, 2.5]


def test_an_annotator_counts_once_with_their_latest_answer():
    pair = _pair_on("left")
    task, _ = read_task(1, task_data(pair, round=0, oracle_id=OID), [_ann(5, 10, "right"), _ann(9, 10, "left"), _ann(7, 11, "tie")], None, oracle_id=OID)
    j = task.judgment()
    assert j.n_votes == 2 and sorted(j.detail["votes"]) == ["a", "tie"] and j.p_a == pytest.approx(0.75)


def test_sides_are_a_fair_deterministic_coin():
    keys = [pair_key(_pair(i), OID) for i in range(2000)]
    left = sum(side_of_a(k) == "left" for k in keys) / len(keys)
    assert 0.46 < left < 0.54
    assert [side_of_a(k) for k in keys[:50]] == [side_of_a(k) for k in keys[:50]]


@pytest.mark.parametrize("field, value", [("left", "edited text"), ("round", 9), ("a_side", "x"), ("a_id", "other"), ("key", "c-0")])
def test_an_edited_task_is_reported_not_trusted(field, value):
    data = {**task_data(_pair(1), round=0, oracle_id=OID), field: value}
    task, problems = read_task(3, data, [_ann(1, 10, "left")], None, oracle_id=OID)
    assert task is None and [p.kind for p in problems] == ["edited"] and problems[0].task_id == 3


def test_foreign_and_unreadable_tasks_are_reported():
    other = task_data(_pair(1), round=0, oracle_id="label_studio:people:other")
    assert read_task(1, other, [], None, oracle_id=OID)[1][0].kind == "foreign"
    broken = task_data(_pair(1), round=0, oracle_id=OID)
    del broken["fingerprint"]
    assert read_task(2, broken, [], None, oracle_id=OID)[1][0].kind == "unreadable"
    ok = task_data(_pair(1), round=0, oracle_id=OID)
    task, problems = read_task(3, ok, [{"id": 1, "completed_by": 10, "result": []}], None, oracle_id=OID)
    assert task.votes == [] and [p.kind for p in problems] == ["unreadable"]


def test_collected_rounds_pending_quorum_and_duplicates():
    p0, p1, p2 = _pair(0), _pair(1), _pair(2)
    s0 = side_of_a(pair_key(p0, OID))
    listed = [
        (1, task_data(p0, round=0, oracle_id=OID), [_ann(1, 10, s0), _ann(2, 11, s0)], None),
        (2, task_data(p1, round=1, oracle_id=OID), [_ann(3, 10, "tie")], None),
        (3, {**task_data(p2, round=1, oracle_id=OID), "left": "edited"}, [], None),
        (4, task_data(p0, round=0, oracle_id=OID), [_ann(5, 12, "tie"), _ann(6, 10, "tie")], None),  # a raced duplicate
    ]
    got = collect_tasks(listed, oracle_id=OID, min_votes=2)
    assert sorted(p.kind for p in got.problems) == ["duplicate", "edited"]
    # p0: annotators 10 and 11 from task 1, 12 from task 4 (10's vote on task 4 is not a second vote).
    assert [(j.pair, j.n_votes, j.p_a) for j in got.judgments] == [(p0, 3, pytest.approx(5 / 6))]
    assert [r["round"] for r in got.rows()] == [0]
    assert got.pending() == 2 and got.pending(round=1) == 2 and got.pending(round=0) == 0
    assert got.quorum() == pytest.approx(1 / 3) and got.quorum(1, round=1) == pytest.approx(1 / 2)
    assert got.metrics()[1]["human/pairs"] == 1 and got.metrics()[0]["human/votes"] == 3


# ----- config and secrets ---------------------------------------------------------------------------
def test_config_checks_and_oracle_id():
    with pytest.raises(ValueError, match="title"):
        LabelStudioConfig(campaign="x" * 60)
    with pytest.raises(ValueError, match="overlap"):
        LabelStudioConfig(campaign="c", overlap=0)
    assert LabelStudioConfig(campaign="c", overlap=1).oracle_id != LabelStudioConfig(campaign="c", overlap=3).oracle_id
    assert LabelStudioConfig(campaign="c").oracle_id == LabelStudioConfig(campaign="other").oracle_id


def test_the_token_is_not_kept_in_reach():
    token = "secret-token-that-must-not-leak"
    oracle = LabelStudioOracle(LabelStudioConfig(campaign="c"), url="http://127.0.0.1:9", api_key=token)
    leaked = token in repr(oracle) or token in repr(oracle.config) or token in repr(vars(oracle).keys())
    leaked = leaked or any(token in repr(v) for k, v in vars(oracle).items() if k != "_client")
    assert not leaked


def test_it_is_a_queued_oracle():
    from oracles.protocol import QueuedOracle

    assert isinstance(LabelStudioOracle(LabelStudioConfig(campaign="c"), url="http://127.0.0.1:9", api_key="t" * 10), QueuedOracle)


def test_the_oracle_refuses_to_be_pickled_with_its_token():
    import pickle

    token = "secret-token-that-must-not-leak"
    oracle = LabelStudioOracle(LabelStudioConfig(campaign="c"), url="http://127.0.0.1:9", api_key=token)
    with pytest.raises(TypeError, match="not pickled") as e:
        pickle.dumps(oracle)
    leaked = token in str(e.value)
    assert not leaked
    assert pickle.loads(pickle.dumps(oracle.config)) == oracle.config
