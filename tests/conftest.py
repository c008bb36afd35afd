"""Test-session environment: offline Hugging Face, a private Prefect home, no telemetry."""

import os
import tempfile

_scratch = tempfile.mkdtemp(prefix="nashflow-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_scratch, "hf"))
os.environ.setdefault("PREFECT_HOME", os.path.join(_scratch, "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
