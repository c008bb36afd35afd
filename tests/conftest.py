"""Test-session environment: offline Hugging Face, a private Prefect home, no telemetry."""

import os
import tempfile

_scratch = tempfile.mkdtemp(prefix="nashflow-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_scratch, "hf"))
os.environ.setdefault("PREFECT_HOME", os.path.join(_scratch, "prefect"))
os.environ["NASHFLOW_CACHE"] = os.path.join(_scratch, "cache")  # GGUF conversions: once per session, never a developer's cache
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models on 2 shared cores: two intra-op threads made sampling ~20x slower than one."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the test session (about 9 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The Label Studio server for tests marked label_studio (started by scripts/test.sh).
from label_studio_fixtures import label_studio  # noqa: E402, F401

# SmolLM2 for tests marked real_model (its package is installed by make setup), converted once per session.
from real_model_fixtures import smollm2, smollm2_gguf  # noqa: E402, F401
