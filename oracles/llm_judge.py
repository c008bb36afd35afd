"""The LLM-judge oracle: asks an OpenAI-compatible chat model which of two responses is better.

    judge = LLMJudge(LLMJudgeConfig(model="gpt-4o-mini", api_key=key, prices={"gpt-4o-mini": (0.15, 0.6)}))
    judgments = judge.judge(pairs)            # one Judgment per pair, in order
    keep = [j for j in judgments if not j.skipped]   # store these; skipped pairs are asked again later
    metrics = judge.metrics(judgments)        # judge/position_bias, judge/consistency, cost/usd, …

What it does for each pair (a, b):

- **Both orders.** It asks "A = a, B = b" and "A = b, B = a" and averages the two answers mapped back to
  the original order: p_a = (P₁(first) + 1 − P₂(first)) / 2. A judge that favours the first slot by δ
  adds +δ to one and −δ to the other, which cancels (Zheng et al. 2023, arXiv:2306.05685, §3.4). Both raw
  answers stay in ``Judgment.detail["orders"]``. If one order abstains the pair abstains: a single order
  would carry the position bias back in.
- **Probabilities.** With ``use_logprobs`` the verdict token's ``top_logprobs`` give P(first) directly
  (``judge_parse.logprob_p_first``); a server that sends none falls back to votes: ``votes`` samples
  (``n`` choices, topped up with further requests when a server returns fewer), a tie counting ½.
- **Untrusted text** is fenced with a per-request random tag and the instructions follow it
  (``judge_template``); answers are parsed strictly, anything else is an abstention with its reason.
- **Throughput.** ``max_in_flight`` worker coroutines share a queue of requests, spread over several
  ``AsyncOpenAI`` clients of at most ``connections_per_client`` connections each (one httpx client
  collapses above ~32 connections on small machines). A failed request is put back on the queue after
  its backoff instead of holding its worker, so one slow or failing request never stalls the batch.
  One event loop runs on one core, so CPU per request bounds throughput: requests go through the
  client's documented ``client.post`` for custom requests and the JSON is read as a dict (the typed
  ``chat.completions.create`` costs ~0.8 ms more CPU per request building and validating models),
  the clients use openai's documented aiohttp transport when ``aiohttp`` is installed (~0.5 ms less)
  and leave out openai's client-telemetry headers (``X-Stainless-OS`` and the like: ~4% less), and one
  TLS context serves every client of the process (building one costs ~40 ms of CPU). Measured by hand
  with modified copies of ``bench/judge_throughput.py`` (2 cores; the benchmark has no switch for them)
  and left out: an event loop per thread (~4% slower: one GIL),
  a second process (~2% faster, not worth splitting budget and rate limits), uvloop (less CPU, lower
  throughput).
- **Retries** are ours (the clients run with ``max_retries=0``): 408/409/429/5xx, timeouts and dropped
  connections are retried up to ``max_retries`` times with full-jitter exponential backoff, or after the
  server's Retry-After. 401/403/404 stop the batch with ``JudgeConfigError`` (nothing else can succeed).
- **Cost and budget.** Cost per judgment from the reply's token usage and ``prices``. ``budget_usd``
  caps what one ``LLMJudge`` spends over all its ``judge`` calls until ``reset_budget()`` (a pipeline
  that asks in chunks builds one judge per round, or resets it each round): each pair reserves its worst
  case (every prompt byte a token) before its first request and settles its true cost after the last,
  so the judge never spends more than the budget.

**Stored or asked again.** A judgment with ``skipped=False`` is final: the judge answered (``p_a`` set)
or abstained on its own (unparseable answer; ``error`` starts with ``"abstained: "``) — asking again
would give the same, so it is stored. ``skipped=True`` means the pair was *not judged* — budget
exhausted, retries used up, request refused — with ``error`` starting ``"not judged: "``; it must not
be stored, so it stays missing in the store and is asked again in a later round or run.

The API key is held in a ``Secret`` that prints as ``'***'``; it never enters ``oracle_id``, ``detail``,
log records or exception messages (errors from the API are re-raised without their cause).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field

import openai

try:  # openai >= 3 runs on the httpx2 fork; older releases on httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx

from oracles.budget import Budget
from oracles.judge_parse import FIRST, SECOND, TIE, logprob_p_first, parse_verdict
from oracles.judge_template import load_template
from oracles.protocol import NOT_JUDGED, Judgment, Pair, make_oracle_id, orders_agree
from oracles.rate_limit import RateLimiter, backoff_s, retry_after_s

log = logging.getLogger(__name__)
_HAVE_AIOHTTP = importlib.util.find_spec("aiohttp") is not None

# openai's client-telemetry headers: the server needs none of them, and each costs CPU on every request
_TELEMETRY_HEADERS = ("X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch",
                      "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Async")
_VOTE = {FIRST: 1.0, SECOND: 0.0, TIE: 0.5}
_RAW_CHARS = 300  # how much of a raw answer goes into Judgment.detail


class Secret:
    """A string that never prints. ``get()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class JudgeConfigError(RuntimeError):
    """The server refused the configuration itself (bad key, no such model or URL): nothing can succeed."""


@dataclass(frozen=True)
class LLMJudgeConfig:
    """Everything the LLM judge needs. Fields above the line change answers (they go into ``oracle_id``);
    the others change only speed, cost accounting or where the requests go."""

    model: str  # the model name the server knows
    both_orders: bool = True  # ask (a, b) and (b, a) and average: cancels position bias at 2× the requests
    votes: int = 1  # answers per order when P comes from votes (needs temperature > 0 to differ)
    temperature: float = 0.0
    use_logprobs: bool = True  # ask for logprobs; P from the verdict token when the server sends them
    top_logprobs: int = 5  # alternatives per token (A, B, tie and their spellings must fit)
    max_tokens: int = 16  # room for "A", a JSON verdict, or a short decorated answer
    template_path: str | None = None  # a template file (see judge_template); None: the default
    seed: int | None = None  # sent as the request's seed when set
    # ---- not part of the oracle id -------------------------------------------------------------
    base_url: str | None = None  # None: the OpenAI API
    api_key: Secret | str | None = field(default=None, repr=False)  # a value, never read from files here
    max_in_flight: int = 64  # requests in flight at once
    connections_per_client: int = 32  # one AsyncOpenAI (httpx) client per this many requests in flight
    http_backend: str = "auto"  # "auto": aiohttp if installed (openai[aiohttp], ~⅓ less CPU per request), else "httpx"
    rpm: float | None = None  # requests per minute; None: unlimited
    tpm: float | None = None  # tokens per minute (prompt estimate + max_tokens, corrected by usage)
    timeout_s: float = 60.0  # per request, whole request (connect to last byte)
    max_retries: int = 4  # retries per request after the first attempt
    backoff_base_s: float = 0.5  # first backoff bound; doubles per retry
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After gives up on the request (not judged)
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model → USD per 1M (prompt, completion) tokens
    budget_usd: float | None = None  # cap on what this judge spends until reset_budget(); needs a price

    def __post_init__(self):
        if isinstance(self.api_key, str):
            object.__setattr__(self, "api_key", Secret(self.api_key))
        problems = []
        if self.votes < 1:
            problems.append(f"votes={self.votes} must be ≥ 1")
        if self.max_in_flight < 1 or self.connections_per_client < 1:
            problems.append("max_in_flight and connections_per_client must be ≥ 1")
        if self.timeout_s <= 0 or self.max_retries < 0:
            problems.append("timeout_s must be > 0 and max_retries ≥ 0")
        if self.use_logprobs and not 1 <= self.top_logprobs <= 20:
            problems.append(f"top_logprobs={self.top_logprobs} must be in 1..20")
        if self.http_backend not in ("auto", "aiohttp", "httpx"):
            problems.append(f"http_backend={self.http_backend!r} must be 'auto', 'aiohttp' or 'httpx'")
        elif self.http_backend == "aiohttp" and not _HAVE_AIOHTTP:
            problems.append("http_backend='aiohttp' needs aiohttp: pip install 'openai[aiohttp]'")
        if self.budget_usd is not None and self.model not in self.prices:
            problems.append(f"budget_usd is set but prices has no entry for model {self.model!r}")
        for name, p in self.prices.items():
            if len(p) != 2 or min(p) < 0:
                problems.append(f"prices[{name!r}] must be (prompt, completion) USD per 1M tokens, got {p!r}")
        if problems:
            raise ValueError("LLM judge config: " + "; ".join(problems))

    @property
    def price(self) -> tuple[float, float]:
        """USD per token (prompt, completion); zero when the model has no price."""
        p, c = self.prices.get(self.model, (0.0, 0.0))
        return p / 1e6, c / 1e6


class LLMJudge:
    """An ``Oracle`` backed by a chat model. See the module docstring."""

    def __init__(self, config: LLMJudgeConfig, *, name: str | None = None):
        self.config = config
        self.template = load_template(config.template_path)
        answers = {
            "both_orders": config.both_orders,
            "votes": config.votes,
            "temperature": config.temperature,
            "use_logprobs": config.use_logprobs,
            "top_logprobs": config.top_logprobs if config.use_logprobs else None,
            "max_tokens": config.max_tokens,
            "template": self.template.digest,
            "seed": config.seed,
        }
        self.oracle_id = make_oracle_id("llm_judge", name or config.model, answers)
        self.budget = Budget(usd=config.budget_usd)
        auto = config.http_backend == "auto"
        self.http_backend = "aiohttp" if config.http_backend == "aiohttp" or (auto and _HAVE_AIOHTTP) else "httpx"

    def reset_budget(self) -> None:
        """Start a new budget period (e.g. a new round): nothing spent yet."""
        self.budget = Budget(usd=self.config.budget_usd)

    @property
    def spent_usd(self) -> float:
        """What this judge spent since it was built or its budget was reset."""
        return self.budget.spent_usd

    def __repr__(self) -> str:
        return f"LLMJudge({self.oracle_id!r}, base_url={self.config.base_url!r})"

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        """One judgment per pair, in order; ``skipped`` ones were not judged (see the module docstring)."""
        try:
            asyncio.get_running_loop()
            inside_a_loop = True
        except RuntimeError:
            inside_a_loop = False
        if not inside_a_loop:  # (not in the except block: an exception raised by the run gets no context)
            return asyncio.run(self.ajudge(pairs))
        # called from inside an event loop (a notebook, an async task): run on a loop of our own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.ajudge(pairs)).result()

    async def ajudge(self, pairs: list[Pair]) -> list[Judgment]:
        return await _Batch(self, list(pairs)).run()

    def metrics(self, judgments: list[Judgment]) -> dict:
        return judge_metrics(judgments)


# ----- one batch ----------------------------------------------------------------------------------
@dataclass
class OrderAnswers:
    """One order of one pair: the question "A = first, B = second" and its answers."""

    swapped: bool
    answers: list[dict] = field(default_factory=list)
    requests: int = 0  # HTTP attempts, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the order failed without an answer (not judged)
    done: bool = False

    def needs_more(self, votes: int) -> int:
        """How many more answers to ask for; 0 when the order is complete."""
        if any(a.get("source") == "logprobs" for a in self.answers):
            return 0
        return max(0, votes - len(self.answers))


@dataclass
class _PairState:
    index: int
    pair: Pair
    orders: list[OrderAnswers]
    admitted: bool | str | None = None  # None: not yet asked; "waiting": for reservations to settle
    reserved_usd: float = 0.0
    t0: float | None = None
    t1: float = 0.0


@dataclass
class _Job:
    state: _PairState
    order: OrderAnswers
    n: int  # answers asked for in this request
    attempt: int = 0


class _Batch:
    def __init__(self, judge: LLMJudge, pairs: list[Pair]):
        self.judge = judge
        self.cfg = cfg = judge.config
        self.states = [
            _PairState(i, p, [OrderAnswers(False)] + ([OrderAnswers(True)] if cfg.both_orders else [])) for i, p in enumerate(pairs)
        ]
        self.open_orders = sum(len(s.orders) for s in self.states)
        self.results: list[Judgment | None] = [None] * len(pairs)
        self.rpm = RateLimiter(cfg.rpm) if cfg.rpm else None
        self.tpm = RateLimiter(cfg.tpm) if cfg.tpm else None
        self.budget = judge.budget
        self.waiting: list[_Job] = []  # jobs of pairs that wait for the budget's reservations to settle
        self.rng = random.Random()
        self.fatal: BaseException | None = None

    async def run(self) -> list[Judgment]:
        if not self.states:
            return []
        cfg = self.cfg
        workers = min(cfg.max_in_flight, self.open_orders * cfg.votes)
        n_clients = math.ceil(workers / cfg.connections_per_client)
        per_client = math.ceil(workers / n_clients)
        key = cfg.api_key.get() if cfg.api_key is not None else "none"  # local servers need no key
        limits = _httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        http = openai.DefaultAioHttpClient if self.judge.http_backend == "aiohttp" else openai.DefaultAsyncHttpxClient
        no_telemetry = {h: openai.Omit() for h in _TELEMETRY_HEADERS}
        clients = [
            openai.AsyncOpenAI(api_key=key, base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout_s,
                               default_headers=no_telemetry,
                               http_client=http(timeout=cfg.timeout_s, verify=_ssl_context(), limits=limits))
            for _ in range(n_clients)
        ]
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        for s in self.states:
            for o in s.orders:
                self.queue.put_nowait(_Job(s, o, cfg.votes))
        self.timers: set[asyncio.TimerHandle] = set()
        try:
            await asyncio.gather(*(self._worker(clients[i % n_clients], workers) for i in range(workers)))
        finally:
            for t in self.timers:
                t.cancel()
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal
        return [r if r is not None else self._finish(s) for r, s in zip(self.results, self.states)]

    async def _worker(self, client: openai.AsyncOpenAI, workers: int) -> None:
        while True:
            job = await self.queue.get()
            if job is None:
                return
            try:
                await self._handle(client, job)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: stop the batch and raise it after the clients are closed
                self._stop(e)
            if self.open_orders == 0:
                for _ in range(workers):
                    self.queue.put_nowait(None)

    async def _handle(self, client: openai.AsyncOpenAI, job: _Job) -> None:
        s, o, cfg = job.state, job.order, self.cfg
        if o.done:
            return
        if s.admitted is None:  # the first request of a pair decides whether the budget admits it
            s.reserved_usd = self._worst_case_usd(s.pair) if cfg.budget_usd is not None else 0.0
            admitted = self.budget.admit(s.reserved_usd)
            s.admitted = "waiting" if admitted is None else admitted
            if admitted is False:
                for other in s.orders:
                    self._close(s, other, f"{NOT_JUDGED}budget exhausted")
        if s.admitted == "waiting":
            self.waiting.append(job)
            return
        if s.admitted is not True or o.done:
            return
        body = request_body(cfg, self.judge.template, s.pair, swapped=o.swapped, n=job.n)
        messages = body["messages"]
        est_tokens = _prompt_bytes(messages) + job.n * cfg.max_tokens if self.tpm else 0  # only a tokens/minute limit needs it
        wait = max(self.rpm.reserve(1) if self.rpm else 0.0, self.tpm.reserve(est_tokens) if self.tpm else 0.0)
        if wait > 0:
            await asyncio.sleep(wait)
        if s.t0 is None:
            s.t0 = time.perf_counter()
        o.requests += 1
        try:
            async with asyncio.timeout(cfg.timeout_s):
                response = await client.post("/chat/completions", body=body, cast_to=_httpx.Response)
            reply = json.loads(response.content)
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if not choices:
                raise _BadReply(f"reply without choices: {response.content[:120]!r}")
        except (openai.APIError, TimeoutError, ValueError, _BadReply) as e:
            self._failed(job, e)
            return
        finally:
            s.t1 = time.perf_counter()
        usage = reply.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        o.prompt_tokens += prompt_tokens
        o.completion_tokens += completion_tokens
        if self.tpm and usage:
            self.tpm.adjust(prompt_tokens + completion_tokens - est_tokens)
        for ch in choices[: job.n]:
            o.answers.append(read_answer(ch, cfg.use_logprobs))
        more = o.needs_more(cfg.votes)
        if more and o.requests < cfg.votes + cfg.max_retries + 1:
            self.queue.put_nowait(_Job(s, o, more))
        else:
            self._close(s, o, None)

    def _failed(self, job: _Job, e: Exception) -> None:
        """Retry later, give up on the order (not judged), or stop the batch."""
        cfg = self.cfg
        retryable, wait, reason = _classify(e)
        if cfg.api_key is not None and cfg.api_key.get():
            reason = reason.replace(cfg.api_key.get(), "***")
        if reason.startswith("fatal: "):  # built here, not raised here: it must not carry the API error
            self._stop(JudgeConfigError(reason.removeprefix("fatal: ")))
            return
        if retryable and wait is not None and wait > cfg.max_retry_after_s:
            retryable, reason = False, f"{reason}; Retry-After {wait:.0f} s exceeds max_retry_after_s"
        if retryable and job.attempt < cfg.max_retries:
            job.attempt += 1
            delay = backoff_s(job.attempt, base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s, retry_after=wait, rng=self.rng)
            log.info("llm judge: %s; retry %d/%d in %.2f s", reason, job.attempt, cfg.max_retries, delay)
            handle = asyncio.get_running_loop().call_later(delay, self._requeue, job)
            self.timers.add(handle)
            return
        tries = f" after {job.attempt + 1} attempts" if retryable else ""
        log.warning("llm judge: pair %s/%s not judged: %s%s", job.state.pair.a_id, job.state.pair.b_id, reason, tries)
        self._close(job.state, job.order, f"{NOT_JUDGED}{reason}{tries}")

    def _requeue(self, job: _Job) -> None:
        self.queue.put_nowait(job)

    def _close(self, s: _PairState, o: OrderAnswers, error: str | None) -> None:
        if o.done:
            return
        o.done, o.error = True, error
        self.open_orders -= 1
        if all(x.done for x in s.orders):
            self.results[s.index] = self._finish(s)
            spent = self.results[s.index].cost_usd
            if s.admitted is True:
                self.budget.settle(s.reserved_usd, spent)
                for job in self.waiting:  # they may fit now; a pair that cannot is skipped on its turn
                    if job.state.admitted == "waiting":
                        job.state.admitted = None
                    self.queue.put_nowait(job)
                self.waiting.clear()

    def _stop(self, error: Exception) -> None:
        """Close every open order; ``run`` raises ``error`` once the workers are done."""
        self.fatal = self.fatal or error
        for s in self.states:
            for o in s.orders:
                self._close(s, o, f"{NOT_JUDGED}batch stopped: {type(error).__name__}")

    def _worst_case_usd(self, pair: Pair) -> float:
        return worst_case_usd(self.cfg, self.judge.template, pair)

    def _finish(self, s: _PairState) -> Judgment:
        latency = (s.t1 - s.t0) if s.t0 is not None else 0.0
        return pair_judgment(s.pair, s.orders, self.cfg, latency_s=latency)


def request_body(cfg: LLMJudgeConfig, template, pair: Pair, *, swapped: bool, n: int) -> dict:
    """The chat-completions body asking about one order of ``pair`` (``swapped``: b shown first), with a
    fresh fence tag; the online judge posts it, the batch judge writes it into its JSONL file."""
    first, second = (pair.b, pair.a) if swapped else (pair.a, pair.b)
    messages = template.messages(pair.prompt, first, second)
    body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if n > 1:
        body["n"] = n
    if cfg.use_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = cfg.top_logprobs
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    return body


def worst_case_usd(cfg: LLMJudgeConfig, template, pair: Pair) -> float:
    """An upper bound on what the pair can cost at ``cfg``'s prices: every prompt byte a token
    (tokenizers merge bytes, chat markup adds a few), every vote its own request, every answer
    ``max_tokens`` long."""
    messages = template.messages(pair.prompt, pair.a, pair.b, tag="0" * 16)
    prompt = _prompt_bytes(messages) + 64
    per_order = cfg.votes * (prompt * cfg.price[0] + cfg.max_tokens * cfg.price[1])
    return per_order * (2 if cfg.both_orders else 1)


def read_choices(reply: dict, order: OrderAnswers, votes: int, use_logprobs: bool) -> None:
    """Add one chat-completion reply's answers and token usage to ``order``."""
    usage = reply.get("usage") or {}
    order.prompt_tokens += int(usage.get("prompt_tokens") or 0)
    order.completion_tokens += int(usage.get("completion_tokens") or 0)
    for ch in (reply.get("choices") or [])[:votes]:
        order.answers.append(read_answer(ch, use_logprobs))


@functools.cache
def _ssl_context():
    """One for every client of the process: building one costs ~40 ms of CPU."""
    return _httpx.create_ssl_context()


class _BadReply(Exception):
    """A 200 reply that is not a chat completion (a proxy's error page, a truncated body)."""


def _prompt_bytes(messages: list[dict]) -> int:
    return sum(len(m["content"].encode()) + 8 for m in messages)


def read_answer(choice: dict, use_logprobs: bool) -> dict:
    """One choice of a reply: its raw text, the verdict for the first slot, and P(first) when log-probs
    give it."""
    message = choice.get("message") or {}
    text = message.get("content")
    if text is None and message.get("refusal"):
        text = message["refusal"]
    verdict, why = parse_verdict(text)
    answer = {"text": (text or "")[:_RAW_CHARS], "verdict": verdict, "finish_reason": choice.get("finish_reason")}
    if verdict is None:
        answer["error"] = why
        return answer
    p = logprob_p_first(choice.get("logprobs"), verdict) if use_logprobs else None
    answer["p_first"] = p if p is not None else _VOTE[verdict]
    answer["source"] = "logprobs" if p is not None else "vote"
    return answer


def _classify(e: Exception) -> tuple[bool, float | None, str]:
    """(retryable, Retry-After seconds, reason). Reasons never carry the key: the API's own message is
    kept only for statuses whose bodies do not echo credentials."""
    if isinstance(e, (TimeoutError, openai.APITimeoutError)):
        return True, None, "timeout"
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        if status in (401, 403):
            return False, None, f"fatal: the server refused the credentials (HTTP {status})"
        if status == 404:
            return False, None, "fatal: no such model or endpoint (HTTP 404); check model and base_url"
        headers = e.response.headers if e.response is not None else None
        should = (headers.get("x-should-retry") if headers is not None else None) or ""
        retryable = status in (408, 409, 429) or status >= 500
        retryable = {"true": True, "false": False}.get(should.lower(), retryable)
        message = _api_message(e)
        return retryable, retry_after_s(headers) if retryable else None, f"HTTP {status}{': ' + message if message else ''}"
    if isinstance(e, openai.APIConnectionError):
        return True, None, "connection error"
    if isinstance(e, (_BadReply, ValueError)):
        return True, None, f"malformed reply ({str(e)[:120]})"
    return False, None, f"{type(e).__name__}"


def _api_message(e: openai.APIStatusError) -> str:
    """The server's explanation: OpenAI's error message, FastAPI's ``detail``, or the body as text."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        body = (inner.get("message") or inner.get("detail") or inner) if isinstance(inner, dict) else inner
    return str(body)[:160] if body else ""


def pair_judgment(pair: Pair, pair_orders: list[OrderAnswers], cfg: LLMJudgeConfig, *, latency_s: float = 0.0) -> Judgment:
    """The pair's judgment from its orders (see the module docstring for the rules). The batch judge
    (oracles/batch_judge.py) reads its answers into the same ``OrderAnswers`` and calls this too."""
    price_p, price_c = cfg.price
    prompt_tokens = sum(o.prompt_tokens for o in pair_orders)
    completion_tokens = sum(o.completion_tokens for o in pair_orders)
    cost = prompt_tokens * price_p + completion_tokens * price_c
    latency = latency_s
    orders, p_original, reasons, failures = [], [], [], []
    for o in pair_orders:
        name = "ba" if o.swapped else "ab"
        usable = [a for a in o.answers if a["verdict"] is not None]
        p_first = _mean(a["p_first"] for a in usable) if usable else None
        orders.append({
            "order": name,
            "p_first": p_first,
            "answers": o.answers,
            "requests": o.requests,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
            **({"error": o.error} if o.error else {}),
        })
        if o.error is not None:
            failures.append(f"order {name}: {o.error.removeprefix(NOT_JUDGED)}")
        elif p_first is None:
            why = next((a["error"] for a in o.answers if a.get("error")), "no answer")
            reasons.append(f"order {name}: {why}")
        else:
            p_original.append(1.0 - p_first if o.swapped else p_first)
    detail = {"orders": orders, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    n_votes = sum(1 for o in pair_orders for a in o.answers if a["verdict"] is not None)
    if failures:
        error = NOT_JUDGED + "; ".join(failures)
        return Judgment(pair, None, n_votes=0, latency_s=latency, cost_usd=cost, error=error, detail=detail, skipped=True)
    if reasons:
        return Judgment(pair, None, n_votes=0, latency_s=latency, cost_usd=cost, error="abstained: " + "; ".join(reasons), detail=detail)
    p_a = min(1.0, max(0.0, _mean(p_original)))
    return Judgment(pair, p_a, n_votes=n_votes, latency_s=latency, cost_usd=cost, detail=detail)


# ----- diagnostics --------------------------------------------------------------------------------
def judge_metrics(judgments: list[Judgment]) -> dict:
    """Per-round diagnostics of an LLM judge, namespaced keys:

    judge/pairs, judge/judged, judge/abstained, judge/not_judged  counts (not_judged: skipped, asked again)
    judge/abstention_rate   abstentions / (judged + abstained)
    judge/position_bias     share of answers picking the first slot, among answers picking a slot
                            (0.5 = unbiased when every pair is asked in both orders)
    judge/first_slot_p      mean P(first slot ≻ second) over answered orders (soft version of the above)
    judge/consistency       share of pairs, answered in both orders, whose two orders agree on a, b or tie
    judge/tie_rate          share of answers that are ties
    judge/p_from_logprobs   share of answers whose P came from log-probs (the rest: votes)
    judge/requests          HTTP attempts, retries included
    tokens/prompt, tokens/completion, cost/usd, cost/usd_per_judgment (per final judgment)

    Pass every judgment, skipped ones included: a skipped pair may have cost money (one order answered,
    the other failed), and only then do the cost totals and ``judge/not_judged`` count it.
    """
    final = [j for j in judgments if not j.skipped]
    judged = [j for j in final if j.p_a is not None]
    answers = [a for j in final for o in j.detail.get("orders", []) for a in o.get("answers", []) if a.get("verdict")]
    slot = [a for a in answers if a["verdict"] != TIE]
    orders = [o for j in final for o in j.detail.get("orders", []) if o.get("p_first") is not None]
    agree = [a for a in (orders_agree(j.detail) for j in final) if a is not None]
    cost = sum(j.cost_usd for j in judgments)
    return {
        "judge/pairs": len(judgments),
        "judge/judged": len(judged),
        "judge/abstained": len(final) - len(judged),
        "judge/not_judged": len(judgments) - len(final),
        "judge/abstention_rate": _share(len(final) - len(judged), len(final)),
        "judge/position_bias": _share(sum(a["verdict"] == FIRST for a in slot), len(slot)),
        "judge/first_slot_p": _mean(o["p_first"] for o in orders) if orders else None,
        "judge/consistency": _share(sum(agree), len(agree)),
        "judge/tie_rate": _share(sum(a["verdict"] == TIE for a in answers), len(answers)),
        "judge/p_from_logprobs": _share(sum(a.get("source") == "logprobs" for a in answers), len(answers)),
        "judge/requests": sum(o.get("requests", 0) for j in judgments for o in j.detail.get("orders", [])),
        "tokens/prompt": sum(j.detail.get("prompt_tokens", 0) for j in judgments),
        "tokens/completion": sum(j.detail.get("completion_tokens", 0) for j in judgments),
        "cost/usd": cost,
        "cost/usd_per_judgment": cost / len(final) if final else None,
    }


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _share(k: int, n: int) -> float | None:
    return k / n if n else None
