"""Label Studio IO: seconds and HTTP requests to import 5,000 pairs and to collect 5,000 finished
annotations against a local server. Prints one JSON line.

    .venv/bin/python bench/label_studio_io.py [--pairs 5000] [--batch-size 1000]

Uses the server in LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, or starts one with scripts/label_studio.sh
(installing it first if needed) and stops it afterwards. Requests are counted with an httpx event hook
on the oracle's client. The 5,000 finished annotations are set up by importing tasks together with
their annotations (a few requests, not measured); the measured collect is the oracle's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from label_studio_sdk import LabelStudio  # noqa: E402

from oracles.label_studio import LabelStudioConfig, LabelStudioOracle  # noqa: E402
from oracles.label_studio_tasks import choice_result, task_data  # noqa: E402
from oracles.protocol import Pair  # noqa: E402


def pairs(n: int) -> list[Pair]:
    """n pairs of realistic size: 20 prompts of ~200 characters, responses of ~600."""
    out = []
    for i in range(n):
        p = i % 20
        prompt = f"Prompt {p}: explain the idea in plain words for a reader new to it. " * 3
        a, b = (f"Response {i}.{s}: " + "a careful answer with an example and a caveat. " * 12 for s in (0, 1))
        out.append(Pair(f"p{p}", prompt, f"r{i}a", a, f"r{i}b", b))
    return out


def counting_client(counter: list) -> httpx.Client:
    return httpx.Client(timeout=300, event_hooks={"request": [lambda request: counter.append(request.url.path)]})


def server() -> tuple[str, str, bool]:
    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if url and key:
        return url, key, False
    script = ROOT / "scripts" / "label_studio.sh"
    subprocess.run(["bash", str(script), "install"], check=True, stdout=sys.stderr)
    out = subprocess.run(["bash", str(script), "start"], check=True, capture_output=True, text=True).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    return env["LABEL_STUDIO_URL"], env["LABEL_STUDIO_API_KEY"], True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    url, key, started = server()
    admin = LabelStudio(base_url=url, api_key=key, timeout=300)
    run = uuid.uuid4().hex[:8]
    the_pairs = pairs(args.pairs)
    made = []
    try:
        # Import: the oracle's submit, from finding (creating) the project to the last import request.
        sent: list = []
        oracle = LabelStudioOracle(LabelStudioConfig(campaign=f"bench-import-{run}", batch_size=args.batch_size), url=url, api_key=key, http_client=counting_client(sent))
        start = time.perf_counter()
        submitted = oracle.submit(the_pairs, round=0)
        import_s = time.perf_counter() - start
        made.append(oracle.project_id)
        assert submitted.created == args.pairs, submitted
        # A repeated submit: lists the project's tasks and imports nothing.
        resent: list = []
        again = LabelStudioOracle(oracle.config, url=url, api_key=key, http_client=counting_client(resent))
        start = time.perf_counter()
        assert again.submit(the_pairs, round=0).created == 0
        resubmit_s = time.perf_counter() - start

        # Collect: set up a second project whose tasks each hold one finished annotation (not measured).
        got_requests: list = []
        collector = LabelStudioOracle(LabelStudioConfig(campaign=f"bench-collect-{run}", batch_size=args.batch_size), url=url, api_key=key, http_client=counting_client(got_requests))
        project = collector.project_id
        made.append(project)
        me = admin.users.whoami().id
        sides = ("left", "right", "tie")
        tasks = [
            {"data": task_data(p, round=0, oracle_id=collector.oracle_id), "annotations": [{"result": choice_result(sides[i % 3]), "completed_by": me, "lead_time": 5.0}]}
            for i, p in enumerate(the_pairs)
        ]
        for s in range(0, len(tasks), args.batch_size):
            admin.projects.import_tasks(id=project, request=tasks[s : s + args.batch_size])
        got_requests.clear()
        start = time.perf_counter()
        got = collector.collect()
        collect_s = time.perf_counter() - start
        assert len(got.judgments) == args.pairs and not got.problems, (len(got.judgments), got.problems[:3])
    finally:
        for project_id in made:
            admin.projects.delete(id=project_id)
        if started:
            subprocess.run(["bash", str(ROOT / "scripts" / "label_studio.sh"), "stop"], check=False, stdout=sys.stderr)

    print(json.dumps({
        "bench": "label_studio_io",
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "import_seconds": round(import_s, 3),
        "requests_import": len(sent),
        "requests_per_pair_import": round(len(sent) / args.pairs, 5),
        "resubmit_seconds": round(resubmit_s, 3),
        "requests_resubmit": len(resent),
        "collect_seconds": round(collect_s, 3),
        "requests_collect": len(got_requests),
        "requests_per_pair_collect": round(len(got_requests) / args.pairs, 5),
        "judgments_collected": len(got.judgments),
    }))


if __name__ == "__main__":
    main()
