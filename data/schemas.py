"""The store's tables, each declared once: columns, key, and whether it is partitioned by round.

The ``round`` column of a partitioned table lives in the hive folder name (``round=3/``), not inside
the Parquet files, so pyarrow, DuckDB or Spark read the store as an ordinary hive dataset.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema  # every column, ``round`` included when partitioned
    key: tuple[str, ...]
    partitioned: bool = True
    # the key names its round (a response's id hashes its round; a comparison's its responses'), so a
    # key is stored in one partition only and readers drop duplicates partition by partition
    key_names_round: bool = False
    # migrate on read: ``(columns a file may lack, the columns they are computed from, the function)``;
    # a file written before those columns existed reads as if written with them
    migration: tuple[tuple[str, ...], tuple[str, ...], Callable[[pa.Table], pa.Table]] | None = None

    @property
    def file_schema(self) -> pa.Schema:
        """The columns stored inside each Parquet file."""
        if not self.partitioned:
            return self.schema
        return self.schema.remove(self.schema.get_field_index("round"))


PROMPTS = Table(
    "prompts",
    pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),  # "train" or "eval"
            pa.field("source", pa.string()),
        ]
    ),
    key=("prompt_id",),
    partitioned=False,
)

RESPONSES = Table(
    "responses",
    pa.schema(
        [
            pa.field("response_id", pa.string(), nullable=False),
            pa.field("round", pa.int64(), nullable=False),
            pa.field("policy_version", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("n_tokens", pa.int32()),
            pa.field("finish_reason", pa.string()),
            # the tokens as the policy sampled them (EOS included when it stopped): what log-probs and
            # training use; null for a response known only by its text (e.g. from an OpenAI-compatible server)
            pa.field("token_ids", pa.list_(pa.int32())),
        ]
    ),
    key=("response_id",),
    key_names_round=True,
)

LOGPROBS = Table(
    "logprobs",
    pa.schema(
        [
            pa.field("response_id", pa.string(), nullable=False),
            pa.field("policy_version", pa.string(), nullable=False),
            pa.field("round", pa.int64(), nullable=False),  # the round in which it was computed
            pa.field("logp", pa.float64(), nullable=False),  # sum over response tokens
        ]
    ),
    key=("response_id", "policy_version"),
)

SCORES = Table(
    "scores",
    pa.schema(
        [
            pa.field("response_id", pa.string(), nullable=False),
            pa.field("oracle_id", pa.string(), nullable=False),  # the reward model's oracle id (its checkpoint's hash)
            pa.field("round", pa.int64(), nullable=False),  # the response's round
            pa.field("score", pa.float64(), nullable=False),  # r(x, y)
        ]
    ),
    key=("response_id", "oracle_id"),
    key_names_round=True,
)

# One step of a pair's route through a cascade (oracles/cascade.py): the stage tried, its oracle, what
# it answered or why it passed the pair on, and what it cost.
ROUTE_STEP = pa.struct(
    [
        pa.field("stage", pa.string()),
        pa.field("oracle", pa.string()),
        pa.field("p_a", pa.float64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("accepted", pa.bool_()),  # its answer is the pair's judgment
        pa.field("submitted", pa.bool_()),  # handed to a queued oracle (people), to be answered later
        pa.field("over_budget", pa.bool_()),
        pa.field("passed_on", pa.bool_()),
        pa.field("error", pa.string()),
    ]
)
ROUTE_FIELDS = tuple(f.name for f in ROUTE_STEP)
ANSWERED = ("answered_by", "stage", "model_version", "route")  # typed since they decide what trains on what
ANSWERED_KEYS = ("answered_by", "stage", "prefmodel", "route")  # the detail keys they came from (and come from, migrating)


def route_step(step: dict) -> dict:
    """A route step as the ``route`` column holds it (unknown keys dropped, missing ones null)."""
    return {name: step.get(name) for name in ROUTE_FIELDS}


def answered_columns(oracle_id: str, detail: dict) -> dict:
    """The typed columns of who answered a judgment, from what an oracle put in its ``detail``: a
    cascade names the stage and oracle that answered, the learned model's version and the route;
    any other oracle answered itself."""
    route = detail.get("route")
    return {
        "answered_by": detail.get("answered_by") or oracle_id,
        "stage": detail.get("stage"),
        "model_version": detail.get("prefmodel"),
        "route": [route_step(s) for s in route] if route else None,
    }


def _answered_from_detail(t: pa.Table) -> pa.Table:
    """Comparisons written before the typed columns: the same values, from the ``detail`` JSON."""
    rows = [answered_columns(o, json.loads(d) if d else {}) for o, d in zip(t["oracle_id"].to_pylist(), t["detail"].to_pylist())]
    for name in ANSWERED:
        if name not in t.column_names:
            t = t.append_column(COMPARISONS_SCHEMA.field(name), pa.array([r[name] for r in rows], COMPARISONS_SCHEMA.field(name).type))
    return t


COMPARISONS_SCHEMA = pa.schema(
    [
        pa.field("comparison_id", pa.string(), nullable=False),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("a_id", pa.string(), nullable=False),
        pa.field("b_id", pa.string(), nullable=False),
        pa.field("oracle_id", pa.string(), nullable=False),
        pa.field("p_a", pa.float64()),  # P(a ≻ b) in [0, 1]; null when the oracle abstained
        pa.field("label", pa.string()),  # "a", "b", "tie" or null
        pa.field("n_votes", pa.int32(), nullable=False),
        pa.field("latency_s", pa.float64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("error", pa.string()),  # why there is no judgment, when there is none
        pa.field("detail", pa.string()),  # oracle-specific raw answers, JSON
        pa.field("answered_by", pa.string()),  # the oracle that answered: oracle_id, or the cascade stage's oracle
        pa.field("stage", pa.string()),  # the cascade stage that answered; null outside a cascade or unanswered
        pa.field("model_version", pa.string()),  # the cascade's learned model at the time (preference_models/r<N>)
        pa.field("route", pa.list_(ROUTE_STEP)),  # the stages a cascade tried, in order; null outside a cascade
    ]
)

COMPARISONS = Table("comparisons", COMPARISONS_SCHEMA, key=("comparison_id",), key_names_round=True, migration=(ANSWERED, ("oracle_id", "detail"), _answered_from_detail))

ROUNDS = Table(
    "rounds",
    pa.schema(
        [
            pa.field("round", pa.int64(), nullable=False),
            pa.field("policy_version", pa.string(), nullable=False),  # the version this round produced
            pa.field("checkpoint", pa.string(), nullable=False),
            pa.field("solver", pa.string(), nullable=False),
            pa.field("metrics", pa.string(), nullable=False),  # JSON object, namespaced keys
            pa.field("timings", pa.string(), nullable=False),  # JSON object, seconds per stage
        ]
    ),
    key=("round",),
    key_names_round=True,
)

TABLES: dict[str, Table] = {t.name: t for t in (PROMPTS, RESPONSES, LOGPROBS, SCORES, COMPARISONS, ROUNDS)}
LABELS = ("a", "b", "tie")
