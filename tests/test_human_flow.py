"""Rounds with people in Label Studio: submit, wait for a quorum, collect; mixed with a machine oracle."""

import threading
import time
import uuid

import pytest
from label_studio_sdk import LabelStudio

from data import Store
from oracles.label_studio_tasks import choice_result
from pipelines import flows
from pipelines.config import parse_config
from pipelines.oracle_factory import people_spec
from pipelines.world import World

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]


def _config(tmp_path, label_studio, **changes):
    raw = {
        "name": f"h{uuid.uuid4().hex[:8]}",
        "store": str(tmp_path / "store"),
        "rounds": 1,
        "games": [{"kind": "random", "n": 4, "seed": 5}],
        "oracle": {"kind": "matrix", "mode": "exact"},
        "humans": {"share": 0.5, "url": label_studio.url, "api_key_env": "LABEL_STUDIO_API_KEY", "poll_interval_s": 1, "wait_timeout_s": 120, "quorum": 1.0},
        "solver": {"algorithm": "inpo", "beta": 0.5},
        "sampling": {"samples_per_prompt": 6},
    }
    raw.update(changes)
    return parse_config(raw)


class Annotator(threading.Thread):
    """A person in the labeling UI: answers every open task by the game's true preference."""

    def __init__(self, label_studio, config, world):
        super().__init__(daemon=True)
        self.client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
        self.title, self.game = f"nashflow {config.name}", next(iter(world.games.values()))
        self.stop, self.answered = threading.Event(), 0

    def run(self):
        while not self.stop.is_set():
            projects = [p for p in self.client.projects.list() if p.title == self.title]
            for project in projects:
                for t in self.client.tasks.list(project=project.id, fields="all", page_size=1000):
                    if t.total_annotations:
                        continue
                    d = t.data
                    a_text, b_text = (d["left"], d["right"]) if d["a_side"] == "left" else (d["right"], d["left"])
                    i, j = int(a_text[1:]), int(b_text[1:])
                    label = "a" if self.game[i, j] > 0.5 else "b" if self.game[i, j] < 0.5 else "tie"
                    side = "tie" if label == "tie" else d["a_side"] if label == "a" else {"left": "right", "right": "left"}[d["a_side"]]
                    self.client.annotations.create(id=t.id, result=choice_result(side), lead_time=3.0)
                    self.answered += 1
            time.sleep(0.5)


def test_a_round_waits_for_people_and_mixes_oracles(tmp_path, label_studio, prefect_harness, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    config = _config(tmp_path, label_studio)
    world = World(config)
    person = Annotator(label_studio, config, world)
    person.start()
    try:
        metrics = flows.alignment_round(config, 1)
    finally:
        person.stop.set()
        person.join(timeout=10)
    comps = Store(config.store).read("comparisons")
    people_id = people_spec(config).oracle_id
    by_people = comps[comps["oracle_id"] == people_id]
    by_machine = comps[comps["oracle_id"].str.startswith("matrix:")]
    assert len(by_people) == person.answered > 0 and len(by_machine) > 0
    assert metrics["human/quorum"] == 1.0
    game = next(iter(world.games.values()))
    texts = Store(config.store).read("responses").set_index("response_id")["text"]
    for r in by_people.itertuples():
        i, j = int(texts[r.a_id][1:]), int(texts[r.b_id][1:])
        assert r.p_a == (1.0 if game[i, j] > 0.5 else 0.0 if game[i, j] < 0.5 else 0.5)

    # a rerun of the finished round collects and resubmits nothing
    tasks_before = sum(1 for p in person.client.projects.list() if p.title == f"nashflow {config.name}" for _ in person.client.tasks.list(project=p.id, page_size=1000))
    flows.alignment_round(config, 1)
    tasks_after = sum(1 for p in person.client.projects.list() if p.title == f"nashflow {config.name}" for _ in person.client.tasks.list(project=p.id, page_size=1000))
    assert tasks_after == tasks_before
    assert len(Store(config.store).read("comparisons")) == len(comps)


def test_a_round_without_votes_times_out_with_advice(tmp_path, label_studio, prefect_harness, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    config = _config(tmp_path, label_studio, humans={"share": 1.0, "url": label_studio.url, "poll_interval_s": 0.5, "wait_timeout_s": 2}, oracle=None)
    with pytest.raises(Exception, match="run the round again later: it collects, it does not resubmit"):
        flows.alignment_round(config, 1)
