"""People as a preference oracle: a queued oracle on a Label Studio server (label-studio-sdk 2.x).

    oracle = LabelStudioOracle(LabelStudioConfig(campaign="demo", overlap=3), url=url, api_key=token)
    oracle.submit(pairs, round=r)        # one task per ordered pair; a repeated submit adds nothing
    got = oracle.collect()                # everything answered so far, whatever its round
    store.write("comparisons", got.rows())    # each judgment in the round its pair was submitted in
    got.problems, got.quorum(round=r), got.metrics()

One project per campaign, found again by its title (or the id in the config) and never created twice.
Every call is batched: tasks are imported ``batch_size`` per request and listed ``batch_size`` per page
with their annotations, so a round of thousands of pairs costs a handful of requests.

The API token is handed to the SDK client and kept nowhere else: not in the config, the oracle's
attributes or repr, the judgments, or the messages of the errors raised here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from oracles.label_studio_tasks import INTERFACE_VERSION, LABEL_CONFIG, Collected, collect_tasks, pair_key, task_data
from oracles.protocol import Pair, make_oracle_id

log = logging.getLogger(__name__)
T = TypeVar("T")

TITLE_MAX = 50  # Label Studio's limit on project titles
DEFAULT_INSTRUCTIONS = (
    "<p>Read the prompt and both responses, then choose the better response. Choose <b>About the same</b> "
    "only when neither is better. Judge the content, not the side it is shown on. The reason is optional.</p>"
)


class LabelStudioError(RuntimeError):
    """A Label Studio call failed or found something it cannot use. Never carries the token."""


@dataclass(frozen=True)
class LabelStudioConfig:
    """The human oracle of one campaign. URL and token are passed to the oracle, not kept here."""

    campaign: str  # one Label Studio project per campaign, titled "nashflow <campaign>"
    overlap: int = 1  # votes asked per pair, each from a different person (project maximum_annotations)
    name: str = "people"  # names the oracle in its oracle_id
    project_id: int | None = None  # use this project instead of finding it by title
    instructions: str = DEFAULT_INSTRUCTIONS  # shown to annotators before they start (HTML)
    batch_size: int = 1000  # tasks per import request and per listing page
    timeout_s: float = 120.0  # per request; a 1,000-task import takes seconds

    def __post_init__(self):
        if self.overlap < 1:
            raise ValueError(f"overlap must be at least 1, not {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if not self.campaign or len(self.title) > TITLE_MAX:
            raise ValueError(f"campaign {self.campaign!r} gives the project title {self.title!r}; Label Studio allows 1 to {TITLE_MAX} characters")

    @property
    def title(self) -> str:
        return f"nashflow {self.campaign}"

    @property
    def oracle_id(self) -> str:
        # What changes the answers: how many people vote, and what they are shown and asked.
        return make_oracle_id("label_studio", self.name, {"overlap": self.overlap, "interface": INTERFACE_VERSION})


@dataclass(frozen=True)
class Submitted:
    created: int  # new tasks
    already_there: int  # pairs that had a task already (a repeated submit)


class LabelStudioOracle:
    """A queued oracle (``submit`` / ``collect`` / ``pending``) on one Label Studio project."""

    def __init__(self, config: LabelStudioConfig, *, url: str, api_key: str, http_client: httpx.Client | None = None):
        """``http_client`` lets a caller count or proxy requests (the benchmark counts them)."""
        self.config = config
        self.oracle_id = config.oracle_id
        self.url = url.rstrip("/")
        self._client = LabelStudio(base_url=self.url, api_key=api_key, timeout=config.timeout_s, httpx_client=http_client)
        self._project_id = config.project_id

    def __repr__(self) -> str:
        return f"LabelStudioOracle({self.oracle_id!r}, url={self.url!r}, title={self.config.title!r}, project_id={self._project_id})"

    def __getstate__(self):
        # Its client holds the token: pickled into a task result or a cache it would be stored. Pass
        # the config (and where to read the token) to a task and build the oracle there.
        raise TypeError("a LabelStudioOracle holds its API token and is not pickled; pass its LabelStudioConfig and build it where it is used")

    # ----- the queued-oracle protocol --------------------------------------------------------------
    def submit(self, pairs: Iterable[Pair], *, round: int) -> Submitted:
        """One task per ordered pair not yet in the project, tagged with ``round``. Pairs that already
        have a task (from any round) are left as they are, so submitting again is harmless."""
        wanted = {pair_key(p, self.oracle_id): p for p in pairs}
        if not wanted:
            return Submitted(created=0, already_there=0)
        there = {data.get("key") for _, data, _, _ in self._list_tasks(fields="task_only")}
        new = [task_data(p, round=round, oracle_id=self.oracle_id) for k, p in wanted.items() if k not in there]
        size = self.config.batch_size
        for start in range(0, len(new), size):
            chunk = new[start : start + size]
            # No automatic retry: a retried import that had in fact landed would repeat its tasks. A
            # failed submit is simply run again; it imports only what is still missing.
            done = self._call("import tasks", lambda: self._client.projects.import_tasks(id=self.project_id, request=[{"data": d} for d in chunk], request_options={"max_retries": 0}))
            if done.task_count is not None and done.task_count != len(chunk):
                raise LabelStudioError(f"Label Studio at {self.url}: imported {done.task_count} of {len(chunk)} tasks; submit again to add the rest")
        log.info("label studio: %d new tasks for round %d, %d already there", len(new), round, len(wanted) - len(new))
        return Submitted(created=len(new), already_there=len(wanted) - len(new))

    def collect(self, *, min_votes: int | None = None) -> Collected:
        """Everything the project holds, read in ``ceil(tasks / batch_size)`` requests: judgments for
        pairs with at least ``min_votes`` (default: ``overlap``) trusted votes, each with its own round,
        and the problems found. Writing judgments with fewer votes than ``overlap`` freezes them in the
        store (a stored key is never overwritten), so lower ``min_votes`` only to close a round early."""
        got = collect_tasks(self._list_tasks(fields="all"), oracle_id=self.oracle_id, min_votes=self.config.overlap if min_votes is None else min_votes)
        if got.problems:
            log.warning("label studio: %d task(s) not trusted or merged; see Collected.problems", len(got.problems))
        return got

    def pending(self) -> int:
        """Submitted pairs that do not have ``overlap`` trusted votes yet."""
        return self.collect().pending()

    def quorum(self, min_votes: int | None = None, *, round: int | None = None) -> float:
        """Share of submitted pairs (of one round, or all) with at least ``min_votes`` (default
        ``overlap``) trusted votes: a round can move on at, say, 0.9."""
        return self.collect().quorum(min_votes, round=round)

    # ----- the project --------------------------------------------------------------------------------
    @property
    def project_id(self) -> int:
        """The campaign's project: the configured id, else the one titled ``config.title``, else a new
        one. Found once per oracle instance."""
        if self._project_id is None:
            self._project_id = self._find_or_create_project()
        return self._project_id

    def _find_or_create_project(self) -> int:
        if self.config.project_id is not None:
            project = self._call("get project", lambda: self._client.projects.get(id=self.config.project_id))
            return self._checked(project)
        found = self._projects_titled(self.config.title)
        if not found:
            found = self._create_project()
        return self._checked(found[0])

    def _create_project(self) -> list:
        """Create the campaign's project; returns the projects with its title, oldest first.

        Two oracles may create it at the same moment, and a create that failed (e.g. the server's
        SQLite database was locked) may still have left a project. Everyone keeps the oldest; newer
        ones with the same title and no tasks are deleted, so none is left over.
        """
        settings = dict(
            title=self.config.title,
            description=f"Pairwise preferences for the nashflow campaign {self.config.campaign!r} ({self.oracle_id}).",
            label_config=LABEL_CONFIG,
            expert_instruction=self.config.instructions,
            show_instruction=True,
            show_skip_button=True,
            enable_empty_annotation=False,
            maximum_annotations=self.config.overlap,
            overlap_cohort_percentage=100,
        )
        try:  # not retried automatically: a retry after a create that landed makes a second project
            self._call("create project", lambda: self._client.projects.create(**settings, request_options={"max_retries": 0}))
        except LabelStudioError:
            if not self._projects_titled(self.config.title):
                raise
        found = self._projects_titled(self.config.title)
        for extra in found[1:]:
            if not extra.task_number:
                try:
                    self._call("delete duplicate project", lambda: self._client.projects.delete(id=extra.id))
                except LabelStudioError:
                    pass  # another oracle deleted it first
        log.info("label studio: project %d %r", found[0].id, self.config.title)
        return found

    def _checked(self, project) -> int:
        if project.maximum_annotations != self.config.overlap:
            raise LabelStudioError(
                f"project {project.id} {project.title!r} asks {project.maximum_annotations} votes per pair, this oracle "
                f"{self.config.overlap}; judgments of two settings would mix. Use another campaign or project_id."
            )
        return project.id

    def _projects_titled(self, title: str) -> list:
        # The title filter matches substrings, case-insensitively: keep exact matches, oldest first.
        listed = self._call("list projects", lambda: list(self._client.projects.list(title=title, page_size=100)))
        return sorted((p for p in listed if p.title == title), key=lambda p: p.id)

    # ----- IO -----------------------------------------------------------------------------------------
    def _list_tasks(self, *, fields: str) -> Iterator[tuple[int, dict, list[dict], object]]:
        """Every task of the project as (id, data, annotations, created_at), ``batch_size`` per page.
        ``resolve_uri=False`` asks for the data exactly as imported (no storage links resolved): it is
        what the fingerprint covers, and the listing is faster."""
        size, page, seen = self.config.batch_size, 1, 0
        project = self.project_id
        while True:
            try:
                pager = self._call("list tasks", lambda: self._client.tasks.list(project=project, page=page, page_size=size, fields=fields, resolve_uri=False))
            except _PastTheEnd:
                if page == 1:
                    raise LabelStudioError(f"Label Studio at {self.url}: project {project} not found") from None
                return  # the task count shrank while paging
            items = pager.items or []
            for t in items:
                yield t.id, t.data or {}, t.annotations or [], t.created_at
            seen += len(items)
            total = getattr(pager.response, "total", None)
            if len(items) < size or (total is not None and seen >= total):
                return
            page += 1

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one SDK call; failures become a LabelStudioError that names the call and the status but
        holds no request (whose headers carry the token) and no chained exception."""
        try:
            return fn()
        except ApiError as e:
            if e.status_code == 404 and what == "list tasks":
                raise _PastTheEnd() from None
            body = str(e.body)
            raise LabelStudioError(f"Label Studio at {self.url}: {what} failed with HTTP {e.status_code}: {body[:300]}") from None
        except httpx.HTTPError as e:
            raise LabelStudioError(f"Label Studio at {self.url}: {what} failed: {type(e).__name__}: {e}") from None


class _PastTheEnd(Exception):
    pass
