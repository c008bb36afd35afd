"""The LLM judge through the OpenAI Batch API: the same questions as the online judge at the batch price
(about half), answered within a completion window of up to 24 h. A queued oracle, like people:

    judge = BatchJudge(LLMJudge(cfg), store, BatchSettings(discount=0.5, on_failure="resubmit"))
    judge.submit(pairs, round=r)      # JSONL → files.create(purpose="batch") → batches.create; ids recorded
    judge.collect()                   # finished batches → judgments written to the store (returned)
    judge.pending(round=r)            # pairs still in a batch that has not been collected

**The same questions, the same answers.** Each pair's orders are the online judge's request bodies
(``llm_judge.request_body``: its template, a fresh fence tag per request, its logprobs or ``n`` votes),
and each answer is read by the online judge's own functions (``read_choices`` → ``pair_judgment``), so a
pair gets the same P(a ≻ b), abstention and ``detail`` either way, and the same ``oracle_id``: the mode
changes where and when the question is asked, not its answer. The batch price is the online price times
``discount`` (what ``cost_usd`` says and what the budget counts).

**Nothing judged twice, nothing lost, no state outside the store.** A request's ``custom_id`` is
``<comparison_id>:<order>`` (ab, or ba for b shown first), so an answer maps back to its pair by its key.
Every batch has a record in the store (``judge_batches/round-<r>/<key>.json``, written atomically), created before
anything is uploaded; its key is a hash of the oracle, the round and the pairs' comparison ids (and of
its parent batch when it is a resubmission), so a crashed or resumed round that submits the same pairs
finds the same record and never creates a second batch:

- killed before the upload finished, or after it but before the file id was recorded: the file is
  looked up by its name (``nashflow-<key>.jsonl``) and uploaded only when it is not there;
- killed after ``batches.create`` but before the batch id was recorded: the batch is looked up by its
  metadata (``nashflow_key``) and created only when it is not there;
- killed while collecting: answers are written to the store (keyed, so a repeat adds nothing) before the
  record is marked collected, and a resubmission's record key is deterministic.

**Failures.** A request in the error file, or left unanswered by an expired, failed or cancelled batch,
fails its pair (both orders are asked again, so the two answers of a pair always come from one
attempt). ``on_failure="resubmit"`` puts the failed pairs into a new batch (at most ``max_resubmits``
times); ``"online"`` asks the online judge at once (full price). A pair that has used up its attempts is
recorded as given up in its batch's record and reported, not stored: rerunning the round does not ask
it again (delete the record to do so). An unreadable answer is an abstention, stored like the online
judge's.

**Budget.** Before a batch is created its pairs are admitted one by one at their worst case (every
prompt byte a token, every answer ``max_tokens``) at the batch price against ``budget_usd`` minus what
the round's batches already hold (their true cost once collected, their reservation before), so no
crash, resume or resubmission spends past it. Pairs that do not fit are not submitted; a later run
asks them again.

The API key lives in the ``LLMJudge``'s config as a ``Secret``; it is handed to the client only, and
never written to a record, a file sent to the server, a log record or an error message.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass

import openai

from data.keys import comparison_id, stable_hash
from oracles.budget import Budget
from oracles.llm_judge import LLMJudge, OrderAnswers, pair_judgment, read_choices, request_body, worst_case_usd
from oracles.protocol import Judgment, Pair
from oracles.resume import pairs_from_keys, unjudged

log = logging.getLogger(__name__)

RECORDS = "judge_batches"  # store folder: round-<r>/<key>.json, one record per batch; open/<key>.json until collected
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
ORDERS = ("ab", "ba")  # a shown first; b shown first
_CLOCK_SKEW_S = 600  # the server's clock may differ from ours: look that much further back


@dataclass(frozen=True)
class BatchSettings:
    """How the batch judge submits, prices and recovers. None of it changes answers."""

    discount: float = 0.5  # batch price = online price × discount (OpenAI: 50% off)
    on_failure: str = "resubmit"  # failed or expired requests: "resubmit" in a new batch, or "online"
    max_resubmits: int = 2  # new batches per pair after its first, before it is given up
    completion_window: str = "24h"
    max_requests: int = 50_000  # requests per batch (the OpenAI API's limit)

    def __post_init__(self):
        if not 0 < self.discount <= 1:
            raise ValueError(f"batch discount must be in (0, 1], got {self.discount}")
        if self.on_failure not in ("resubmit", "online"):
            raise ValueError(f"batch on_failure must be 'resubmit' or 'online', got {self.on_failure!r}")
        if self.max_resubmits < 0 or self.max_requests < 2:
            raise ValueError("batch max_resubmits must be ≥ 0 and max_requests ≥ 2")


class BatchJudge:
    """A queued oracle (``submit`` / ``collect`` / ``pending``) asking ``judge``'s questions through the
    Batch API. ``store``: a ``data.Store`` (its records, and the comparisons it writes)."""

    def __init__(self, judge: LLMJudge, store, settings: BatchSettings = BatchSettings(), *, client: openai.OpenAI | None = None):
        self.online = judge
        self.oracle_id = judge.oracle_id
        self.store = store
        self.settings = settings
        cfg = judge.config
        # the batch price table: every model's online price times the discount
        self.config = dataclasses.replace(cfg, prices={m: (p * settings.discount, c * settings.discount) for m, (p, c) in cfg.prices.items()})
        self._client = client

    def __repr__(self) -> str:
        return f"BatchJudge({self.oracle_id!r}, base_url={self.config.base_url!r})"

    def __getstate__(self):
        raise TypeError("a BatchJudge holds its API key and is not pickled; pass its config and build it where it is used")

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            cfg = self.config
            key = cfg.api_key.get() if cfg.api_key is not None else "none"
            self._client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=max(cfg.timeout_s, 120.0), max_retries=2)
        return self._client

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        """Ask online, now, at the online price (same oracle id): for the few pairs that cannot wait,
        e.g. a held-out evaluation."""
        return self.online.judge(pairs)

    # ----- the queued-oracle protocol --------------------------------------------------------------
    def submit(self, pairs: list[Pair], *, round: int) -> dict:
        """Put the pairs that have no stored judgment and no batch yet into new batches (idempotent), and
        finish any of this round's batches a crash left unsubmitted. Returns counts."""
        records = self.records(round=round)
        for r in records:  # a crash between the record and the batch: finish what it started
            if r["state"] == "new":
                self._send(r, pairs_by_key(pairs))
        in_batches = {tuple(k) for r in records for k in r["pairs"]}
        todo = [p for p in unjudged(pairs, self.oracle_id, self.store, rounds=[round]) if (p.prompt_id, p.a_id, p.b_id) not in in_batches]
        admitted, over_budget = self._admit(todo, round=round)
        per_batch = self.settings.max_requests // 2
        created = 0
        for start in range(0, len(admitted), per_batch):
            record = self._record(admitted[start : start + per_batch], round=round)
            self._send(record, pairs_by_key(pairs))
            created += 1
        if over_budget:
            log.info("batch judge: %d pairs do not fit the budget; a later run asks them", len(over_budget))
        return {"batches_created": created, "pairs_submitted": len(admitted), "over_budget": len(over_budget), "already_in_batches": len(in_batches)}

    def collect(self) -> list[Judgment]:
        """Collect every finished batch: its answers into the store, its failed pairs resubmitted or asked
        online (``on_failure``). Returns the judgments stored now."""
        stored = []
        for record in self._open_records():
            if record["state"] == "new":  # its round died before sending it: send it now, texts from the store
                self._send(record, pairs_by_key(pairs_from_keys(self.store, [tuple(k) for k in record["pairs"]], round=record["round"])))
            stored += self._collect(record)
        return stored

    def pending(self, *, round: int | None = None) -> int:
        """Pairs in batches not collected yet (of ``round``, or of every round)."""
        records = self.records(round=round) if round is not None else self._open_records()
        return sum(len(r["pairs"]) for r in records if r["state"] != "collected")

    def status(self, *, round: int) -> dict:
        """The round's batches at a glance: pairs pending, batches by state, pairs given up, cost held."""
        records = self.records(round=round)
        states: dict[str, int] = {}
        for r in records:
            states[r["state"]] = states.get(r["state"], 0) + 1
        return {
            "batch/pending": sum(len(r["pairs"]) for r in records if r["state"] != "collected"),
            "batch/batches": len(records),
            **{f"batch/{s}": n for s, n in sorted(states.items())},
            "batch/given_up": sum(len(r.get("given_up", [])) for r in records),
            "batch/cost_usd": sum(_held_usd(r) for r in records),
        }

    # ----- records ---------------------------------------------------------------------------------
    def records(self, *, round: int) -> list[dict]:
        """The round's batch records (this oracle's), oldest generation first."""
        folder = f"{RECORDS}/round-{round}"
        out = [json.loads(self.store.read_bytes(f"{folder}/{n}")) for n in self.store.list_files(folder) if n.endswith(".json")]
        return sorted((r for r in out if r["oracle_id"] == self.oracle_id), key=lambda r: (r["generation"], r["key"]))

    def _open_records(self) -> list[dict]:
        """The records not collected yet, of every round: read through their small open markers, so
        collecting does not reread a long campaign's finished batches."""
        out = []
        for name in self.store.list_files(f"{RECORDS}/open"):
            marker = json.loads(self.store.read_bytes(f"{RECORDS}/open/{name}"))
            path = _record_path(marker["round"], marker["key"])
            if not self.store.exists(path):  # killed between the marker and its record: nothing was sent
                self.store.delete(f"{RECORDS}/open/{name}")
                continue
            record = json.loads(self.store.read_bytes(path))
            if record["oracle_id"] == self.oracle_id:
                out.append(record)
        return sorted(out, key=lambda r: (r["round"], r["generation"], r["key"]))

    def _save(self, record: dict) -> None:
        self.store.write_bytes(_record_path(record["round"], record["key"]), json.dumps(record, sort_keys=True, indent=1).encode())
        if record["state"] == "collected":
            self.store.delete(f"{RECORDS}/open/{record['key']}.json")

    def _record(self, pairs: list[Pair], *, round: int, parent: dict | None = None) -> dict:
        """The record of a batch of ``pairs`` (found again when it exists: its key names its pairs)."""
        keys = [[p.prompt_id, p.a_id, p.b_id] for p in pairs]
        cids = sorted(comparison_id(*k, self.oracle_id) for k in keys)
        key = "b-" + stable_hash(self.oracle_id, round, parent["key"] if parent else "", *cids)
        path = _record_path(round, key)
        if self.store.exists(path):
            return json.loads(self.store.read_bytes(path))
        self.store.write_bytes(f"{RECORDS}/open/{key}.json", json.dumps({"round": round, "key": key}).encode())  # before the record: never an open record without one
        record = {
            "key": key,
            "oracle_id": self.oracle_id,
            "round": round,
            "generation": parent["generation"] + 1 if parent else 0,
            "parent": parent["key"] if parent else None,
            "pairs": keys,
            "reserved_usd": sum(worst_case_usd(self.config, self.online.template, p) for p in pairs),
            "state": "new",  # new → submitted (file and batch ids recorded) → collected
            "file_id": None,
            "batch_id": None,
            "created_at": time.time(),
        }
        self._save(record)
        return record

    # ----- submitting ------------------------------------------------------------------------------
    def _admit(self, pairs: list[Pair], *, round: int) -> tuple[list[Pair], list[Pair]]:
        if self.config.budget_usd is None:
            return pairs, []
        budget = Budget(usd=self.config.budget_usd)
        budget.spend(0, sum(_held_usd(r) for r in self.records(round=round)))
        admitted, refused = [], []
        for p in pairs:
            (admitted if budget.admit(worst_case_usd(self.config, self.online.template, p)) else refused).append(p)
        return admitted, refused

    def _send(self, record: dict, texts: dict[tuple, Pair]) -> None:
        """Upload the record's requests and create its batch, each step only once (see the module
        docstring); the ids go into the record as soon as they are known."""
        name = f"nashflow-{record['key']}.jsonl"
        if record["file_id"] is None:
            record["file_id"] = self._find_file(name, since=record["created_at"])
        if record["file_id"] is None:
            lines = []
            for k in record["pairs"]:
                pair = texts.get(tuple(k))
                if pair is None:
                    raise ValueError(f"batch {record['key']}: the texts of pair {k} were not given; submit the round's pairs again")
                lines += self._requests(pair)
            data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
            record["file_id"] = self.client.files.create(file=(name, io.BytesIO(data), "application/jsonl"), purpose="batch").id
            self._save(record)
        if record["batch_id"] is None:
            record["batch_id"] = self._find_batch(record["key"], since=record["created_at"])
        if record["batch_id"] is None:
            batch = self.client.batches.create(
                input_file_id=record["file_id"], endpoint=ENDPOINT, completion_window=self.settings.completion_window,
                metadata={"nashflow_key": record["key"], "round": str(record["round"])},
            )
            record["batch_id"] = batch.id
        record["state"] = "submitted"
        self._save(record)
        log.info("batch judge: batch %s (%d pairs, round %d) submitted", record["batch_id"], len(record["pairs"]), record["round"])

    def _requests(self, pair: Pair) -> list[dict]:
        cfg = self.config
        cid = comparison_id(pair.prompt_id, pair.a_id, pair.b_id, self.oracle_id)
        orders = ORDERS if cfg.both_orders else ORDERS[:1]
        return [
            {"custom_id": f"{cid}:{o}", "method": "POST", "url": ENDPOINT,
             "body": request_body(cfg, self.online.template, pair, swapped=o == "ba", n=cfg.votes)}
            for o in orders
        ]

    def _find_file(self, name: str, *, since: float) -> str | None:
        """An upload of this record's file (newest first, none older than the record)."""
        for f in self.client.files.list(purpose="batch", order="desc"):
            if f.created_at < since - _CLOCK_SKEW_S:
                return None
            if f.filename == name and f.status != "error":
                return f.id
        return None

    def _find_batch(self, key: str, *, since: float) -> str | None:
        """A batch created for this record (newest first, none older than the record)."""
        for b in self.client.batches.list(limit=100):
            if b.created_at < since - _CLOCK_SKEW_S:
                return None
            if (b.metadata or {}).get("nashflow_key") == key and b.status not in ("failed", "cancelled", "cancelling"):
                return b.id
        return None

    # ----- collecting ------------------------------------------------------------------------------
    def _collect(self, record: dict) -> list[Judgment]:
        batch = self.client.batches.retrieve(record["batch_id"])
        if batch.status not in TERMINAL:
            return []
        answers = self._results(batch.output_file_id) | self._results(batch.error_file_id)
        latency = max(0.0, float((batch.completed_at or batch.expired_at or batch.failed_at or batch.cancelled_at or batch.created_at) - batch.created_at))
        judged, failed, why = [], [], {}
        for k in record["pairs"]:
            pair = Pair(k[0], "", k[1], "", k[2], "")  # the texts are not needed to store a judgment
            j, reason = self._judgment(pair, answers, latency, batch.status)
            if j is None:
                failed.append(pair)
                why[tuple(k)] = reason
            else:
                judged.append(j)
        self.store.write("comparisons", [j.row(self.oracle_id, record["round"]) for j in judged])
        record["cost_usd"] = sum(j.cost_usd for j in judged)
        if failed:
            judged += self._recover(record, failed, why)
        record["state"] = "collected"
        record["status"] = batch.status
        self._save(record)
        log.info("batch judge: batch %s %s: %d pairs stored, %d failed", record["batch_id"], batch.status, len(record["pairs"]) - len(failed), len(failed))
        return judged

    def _results(self, file_id: str | None) -> dict[str, dict]:
        if not file_id:
            return {}
        text = self.client.files.content(file_id).text
        return {line["custom_id"]: line for line in map(json.loads, filter(None, text.splitlines()))}

    def _judgment(self, pair: Pair, answers: dict[str, dict], latency: float, status: str) -> tuple[Judgment | None, str | None]:
        """The pair's judgment from its orders' answers, exactly as the online judge reads them; None
        (and why) when an order has no answer."""
        cfg = self.config
        cid = comparison_id(pair.prompt_id, pair.a_id, pair.b_id, self.oracle_id)
        orders = []
        for o in ORDERS if cfg.both_orders else ORDERS[:1]:
            line = answers.get(f"{cid}:{o}")
            response = (line or {}).get("response") or {}
            body = response.get("body")
            if line is None or response.get("status_code") != 200 or not isinstance(body, dict) or not body.get("choices"):
                error = (line or {}).get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
                code = response.get("status_code")
                reason = error.get("code") or error.get("message") or (f"HTTP {code}" if code else f"no answer (batch {status})")
                return None, str(reason)[:160]
            answered = OrderAnswers(o == "ba", requests=1)
            read_choices(body, answered, cfg.votes, cfg.use_logprobs)
            answered.done = True
            orders.append(answered)
        return pair_judgment(pair, orders, cfg, latency_s=latency), None

    def _recover(self, record: dict, failed: list[Pair], why: dict) -> list[Judgment]:
        """Failed pairs: into a new batch, or to the online judge; given up after ``max_resubmits``."""
        s = self.settings
        if s.on_failure == "online":
            texts = pairs_from_keys(self.store, [(p.prompt_id, p.a_id, p.b_id) for p in failed], round=record["round"])
            got = self.online.judge(texts)
            self.store.write("comparisons", [j.row(self.oracle_id, record["round"]) for j in got if not j.skipped])
            record["online"] = len(got)
            record["cost_usd"] += sum(j.cost_usd for j in got)  # at the online price: the budget counts it too
            record["given_up"] = [[j.pair.prompt_id, j.pair.a_id, j.pair.b_id] for j in got if j.skipped]
            return [j for j in got if not j.skipped]
        if record["generation"] >= s.max_resubmits:
            record["given_up"] = [[p.prompt_id, p.a_id, p.b_id] for p in failed]
            log.warning("batch judge: %d pairs of round %d failed %d times and are given up (first: %s)",
                        len(failed), record["round"], record["generation"] + 1, next(iter(why.values())))
            return []
        texts = pairs_from_keys(self.store, [(p.prompt_id, p.a_id, p.b_id) for p in failed], round=record["round"])
        child = self._record(texts, round=record["round"], parent=record)
        if child["state"] == "new":
            self._send(child, pairs_by_key(texts))
        record["resubmitted"] = child["key"]
        return []


# ----- helpers -------------------------------------------------------------------------------------


def pairs_by_key(pairs: list[Pair]) -> dict[tuple, Pair]:
    return {(p.prompt_id, p.a_id, p.b_id): p for p in pairs}


def _record_path(round: int, key: str) -> str:
    return f"{RECORDS}/round-{round}/{key}.json"


def _held_usd(record: dict) -> float:
    """What a batch holds of the budget: its true cost once collected, its worst case before."""
    return record["cost_usd"] if "cost_usd" in record else record["reserved_usd"]

