"""SmolLM2-135M-Instruct as a local pairwise_lm judge (the session's converted v0 folder, the ``smollm2``
fixture), on hand-written pairs whose first answer is right and second wrong, and against the same
weights served by ``transformers serve`` and asked by the llm_judge oracle on the same template.

What was measured (2 shared cores, Dec 2026; printed by the tests): with the default judge template
SmolLM2-135M cannot tell these answers apart. Each order's P(first) is 0.72–0.84 — a strong pull to
the first slot — and the two orders differ by less than 0.01, so with both orders averaged
P(right ≻ wrong) is 0.499–0.504: the right answer is preferred in 3 of the 4 pairs here (0.75; 5 of 8
on a longer list measured once, 0.625), at margins of a few thousandths: no evidence of skill.

So what is asserted is what holds robustly for this model: a first-slot bias far above ½ that
averaging both orders cancels (|P − ½| ten times smaller than the bias). Served by ``transformers
serve`` and asked by the llm_judge, the same weights answer greedily (no log-probs) with no verdict
at all — "<<<BEG…", the start of a fence, in all 8 orders of a first run — so the served judge
abstains where the local judge, renormalizing over the two verdict tokens, still gives a P; the
local judge keeps the verdict tokens' own probabilities (``p_verdicts``), and the comparison checks
that they are consistent with what the served model wrote.
"""

from __future__ import annotations

import statistics

import pytest

from oracles.judge_parse import FIRST, SECOND
from oracles.local_judges import PairwiseLMOracle
from oracles.protocol import Pair, side

pytestmark = pytest.mark.real_model

RIGHT_WRONG = [  # (prompt, right answer, wrong answer)
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("How many days are in a week?", "A week has 7 days.", "A week has 10 days."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has three legs."),
]
PAIRS = [Pair(f"p{i}", q, f"right{i}", right, f"wrong{i}", wrong) for i, (q, right, wrong) in enumerate(RIGHT_WRONG)]


@pytest.fixture(scope="module")
def local_verdicts(smollm2):
    from solvers.pairwise_lm import PairwiseLM

    oracle = PairwiseLMOracle(PairwiseLM.load(smollm2.v0, device="cpu"))
    return oracle.judge(PAIRS)


def test_smollm2_judges_right_and_wrong_answers_with_its_position_bias_cancelled(local_verdicts):
    p_right = [j.p_a for j in local_verdicts]
    first_slot = [o["p_first"] for j in local_verdicts for o in j.detail["orders"]]
    rate = sum(p > 0.5 for p in p_right) / len(p_right)
    print(f"P(right ≻ wrong) = {[round(p, 4) for p in p_right]}; preferred in {rate:.2f} of pairs; P(first slot) = {[round(p, 3) for p in first_slot]}")
    for j in local_verdicts:
        ab, ba = (o["p_first"] for o in j.detail["orders"])
        assert 0.0 <= ab <= 1.0 and 0.0 <= ba <= 1.0
        assert j.p_a == pytest.approx((ab + 1 - ba) / 2)  # both orders averaged: P(a ≻ b) = 1 − P(b ≻ a)
    bias = statistics.mean(first_slot) - 0.5
    assert bias > 0.1  # measured 0.22–0.34 per order: SmolLM2 leans to whichever answer it reads first
    assert max(abs(p - 0.5) for p in p_right) < bias / 10  # … and the two orders cancel that lean


def test_smollm2_verdicts_match_the_same_model_through_transformers_serve(smollm2, local_verdicts, tmp_path):
    """The served model answers greedily (transformers serve sends no log-probs, so the llm_judge has a
    vote per order, or an abstention when the answer is no verdict). Per order: where it votes, the
    local judge favours the same slot; where it writes something else, the local judge's verdict tokens
    cannot be the most likely next token (each below what the rest of the vocabulary holds)."""
    from local_servers import transformers_serve
    from oracles.llm_judge import LLMJudge, LLMJudgeConfig

    with transformers_serve(smollm2.v0, tmp_path / "serve.log", timeout=180) as base_url:
        judge = LLMJudge(LLMJudgeConfig(model=str(smollm2.v0), base_url=base_url, max_tokens=4, max_in_flight=2, timeout_s=300))
        served = judge.judge(PAIRS)
    voted = consistent = 0
    for local, remote in zip(local_verdicts, served):
        assert not remote.skipped, remote.error
        for lo, ro in zip(local.detail["orders"], remote.detail["orders"]):
            verdict = ro["answers"][0]["verdict"]
            p1, p2 = lo["p_verdicts"]
            if verdict is None:
                consistent += max(p1, p2) < 1 - p1 - p2
            else:
                voted += 1
                consistent += verdict == {"a": FIRST, "b": SECOND}.get(side(lo["p_first"]))
        if remote.p_a is not None:  # a vote per order gives P in {0, ¼, ½, ¾, 1}
            assert remote.p_a == pytest.approx(local.p_a, abs=0.26)
    answers = [a["text"] for j in served for o in j.detail["orders"] for a in o["answers"]]
    masses = [round(sum(o["p_verdicts"]), 3) for j in local_verdicts for o in j.detail["orders"]]
    print(f"served answers {answers}; local verdict-token mass {masses}; {voted} votes; consistent in {consistent}/{2 * len(PAIRS)} orders")
    assert consistent == 2 * len(PAIRS)
