"""The store at campaign scale: reads pruned to what a stage needs, compaction that a concurrent reader
never catches half-done, and an integrity check that names each bad file and what to do."""

import subprocess
import sys
import threading

import pyarrow.compute as pc
import pytest

from data import Store, StoreError, comparison_id, prompt_id
from store_contents import seed_responses

ROOT = __file__.rsplit("/tests/", 1)[0]
PROMPT = "Which is better?"
PID = prompt_id(PROMPT)


def _comparison(a, b, p, round, oracle="o"):
    return dict(comparison_id=comparison_id(PID, a, b, oracle), round=round, prompt_id=PID, a_id=a, b_id=b, oracle_id=oracle, p_a=p, n_votes=1)


def grow(store: Store, rounds: int, writes_per_round: int = 3) -> set[str]:
    """A store like a campaign's: per round, responses and several small comparison writes."""
    keys = set()
    for r in range(1, rounds + 1):
        ids = seed_responses(store, PROMPT, [f"r{r} answer {i}" for i in range(2 * writes_per_round)], round=r)
        for w in range(writes_per_round):
            row = _comparison(ids[2 * w], ids[2 * w + 1], 0.25 * (w % 5), r)
            store.write("comparisons", [row])
            keys.add(row["comparison_id"])
    return keys


def test_a_write_refers_to_its_own_round_first_and_finds_older_rounds_too(tmp_path):
    store = Store(tmp_path)
    old = seed_responses(store, PROMPT, ["a", "b"], round=1)
    new = seed_responses(store, PROMPT, ["c"], round=2)
    store.write("comparisons", [_comparison(new[0], old[0], 0.5, 2)])  # round 2 names a round-1 response
    store.write("logprobs", [dict(response_id=old[1], policy_version="v1", round=2, logp=-3.0)])
    with pytest.raises(StoreError, match=r"comparisons row 1 .*b_id='nope' is not a stored response"):
        store.write("comparisons", [_comparison(new[0], old[1], 0.5, 2), _comparison(new[0], "nope", 0.5, 2)])
    with pytest.raises(StoreError, match=r"logprobs row 0 .*: logp=0.5 is not a log-probability"):
        store.write("logprobs", [dict(response_id=old[0], policy_version="v1", round=2, logp=0.5)])
    assert len(store.read("comparisons")) == 1 and len(store.read("logprobs")) == 1  # nothing of a refused batch


def test_a_filter_is_pushed_to_the_reader(tmp_path):
    store = Store(tmp_path)
    grow(store, 3)
    got = store.read("comparisons", rounds=[2, 3], columns=["a_id", "p_a"], where=pc.field("p_a") >= 0.25)
    assert len(got) == 4 and set(got["p_a"]) == {0.25, 0.5}


def test_compaction_leaves_one_file_per_partition_and_the_same_rows(tmp_path):
    store = Store(tmp_path)
    keys = grow(store, 4)
    before = store.read("comparisons").sort_values("comparison_id").reset_index(drop=True)
    assert len(store.files("comparisons")) == 12
    report = store.compact()
    assert report["comparisons"] == {"files_before": 12, "files_after": 4}
    assert report["prompts"]["files_after"] == 1
    assert len(list((tmp_path / "comparisons").rglob("*.parquet"))) == 4
    after = store.read("comparisons").sort_values("comparison_id").reset_index(drop=True)
    assert after.equals(before) and set(after["comparison_id"]) == keys
    assert store.compact()["comparisons"] == {"files_before": 4, "files_after": 4}  # nothing left to merge
    late = seed_responses(store, PROMPT, ["late a", "late b"], round=1, policy_version="v1")
    store.write("comparisons", [_comparison(*late, 0.5, 1)])  # lands beside the merged file; the next compaction takes both
    assert store.compact()["comparisons"] == {"files_before": 5, "files_after": 4}
    assert len(store.read("comparisons")) == len(keys) + 1
    assert store.check() == []


def test_compacting_a_round_merges_only_its_partitions(tmp_path):
    store = Store(tmp_path)
    grow(store, 3)
    report = store.compact(rounds=[2])
    assert report["comparisons"] == {"files_before": 3, "files_after": 1} and "prompts" not in report
    assert [len(store.files("comparisons", rounds=[r])) for r in (1, 2, 3)] == [3, 1, 3]


def test_a_compaction_that_stops_before_deleting_changes_nothing_a_reader_sees(tmp_path, monkeypatch):
    store = Store(tmp_path)
    keys = grow(store, 2)

    def crash(path):
        raise KeyboardInterrupt("killed after the merged file was written")

    monkeypatch.setattr(store, "_remove", crash)
    with pytest.raises(KeyboardInterrupt):
        store.compact("comparisons")
    monkeypatch.undo()
    assert len(list((tmp_path / "comparisons" / "round=1").glob("*.parquet"))) == 4  # 3 old + the merged one
    assert len(store.files("comparisons", rounds=[1])) == 1  # readers take the merged one alone
    assert set(store.read("comparisons")["comparison_id"]) == keys and len(store.read("comparisons")) == len(keys)
    store.compact("comparisons")  # the next compaction deletes what the merged file replaced
    assert len(list((tmp_path / "comparisons" / "round=1").glob("*.parquet"))) == 1


def test_a_concurrent_reader_sees_the_old_files_or_the_merged_one_never_both_or_neither(tmp_path):
    store = Store(tmp_path)
    keys = grow(store, 12, writes_per_round=4)
    old = {path for path in store.files("comparisons")}
    seen, errors, stop = [], [], threading.Event()

    def reader():
        reading = Store(tmp_path)
        while not stop.is_set():
            try:
                files = reading.files("comparisons")
                rows = reading.read_arrow("comparisons", columns=["comparison_id"])
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                errors.append(repr(e))
                return
            for round in range(1, 13):
                mine = [f for f in files if f"/round={round}/" in f]
                merged = [f for f in mine if "/compact-" in f]
                if merged and set(mine) - set(merged) or not mine:
                    errors.append(f"round {round}: {mine}")
            if set(rows["comparison_id"].to_pylist()) != keys or rows.num_rows != len(keys):
                errors.append(f"read {rows.num_rows} rows")
            seen.append(len(files))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    proc = subprocess.run([sys.executable, "-c", f"from data import Store; Store({str(tmp_path)!r}).compact('comparisons')"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    stop.set()
    for t in threads:
        t.join()
    assert proc.returncode == 0, proc.stderr
    assert not errors, errors[:5]
    assert len(seen) >= 2 and max(seen) == len(old) and min(seen) == 12  # the readers ran across the swap


def test_check_names_each_problem_and_what_to_do(tmp_path):
    store = Store(tmp_path)
    grow(store, 3)
    assert store.check() == []
    victim = sorted((tmp_path / "comparisons" / "round=2").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    (tmp_path / "comparisons" / "notes.txt").write_text("hello")  # stray
    for f in (tmp_path / "responses" / "round=3").glob("*.parquet"):
        f.unlink()  # round 3's comparisons now name responses the store lacks
    problems = store.check()
    by_what = {p.what.split(" ")[0]: p for p in problems}
    assert len(problems) == 4, problems
    truncated = next(p for p in problems if str(victim) == p.path)
    assert "unreadable Parquet file" in truncated.what and "run its round again" in truncated.todo
    assert any(p.path.endswith("notes.txt") and "stray" in p.what for p in problems)
    assert sum("refer to" in p.what for p in problems) == 2 and by_what  # a_id and b_id
    with pytest.raises(StoreError, match="notes.txt: stray file .*move it out of the store"):
        store.verify_files()
    (tmp_path / "comparisons" / "notes.txt").unlink()
    with pytest.raises(StoreError, match=rf"{victim}: unreadable Parquet file .*nashflow check"):
        store.verify_files()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_status_and_run_meet_a_corrupt_or_missing_store_with_one_line(tmp_path):
    missing = _cli("status", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    store = Store(tmp_path / "s")
    grow(store, 2)
    victim = sorted((tmp_path / "s" / "comparisons" / "round=1").glob("*.parquet"))[0]
    victim.write_bytes(b"PAR1 not really")
    status = _cli("status", str(tmp_path / "s"))
    assert status.returncode != 0 and str(victim) in status.stderr and "nashflow check" in status.stderr
    assert "Traceback" not in status.stderr and len(status.stderr.strip().splitlines()) <= 3
    run = _cli("run", "examples/tabular_inpo.yaml", "--store", str(tmp_path / "s"), "--rounds", "1")
    assert run.returncode != 0 and str(victim) in run.stderr and "Traceback" not in run.stderr
    check = _cli("check", str(tmp_path / "s"))
    assert check.returncode == 1 and str(victim) in check.stderr and "what to do" in check.stderr
    victim.unlink()
    assert _cli("compact", str(tmp_path / "s")).returncode == 0


def test_comparisons_written_before_the_typed_columns_read_with_them(tmp_path):
    """Who answered used to live in ``detail`` JSON: an old file reads as if written with the columns,
    and the rule that a learned model's answers never train it holds on it."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.diagnostics import intransitivity
    from data.schemas import COMPARISONS

    store = Store(tmp_path)
    ids = seed_responses(store, PROMPT, ["a", "b", "c"], round=1)
    old_schema = pa.schema([f for f in COMPARISONS.file_schema if f.name not in ("answered_by", "stage", "model_version", "route")])
    route = [{"stage": "learned", "oracle": "learned:pairwise@abc:1", "p_a": 0.9, "cost_usd": 0.0, "accepted": True}]
    rows = [
        {**_comparison(ids[0], ids[1], 0.9, 1, oracle="cascade:c:1"), "detail": json.dumps({"answered_by": "learned:pairwise@abc:1", "stage": "learned", "prefmodel": "preference_models/r0", "route": route})},
        {**_comparison(ids[1], ids[2], 0.9, 1, oracle="cascade:c:1"), "detail": None},
        {**_comparison(ids[2], ids[0], 0.9, 1, oracle="cascade:c:1"), "detail": json.dumps({"answered_by": "judge:x:1", "stage": "judge"})},
    ]
    table = pa.Table.from_pylist([{k: r.get(k) for k in old_schema.names} for r in rows], schema=old_schema)
    (tmp_path / "comparisons" / "round=1").mkdir(parents=True)
    pq.write_table(table, tmp_path / "comparisons" / "round=1" / "part-old.parquet")
    got = store.read("comparisons").set_index("a_id")
    assert list(got.loc[ids, "answered_by"]) == ["learned:pairwise@abc:1", "cascade:c:1", "judge:x:1"]
    assert got.loc[ids, "stage"].fillna("-").tolist() == ["learned", "-", "judge"] and got.at[ids[0], "model_version"] == "preference_models/r0"
    assert got.at[ids[0], "route"][0]["stage"] == "learned" and got.at[ids[1], "route"] is None
    # a column asked for alone migrates too; the learned answer is left out of the cycle count
    assert store.read("comparisons", columns=["answered_by"])["answered_by"].str.startswith("learned:").sum() == 1
    assert intransitivity(store)["intransitivity/triples"] == 0  # a → b (learned) is left out: no whole triple


def test_check_names_a_key_stored_twice_with_different_contents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(tmp_path)
    grow(store, 1)
    first = sorted((tmp_path / "comparisons" / "round=1").glob("*.parquet"))[0]
    copy = pq.read_table(first)
    pq.write_table(copy, first.with_name("part-copy.parquet"))  # an identical copy: harmless
    assert store.check() == []
    changed = copy.set_column(copy.schema.get_field_index("p_a"), "p_a", pa.array([0.99] * copy.num_rows))
    pq.write_table(changed, first.with_name("part-changed.parquet"))
    (problem,) = store.check()
    assert "stored with different contents in 3 files" in problem.what and "part-changed.parquet" in problem.what  # the original, its copy, the changed one
