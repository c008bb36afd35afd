"""The Label Studio server for tests marked ``label_studio`` (imported by conftest.py).

scripts/test.sh starts the server and exports LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, plus
LABEL_STUDIO_CONTROL (scripts/label_studio.sh) so that a test can restart the server it started.
Outside CI, a run without them skips these tests with the reason; in CI (CI=true) they fail.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

import httpx
import pytest

NOT_SET = "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set: run the tests through scripts/test.sh, which installs and starts Label Studio"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str, tests: str = "the Label Studio tests") -> None:
    """Skip with ``reason`` on a developer's machine; fail in CI, where nothing may be skipped silently."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: {tests} must run)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class LabelStudioServer:
    url: str
    api_key: str = field(repr=False)
    control: str | None = None  # scripts/label_studio.sh when the test run started the server

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def _control(self, command: str) -> float:
        if not self.control:
            unavailable("LABEL_STUDIO_CONTROL is not set: this test stops and starts the server that scripts/test.sh started")
        start = time.perf_counter()
        done = subprocess.run(["bash", self.control, command], capture_output=True, text=True, timeout=360)
        assert done.returncode == 0, f"label_studio.sh {command} failed:\n{done.stderr[-2000:]}"
        return time.perf_counter() - start

    def stop(self) -> float:
        return self._control("stop")

    def start(self) -> float:
        return self._control("start")


@pytest.fixture(scope="session")
def label_studio() -> LabelStudioServer:
    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if not url or not key:
        unavailable(NOT_SET)
    server = LabelStudioServer(url.rstrip("/"), key, os.environ.get("LABEL_STUDIO_CONTROL") or None)
    if not server.healthy():
        pytest.fail(f"LABEL_STUDIO_URL={url} is set but {url}/health does not answer", pytrace=False)
    return server
