"""The Parquet store: one dataset per table, hive-partitioned by round, on any ``pyarrow.fs`` filesystem.

Rules (see docs/architecture.md):
- a write is one new Parquet file, written under a temporary name and renamed (a single PUT on object
  stores), so a reader never sees half a file;
- keys are deterministic and rows whose key is already stored are not written again, so a repeated
  write adds nothing; readers drop duplicates anyway (two concurrent writers may race);
- bad rows are refused before anything is written, with the row named.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data.keys import stable_hash
from data.schemas import LABELS, TABLES, Table


class StoreError(ValueError):
    """Bad input for the store, or a file in it that cannot be trusted. The message names the culprit."""


Rows = pd.DataFrame | pa.Table | Sequence[dict]


class Store:
    """A campaign's store rooted at a local folder or any URI that ``pyarrow.fs`` opens (s3://, gs://…)."""

    def __init__(self, root: str | object):
        root = str(root)
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.uri = root
        else:
            self.fs, self.root = pafs.LocalFileSystem(), _abspath(root)
            self.uri = self.root
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ----- paths and raw files -------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, relpath: str) -> bool:
        return self.fs.get_file_info(self.path(relpath)).type != pafs.FileType.NotFound

    def local_path(self, relpath: str = "") -> str:
        """The folder on local disk, for libraries that only write to local paths."""
        if not self.is_local:
            raise StoreError(f"{self.uri} is not on local disk; {relpath!r} has no local path")
        return self.path(relpath) if relpath else self.root

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write one file atomically (temporary name, then rename). Returns its path."""
        final = self.path(relpath)
        self._atomic_write(final, lambda out: out.write(data))
        return final

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open_input_stream(self.path(relpath)) as f:
            return f.read()

    def list_files(self, relpath: str) -> list[str]:
        """Names of the files directly in the folder ``relpath``, sorted; none when it does not exist."""
        base = self.path(relpath)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        return sorted(info.base_name for info in self.fs.get_file_info(pafs.FileSelector(base)) if info.type == pafs.FileType.File)

    def delete(self, relpath: str) -> None:
        """Remove one file; nothing to do when it is not there."""
        if self.exists(relpath):
            self.fs.delete_file(self.path(relpath))

    def _atomic_write(self, final: str, write) -> None:
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:  # an object store makes a single PUT visible only once complete
            with self.fs.open_output_stream(final) as out:
                write(out)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self.fs.move(tmp, final)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    # ----- tables ---------------------------------------------------------------------------------
    def write(self, table: str, rows: Rows) -> pd.DataFrame:
        """Validate ``rows`` and store those whose key is not stored yet, one file per round.

        Returns the rows written (empty when everything was already there). Nothing is written
        when any row is bad.
        """
        spec = _table(table)
        new = _to_arrow(spec, rows)
        self._validate(spec, new)
        stored = self.keys(table, rounds=_rounds_of(new) if spec.partitioned else None)
        keys = _key_tuples(new, spec.key)
        fresh = [i for i, k in enumerate(keys) if k not in stored]
        first = {}  # drop duplicates inside the batch too
        for i in fresh:
            first.setdefault(keys[i], i)
        new = new.take(pa.array(sorted(first.values()), pa.int64()))
        if new.num_rows == 0:
            return new.to_pandas()
        groups = [(r, new.filter(pc.equal(new["round"], r))) for r in _rounds_of(new)] if spec.partitioned else [(None, new)]
        for rnd, part in groups:
            digest = stable_hash(*sorted(_key_tuples(part, spec.key)))
            folder = spec.name if rnd is None else f"{spec.name}/round={rnd}"
            body = part.drop_columns(["round"]) if spec.partitioned else part
            body = body.select(spec.file_schema.names).cast(spec.file_schema)
            buf = io.BytesIO()
            pq.write_table(body, buf)
            self._atomic_write(self.path(folder, f"part-{digest}.parquet"), lambda out, b=buf: out.write(b.getvalue()))
        return new.to_pandas()

    def read_arrow(self, table: str, *, rounds: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """All stored rows of ``table`` (optionally only some rounds), one row per key."""
        spec = _table(table)
        wanted = set(spec.schema.names) if not columns else {*columns, *spec.key}  # keys: for one row per key
        names = [n for n in spec.schema.names if n in wanted]
        schema = pa.schema([spec.schema.field(n) for n in names])
        parts = []
        for path, rnd in self._files(spec, rounds):
            try:
                with self.fs.open_input_file(path) as f:
                    parquet = pq.ParquetFile(f)
                    _check_schema(parquet.schema_arrow, spec, path)
                    # only the columns asked for come off the disk (responses' texts and tokens are most of it)
                    t = parquet.read(columns=[n for n in names if n in parquet.schema_arrow.names])
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"{path}: unreadable Parquet file in table {spec.name!r} ({e})") from e
            if spec.partitioned and "round" in wanted:
                t = t.append_column("round", pa.array([rnd] * t.num_rows, pa.int64()))
            parts.append(_with_added_columns(t, schema))
        out = pa.concat_tables(parts) if parts else schema.empty_table()
        out = _drop_duplicate_keys(out, spec.key)
        return out.select(list(columns)) if columns else out

    def read(self, table: str, *, rounds: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        return self.read_arrow(table, rounds=rounds, columns=columns).to_pandas()

    def keys(self, table: str, *, rounds: Iterable[int] | None = None) -> set[tuple]:
        spec = _table(table)
        return set(_key_tuples(self.read_arrow(table, rounds=rounds, columns=spec.key), spec.key))

    def rounds(self, table: str) -> list[int]:
        """The rounds that have a partition in ``table``."""
        return sorted({rnd for _, rnd in self._files(_table(table), None)})

    def _files(self, spec: Table, rounds: Iterable[int] | None) -> list[tuple[str, int | None]]:
        base = self.path(spec.name)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        wanted = None if rounds is None else {int(r) for r in rounds}
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = info.path[len(base) + 1 :]
            name = rel.rsplit("/", 1)[-1]
            if info.type != pafs.FileType.File or name.startswith((".", "_")):
                continue  # temporary files of unfinished writes, and markers
            rnd = None
            if spec.partitioned:
                folder = rel.split("/", 1)[0]
                if not folder.startswith("round=") or "/" not in rel:
                    raise StoreError(f"{info.path}: stray file in partitioned table {spec.name!r} (expected round=N/...)")
                rnd = int(folder.removeprefix("round="))
                if wanted is not None and rnd not in wanted:
                    continue
            out.append((info.path, rnd))
        return sorted(out)

    # ----- validation ------------------------------------------------------------------------------
    def _validate(self, spec: Table, t: pa.Table) -> None:
        rows = t.to_pylist()
        if spec.name == "comparisons":
            known = self._response_ids()
            for i, row in enumerate(rows):
                where = f"comparisons row {i} (comparison_id={row['comparison_id']})"
                p = row["p_a"]
                if p is not None and (math.isnan(p) or not 0.0 <= p <= 1.0):
                    raise StoreError(f"{where}: p_a={p} is not a probability in [0, 1]")
                if row["label"] is not None and row["label"] not in LABELS:
                    raise StoreError(f"{where}: label={row['label']!r} is not one of {LABELS} or null")
                if row["n_votes"] < 0:
                    raise StoreError(f"{where}: n_votes={row['n_votes']} is negative")
                for col in ("a_id", "b_id"):
                    if row[col] not in known:
                        raise StoreError(f"{where}: {col}={row[col]!r} is not a stored response")
        elif spec.name == "logprobs":
            known = self._response_ids()
            for i, row in enumerate(rows):
                where = f"logprobs row {i} (response_id={row['response_id']})"
                if math.isnan(row["logp"]) or row["logp"] > 1e-6:
                    raise StoreError(f"{where}: logp={row['logp']} is not a log-probability")
                if row["response_id"] not in known:
                    raise StoreError(f"{where}: response_id={row['response_id']!r} is not a stored response")
        elif spec.name == "responses":
            known = {k[0] for k in self.keys("prompts")}
            for i, row in enumerate(rows):
                if row["prompt_id"] not in known:
                    raise StoreError(f"responses row {i} (response_id={row['response_id']}): prompt_id={row['prompt_id']!r} is not a stored prompt")

    def _response_ids(self) -> set[str]:
        return {k[0] for k in self.keys("responses")}


def _abspath(root: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(root))


def _table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise StoreError(f"unknown table {name!r}; the store has {sorted(TABLES)}") from None


def _to_arrow(spec: Table, rows: Rows) -> pa.Table:
    """Columns as given. In a DataFrame NaN means missing (the pandas convention); in a list of
    dicts None is missing and NaN is a value, which validation then refuses."""
    if isinstance(rows, pa.Table):
        rows = rows.to_pandas()
    from_pandas = isinstance(rows, pd.DataFrame)
    if from_pandas:
        names, n = list(rows.columns), len(rows)
        column = lambda name: list(rows[name])  # noqa: E731
    else:
        rows = list(rows)
        names, n = list(dict.fromkeys(k for r in rows for k in r)), len(rows)
        column = lambda name: [r.get(name) for r in rows]  # noqa: E731
    if n == 0:
        return spec.schema.empty_table()
    missing = [f.name for f in spec.schema if f.name not in names and not f.nullable]
    if missing:
        raise StoreError(f"{spec.name}: missing required column(s) {missing}")
    extra = [c for c in names if c not in spec.schema.names]
    if extra:
        raise StoreError(f"{spec.name}: unknown column(s) {extra}; the table has {spec.schema.names}")
    columns = {}
    for field in spec.schema:
        values = column(field.name) if field.name in names else [None] * n
        try:
            arr = pa.array(values, type=field.type, from_pandas=from_pandas)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise StoreError(f"{spec.name}.{field.name}: values do not fit type {field.type} ({e})") from None
        if not field.nullable and arr.null_count:
            row = next(i for i, v in enumerate(arr.is_null().to_pylist()) if v)
            raise StoreError(f"{spec.name} row {row}: column {field.name!r} is required but missing")
        columns[field.name] = arr
    return pa.table(columns, schema=spec.schema)


def _rounds_of(t: pa.Table) -> list[int]:
    return sorted(set(t["round"].to_pylist()))


def _key_tuples(t: pa.Table, key: Sequence[str]) -> list[tuple]:
    return list(zip(*(t[c].to_pylist() for c in key))) if t.num_rows else []


def _drop_duplicate_keys(t: pa.Table, key: Sequence[str]) -> pa.Table:
    seen: set[tuple] = set()
    keep = []
    for i, k in enumerate(_key_tuples(t, key)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return t if len(keep) == t.num_rows else t.take(pa.array(keep, pa.int64()))


def _check_schema(got: pa.Schema, spec: Table, path: str) -> None:
    """Refuse a file whose columns are not its table's; a file written before nullable columns were
    added to the table passes (it reads them as nulls: ``_with_added_columns``)."""
    have = pa.schema([f for f in spec.file_schema if f.name in got.names or not f.nullable])
    if not got.equals(have, check_metadata=False):
        raise StoreError(f"{path}: schema does not match table {spec.name!r}: {_schema_diff(got, spec.file_schema)}")


def _with_added_columns(t: pa.Table, want: pa.Schema) -> pa.Table:
    """``t`` with ``want``'s columns in its order, those a file lacks (checked nullable) as nulls."""
    for f in want:
        if f.name not in t.schema.names:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t.select(want.names)


def _schema_diff(got: pa.Schema, want: pa.Schema) -> str:
    g = {f.name: f.type for f in got}
    w = {f.name: f.type for f in want}
    notes = [f"missing {n!r}" for n in w if n not in g]
    notes += [f"unexpected {n!r}" for n in g if n not in w]
    notes += [f"{n!r} is {g[n]}, expected {w[n]}" for n in w if n in g and g[n] != w[n]]
    return "; ".join(notes) or "column order differs"
