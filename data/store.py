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
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

    def __init__(self, root: str | object, *, must_exist: bool = False):
        root = str(root)
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.uri = root
        else:
            self.fs, self.root = pafs.LocalFileSystem(), _abspath(root)
            self.uri = self.root
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if must_exist and self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            raise StoreError(f"{self.uri}: no store there (the path does not exist)")

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
        when any row is bad. Only the partitions of the rows' rounds are read: its cost does not grow
        with the rest of the store.
        """
        spec = _table(table)
        new = _to_arrow(spec, rows)
        self._validate(spec, new)
        stored = self.read_arrow(table, rounds=_rounds_of(new) if spec.partitioned else None, columns=spec.key)
        new = _drop_duplicate_keys(new, spec.key)  # inside the batch too
        new = new.filter(pc.invert(pc.is_in(_key_array(new, spec.key), value_set=_key_array(stored, spec.key))))
        if new.num_rows == 0:
            return new.to_pandas()
        groups = [(r, new.filter(pc.equal(new["round"], r))) for r in _rounds_of(new)] if spec.partitioned else [(None, new)]
        for rnd, part in groups:
            digest = stable_hash(*sorted(_key_array(part, spec.key).to_pylist()))
            self._write_file(spec, rnd, f"part-{digest}.parquet", part)
        return new.to_pandas()

    def _write_file(self, spec: Table, rnd: int | None, name: str, rows: pa.Table, metadata: dict | None = None) -> str:
        body = rows.drop_columns(["round"]) if spec.partitioned else rows
        body = body.select(spec.file_schema.names).cast(spec.file_schema)
        if metadata:
            body = body.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
        buf = io.BytesIO()
        pq.write_table(body, buf)
        path = self.path(_folder(spec, rnd), name)
        self._atomic_write(path, lambda out: out.write(buf.getvalue()))
        return path

    def read_arrow(
        self,
        table: str,
        *,
        rounds: Iterable[int] | None = None,
        columns: Sequence[str] | None = None,
        where: pc.Expression | None = None,
        dictionary: Sequence[str] = (),
    ) -> pa.Table:
        """The stored rows of ``table``, one row per key: only the partitions of ``rounds`` (all when
        None), only ``columns`` (and the key) off the disk, and only rows matching ``where`` (a
        ``pyarrow.compute`` expression on the files' columns, e.g. ``pc.field("policy_version") == "v3"``,
        pushed down to the Parquet reader). String columns in ``dictionary`` come back dictionary-encoded,
        as Parquet stores them: far cheaper to read and compare when values repeat (prompt and oracle ids)."""
        spec = _table(table)
        out_names = [n for n in spec.schema.names if not columns or n in columns or (n in spec.key and not spec.key_names_round)]
        with_key = list(dict.fromkeys([*out_names, *spec.key]))

        def read_one(partition) -> list[pa.Table]:
            """One partition's rows, one per key; the key column comes off the disk only where a key can
            be stored twice (a partition of several files, or a table whose keys span partitions)."""
            folder, rnd, files = partition
            names = with_key if len(files) > 1 or not spec.key_names_round else out_names
            found = self._read_partition(spec, folder, rnd, files, names, pa.schema([spec.schema.field(n) for n in names]), where, dictionary)
            if spec.key_names_round and len(found) > 1:
                found = [_drop_duplicate_keys(pa.concat_tables(found), spec.key)]
            return [t.select(out_names) for t in found]

        partitions = self._partitions(spec, rounds=rounds)
        if len(partitions) > 4:  # Arrow reads without the GIL: partitions in parallel (a campaign's hundreds of rounds)
            with ThreadPoolExecutor(max_workers=READERS) as pool:
                parts = [t for found in pool.map(read_one, partitions) for t in found]
        else:
            parts = [t for p in partitions for t in read_one(p)]
        out = pa.concat_tables(parts) if parts else pa.schema([spec.schema.field(n) for n in out_names]).empty_table()
        if not spec.key_names_round:
            out = _drop_duplicate_keys(out, spec.key)
        return out.select(list(columns)) if columns else out

    def _read_partition(self, spec: Table, folder: str, rnd: int | None, files: list[str], names, schema, where, dictionary=()) -> list[pa.Table]:
        """A partition's live files, read."""
        return self._relisting(folder, files, lambda live: [self._read_file(spec, f"{folder}/{name}", rnd, names, schema, where, dictionary) for name in live])

    def _relisting(self, folder: str, names: list[str], use):
        """``use(live file names)``, with the partition listed again when a compaction replaced a file
        since the listing (the listed file is gone: its rows are in the merged file)."""
        for attempt in range(RELISTS):
            try:
                return use(self._live(folder, names))
            except FileNotFoundError:
                if attempt == RELISTS - 1:
                    raise
                names = self._names_in(folder)

    def _read_file(self, spec: Table, path: str, rnd: int | None, names: list[str], schema: pa.Schema, where, dictionary=()) -> pa.Table:
        try:
            with self.fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f, read_dictionary=[n for n in dictionary if n in names] or None)
                _check_schema(_decoded(parquet.schema_arrow), spec, path)
                # only the columns asked for come off the disk (responses' texts and tokens are most of it)
                have = parquet.schema_arrow.names
                present = [n for n in names if n in have]
                migrate = spec.migration is not None and any(n in spec.migration[0] and n not in have for n in names)
                if migrate:  # a file from before some typed columns: read what they are computed from
                    present += [n for n in spec.migration[1] if n not in present]
                as_dictionary = [n for n in dictionary if n in present] or None
                t = parquet.read(columns=present) if where is None else pq.read_table(f, columns=present, filters=where, read_dictionary=as_dictionary)
                if migrate:
                    t = spec.migration[2](t)
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{path}: unreadable Parquet file in table {spec.name!r} ({e}); `nashflow check {self.uri}` lists every such file and what to do") from e
        if spec.partitioned and "round" in names:
            t = t.append_column("round", pa.array([rnd] * t.num_rows, pa.int64()))
        t = _with_added_columns(t, schema)
        for name in dictionary:  # a column the file lacks, or one a migration computed, comes back plain
            if name in t.column_names and not pa.types.is_dictionary(t.schema.field(name).type):
                t = t.set_column(t.schema.get_field_index(name), name, pc.dictionary_encode(t[name]))
        return t

    def read(self, table: str, *, rounds: Iterable[int] | None = None, columns: Sequence[str] | None = None, where: pc.Expression | None = None) -> pd.DataFrame:
        return self.read_arrow(table, rounds=rounds, columns=columns, where=where).to_pandas()

    def keys(self, table: str, *, rounds: Iterable[int] | None = None) -> set[tuple]:
        spec = _table(table)
        return set(_key_tuples(self.read_arrow(table, rounds=rounds, columns=spec.key), spec.key))

    def rounds(self, table: str) -> list[int]:
        """The rounds that have a partition in ``table``."""
        return sorted({rnd for _, rnd in self._files(_table(table), None)})

    def files(self, table: str, *, rounds: Iterable[int] | None = None) -> list[str]:
        """The live Parquet files of ``table``: what a reader reads (a compacted file, not those it replaced)."""
        return [path for path, _ in self._files(_table(table), rounds)]

    def _files(self, spec: Table, rounds: Iterable[int] | None) -> list[tuple[str, int | None]]:
        out = []
        for folder, rnd, names in self._partitions(spec, rounds=rounds):
            out += self._relisting(folder, names, lambda live: [(f"{folder}/{name}", rnd) for name in live])  # noqa: B023 - called at once
        return sorted(out)

    def _partitions(self, spec: Table, *, rounds: Iterable[int] | None = None, strict: bool = True) -> list[tuple[str, int | None, list[str]]]:
        """(folder, round, Parquet file names) of each partition (one for an unpartitioned table), only
        those of ``rounds`` when given. With ``strict``, a stray file in a partitioned table is an error;
        otherwise it is left out."""
        base = self.path(spec.name)
        wanted = None if rounds is None else {int(r) for r in rounds}
        if wanted is not None and spec.partitioned:  # list only the partitions asked for
            found = [(f"{base}/round={r}", r, self._names_in(f"{base}/round={r}")) for r in sorted(wanted)]
            return [p for p in found if p[2]]
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        folders: dict[str, tuple[int | None, list[str]]] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = info.path[len(base) + 1 :]
            folder, _, name = rel.rpartition("/")
            if info.type != pafs.FileType.File or not _is_data(name):
                continue
            rnd = None
            if spec.partitioned:
                if not folder.startswith("round=") or "/" in folder:
                    if strict:
                        raise StoreError(f"{info.path}: stray file in partitioned table {spec.name!r} (expected round=N/...); move it out of the store")
                    continue
                rnd = int(folder.removeprefix("round="))
            elif folder:
                continue
            folders.setdefault(f"{base}/{folder}" if folder else base, (rnd, []))[1].append(name)
        return sorted(((folder, rnd, sorted(names)) for folder, (rnd, names) in folders.items()), key=lambda x: x[0])

    def _names_in(self, folder: str) -> list[str]:
        """The data files directly in ``folder`` (none when it does not exist)."""
        selector = pafs.FileSelector(folder, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File and _is_data(info.base_name))

    def _live(self, folder: str, names: list[str]) -> list[str]:
        """A partition's files less those a compacted file replaced (named in its footer)."""
        dead: set[str] = set()
        for name in names:
            if name.startswith(COMPACTED):
                try:
                    dead |= set(_replaced(pq.read_metadata(f"{folder}/{name}", filesystem=self.fs)))
                except FileNotFoundError:
                    raise
                except (pa.ArrowInvalid, OSError):
                    continue  # unreadable: the read of it reports it
        return [n for n in names if n not in dead]

    # ----- upkeep: compaction and integrity --------------------------------------------------------
    def compact(self, table: str | None = None, *, rounds: Iterable[int] | None = None) -> dict[str, dict[str, int]]:
        """Merge each partition's files into one (per table: ``{"files_before", "files_after"}``); only
        the partitions of ``rounds`` when given (a campaign compacts each round it finishes).

        The merged file is written atomically and names, in its footer, the files it replaces; readers
        skip those from then on (``_live``), so a reader running at the same time reads either the old
        files or the merged one, never both or neither; then the replaced files are deleted. Rows and
        keys are kept as they are; a file written during compaction is not replaced.
        """
        report = {}
        for spec in [_table(table)] if table else TABLES.values():
            if rounds is not None and not spec.partitioned:
                continue
            before = after = 0
            for folder, rnd, names in self._partitions(spec, rounds=rounds):
                live = self._live(folder, names)
                before += len(live)
                if len(live) > 1:
                    rows = _drop_duplicate_keys(pa.concat_tables([self._read_file(spec, f"{folder}/{n}", rnd, spec.schema.names, spec.schema, None) for n in live]), spec.key)
                    self._write_file(spec, rnd, f"{COMPACTED}{stable_hash(*live)}.parquet", rows, {REPLACES: json.dumps(live)})
                dead = set(names) - set(live)  # replaced by a merged file before (a compaction killed half-way)
                if len(live) > 1:
                    dead |= set(live)  # replaced by the one just written
                for name in sorted(dead):
                    self._remove(f"{folder}/{name}")
                after += min(len(live), 1)
            report[spec.name] = {"files_before": before, "files_after": after}
        return report

    def _remove(self, path: str) -> None:
        self.fs.delete_file(path)

    def check(self) -> list["Problem"]:
        """Read every file of every table; return each problem with its path and what to do: unreadable
        or foreign files, a key stored twice with different contents, references that do not resolve.
        An empty list: the store is sound."""
        problems: list[Problem] = []
        tables: dict[str, pa.Table] = {}
        for spec in TABLES.values():
            parts, files = [], []
            for folder, rnd, names in self._partitions(spec, strict=False):
                for name in self._live(folder, names):
                    path = f"{folder}/{name}"
                    try:
                        parts.append(self._read_file(spec, path, rnd, spec.schema.names, spec.schema, None))
                        files += [path] * parts[-1].num_rows
                    except StoreError as e:
                        problems.append(Problem(path, str(e).split(" (", 1)[0].removeprefix(f"{path}: "), MOVE_ASIDE))
            problems += self._stray(spec)
            rows = pa.concat_tables(parts) if parts else spec.schema.empty_table()
            unique = _drop_duplicate_keys(rows, spec.key)
            if unique.num_rows < rows.num_rows:
                problems += _conflicting_copies(spec, rows, files)
            tables[spec.name] = unique
        for table, column, target in REFERENCES:
            known = tables[target][TABLES[target].key[0]]
            bad = tables[table].filter(pc.invert(pc.is_in(tables[table][column], value_set=known)))
            if bad.num_rows:
                example = bad[column][0].as_py()
                problems.append(Problem(self.path(table), f"{bad.num_rows} {table} row(s) refer to {column}s that {target} does not hold (e.g. {example!r})", f"restore the missing {target} files, or move the {table} files of those rounds aside and rerun the rounds"))
        return problems

    def _stray(self, spec: Table) -> list["Problem"]:
        known = {folder for folder, _, _ in self._partitions(spec, strict=False)}
        base = self.path(spec.name)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        return [
            Problem(info.path, f"stray file in table {spec.name!r}", "move it out of the store")
            for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if info.type == pafs.FileType.File and _is_data(info.base_name) and info.path.rpartition("/")[0] not in known
        ]

    def verify_files(self) -> None:
        """Open the footer of every live file: a quick check (no data read) that raises StoreError
        naming an unreadable file. ``check`` reads everything."""

        def footer(entry: tuple[Table, str]) -> str | None:
            spec, path = entry
            try:
                _check_schema(pq.read_schema(path, filesystem=self.fs), spec, path)
            except FileNotFoundError:
                return None  # compacted away since the listing
            except (pa.ArrowInvalid, OSError) as e:
                return f"{path}: unreadable Parquet file in table {spec.name!r} ({_first_line(e)}); `nashflow check {self.uri}` lists every problem and what to do"
            except StoreError as e:
                return f"{e}; `nashflow check {self.uri}` lists every problem and what to do"
            return None

        entries = [(spec, path) for spec in TABLES.values() for path, _ in self._files(spec, None)]
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            problem = next((p for p in pool.map(footer, entries) if p), None)
        if problem:
            raise StoreError(problem)

    # ----- validation ------------------------------------------------------------------------------
    def _validate(self, spec: Table, t: pa.Table) -> None:
        """Refuse bad rows, naming the first; vectorized, and references are looked up in the rows'
        own rounds first (where a stage's rows find them), the other rounds only for what is left."""
        if spec.name == "comparisons":
            p = t["p_a"]
            _refuse(spec, t, pc.and_(pc.is_valid(p), pc.or_(pc.is_nan(p), pc.or_(pc.less(p, 0.0), pc.greater(p, 1.0)))), "p_a", "is not a probability in [0, 1]")
            label = t["label"]
            _refuse(spec, t, pc.and_(pc.is_valid(label), pc.invert(pc.is_in(label, value_set=pa.array(LABELS)))), "label", f"is not one of {LABELS} or null")
            _refuse(spec, t, pc.less(t["n_votes"], 0), "n_votes", "is negative")
            for column in ("a_id", "b_id"):
                self._refuse_unknown(spec, t, column, "responses", "is not a stored response")
        elif spec.name == "logprobs":
            logp = t["logp"]
            _refuse(spec, t, pc.or_(pc.is_nan(logp), pc.greater(logp, 1e-6)), "logp", "is not a log-probability")
            self._refuse_unknown(spec, t, "response_id", "responses", "is not a stored response")
        elif spec.name == "scores":
            _refuse(spec, t, pc.invert(pc.is_finite(t["score"])), "score", "is not a finite number")
            self._refuse_unknown(spec, t, "response_id", "responses", "is not a stored response")
        elif spec.name == "responses":
            self._refuse_unknown(spec, t, "prompt_id", "prompts", "is not a stored prompt")

    def _refuse_unknown(self, spec: Table, t: pa.Table, column: str, target: str, what: str) -> None:
        ids = t[column]
        key = TABLES[target].key[0]
        near = self.read_arrow(target, rounds=_rounds_of(t) if TABLES[target].partitioned else None, columns=[key])[key]
        unknown = pc.invert(pc.is_in(ids, value_set=near))
        if TABLES[target].partitioned and pc.any(unknown).as_py():
            rest = pc.unique(ids.filter(unknown))
            found = self.read_arrow(target, columns=[key], where=pc.field(key).isin(rest))[key]
            unknown = pc.and_(unknown, pc.invert(pc.is_in(ids, value_set=found)))
        _refuse(spec, t, unknown, column, what)


@dataclass(frozen=True)
class Problem:
    """One thing ``Store.check`` found: where, what, and what to do about it."""

    path: str
    what: str
    todo: str


READERS = min(8, os.cpu_count() or 1)  # threads reading partitions at once
RELISTS = 20  # times a reader lists a partition again after a compaction replaced a file it listed
COMPACTED = "compact-"  # a merged file's name starts so; its footer lists the files it replaces
REPLACES = "nashflow.replaces"
MOVE_ASIDE = "move the file out of the store and run its round again: the stages redo only what is missing"
REFERENCES = (("comparisons", "a_id", "responses"), ("comparisons", "b_id", "responses"), ("logprobs", "response_id", "responses"), ("scores", "response_id", "responses"), ("responses", "prompt_id", "prompts"))


def _is_data(name: str) -> bool:
    """Not a temporary file of an unfinished write, nor a marker."""
    return not name.startswith((".", "_"))


def _replaced(metadata: pq.FileMetaData) -> list[str]:
    raw = (metadata.metadata or {}).get(REPLACES.encode())
    return json.loads(raw) if raw else []


def _folder(spec: Table, rnd: int | None) -> str:
    return spec.name if rnd is None else f"{spec.name}/round={rnd}"


def _refuse(spec: Table, t: pa.Table, bad: pa.ChunkedArray | pa.Array, column: str, what: str) -> None:
    """Raise naming the first row where ``bad`` holds (its key, the column and its value)."""
    i = pc.index(pc.fill_null(bad, False), True).as_py()
    if i is not None and i >= 0:
        key = ", ".join(f"{k}={t[k][i].as_py()}" for k in spec.key)
        raise StoreError(f"{spec.name} row {i} ({key}): {column}={t[column][i].as_py()!r} {what}")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


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
        return _arrow_rows(spec, rows)
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


def _arrow_rows(spec: Table, rows: pa.Table) -> pa.Table:
    """An Arrow table's columns cast to the table's schema, with the same checks as other rows."""
    missing = [f.name for f in spec.schema if f.name not in rows.column_names and not f.nullable]
    extra = [c for c in rows.column_names if c not in spec.schema.names]
    if missing or extra:
        raise StoreError(f"{spec.name}: " + "; ".join(([f"missing required column(s) {missing}"] if missing else []) + ([f"unknown column(s) {extra}; the table has {spec.schema.names}"] if extra else [])))
    columns = {}
    for field in spec.schema:
        if field.name not in rows.column_names:
            columns[field.name] = pa.nulls(rows.num_rows, field.type)
            continue
        try:
            columns[field.name] = rows[field.name].cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise StoreError(f"{spec.name}.{field.name}: values do not fit type {field.type} ({e})") from None
        if not field.nullable and columns[field.name].null_count:
            row = pc.index(pc.is_null(columns[field.name]), True).as_py()
            raise StoreError(f"{spec.name} row {row}: column {field.name!r} is required but missing")
    return pa.table(columns, schema=spec.schema)


def _rounds_of(t: pa.Table) -> list[int]:
    return sorted(set(t["round"].to_pylist()))


def _key_tuples(t: pa.Table, key: Sequence[str]) -> list[tuple]:
    return list(zip(*(t[c].to_pylist() for c in key))) if t.num_rows else []


def _key_array(t: pa.Table, key: Sequence[str]) -> pa.ChunkedArray:
    """One string per row standing for its key (the columns joined by a separator no id contains)."""
    columns = [pc.cast(t[c], pa.string()) for c in key]
    return columns[0] if len(columns) == 1 else pc.binary_join_element_wise(*columns, "\x1f")


def _drop_duplicate_keys(t: pa.Table, key: Sequence[str]) -> pa.Table:
    """The first row of each key, in the table's order."""
    keys = _key_array(t, key)
    if t.num_rows == 0 or pc.count_distinct(keys).as_py() == t.num_rows:
        return t
    first = pa.table({"k": keys, "i": pa.array(range(t.num_rows), pa.int64())}).group_by("k", use_threads=False).aggregate([("i", "min")])
    rows = first["i_min"]
    return t.take(pc.take(rows, pc.sort_indices(rows)))


def _conflicting_copies(spec: Table, rows: pa.Table, files: list[str]) -> list[Problem]:
    """A problem for each key stored more than once with different contents (identical copies, left by
    racing writers, are harmless: readers keep one)."""
    by_key: dict[tuple, list[int]] = {}
    for i, key in enumerate(_key_tuples(rows, spec.key)):
        by_key.setdefault(key, []).append(i)
    problems = []
    for key, where in by_key.items():
        copies = [rows.slice(i, 1).to_pylist()[0] for i in where]
        if len(where) > 1 and any(c != copies[0] for c in copies[1:]):
            named = ", ".join(f"{k}={v!r}" for k, v in zip(spec.key, key))
            paths = sorted({files[i] for i in where})
            problems.append(Problem(paths[0], f"{spec.name}: {named} is stored with different contents in {len(paths)} files: {', '.join(paths)}", "readers keep the row of the first file by name; move the wrong file out of the store"))
    return problems


def _check_schema(got: pa.Schema, spec: Table, path: str) -> None:
    """Refuse a file whose columns are not its table's; a file written before nullable columns were
    added to the table passes (it reads them as nulls: ``_with_added_columns``)."""
    have = pa.schema([f for f in spec.file_schema if f.name in got.names or not f.nullable])
    if not got.equals(have, check_metadata=False):
        raise StoreError(f"{path}: schema does not match table {spec.name!r}: {_schema_diff(got, spec.file_schema)}")


def _decoded(schema: pa.Schema) -> pa.Schema:
    """The schema with dictionary-read columns as the plain types they are stored as."""
    return pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema], metadata=schema.metadata)


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
