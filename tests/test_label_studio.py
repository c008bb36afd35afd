"""The human oracle against a real Label Studio server (started by scripts/test.sh).

Annotators are simulated the way the labeling UI submits: POST /api/tasks/{id}/annotations/ with the
Choices result and the lead time (``annotations.create``), or with ``was_cancelled`` for a skip. Each
annotator is a real user created through the API; the test's admin token submits on their behalf by
setting ``completed_by`` (Label Studio's API gives a token only to the user it belongs to).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid

import httpx
import pytest
from label_studio_sdk import LabelStudio

from data import Store, prompt_id, response_id
from oracles.agreement import krippendorff_alpha_nominal
from oracles.label_studio import LabelStudioConfig, LabelStudioError, LabelStudioOracle
from label_studio_fixtures import unavailable
from oracles.label_studio_tasks import choice_result, pair_key
from oracles.protocol import Pair
from store_contents import seed_responses

pytestmark = pytest.mark.label_studio

RUN = uuid.uuid4().hex[:8]  # fresh projects every run: the server's database outlives test runs


def campaign(name: str) -> str:
    return f"t{RUN}-{name}"


@pytest.fixture(scope="module")
def client(label_studio):
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)


@pytest.fixture(scope="module")
def annotators(client) -> list[int]:
    """Three annotator accounts (found again if an earlier run made them)."""
    users = {u.email: u.id for u in client.users.list()}
    ids = []
    for i in range(3):
        email = f"annotator{i}@nashflow.test"
        if email not in users:
            users[email] = client.users.create(username=f"annotator{i}", email=email, password=uuid.uuid4().hex).id
        ids.append(users[email])
    return ids


def make_pairs(store: Store | None, n: int, *, round: int, tag: str = "") -> list[Pair]:
    """n ordered pairs of stored responses (the store checks that judged responses exist)."""
    prompt = f"Write a greeting {tag}"
    pid = prompt_id(prompt)
    texts = [f"hello {tag} {round}.{i}" for i in range(2 * n)]
    ids = [response_id(pid, "v0", round, i) for i in range(2 * n)]
    if store is not None:
        seed_responses(store, prompt, texts, round=round)
    return [Pair(pid, prompt, ids[2 * i], texts[2 * i], ids[2 * i + 1], texts[2 * i + 1]) for i in range(n)]


def tasks_of(client, oracle) -> dict[str, dict]:
    """key → {"id", "data"} of every task in the oracle's project."""
    out = {}
    for t in client.tasks.list(project=oracle.project_id, fields="task_only", page_size=1000):
        assert t.data["key"] not in out, "two tasks for one comparison key"
        out[t.data["key"]] = {"id": t.id, "data": t.data}
    return out


def oracle_key(oracle, pair: Pair) -> str:
    return pair_key(pair, oracle.oracle_id)


def vote(client, task: dict, label: str, user: int, *, lead_time: float = 4.0, reason: str | None = None):
    """An annotator's answer in a/b/tie terms, clicked on the side the task shows that response."""
    a_side = task["data"]["a_side"]
    side = "tie" if label == "tie" else a_side if label == "a" else {"left": "right", "right": "left"}[a_side]
    result = choice_result(side)
    if reason:
        result.append({"from_name": "reason", "to_name": "prompt", "type": "textarea", "value": {"text": [reason]}})
    client.annotations.create(id=task["id"], result=result, completed_by=user, lead_time=lead_time)
    return side


def skip(client, task: dict, user: int):
    client.annotations.create(id=task["id"], result=[], was_cancelled=True, completed_by=user)


def oracle_for(label_studio, name: str, **config) -> LabelStudioOracle:
    return LabelStudioOracle(LabelStudioConfig(campaign=campaign(name), **config), url=label_studio.url, api_key=label_studio.api_key)


def test_submit_annotate_collect(label_studio, client, annotators):
    oracle = oracle_for(label_studio, "collect", overlap=3)
    pairs = make_pairs(None, 6, round=0, tag="collect")
    assert oracle.submit(pairs, round=0).created == 6
    tasks = tasks_of(client, oracle)
    keys = [oracle_key(oracle, p) for p in pairs]
    ballots = {  # a/b/tie per annotator; None: no answer; "skip": skipped
        0: ["a", "a", "a"],  # P = 1
        1: ["a", "b", "tie"],  # P = (1 + 0 + 0.5) / 3 = 1/2
        2: ["b", "b", "tie"],  # P = 1/6
        3: ["a", "a", "skip"],  # 2 votes: not finished
        4: [None, None, None],  # untouched
        5: ["tie", "tie", "a"],  # P = (0.5 + 0.5 + 1) / 3 = 2/3
    }
    sides = []
    for i, ballot in ballots.items():
        for user, label in zip(annotators, ballot):
            if label == "skip":
                skip(client, tasks[keys[i]], user)
            elif label:
                sides.append(vote(client, tasks[keys[i]], label, user, lead_time=2.0 + user, reason="clearer" if i == 0 and user == annotators[0] else None))
    got = oracle.collect()
    assert got.problems == []
    by_pair = {j.pair: j for j in got.judgments}
    assert set(by_pair) == {pairs[0], pairs[1], pairs[2], pairs[5]}
    for i, p in [(0, 1.0), (1, 0.5), (2, 1 / 6), (5, 2 / 3)]:
        j = by_pair[pairs[i]]
        assert j.p_a == pytest.approx(p) and j.n_votes == 3 and j.detail["round"] == 0
        assert sorted(j.detail["annotators"]) == sorted(annotators)
        assert sorted(j.detail["lead_time_s"]) == sorted(2.0 + u for u in annotators)
    assert by_pair[pairs[0]].detail["reasons"] == ["clearer"] and by_pair[pairs[0]].row(oracle.oracle_id, 0)["label"] == "a"
    assert oracle.pending() == 2 and got.pending() == 2
    assert got.quorum() == pytest.approx(4 / 6) and got.quorum(2) == pytest.approx(5 / 6)
    # Agreement over every task with two or more votes: units [a,a,a] [a,b,tie] [b,b,tie] [a,a] [tie,tie,a].
    # Percent agreement per unit 1, 0, 1/3, 1, 1/3 → 8/15. Coincidences (1/(m-1) per ordered pair):
    # o_aa=5 o_ab=.5 o_at=1.5 | o_ba=.5 o_bb=1 o_bt=1.5 | o_ta=1.5 o_tb=1.5 o_tt=1 → n_a=7 n_b=3 n_t=4, n=14;
    # sum_{c≠k} o = 7, sum_{c≠k} n_c n_k = 2(21 + 28 + 12) = 122 → alpha = 1 - 13·7/122 = 31/122.
    m = got.metrics()[0]
    assert m["human/agreement"] == pytest.approx(8 / 15) and m["human/alpha"] == pytest.approx(31 / 122)
    assert krippendorff_alpha_nominal([["a"] * 3, ["a", "b", "tie"], ["b", "b", "tie"], ["a", "a"], ["tie", "tie", "a"]]) == pytest.approx(31 / 122)
    not_tie = [s for s in sides if s != "tie"]
    assert m["human/left_share"] == pytest.approx(not_tie.count("left") / len(not_tie))
    assert (m["human/pairs"], m["human/finished"], m["human/votes"]) == (6, 4, 14)


def test_resubmitting_and_new_instances_duplicate_nothing(label_studio, client):
    pairs = make_pairs(None, 8, round=0, tag="dup")
    first = oracle_for(label_studio, "dup", overlap=2, batch_size=3)  # several import requests and pages
    assert first.submit(pairs[:5], round=0).created == 5
    assert first.submit(pairs[:5], round=0).created == 0
    assert first.submit(pairs + pairs[:2], round=1).created == 3  # only the new ones; repeats in a batch count once
    again = oracle_for(label_studio, "dup", overlap=2)
    assert again.project_id == first.project_id and again.submit(pairs, round=2).created == 0
    assert len(tasks_of(client, again)) == 8
    assert {t["data"]["round"] for t in tasks_of(client, again).values()} == {0, 1}  # a resubmit keeps the first round
    titled = [p for p in client.projects.list(title=first.config.title) if p.title == first.config.title]
    assert len(titled) == 1
    # The same campaign with another vote count would mix two oracles' judgments in one project.
    with pytest.raises(LabelStudioError, match="votes per pair"):
        oracle_for(label_studio, "dup", overlap=3).project_id
    # Two oracles creating the campaign's project at the same moment end up with one project.
    racers = [oracle_for(label_studio, "race") for _ in range(3)]
    threads = [threading.Thread(target=lambda o=o: o.project_id) for o in racers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len({o.project_id for o in racers}) == 1
    assert len([p for p in client.projects.list(title=racers[0].config.title) if p.title == racers[0].config.title]) == 1


def test_restart_in_the_middle_of_collecting_loses_and_repeats_nothing(label_studio, client, annotators, tmp_path):
    if not label_studio.control:
        unavailable("LABEL_STUDIO_CONTROL is not set: this test stops and restarts the server scripts/test.sh started")
    store = Store(tmp_path / "store")
    pairs = make_pairs(store, 12, round=0, tag="restart")
    requests = []
    armed = {"stop_on_page": None}

    def on_request(request: httpx.Request):
        requests.append(request.url.path)
        if armed["stop_on_page"] and request.url.path.startswith("/api/tasks") and request.url.params.get("page") == str(armed["stop_on_page"]):
            armed["stop_on_page"] = None
            label_studio.stop()  # the server goes away between two pages of one collect

    http = httpx.Client(timeout=60, event_hooks={"request": [on_request]})
    oracle = LabelStudioOracle(LabelStudioConfig(campaign=campaign("restart"), batch_size=4), url=label_studio.url, api_key=label_studio.api_key, http_client=http)
    oracle.submit(pairs, round=0)
    tasks = tasks_of(client, oracle)
    labels = ["a", "b", "tie"] * 4
    for p, label in list(zip(pairs, labels))[:6]:
        vote(client, tasks[oracle_key(oracle, p)], label, annotators[0])
    before = oracle.collect()
    assert len(store.write("comparisons", before.rows())) == 6

    armed["stop_on_page"] = 2
    with pytest.raises(LabelStudioError) as stopped:
        oracle.collect()
    leaked = label_studio.api_key in str(stopped.value)
    assert not leaked and not label_studio.healthy()
    label_studio.start()  # the same data folder and token

    for p, label in list(zip(pairs, labels))[6:9]:
        vote(client, tasks[oracle_key(oracle, p)], label, annotators[1])
    after = oracle.collect()  # the same oracle and HTTP client carry on
    assert len(after.judgments) == 9 and after.pending() == 3 and after.problems == []
    assert len(store.write("comparisons", after.rows())) == 3  # the six from before the restart are not repeated
    assert len(store.write("comparisons", oracle_for(label_studio, "restart").collect().rows())) == 0
    stored = store.read("comparisons").set_index("a_id")
    assert len(stored) == 9
    expected = {"a": 1.0, "b": 0.0, "tie": 0.5}
    for p, label in list(zip(pairs, labels))[:9]:
        assert stored.loc[p.a_id, "p_a"] == expected[label] and stored.loc[p.a_id, "n_votes"] == 1
    assert len(tasks_of(client, oracle)) == 12 and oracle_for(label_studio, "restart").project_id == oracle.project_id


def test_late_annotations_land_in_their_round(label_studio, client, annotators, tmp_path):
    store = Store(tmp_path / "store")
    oracle = oracle_for(label_studio, "late")
    round0, round1 = make_pairs(store, 3, round=0, tag="late"), make_pairs(store, 3, round=1, tag="late")
    oracle.submit(round0, round=0)
    tasks = tasks_of(client, oracle)
    for p in round0[:2]:
        vote(client, tasks[oracle_key(oracle, p)], "a", annotators[0])
    store.write("comparisons", oracle.collect().rows())
    # The campaign moves on to round 1 while round0[2] is still waiting for its person.
    oracle.submit(round1, round=1)
    tasks = tasks_of(client, oracle)
    for p in round1 + round0[2:]:
        vote(client, tasks[oracle_key(oracle, p)], "b", annotators[1])
    got = oracle.collect()
    late = next(j for j in got.judgments if j.pair == round0[2])
    assert late.detail["round"] == 0 and late.p_a == 0.0
    assert len(store.write("comparisons", got.rows())) == 4
    assert store.rounds("comparisons") == [0, 1]
    assert set(store.read("comparisons", rounds=[0])["a_id"]) == {p.a_id for p in round0}
    assert set(store.read("comparisons", rounds=[1])["a_id"]) == {p.a_id for p in round1}
    assert got.metrics()[0]["human/finished"] == 3 and got.quorum(round=1) == 1.0


def test_an_edited_task_is_reported_not_trusted(label_studio, client, annotators):
    oracle = oracle_for(label_studio, "edited")
    pairs = make_pairs(None, 4, round=0, tag="edited")
    oracle.submit(pairs, round=0)
    tasks = tasks_of(client, oracle)
    for p in pairs:
        vote(client, tasks[oracle_key(oracle, p)], "a", annotators[0])
    text_edit, round_edit = tasks[oracle_key(oracle, pairs[1])], tasks[oracle_key(oracle, pairs[2])]
    # What the Data Manager's task editor sends: the task's whole data with a field changed.
    client.tasks.update(id=text_edit["id"], data={**text_edit["data"], "left": "a different response"})
    client.tasks.update(id=round_edit["id"], data={**round_edit["data"], "round": 7})
    got = oracle.collect()
    assert {j.pair for j in got.judgments} == {pairs[0], pairs[3]}
    assert sorted((p.kind, p.task_id) for p in got.problems) == sorted([("edited", text_edit["id"]), ("edited", round_edit["id"])])
    assert got.pending() == 2 and oracle.pending() == 2 and got.quorum() == pytest.approx(0.5)
    assert oracle.submit(pairs, round=0).created == 0  # resubmitting does not paper over it


def test_the_token_reaches_no_store_log_or_error(label_studio, client, annotators, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    token = label_studio.api_key
    store = Store(tmp_path / "store")
    oracle = oracle_for(label_studio, "secret")
    pairs = make_pairs(store, 3, round=0, tag="secret")
    oracle.submit(pairs, round=0)
    for p in pairs:
        vote(client, tasks_of(client, oracle)[oracle_key(oracle, p)], "tie", annotators[2])
    got = oracle.collect()
    store.write("comparisons", got.rows())
    errors = []
    for bad in (
        LabelStudioOracle(LabelStudioConfig(campaign=campaign("secret"), project_id=10**8), url=label_studio.url, api_key=token),
        LabelStudioOracle(LabelStudioConfig(campaign=campaign("secret")), url=label_studio.url, api_key=token + "-wrong"),
        LabelStudioOracle(LabelStudioConfig(campaign=campaign("secret")), url="http://127.0.0.1:9", api_key=token),
    ):
        with pytest.raises(LabelStudioError) as e:
            bad.collect()
        errors.append(str(e.value))
    stored = b"".join(f.read_bytes() for f in (tmp_path / "store").rglob("*") if f.is_file())
    out, err = capfd.readouterr()
    assert caplog.records and b"p_a" in stored  # something was logged and stored: the checks below mean something
    texts = [caplog.text, out, err, repr(oracle), repr(oracle.config), json.dumps(got.rows(), default=str), *errors]
    texts += [repr(j) for j in got.judgments] + [repr(p) for p in got.problems]
    leaked = token.encode() in stored or any(token in t for t in texts)
    assert not leaked
    assert "401" in errors[1] and "ConnectError" in errors[2]
