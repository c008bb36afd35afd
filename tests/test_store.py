"""The Parquet store: round trips, idempotency, atomicity, and refusals that name the culprit."""

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import Store, StoreError, comparison_id, prompt_id
from data.export import export_preferences, preference_pairs
from data.schemas import RESPONSES
from store_contents import seed_responses

PID = prompt_id("Which is better?")


def _seed(store: Store, n: int = 3, round: int = 1) -> list[str]:
    return seed_responses(store, "Which is better?", [f"answer {i}" for i in range(n)], round=round)


def _comparison(a, b, p, round=1, oracle="o"):
    return dict(comparison_id=comparison_id(PID, a, b, oracle), round=round, prompt_id=PID, a_id=a, b_id=b, oracle_id=oracle, p_a=p, n_votes=1)


def _snapshot(root):
    return sorted((d, f, os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs)


def test_round_trip_with_hive_partitions(tmp_path):
    store = Store(tmp_path)
    a, b, c = _seed(store)
    store.write("comparisons", [_comparison(a, b, 0.75), _comparison(b, c, 0.5, round=2)])
    got = store.read("comparisons")
    assert sorted(got["round"]) == [1, 2]
    assert got.set_index("a_id").loc[a, "p_a"] == 0.75
    assert list(store.read("comparisons", rounds=[2])["a_id"]) == [b]
    assert (tmp_path / "comparisons" / "round=2").is_dir()
    # an ordinary hive reader sees the same rows, with the round from the folder names
    ds = pq.ParquetDataset(str(tmp_path / "comparisons"), partitioning="hive").read()
    assert sorted(ds.column("round").to_pylist()) == [1, 2]


def test_repeated_write_adds_nothing(tmp_path):
    store = Store(tmp_path)
    a, b, c = _seed(store)
    rows = [_comparison(a, b, 0.75), _comparison(a, c, 0.25)]
    assert len(store.write("comparisons", rows)) == 2
    before = _snapshot(tmp_path)
    assert len(store.write("comparisons", rows)) == 0
    assert len(store.write("comparisons", rows[:1] + rows[:1])) == 0
    assert _snapshot(tmp_path) == before
    assert len(store.read("comparisons")) == 2


def test_readers_drop_duplicates_from_racing_writers(tmp_path):
    store = Store(tmp_path)
    a, b, _ = _seed(store)
    row = _comparison(a, b, 0.75)
    store.write("comparisons", [row])
    # a second writer that did not see the first one's file writes the same key again
    t = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "round"}])
    extra = {f.name: t.column(f.name) if f.name in t.column_names else pa.nulls(1, f.type) for f in store_schema()}
    pq.write_table(pa.table(extra, schema=store_schema()), tmp_path / "comparisons" / "round=1" / "part-other.parquet")
    assert len(store.read("comparisons")) == 1


def store_schema():
    from data.schemas import COMPARISONS

    return COMPARISONS.file_schema


@pytest.mark.parametrize(
    "p, message",
    [(1.5, r"comparisons row 1 \(comparison_id=c-\w+\): p_a=1.5 is not a probability"), (float("nan"), r"row 1 .*p_a=nan"), (-0.1, r"row 1 .*p_a=-0.1")],
)
def test_bad_probability_is_refused_with_the_row_named(tmp_path, p, message):
    store = Store(tmp_path)
    a, b, c = _seed(store)
    store.write("comparisons", [_comparison(a, b, 0.5)])
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=message):
        store.write("comparisons", [_comparison(a, c, 0.9), _comparison(b, c, p)])
    assert _snapshot(tmp_path) == before  # the good row of the bad batch was not written either


def test_unknown_response_is_refused(tmp_path):
    store = Store(tmp_path)
    a, _, _ = _seed(store)
    with pytest.raises(StoreError, match=r"comparisons row 0 .*b_id='r-nope' is not a stored response"):
        store.write("comparisons", [_comparison(a, "r-nope", 0.5)])
    assert store.read("comparisons").empty


def test_missing_or_mistyped_columns_are_named(tmp_path):
    store = Store(tmp_path)
    a, b, _ = _seed(store)
    row = _comparison(a, b, 0.5)
    del row["oracle_id"]
    with pytest.raises(StoreError, match="missing required column.*oracle_id"):
        store.write("comparisons", [row])
    with pytest.raises(StoreError, match=r"comparisons\.n_votes"):
        store.write("comparisons", [{**_comparison(a, b, 0.5), "n_votes": "many"}])
    with pytest.raises(StoreError, match="unknown column"):
        store.write("comparisons", [{**_comparison(a, b, 0.5), "api_key": "x"}])


def test_truncated_file_is_named(tmp_path):
    store = Store(tmp_path)
    a, b, _ = _seed(store)
    store.write("comparisons", [_comparison(a, b, 0.5)])
    (path,) = (tmp_path / "comparisons" / "round=1").glob("part-*.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=f"{path.name}: unreadable Parquet file in table 'comparisons'"):
        store.read("comparisons")


def test_wrong_schema_file_is_named(tmp_path):
    store = Store(tmp_path)
    _seed(store)
    bad = tmp_path / "responses" / "round=1" / "part-foreign.parquet"
    pq.write_table(pa.table({"response_id": ["x"], "text": [3]}), bad)
    with pytest.raises(StoreError, match=r"part-foreign.parquet: schema does not match table 'responses': missing 'policy_version'"):
        store.read("responses")


def test_a_file_from_before_a_nullable_column_was_added_reads_with_nulls(tmp_path):
    store = Store(tmp_path)
    _seed(store, n=0)
    store.write("responses", [dict(response_id="new", round=1, policy_version="v0", prompt_id=PID, text="b", token_ids=[5, 1])])
    older = RESPONSES.file_schema.remove(RESPONSES.file_schema.get_field_index("token_ids"))
    pq.write_table(pa.table({"response_id": ["old"], "policy_version": ["v0"], "prompt_id": [PID], "text": ["a"], "n_tokens": [1], "finish_reason": ["stop"]}, schema=older),
                   tmp_path / "responses" / "round=1" / "part-older.parquet")
    rows = store.read("responses").set_index("response_id")
    assert rows.at["old", "token_ids"] is None and list(rows.at["new", "token_ids"]) == [5, 1]


def test_list_files_and_delete(tmp_path):
    store = Store(tmp_path)
    assert store.list_files("notes") == []  # no folder yet
    store.write_bytes("notes/b.json", b"{}")
    store.write_bytes("notes/a.json", b"{}")
    store.write_bytes("notes/sub/c.json", b"{}")
    assert store.list_files("notes") == ["a.json", "b.json"]  # files only, not sub-folders
    store.delete("notes/a.json")
    store.delete("notes/a.json")  # already gone: nothing to do
    assert store.list_files("notes") == ["b.json"]


def test_a_write_killed_half_way_leaves_the_store_readable_and_unchanged(tmp_path):
    store = Store(tmp_path)
    a, b, c = _seed(store)
    store.write("comparisons", [_comparison(a, b, 0.5)])
    before = store.read("comparisons")
    # A separate process writes and is killed (os._exit) between writing the bytes and the rename.
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        import pyarrow.fs as pafs
        from data import Store, comparison_id
        class DiesBeforeRename:
            def __init__(self, fs):
                self.fs = fs
            def __getattr__(self, name):
                return getattr(self.fs, name)
            def move(self, src, dest):
                os._exit(9)
        store = Store({str(tmp_path)!r})
        store.fs = DiesBeforeRename(store.fs)
        store.write("comparisons", [dict(comparison_id=comparison_id({PID!r}, {a!r}, {c!r}, "o"), round=1,
            prompt_id={PID!r}, a_id={a!r}, b_id={c!r}, oracle_id="o", p_a=0.1, n_votes=1)])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    leftovers = list((tmp_path / "comparisons" / "round=1").glob(".tmp-*"))
    assert leftovers, "the killed writer should have left its temporary file behind"
    pd.testing.assert_frame_equal(store.read("comparisons"), before)


def test_export_trl_style(tmp_path):
    store = Store(tmp_path)
    a, b, c = _seed(store)
    store.write("comparisons", [_comparison(a, b, 0.75), _comparison(a, c, 0.25), _comparison(b, c, 0.5), {**_comparison(c, a, None), "error": "abstained"}])
    df = preference_pairs(store)
    assert list(df.columns[:4]) == ["prompt", "chosen", "rejected", "p_chosen"]
    assert sorted(zip(df["chosen"], df["rejected"], df["p_chosen"])) == [("answer 0", "answer 1", 0.75), ("answer 2", "answer 0", 0.75)]
    assert len(preference_pairs(store, include_ties=True)) == 3
    assert export_preferences(store, str(tmp_path / "prefs.jsonl")) == 2
    assert len(pd.read_json(tmp_path / "prefs.jsonl", lines=True)) == 2
    with pytest.raises(StoreError, match="already exists"):
        export_preferences(store, str(tmp_path / "prefs.jsonl"))
    assert export_preferences(store, str(tmp_path / "prefs.parquet")) == 2


def test_a_checkpoint_is_complete_once_its_manifest_is_written_and_old_markers_migrate(tmp_path):
    from data import checkpoints as marks

    store = Store(tmp_path / "store")
    store.write_bytes("models/r1/weights.bin", b"half")  # written, but not (yet) marked complete
    assert not marks.is_complete(store, "models/r1") and marks.complete_checkpoints(store, "models") == []
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        marks.read_manifest(store, "models/r1")
    marks.mark_complete(store, "models/r1", {"fingerprint": "abc"})
    assert marks.read_manifest(store, "models/r1") == {"fingerprint": "abc"} and marks.complete_checkpoints(store, "models") == ["r1"]
    assert sorted(os.listdir(store.path("models/r1"))) == ["weights.bin"]  # the folder is what its writer wrote
    # a checkpoint marked the old way (an empty _COMPLETE inside) is complete, and gets its manifest
    store.write_bytes("models/r0/_COMPLETE", b"")
    assert marks.is_complete(store, "models/r0") and marks.complete_checkpoints(store, "models") == ["r0", "r1"]
    marks.unmark(store, "models/r1")
    assert not marks.is_complete(store, "models/r1")
