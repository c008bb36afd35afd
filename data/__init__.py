"""What is kept: the Parquet store, its schemas, and import/export. Imports nothing of nashflow's."""

from data.keys import comparison_id, prompt_id, response_id
from data.store import Store, StoreError

__all__ = ["Store", "StoreError", "comparison_id", "prompt_id", "response_id"]
