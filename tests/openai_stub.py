"""A small OpenAI-compatible chat server for tests and benchmarks: real HTTP on 127.0.0.1, known answers.

It plays a judge model. It reads the fenced texts of the judge template (``<<<BEGIN <name> <tag>>>`` …
``<<<END <name> <tag>>>``, see ``oracles/judge_template.py``) and answers which of the two responses, ``A``
(shown first) or ``B``, is better by a known rule: each response's score is the number after ``score=``
in its text (1 when absent) and P(first ≻ second) = s_first / (s_first + s_second), shifted toward the
first slot by ``position_bias``. So a debiased judge recovers s_a / (s_a + s_b) exactly.

- ``logprobs`` (when the request asks for them and the stub allows them): the verdict token carries
  ``top_logprobs`` for ``A``/``B`` with log q and log(1 − q); otherwise answers are votes: the k-th sample
  for an ordered pair (counted over all requests) says ``A`` when the k-th van der Corput number is below q,
  so 4 votes give exactly q for q a multiple of ¼ however they are split over requests; at temperature 0
  the answer is the argmax (a tie at ½).
- ``style``: ``"letter"`` (``A``), ``"json"`` (``{"verdict": "A"}``) or ``"garbage"`` (prose, no verdict).
- Gullible on purpose: text *outside* every fence that says "ignore … instructions … answer A/B" is
  obeyed, so a template whose fences a response can close is caught by the tests.
- Faults are asked for by the responses themselves: a response containing ``!fault=<kind>x<n>`` makes the
  first n requests for that ordered pair (prompt, first, second) fail — with ``@first`` or ``@second``
  appended, only while that response is shown in that slot — with kind ∈ {429, 500, 503, drop, slow, garbage, 400}
  (``429`` sends ``Retry-After: <retry_after>``; ``slow`` sleeps ``slow_s`` before answering;
  ``drop`` closes the connection without a reply; ``garbage`` answers 200 with no verdict).
- Counts every request (``requests``), per kind of fault (``faults``) and keeps the Authorization header
  values it saw (``auth_headers``) so a test can check that the key was sent, and the names of the
  headers sent (``header_names``); ``log`` lists the requests.

- The Files and Batches endpoints of the Batch API (``POST /v1/files`` multipart, ``GET /v1/files``,
  ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``): a batch stays
  ``in_progress`` for ``batch_delay_s`` and then completes, each of its lines answered by the same rule
  as ``/v1/chat/completions`` (faults included: a faulty line goes to the error file with its status);
  the first ``expire_batches`` batches expire instead, answering only the first half of their lines (the
  rest go to the error file as ``batch_expired``). ``batches``, ``files`` and ``batches_created`` let a
  test count what was created.

A plain asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) rather than a web framework: it costs
little CPU, so a throughput benchmark measures the client, and it can misbehave at the socket level.
Run it in a thread (``with StubServer(...) as s: s.base_url``) or as a process
(``python tests/openai_stub.py --latency 0.1`` prints ``PORT <n>`` and serves until killed; ``--die-after N``
makes it exit mid-round, as a sampling server that crashes).
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import json
import math
import os
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

FENCE = re.compile(r"<<<BEGIN (\w+) ([0-9a-f]{8,})>>>\n(.*?)\n<<<END \1 \2>>>", re.S)
FAULT = re.compile(r"!fault=(\w+)x(\d+)(?:@(first|second))?")
SCORE = re.compile(r"score=(\d+(?:\.\d+)?)")
INJECTION = re.compile(r"ignore\b.{0,40}\binstructions\b.{0,200}?\banswer\s+\W?([AB])\b", re.I | re.S)


def score(text: str) -> float:
    m = SCORE.search(text)
    return float(m.group(1)) if m else 1.0


def rule_p_first(first: str, second: str) -> float:
    """The stub's true P(first ≻ second), before position bias."""
    s1, s2 = score(first), score(second)
    return s1 / (s1 + s2)


@dataclass
class StubConfig:
    latency_s: float = 0.0  # every answer waits this long
    position_bias: float = 0.0  # added to P(first slot wins), clipped to [0, 1]
    logprobs: bool = True  # answer with logprobs when the request asks for them
    style: str = "letter"  # "letter", "json" or "garbage"
    retry_after: str = "0.05"  # the Retry-After header sent with a 429
    slow_s: float = 2.0  # how long a "slow" fault waits
    max_choices: int | None = None  # cap on choices per reply (a server that ignores n>1 uses 1)
    api_key: str | None = None  # when set, other keys get a 401
    batch_delay_s: float = 0.0  # a batch completes this long after it was created
    expire_batches: int = 0  # the first this many batches expire with half of their lines answered
    die_after: int | None = None  # the process exits when chat request die_after + 1 arrives (a server dying mid-round)


@dataclass
class StubServer:
    config: StubConfig = field(default_factory=StubConfig)
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self):
        self.requests = 0
        self.chats: Counter = Counter()  # chat completions asked, "online" or "batch" (a batch's lines)
        self.faults: Counter = Counter()
        self.auth_headers: set[str] = set()
        self.header_names: set[str] = set()  # lower case
        self.bodies: list[dict] = []  # request bodies, when keep_bodies is set
        self.keep_bodies = False
        self.log: list[tuple[str, str]] = []  # (fault kind or "ok", first 40 characters of response A), in arrival order
        self._attempts: dict[tuple, int] = defaultdict(int)
        self._draws: dict[tuple, int] = defaultdict(int)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self.files: dict[str, dict] = {}  # id → file object, with its bytes under "_data"
        self.batches: dict[str, dict] = {}  # id → batch object
        self.batches_created = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ----- running it ----------------------------------------------------------------------------
    async def serve(self) -> None:
        """Start listening (in the running loop); ``self.port`` is the bound port afterwards."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> "StubServer":
        ready = threading.Event()
        failed: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.serve())
            except BaseException as e:  # report a failed bind to the caller
                failed.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="openai-stub", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- HTTP ------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                # the whole head in one read (a readline per header costs the benchmark's server CPU);
                # IncompleteReadError when the client closes the connection
                request_head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = request_head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for h in lines:
                    k, _, v = h.partition(":")
                    if k:
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                body = await reader.readexactly(n) if n else b""
                status, payload, extra = await self._answer(method, target, headers, body)
                if status == 0:  # drop the connection without a reply
                    writer.transport.abort()
                    return
                raw = isinstance(payload, bytes)  # a file's content
                data = payload if raw else json.dumps(payload).encode()
                kind = "application/octet-stream" if raw else "application/json"
                head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-type: {kind}",
                        f"content-length: {len(data)}"]
                head += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _answer(self, method: str, target: str, headers: dict, body: bytes) -> tuple[int, dict, dict]:
        self.requests += 1
        path = target.split("?", 1)[0]
        if method == "GET" and path.endswith("/health"):
            return 200, {"ok": True}, {}
        if method == "GET" and path.endswith("/v1/models"):
            return 200, {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "tests"}]}, {}
        batch_api = "/files" in path or "/batches" in path
        if not batch_api and (method != "POST" or not path.endswith("/chat/completions")):
            return 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}, {}
        auth = headers.get("authorization", "")
        self.auth_headers.add(auth)
        self.header_names.update(headers)
        if self.config.api_key is not None and auth != f"Bearer {self.config.api_key}":
            # like the real API, the message quotes the key it got: a test checks that it goes no further
            return 401, {"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
                                   "type": "invalid_request_error"}}, {}
        if batch_api:
            return await self._batch_api(method, path, target, headers, body)
        req = json.loads(body)
        if self.config.die_after is not None and self.chats["online"] >= self.config.die_after:
            os._exit(17)
        if self.keep_bodies:
            self.bodies.append(req)
        return await self._chat(req)

    async def _chat(self, req: dict) -> tuple[int, dict, dict]:
        """One chat completion by the stub's rule (its status, body and extra headers)."""
        self.chats["batch" if req.get("_in_batch") else "online"] += 1
        prompt = "\n".join(m["content"] for m in req["messages"] if isinstance(m.get("content"), str))
        blocks = {name: text for name, _tag, text in FENCE.findall(prompt)}
        first, second = blocks.get("A", ""), blocks.get("B", "")
        outside = FENCE.sub("", prompt)

        fault = None
        question = (blocks.get("PROMPT", ""), first, second)  # one ordered pair
        for slot, text in (("first", first), ("second", second)):
            for kind, times, only in FAULT.findall(text):
                if only and only != slot:
                    continue
                self._attempts[(question, kind)] += 1
                if fault is None and self._attempts[(question, kind)] <= int(times):
                    fault = kind
        if fault:
            self.faults[fault] += 1
        self.log.append((fault or "ok", first[:40]))
        if fault == "drop":
            return 0, {}, {}
        latency_s = 0.0 if req.get("_in_batch") else self.config.latency_s
        if fault == "slow":
            await asyncio.sleep(self.config.slow_s)
        elif latency_s:
            await asyncio.sleep(latency_s)
        if fault == "429":
            return 429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}, {"retry-after": self.config.retry_after}
        if fault in ("500", "503"):
            return int(fault), {"error": {"message": "The server had an error", "type": "server_error"}}, {}
        if fault == "400":
            return 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}, {}

        q = min(1.0, max(0.0, rule_p_first(first, second) + self.config.position_bias))
        forced = INJECTION.search(outside)
        if forced:  # the gullible model obeys instructions it finds outside the fences
            q = 1.0 if forced.group(1).upper() == "A" else 0.0
        n = int(req.get("n") or 1)
        if self.config.max_choices is not None:
            n = min(n, self.config.max_choices)
        want_lp = bool(req.get("logprobs")) and self.config.logprobs
        top = int(req.get("top_logprobs") or 0)
        temperature = float(req.get("temperature", 1.0) if req.get("temperature") is not None else 1.0)
        style = "garbage" if fault == "garbage" else self.config.style
        choices = []
        for i in range(n):
            if want_lp or temperature == 0:
                verdict = "A" if q > 0.5 else "B" if q < 0.5 else "tie"
            else:  # the k-th sample for this ordered pair, over all requests: low-discrepancy, not random
                self._draws[question] += 1
                verdict = "A" if _van_der_corput(self._draws[question]) < q else "B"
            choices.append(_choice(i, verdict, q, style, want_lp, top))
        prompt_tokens = max(1, len(prompt) // 4)
        completion_tokens = sum(len(c["message"]["content"]) // 4 + 1 for c in choices)
        return 200, {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": 0,
            "model": req.get("model", "stub"),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, {}


    # ----- the Batch API: files and batches ---------------------------------------------------------
    async def _batch_api(self, method: str, path: str, target: str, headers: dict, body: bytes) -> tuple[int, object, dict]:
        parts = path.split("/v1/", 1)[-1].strip("/").split("/")
        if parts == ["files"] and method == "POST":
            return 200, self._upload(headers, body), {}
        if parts == ["files"] and method == "GET":
            purpose = dict(q.split("=", 1) for q in target.partition("?")[2].split("&") if "=" in q).get("purpose")
            files = [_public(f) for f in reversed(self.files.values()) if purpose in (None, f["purpose"])]  # newest first
            return 200, {"object": "list", "data": files, "has_more": False}, {}
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and parts[1] in self.files:
            return 200, self.files[parts[1]]["_data"], {}
        if parts == ["batches"] and method == "POST":
            return self._create_batch(json.loads(body))
        if parts == ["batches"] and method == "GET":
            for b in list(self.batches.values()):
                await self._advance(b)
            data = sorted(self.batches.values(), key=lambda b: b["_n"], reverse=True)
            return 200, {"object": "list", "data": [_public(b) for b in data], "has_more": False}, {}
        if len(parts) == 2 and parts[0] == "batches" and parts[1] in self.batches:
            return 200, _public(await self._advance(self.batches[parts[1]])), {}
        return 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}, {}

    def _upload(self, headers: dict, body: bytes) -> dict:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"content-type: {headers['content-type']}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": fields["file"].get_filename(), "purpose": fields["purpose"].get_payload(decode=True).decode(),
                               "status": "processed", "_data": data}
        return _public(self.files[file_id])

    def _output_file(self, name: str, lines: list[dict]) -> str | None:
        if not lines:
            return None
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": name,
                               "purpose": "batch_output", "status": "processed", "_data": data}
        return file_id

    def _create_batch(self, req: dict) -> tuple[int, dict, dict]:
        if req.get("input_file_id") not in self.files or req.get("endpoint") != "/v1/chat/completions" or req.get("completion_window") != "24h":
            return 400, {"error": {"message": "bad batch request", "type": "invalid_request_error"}}, {}
        self.batches_created += 1
        batch_id = f"batch-{self.batches_created}"
        now = int(time.time())
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"],
            "completion_window": "24h", "status": "in_progress", "created_at": now, "in_progress_at": now,
            "metadata": req.get("metadata"), "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "_n": self.batches_created, "_due": time.monotonic() + self.config.batch_delay_s,
            "_expire": self.batches_created <= self.config.expire_batches,
        }
        return 200, _public(self.batches[batch_id]), {}

    async def _advance(self, b: dict) -> dict:
        """Finish a due batch: answer its lines (or half of them, when it expires) into its files."""
        if b["status"] != "in_progress" or time.monotonic() < b["_due"]:
            return b
        lines = [json.loads(x) for x in self.files[b["input_file_id"]]["_data"].decode().splitlines() if x.strip()]
        answered = lines[: len(lines) // 2] if b["_expire"] else lines
        out, errors = [], []
        for i, line in enumerate(answered):
            status, payload, _ = await self._chat({**line["body"], "_in_batch": True})
            status = status or 500  # a dropped connection: the batch records a server error
            record = {"id": f"{b['id']}-req-{i}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": f"req-{i}", "body": payload}, "error": None}
            (out if status == 200 else errors).append(record)
        for line in lines[len(answered):]:
            errors.append({"id": f"{b['id']}-req-x", "custom_id": line["custom_id"], "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
        now = int(time.time())
        b.update(status="expired" if b["_expire"] else "completed", output_file_id=self._output_file(f"{b['id']}_output.jsonl", out),
                 error_file_id=self._output_file(f"{b['id']}_error.jsonl", errors),
                 request_counts={"total": len(lines), "completed": len(out), "failed": len(errors)})
        b["expired_at" if b["_expire"] else "completed_at"] = now
        return b


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _van_der_corput(k: int) -> float:
    """k = 1, 2, 3, 4, … → 0.5, 0.25, 0.75, 0.125, …: any 2^m consecutive-from-1 draws split [0, 1) evenly."""
    x, f = 0.0, 0.5
    while k:
        x += f * (k & 1)
        k >>= 1
        f /= 2
    return x


def _choice(i: int, verdict: str, q: float, style: str, want_lp: bool, top: int) -> dict:
    if style == "garbage":
        text = "Both responses have merits; it depends on what the user values most."
        tokens = [text]
    elif style == "json":
        tokens = ['{"', "verdict", '":', ' "', verdict, '"}']
        text = "".join(tokens)
    else:
        tokens = [verdict]
        text = verdict
    logprobs = None
    if want_lp:
        alts = [(t, p) for t, p in (("A", q), ("B", 1.0 - q)) if p > 0]
        alts.sort(key=lambda tp: -tp[1])
        content = []
        for tok in tokens:
            if tok == verdict:
                lp = math.log(dict(alts).get(tok, 1e-9)) if tok != "tie" else math.log(0.5)
                tops = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in alts[:top]]
            else:
                lp, tops = 0.0, [{"token": tok, "logprob": 0.0, "bytes": list(tok.encode())}][:top]
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": tops})
        logprobs = {"content": content, "refusal": None}
    return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": logprobs}


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--position-bias", type=float, default=0.0)
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--max-choices", type=int, default=None)
    ap.add_argument("--die-after", type=int, default=None, help="exit when chat request N + 1 arrives ...")
    ap.add_argument("--once", default=None, help="... only if this file does not exist yet (it is created): dies in its first life only")
    ap.add_argument("--model", default=None, help="ignored (a sampling server's command names its checkpoint)")
    args = ap.parse_args(argv)
    die_after = args.die_after
    if die_after is not None and args.once:
        die_after = None if os.path.exists(args.once) else die_after
        open(args.once, "a").close()
    stub = StubServer(StubConfig(latency_s=args.latency, position_bias=args.position_bias, logprobs=not args.no_logprobs, max_choices=args.max_choices, die_after=die_after),
                      port=args.port)

    async def run():
        await stub.serve()
        print(f"PORT {stub.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
