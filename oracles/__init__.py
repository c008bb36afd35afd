"""Who prefers what: preference oracles behind one small protocol. Never imports solvers or pipelines."""

from oracles.protocol import Judgment, Oracle, Pair, QueuedOracle, make_oracle_id

__all__ = ["Judgment", "Oracle", "Pair", "QueuedOracle", "make_oracle_id"]
