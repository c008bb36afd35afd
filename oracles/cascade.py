"""A cascade of oracles: the cheap one answers where it is sure, the expensive ones only where needed.

    cascade = Cascade([
        Stage(LearnedOracle(model), accept=Confident(0.2)),          # |P − ½| ≥ 0.2: final
        Stage(judge, accept=OrdersAgree(), budget=Budget(usd=5.0, usd_per_pair=0.002)),
        Stage(people, budget=Budget(pairs=200)),                      # a queued oracle: last
    ])
    cascade.start_round(r)          # per-round budgets start afresh; people's tasks are tagged r
    judgments = cascade.judge(pairs)
    store these: [j for j in judgments if not j.skipped]
    cascade.metrics(judgments)      # cascade/share/<stage>, cascade/cost_usd/<stage>, …

Each pair goes down the stages until one's answer is accepted: ``accept(judgment)`` says whether a
stage's answer is final (None: always, as for the last stage). An answer a stage does not accept —
including an abstention — passes the pair on. The cascade is composed from the oracle protocol only.

What a judgment records (``detail``): ``answered_by`` (the oracle_id that answered), ``stage``, its
``answer`` (that oracle's own detail), and the ``route`` (each stage asked, with its P, cost and
whether it was accepted). Its cost and latency are the sums over the route: a pair people answer
also cost the judge. Stored under the cascade's own ``oracle_id``, whose config names the stages'
oracle ids and rules, so a new model version or threshold gives a new id.

Skipped judgments (not stored, asked again later) are of two kinds:
- the pair reached a stage whose per-round budget is spent (``error`` "not judged: … budget …") and
  whose ``over_budget`` is "stop", or a stage skipped it itself (its own budget, a failed request);
- the pair went to people (a queued oracle, which must be last): it is submitted and the judgment is
  marked ``detail["pending"]`` = their oracle_id. People's answers come back later through that
  oracle's ``collect`` and are stored under its own id (the annotation-collection flow). A pipeline
  that re-runs the round should leave out pairs already submitted, or the judge is paid again for them.

Budgets (oracles/budget.py's ``Budget``) are per round and per stage, in pairs and/or USD. A USD budget needs
``usd_per_pair``, the most one pair can cost at that stage: pairs are admitted only while the spent
plus that worst case fits, and the true cost (from the judgments) is what is then counted, so a stage
never spends more than its budget as long as the worst case holds. Queued stages are counted at
``usd_per_pair`` on submission (people are paid when they answer). A stage with ``over_budget="pass_on"``
passes the pairs past its budget on to the next stage instead (when people follow a judge, they take
the judge's overflow); its route step says so (``over_budget``, ``passed_on``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from oracles.budget import Budget
from oracles.protocol import NOT_JUDGED, Judgment, Pair, make_oracle_id, orders_agree

OVER_BUDGET = ("stop", "pass_on")


@dataclass(frozen=True)
class Confident:
    """Accept an answer with |P − ½| ≥ ``margin`` (a learned model's confidence)."""

    margin: float

    def __post_init__(self):
        if not 0.0 <= self.margin <= 0.5:
            raise ValueError(f"Confident: margin must be in [0, ½], got {self.margin}")

    def __call__(self, j: Judgment) -> bool:
        return j.p_a is not None and abs(j.p_a - 0.5) >= self.margin


@dataclass(frozen=True)
class OrdersAgree:
    """Accept an LLM judge's answer when its two orders of presentation agree on a, b or tie
    (``detail["orders"]`` as oracles/llm_judge.py records it: p_first of order "ab" and of "ba"). An
    answer without both orders is accepted if ``single_order_ok``, else passed on."""

    single_order_ok: bool = False

    def __call__(self, j: Judgment) -> bool:
        if j.p_a is None:
            return False
        agree = orders_agree(j.detail)
        return self.single_order_ok if agree is None else agree


@dataclass
class Stage:
    """One step of the cascade. ``oracle``: a synchronous ``Oracle`` (``judge``) or, last, a queued one
    (``submit``/``collect``/``pending``). ``accept``: whether its answer is final (None: always).
    ``budget``: per round (None: unlimited). ``name``: in detail and metrics (default: the oracle's kind).
    ``over_budget``: what becomes of the pairs past the budget: "stop" (skipped, asked again later) or
    "pass_on" (to the next stage; not for the last)."""

    oracle: object
    accept: Callable[[Judgment], bool] | None = None
    budget: Budget | None = None
    name: str = ""
    over_budget: str = "stop"

    def __post_init__(self):
        if self.over_budget not in OVER_BUDGET:
            raise ValueError(f"Stage: over_budget must be one of {OVER_BUDGET}, got {self.over_budget!r}")
        if self.budget is not None and not self.budget.admits_in_bulk:
            raise ValueError("Stage: a USD budget needs usd_per_pair > 0, the worst-case cost of one pair at this stage")

    @property
    def queued(self) -> bool:
        return not hasattr(self.oracle, "judge") and hasattr(self.oracle, "submit")


class Cascade:
    """An ``Oracle`` that routes each pair down its stages (see the module docstring)."""

    def __init__(self, stages: list[Stage], *, name: str = "cascade", round: int = 0):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        names = []
        for k, s in enumerate(stages):
            if not (hasattr(s.oracle, "judge") or hasattr(s.oracle, "submit")) or not hasattr(s.oracle, "oracle_id"):
                raise TypeError(f"stage {k}: {type(s.oracle).__name__} is neither an Oracle (judge) nor a QueuedOracle (submit)")
            if s.queued and k != len(stages) - 1:
                raise ValueError(f"stage {k} ({s.oracle.oracle_id}) is a queued oracle: its answers come later, so it must be the last stage")
            if s.over_budget == "pass_on" and k == len(stages) - 1:
                raise ValueError(f"stage {k} ({s.oracle.oracle_id}) passes pairs past its budget on, but it is the last stage")
            s.name = s.name or s.oracle.oracle_id.split(":", 1)[0]
            if s.name in names:
                raise ValueError(f"two stages are named {s.name!r}; give them distinct names")
            names.append(s.name)
        self.stages, self.name, self.round = stages, name, round
        # What changes answers: the stages' oracles and rules, not their budgets.
        config = {"stages": [{"oracle": s.oracle.oracle_id, "accept": _describe(s.accept)} for s in stages]}
        self.oracle_id = make_oracle_id("cascade", name, config)

    def __repr__(self) -> str:
        return f"Cascade({self.oracle_id!r}, stages={[s.name for s in self.stages]})"

    def start_round(self, round: int) -> None:
        """A new round: every stage's budget starts afresh; people's tasks are tagged with ``round``."""
        self.round = round
        for s in self.stages:
            if s.budget is not None:
                s.budget.reset()

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        """One judgment per pair, in order; ``skipped`` ones are not to be stored (see the module doc)."""
        out: list[Judgment | None] = [None] * len(pairs)
        routes: list[list[dict]] = [[] for _ in pairs]
        spent = [[0.0, 0.0] for _ in pairs]  # per pair: cost, latency so far
        todo = list(range(len(pairs)))
        for k, stage in enumerate(self.stages):
            if not todo:
                break
            last = k == len(self.stages) - 1
            if stage.queued:
                asked = self._admit(stage, todo)
                if asked:
                    self._submit(stage, [pairs[i] for i in asked])
                    per_pair = stage.budget.usd_per_pair if stage.budget is not None and stage.budget.usd_per_pair else 0.0
                    for i in asked:
                        spent[i][0] += per_pair
                        routes[i].append({"stage": stage.name, "oracle": stage.oracle.oracle_id, "cost_usd": per_pair, "submitted": True})
                        error = f"{NOT_JUDGED}sent to {stage.name} ({stage.oracle.oracle_id}); their answer is collected later"
                        out[i] = self._skipped(pairs[i], error, routes[i], spent[i], pending=stage.oracle.oracle_id)
                for i in todo[len(asked) :]:
                    out[i] = self._over_budget(stage, pairs[i], routes[i], spent[i])
                break
            passed = []
            while todo:  # one call per budget admission (a USD budget may admit more once true costs settle)
                asked = self._admit(stage, todo)
                if not asked:
                    break
                todo = todo[len(asked) :]
                answers = stage.oracle.judge([pairs[i] for i in asked])
                if len(answers) != len(asked):
                    raise RuntimeError(f"stage {stage.name}: {len(answers)} judgments for {len(asked)} pairs")
                if stage.budget is not None:
                    stage.budget.spend(len(asked), sum(j.cost_usd for j in answers))
                for i, j in zip(asked, answers):
                    spent[i][0] += j.cost_usd
                    spent[i][1] += j.latency_s
                    final = not j.skipped and (last or stage.accept is None or bool(stage.accept(j)))
                    routes[i].append({"stage": stage.name, "oracle": stage.oracle.oracle_id, "p_a": j.p_a, "cost_usd": j.cost_usd, "accepted": final, **({"error": j.error} if j.error else {})})
                    if j.skipped:
                        out[i] = self._skipped(pairs[i], j.error or f"{NOT_JUDGED}{stage.name} skipped it", routes[i], spent[i])
                    elif final:
                        out[i] = self._final(stage, j, routes[i], spent[i])
                    else:
                        passed.append(i)
            for i in todo:  # what the budget did not admit
                if stage.over_budget == "pass_on":
                    routes[i].append(self._over_budget_step(stage, passed_on=True))
                    passed.append(i)
                else:
                    out[i] = self._over_budget(stage, pairs[i], routes[i], spent[i])
            todo = passed
        return out  # type: ignore[return-value]

    def metrics(self, judgments: list[Judgment]) -> dict:
        """The round's routing, from the judgments given (pass all of them, skipped ones included):

        cascade/pairs                   judgments given
        cascade/share/<stage>           share of them answered by that stage
        cascade/share/pending           share sent to people (a queued last stage), answers to come
        cascade/share/not_judged        share skipped for a spent budget or by a stage itself
        cascade/cost_usd/<stage>        what that stage cost over all routes (answered or passed on)
        cascade/cost_usd                all stages
        cascade/budget_left_pairs/<stage>, cascade/budget_left_usd/<stage>   after this round so far
        """
        n = len(judgments)
        share = lambda k: k / n if n else None  # noqa: E731
        out: dict = {"cascade/pairs": n}
        for s in self.stages:
            out[f"cascade/share/{s.name}"] = share(sum(j.detail.get("stage") == s.name and "answered_by" in j.detail for j in judgments))
        out["cascade/share/pending"] = share(sum("pending" in j.detail for j in judgments))
        out["cascade/share/not_judged"] = share(sum(j.skipped and "pending" not in j.detail for j in judgments))
        total = 0.0
        for s in self.stages:
            cost = sum(r.get("cost_usd", 0.0) or 0.0 for j in judgments for r in j.detail.get("route", []) if r.get("stage") == s.name)
            out[f"cascade/cost_usd/{s.name}"] = cost
            total += cost
            if s.budget is not None:
                if s.budget.pairs is not None:
                    out[f"cascade/budget_left_pairs/{s.name}"] = s.budget.pairs - s.budget.spent_pairs
                if s.budget.usd is not None:
                    out[f"cascade/budget_left_usd/{s.name}"] = s.budget.usd - s.budget.spent_usd
        out["cascade/cost_usd"] = total
        return out

    # ----- pieces ------------------------------------------------------------------------------------

    def _admit(self, stage: Stage, todo: list[int]) -> list[int]:
        room = None if stage.budget is None else stage.budget.room()
        return list(todo) if room is None else list(todo[:room])

    def _submit(self, stage: Stage, pairs: list[Pair]) -> None:
        stage.oracle.submit(pairs, round=self.round)
        if stage.budget is not None:
            stage.budget.spend(len(pairs), len(pairs) * (stage.budget.usd_per_pair or 0.0))

    def _final(self, stage: Stage, j: Judgment, route: list[dict], spent: list[float]) -> Judgment:
        detail = {"answered_by": stage.oracle.oracle_id, "stage": stage.name, "route": route, "answer": j.detail}
        return Judgment(j.pair, j.p_a, label=j.label, n_votes=j.n_votes, latency_s=spent[1], cost_usd=spent[0], error=j.error, detail=detail)

    def _skipped(self, pair: Pair, error: str, route: list[dict], spent: list[float], *, pending: str | None = None) -> Judgment:
        detail = {"route": route, **({"pending": pending} if pending else {})}
        if not error.startswith(NOT_JUDGED):
            error = NOT_JUDGED + error
        return Judgment(pair, None, n_votes=0, latency_s=spent[1], cost_usd=spent[0], error=error, detail=detail, skipped=True)

    def _over_budget(self, stage: Stage, pair: Pair, route: list[dict], spent: list[float]) -> Judgment:
        return self._skipped(pair, self._budget_spent(stage), route + [self._over_budget_step(stage)], spent)

    def _over_budget_step(self, stage: Stage, *, passed_on: bool = False) -> dict:
        """The route step of a pair past ``stage``'s budget; a passed-on one says why in its ``error``."""
        step = {"stage": stage.name, "oracle": stage.oracle.oracle_id, "over_budget": True}
        if passed_on:
            step |= {"passed_on": True, "error": f"{self._budget_spent(stage)}; passed on"}
        return step

    def _budget_spent(self, stage: Stage) -> str:
        b = stage.budget
        what = ", ".join(x for x in (f"{b.pairs} pairs" if b.pairs is not None else "", f"${b.usd:g}" if b.usd is not None else "") if x)
        return f"{NOT_JUDGED}the {stage.name} budget for round {self.round} ({what}) is spent"


def _describe(rule) -> str | None:
    """A rule's settings for the oracle id: a dataclass's repr (``Confident(margin=0.2)``), else its name."""
    if rule is None:
        return None
    if hasattr(rule, "__dataclass_fields__"):
        return repr(rule)
    return getattr(rule, "__qualname__", type(rule).__qualname__)
