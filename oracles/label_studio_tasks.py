"""What a Label Studio comparison task holds, and how its annotations become judgments.

Pure functions and small dataclasses, no server: ``oracles/label_studio.py`` moves these dictionaries
to and from Label Studio.

A task shows the prompt and the two responses side by side. Which response sits on the left is decided
per task by a hash of the comparison key, so a preference for the left slot cancels out over many tasks
and shows up in the ``human/left_share`` metric. The task data carries everything needed to turn a vote
back into P(a ≻ b) without any state outside Label Studio: the comparison key, the round the pair was
submitted in, the ids of the ordered pair (a, b), the side a was shown on, and a fingerprint of all
of it, recomputed at collect time so that a task edited in the UI is reported instead of trusted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from data.keys import comparison_id, stable_hash
from oracles.agreement import krippendorff_alpha_nominal, percent_agreement
from oracles.protocol import Judgment, Pair

# Bump when the labeling interface changes what people are asked: it is part of the oracle_id.
INTERFACE_VERSION = 1
CHOICE = "choice"  # the Choices control's name: its result is the vote
REASON = "reason"  # the optional free-text reason
SIDES = ("left", "right")
VOTE = {"left", "right", "tie"}  # the values a Choices result may hold

LABEL_CONFIG = f"""<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt"/>
  <View style="display: flex; gap: 1em; margin-top: 1em">
    <View style="flex: 1; padding: 0.5em; border: 1px solid #ccc; border-radius: 4px">
      <Header value="Left response"/>
      <Text name="left" value="$left"/>
    </View>
    <View style="flex: 1; padding: 0.5em; border: 1px solid #ccc; border-radius: 4px">
      <Header value="Right response"/>
      <Text name="right" value="$right"/>
    </View>
  </View>
  <Header value="Which response is better?"/>
  <Choices name="{CHOICE}" toName="prompt" choice="single-radio" required="true" showInline="true">
    <Choice value="Left is better" alias="left" hotkey="1"/>
    <Choice value="Right is better" alias="right" hotkey="2"/>
    <Choice value="About the same" alias="tie" hotkey="3"/>
  </Choices>
  <TextArea name="{REASON}" toName="prompt" placeholder="Why? (optional)" rows="2" maxSubmissions="1"/>
</View>"""

# The fields a task's data must hold, and their types (JSON round-trips ints as ints).
_FIELDS = {
    "prompt": str, "left": str, "right": str, "key": str, "round": int, "oracle_id": str,
    "prompt_id": str, "a_id": str, "b_id": str, "a_side": str, "fingerprint": str,
}


def pair_key(pair: Pair, oracle_id: str) -> str:
    """The comparison key of the *ordered* pair (a, b) for this oracle: the comparisons table's key."""
    return comparison_id(pair.prompt_id, pair.a_id, pair.b_id, oracle_id)


def side_of_a(key: str) -> str:
    """Where response a is shown: a fixed coin flip per comparison key, so a rerun shows the same."""
    return SIDES[int(stable_hash(key, "side", length=4), 16) % 2]


def fingerprint(data: dict) -> str:
    """A hash of every field of the task that a vote's meaning depends on."""
    return stable_hash(*(data[name] for name in _FIELDS if name != "fingerprint"))


def task_data(pair: Pair, *, round: int, oracle_id: str) -> dict:
    """The data of the Label Studio task that asks about ``pair``."""
    key = pair_key(pair, oracle_id)
    a_side = side_of_a(key)
    left, right = (pair.a, pair.b) if a_side == "left" else (pair.b, pair.a)
    data = {
        "prompt": pair.prompt, "left": left, "right": right, "key": key, "round": int(round),
        "oracle_id": oracle_id, "prompt_id": pair.prompt_id, "a_id": pair.a_id, "b_id": pair.b_id,
        "a_side": a_side,
    }
    data["fingerprint"] = fingerprint({**data, "fingerprint": ""})
    return data


def choice_result(vote: str) -> list[dict]:
    """The annotation result the labeling interface submits for a vote ("left", "right" or "tie")."""
    if vote not in VOTE:
        raise ValueError(f"vote must be one of {sorted(VOTE)}, not {vote!r}")
    return [{"from_name": CHOICE, "to_name": "prompt", "type": "choices", "value": {"choices": [vote]}}]


@dataclass(frozen=True)
class Problem:
    """Something found in Label Studio that was not trusted. ``kind`` is one of: ``edited`` (the task
    no longer matches its key and fingerprint), ``foreign`` (a task of another oracle), ``unreadable``
    (a task or annotation that cannot be parsed), ``duplicate`` (two tasks for one key; their votes are
    merged, one per annotator)."""

    kind: str
    task_id: int
    key: str | None
    message: str
    round: int | None = None  # as the task data says (it may be the edited part)


@dataclass(frozen=True)
class Vote:
    annotator: int
    label: str  # "a", "b" or "tie": mapped back through the side a was shown on
    side: str  # what was clicked: "left", "right" or "tie"
    lead_time_s: float | None
    created_at: datetime | None
    reason: str | None


@dataclass
class TaskVotes:
    """One trusted task: its pair, the round it was submitted in, and one vote per annotator."""

    task_id: int
    key: str
    round: int
    pair: Pair
    a_side: str
    created_at: datetime | None
    votes: list[Vote] = field(default_factory=list)

    def judgment(self) -> Judgment:
        """P(a ≻ b) = (votes for a + half the ties) / votes. ``latency_s`` is the wait from the task's
        creation to its last vote; the time each person spent is in ``detail["lead_time_s"]``."""
        n = len(self.votes)
        p_a = sum({"a": 1.0, "b": 0.0, "tie": 0.5}[v.label] for v in self.votes) / n if n else None
        last = max((v.created_at for v in self.votes if v.created_at), default=None)
        latency = (last - self.created_at).total_seconds() if last and self.created_at else 0.0
        return Judgment(
            pair=self.pair,
            p_a=p_a,
            n_votes=n,
            latency_s=max(latency, 0.0),
            error=None if n else "no votes",
            detail={
                "round": self.round,
                "task_id": self.task_id,
                "a_side": self.a_side,
                "votes": [v.label for v in self.votes],
                "annotators": [v.annotator for v in self.votes],
                "lead_time_s": [v.lead_time_s for v in self.votes],
                "reasons": [v.reason for v in self.votes if v.reason],
            },
        )


def read_task(task_id: int, data: dict, annotations: list[dict], created_at: datetime | None, *, oracle_id: str) -> tuple[TaskVotes | None, list[Problem]]:
    """A task as Label Studio lists it → its trusted votes, or None and the reason it is not trusted.

    Skipped (cancelled) annotations are not votes. An annotator counts once per task: their latest
    annotation (highest id) is their vote.
    """
    key = data.get("key") if isinstance(data.get("key"), str) else None
    rnd = data.get("round") if isinstance(data.get("round"), int) else None
    bad = [name for name, kind in _FIELDS.items() if not isinstance(data.get(name), kind)]
    if bad:
        return None, [Problem("unreadable", task_id, key, f"task {task_id}: field(s) {bad} missing or of the wrong type", rnd)]
    if data["oracle_id"] != oracle_id:
        return None, [Problem("foreign", task_id, key, f"task {task_id} belongs to oracle {data['oracle_id']!r}, not {oracle_id!r}", rnd)]
    expected_key = comparison_id(data["prompt_id"], data["a_id"], data["b_id"], oracle_id)
    if data["a_side"] not in SIDES or key != expected_key or fingerprint(data) != data["fingerprint"]:
        return None, [Problem("edited", task_id, key, f"task {task_id} was changed after import (its data no longer matches its key); its votes are not used. Delete the task in Label Studio and submit the pair again to ask anew.", rnd)]
    a_left = data["a_side"] == "left"
    pair = Pair(data["prompt_id"], data["prompt"], data["a_id"], data["left"] if a_left else data["right"], data["b_id"], data["right"] if a_left else data["left"])
    task = TaskVotes(task_id, key, data["round"], pair, data["a_side"], created_at)
    problems, latest = [], {}
    for ann in sorted(annotations, key=lambda a: a.get("id") or 0):
        if ann.get("was_cancelled"):
            continue
        side, reason = _read_result(ann.get("result") or [])
        annotator = ann.get("completed_by")
        if isinstance(annotator, dict):  # some listings expand the user
            annotator = annotator.get("id")
        if side is None or annotator is None:
            problems.append(Problem("unreadable", task_id, key, f"task {task_id}: annotation {ann.get('id')} has no A/B/tie choice or no annotator; not a vote", rnd))
            continue
        label = "tie" if side == "tie" else "a" if (side == "left") == a_left else "b"
        latest[annotator] = Vote(annotator, label, side, ann.get("lead_time"), _when(ann.get("created_at")), reason)
    task.votes = list(latest.values())
    return task, problems


def _read_result(result: list[dict]) -> tuple[str | None, str | None]:
    side = reason = None
    for item in result:
        value = item.get("value") or {}
        if item.get("from_name") == CHOICE:
            choices = value.get("choices") or []
            side = choices[0] if len(choices) == 1 and choices[0] in VOTE else None
        elif item.get("from_name") == REASON:
            reason = " ".join(t for t in value.get("text") or [] if t).strip() or None
    return side, reason


def _when(value) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


@dataclass
class Collected:
    """What Label Studio holds for one oracle, read in one pass.

    ``judgments`` are the pairs with at least ``min_votes`` trusted votes; each carries the round its pair
    was submitted in as ``detail["round"]`` (a late annotation still lands in its own round), and
    ``rows()`` writes each with that round. ``problems`` lists what was not trusted. ``tasks`` holds every
    trusted task, finished or not, for progress and agreement.
    """

    oracle_id: str
    min_votes: int
    tasks: list[TaskVotes]
    problems: list[Problem]
    judgments: list[Judgment] = field(init=False)

    def __post_init__(self):
        self.judgments = [t.judgment() for t in self.tasks if len(t.votes) >= self.min_votes]

    def rows(self) -> list[dict]:
        """Comparisons-table rows for the finished judgments, each in the round it was submitted in."""
        return [j.row(self.oracle_id, j.detail["round"]) for j in self.judgments]

    def _in(self, round: int | None) -> list[TaskVotes]:
        return [t for t in self.tasks if round is None or t.round == round]

    def _untrusted(self, round: int | None) -> int:
        # An edited or unreadable task holds a submitted pair that has no trusted votes: not done.
        # (Duplicates and unreadable annotations sit on trusted tasks, which are counted already.)
        trusted = {t.task_id for t in self.tasks}
        return len({p.task_id for p in self.problems if p.task_id not in trusted and p.kind in ("edited", "unreadable") and (round is None or p.round == round)})

    def pending(self, round: int | None = None) -> int:
        """Submitted pairs (of one round, or all) without ``min_votes`` trusted votes yet; edited and
        unreadable tasks count as pending, since they never will have any."""
        return sum(len(t.votes) < self.min_votes for t in self._in(round)) + self._untrusted(round)

    def quorum(self, min_votes: int | None = None, *, round: int | None = None) -> float:
        """Share of submitted pairs (of one round, or all) with at least ``min_votes`` trusted votes."""
        need = self.min_votes if min_votes is None else min_votes
        tasks = self._in(round)
        total = len(tasks) + self._untrusted(round)
        return sum(len(t.votes) >= need for t in tasks) / total if total else 0.0

    def metrics(self) -> dict[int, dict[str, float | int | None]]:
        """Per round: pairs, finished pairs, votes, agreement between annotators (percent and
        Krippendorff's alpha over a / b / tie, on every task with two or more votes), and the share of
        non-tie votes that went to the left slot (0.5 when people ignore the side)."""
        by_round = defaultdict(list)
        for t in self.tasks:
            by_round[t.round].append(t)
        out = {}
        for rnd, tasks in sorted(by_round.items()):
            units = [[v.label for v in t.votes] for t in tasks]
            sides = [v.side for t in tasks for v in t.votes if v.side != "tie"]
            votes = sum(len(u) for u in units)
            out[rnd] = {
                "human/pairs": len(tasks),
                "human/finished": sum(len(t.votes) >= self.min_votes for t in tasks),
                "human/votes": votes,
                "human/tie_share": sum(u.count("tie") for u in units) / votes if votes else None,
                "human/agreement": percent_agreement(units),
                "human/alpha": krippendorff_alpha_nominal(units),
                "human/left_share": sides.count("left") / len(sides) if sides else None,
            }
        return out


def collect_tasks(listed, *, oracle_id: str, min_votes: int) -> Collected:
    """Read listed tasks (``(task_id, data, annotations, created_at)``) into a :class:`Collected`.
    Tasks that share a key (a submit that raced another) are merged, one vote per annotator."""
    tasks: dict[str, TaskVotes] = {}
    problems: list[Problem] = []
    seen: set[int] = set()
    for task_id, data, task_annotations, created_at in listed:
        if task_id in seen:  # a page boundary that moved while listing
            continue
        seen.add(task_id)
        task, found = read_task(task_id, data, task_annotations, created_at, oracle_id=oracle_id)
        problems += found
        if task is None:
            continue
        first = tasks.get(task.key)
        if first is None:
            tasks[task.key] = task
            continue
        problems.append(Problem("duplicate", task_id, task.key, f"task {task_id} repeats task {first.task_id} (same key); their votes are merged", task.round))
        merged = {v.annotator: v for v in first.votes}
        merged.update({v.annotator: v for v in task.votes if v.annotator not in merged})
        first.votes = list(merged.values())
    return Collected(oracle_id, min_votes, list(tasks.values()), problems)
