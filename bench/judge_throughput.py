"""LLM-judge throughput: judged pairs per second against a local OpenAI-compatible server.

    .venv/bin/python bench/judge_throughput.py            # 2,000 pairs, both orders, 64 in flight, 100 ms

The server (``tests/openai_stub.py``, its own process so it does not share our GIL) answers every request
after 100 ms. With 64 requests in flight the ideal is 64 / 0.1 s = 640 requests/s = 320 pairs/s (two
orders per pair). The baseline, measured in the same run, is how a popular RLHF library's judge did it: a
pool of 64 threads calling the synchronous client's ``chat.completions.create`` once per pair (one order,
so it does half the requests per pair: compare ``requests_per_s``). Prints one JSON line.

The event loop runs on one core, so its CPU per request bounds it (``client_cpu_bound_requests_per_s``);
on a 2-core machine shared with other work the wall-clock figure also depends on the load, which is
printed before and after the judge's runs (the 1-minute load average; our own client and server add
about 1), and so are the cores that other work kept busy during each run (``other_cores_runs``: other
processes and the hypervisor's steal time; above ~0.5 the run shared our cores). With ``aiohttp``
installed (``openai[aiohttp]``) the judge uses openai's aiohttp transport, about a third less CPU per
request than httpx2 (``http_backend`` says which ran).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from oracles.judge_parse import parse_verdict  # noqa: E402
from oracles.judge_template import load_template  # noqa: E402
from oracles.llm_judge import LLMJudge, LLMJudgeConfig  # noqa: E402
from oracles.protocol import Pair  # noqa: E402


def make_pairs(n: int) -> list[Pair]:
    return [Pair(f"p{i % 50}", f"Prompt {i % 50}: explain something.", f"a{i}", f"score={1 + i % 7} answer {i} " + "x" * 200,
                 f"b{i}", f"score={1 + (i * 3) % 5} other answer {i} " + "y" * 200) for i in range(n)]


def start_stub(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_stub.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"stub server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy so far (stolen by the hypervisor included); None where
    /proc is missing."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    except OSError:
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured_run(server: subprocess.Popen, base_url: str, pairs: list[Pair], in_flight: int) -> dict:
    """One judge run, with the CPU the server and the rest of the machine used meanwhile."""
    server0, busy0 = process_cpu_s(server.pid), machine_busy_s()
    run = run_judge(base_url, pairs, in_flight)
    server1, busy1 = process_cpu_s(server.pid), machine_busy_s()
    run["server_cpu_s"] = server1 - server0 if server0 is not None else None
    if busy0 is not None and run["server_cpu_s"] is not None:  # other work: cores it kept busy on average
        run["other_cores"] = (busy1 - busy0 - run["cpu_s"] - run["server_cpu_s"]) / run["wall_s"]
    return run


def run_judge(base_url: str, pairs: list[Pair], in_flight: int) -> dict:
    judge = LLMJudge(LLMJudgeConfig(model="stub", base_url=base_url, api_key="sk-bench", max_in_flight=in_flight))
    cpu0, t0 = time.process_time(), time.perf_counter()
    judgments = judge.judge(pairs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    requests = sum(o["requests"] for j in judgments for o in j.detail["orders"])
    judged = sum(j.p_a is not None for j in judgments)
    return {"wall_s": wall, "requests": requests, "judged": judged, "cpu_s": cpu, "http_backend": judge.http_backend}


def run_baseline(base_url: str, pairs: list[Pair], threads: int) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    template = load_template()

    def one(pair: Pair):
        reply = client.chat.completions.create(model="stub", messages=template.messages(pair.prompt, pair.a, pair.b),
                                               max_tokens=16, temperature=0.0)
        return parse_verdict(reply.choices[0].message.content)[0]

    cpu0, t0 = time.process_time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        verdicts = list(pool.map(one, pairs))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.close()
    return {"wall_s": wall, "requests": len(pairs), "judged": sum(v is not None for v in verdicts), "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--baseline-pairs", type=int, default=None, help="pairs for the baseline (default: --pairs)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the judge; the median is reported")
    args = ap.parse_args()
    pairs = make_pairs(args.pairs)
    ideal_rps = args.in_flight / args.latency
    proc, base_url = start_stub(args.latency)
    try:
        run_judge(base_url, make_pairs(args.in_flight), args.in_flight)  # warm up imports and the server
        load = os.getloadavg()[0]
        # the median run is reported; every run is listed
        runs = [measured_run(proc, base_url, pairs, args.in_flight) for _ in range(args.repeat)]
        load_after = os.getloadavg()[0]
        ours = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        base = run_baseline(base_url, pairs[: args.baseline_pairs or args.pairs], args.in_flight)
    finally:
        proc.terminate()
        proc.wait(10)
    pairs_per_s = len(pairs) / ours["wall_s"]
    print(json.dumps({
        "bench": "judge_throughput",
        "pairs": len(pairs),
        "in_flight": args.in_flight,
        "latency_s": args.latency,
        "pairs_per_s": round(pairs_per_s, 1),
        "requests_per_s": round(ours["requests"] / ours["wall_s"], 1),
        "ideal_pairs_per_s": ideal_rps / 2,
        "fraction_of_ideal": round(pairs_per_s / (ideal_rps / 2), 3),
        "judged": ours["judged"],
        "http_backend": ours["http_backend"],
        "client_cpu_ms_per_request": round(1000 * ours["cpu_s"] / ours["requests"], 3),
        # one event loop runs on one core: this is the most it could do with a core to itself
        "client_cpu_bound_requests_per_s": round(ours["requests"] / ours["cpu_s"], 1),
        "server_cpu_ms_per_request": round(1000 * ours["server_cpu_s"] / ours["requests"], 3) if ours["server_cpu_s"] is not None else None,
        "pairs_per_s_runs": [round(len(pairs) / r["wall_s"], 1) for r in runs],
        # cores that other work (other processes, the hypervisor) kept busy during each run
        "other_cores_runs": [round(r["other_cores"], 2) if "other_cores" in r else None for r in runs],
        "baseline_pairs_per_s": round(base["requests"] / base["wall_s"], 1),  # one request (one order) per pair
        "baseline_requests_per_s": round(base["requests"] / base["wall_s"], 1),
        "baseline_judged": base["judged"],
        "baseline_client_cpu_ms_per_request": round(1000 * base["cpu_s"] / base["requests"], 3),
        # per request, the fair comparison: the baseline asks one order per pair, we ask both
        "speedup_requests_per_s": round((ours["requests"] / ours["wall_s"]) / (base["requests"] / base["wall_s"]), 2),
        "load_avg_1m_before": round(load, 2),
        "load_avg_1m_after": round(load_after, 2),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
