"""The store's tables, each declared once: columns, key, and whether it is partitioned by round.

The ``round`` column of a partitioned table lives in the hive folder name (``round=3/``), not inside
the Parquet files, so pyarrow, DuckDB or Spark read the store as an ordinary hive dataset.
"""

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema  # every column, ``round`` included when partitioned
    key: tuple[str, ...]
    partitioned: bool = True

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

COMPARISONS = Table(
    "comparisons",
    pa.schema(
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
        ]
    ),
    key=("comparison_id",),
)

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
)

TABLES: dict[str, Table] = {t.name: t for t in (PROMPTS, RESPONSES, LOGPROBS, COMPARISONS, ROUNDS)}
LABELS = ("a", "b", "tie")
