"""A cascade campaign's learned preference model: its checkpoints in the store and the cascade oracle that
judges each round with the right one (pipelines/retrain.py retrains it after each round).

In the store (the truth, like the policy's checkpoints):

    preference_models/r0/          the initial model (``oracle.init``), copied in once
    preference_models/r<N>/        retrained after round N on what the judge and people answered up to N
    preference_models/r<N>.json    its manifest (fingerprint, the model it started from, the fit's
                                   metrics), written last: only a model with a manifest exists
                                   (data/checkpoints.py, the rule of every checkpoint)
    preference_models/.work-r<N>/  step checkpoints of an unfinished retraining (a killed one resumes)

Round N judges with the newest model of a round before N (r0 to start), so a round's model is fixed
before the round starts and a rerun asks the same model. Checkpoint folders are byte-for-byte what
``fit_preference_model`` wrote, so the fingerprint in the manifest is the one a loaded model reports;
a folder changed after it was written is refused rather than used under the wrong name.

The cascade's oracle id is stable for the campaign (``cascade_oracle_id``): the solver reads every
round's judgments under one id, while each stored judgment names the model version that answered
(``detail``: ``answered_by``, the learned oracle's id with the model's fingerprint, and ``prefmodel``,
the checkpoint folder), so two versions' judgments are told apart in the data and retraining never
takes a model's own answers for labels. A pair belongs to one round and is judged once, by the one
model of that round.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from data import Store
from data import checkpoints as marks
from oracles.budget import Budget
from oracles.cascade import Cascade, Confident, OrdersAgree, Stage
from oracles.learned import LearnedOracle
from oracles.protocol import NOT_JUDGED, Judgment, Pair, make_oracle_id
from pipelines.config import CampaignConfig
from pipelines.versions import local_folder, publish_folder, sampling_policy, version
from pipelines.world import World
from pipelines.gpu import HoldingGpu, gpu_slot

MODELS = "preference_models"
ARCHITECTURE = ("head", "pool", "head_hidden", "max_prompt_tokens", "max_response_tokens")


def model_dir(round: int) -> str:
    return f"{MODELS}/r{round}"


def model_rounds(store: Store) -> list[int]:
    """The rounds with a complete preference model (its manifest written), ascending."""
    return sorted(int(name[1:]) for name in marks.complete_checkpoints(store, MODELS) if name[:1] == "r" and name[1:].isdigit())


def read_manifest(store: Store, round: int) -> dict:
    return marks.read_manifest(store, model_dir(round))


def model_for_round(store: Store, config: CampaignConfig, round: int) -> int:
    """The model round ``round`` judges with: the newest from an earlier round (r0, written now if missing)."""
    earlier = [k for k in model_rounds(store) if k < round]
    if earlier:
        return earlier[-1]
    ensure_initial_model(store, config)
    return 0


def save_model(store: Store, round: int, folder: str | os.PathLike, manifest: dict) -> str:
    """Put a local checkpoint folder in the store as ``preference_models/r<round>`` (moved into place
    whole), then its manifest, which marks it complete."""
    publish_folder(store, str(folder), model_dir(round))
    marks.mark_complete(store, model_dir(round), manifest)
    return store.path(model_dir(round))


def ensure_initial_model(store: Store, config: CampaignConfig) -> None:
    """Write r0 once: the ``init`` checkpoint as it is, or a new model on the tiny or given backbone.
    Later changes to ``init`` do not touch a store that has its r0."""
    if marks.is_complete(store, model_dir(0)):
        return
    from solvers import preference_model as pm

    cfg = config.oracle
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "r0"
        if _is_checkpoint(cfg.init):
            source = Path(cfg.init).expanduser()
            model = pm.load_preference_model(source, device="cpu")  # refuses a folder that does not load
            _check_architecture(cfg, model.config)
            shutil.copytree(source, folder)
        else:
            model = _new_model(cfg)
            pm.save_preference_model(model, folder)
        # the model's fingerprint is its folder's (the copy has the same files)
        save_model(store, 0, folder, {"round": 0, "fingerprint": model.fingerprint, "head": model.config.head, "init": cfg.init})


def _is_checkpoint(path: str) -> bool:
    from solvers.preference_model import PREFERENCE_FILE

    return path != "tiny" and (Path(path).expanduser() / PREFERENCE_FILE).is_file()


def _new_model(cfg):
    from solvers import preference_model as pm

    default = 64 if cfg.init == "tiny" else 256
    settings = pm.PreferenceModelConfig(
        head=cfg.head or "pairwise",
        pool=cfg.pool or "mean",
        head_hidden=cfg.head_hidden or default,
        max_prompt_tokens=cfg.max_prompt_tokens or default,
        max_response_tokens=cfg.max_response_tokens or default,
    )
    if cfg.init == "tiny":
        return pm.tiny_preference_model(settings, seed=cfg.tiny_seed)
    return pm.PreferenceModel.from_backbone(cfg.init, settings, seed=cfg.train.seed, device="cpu")


def _check_architecture(cfg, saved) -> None:
    for name in ARCHITECTURE:
        wanted = getattr(cfg, name)
        if wanted is not None and wanted != getattr(saved, name):
            raise ValueError(f"oracle.{name}: {wanted!r}, but the checkpoint {cfg.init} has {getattr(saved, name)!r}; leave it unset to use the checkpoint's")


# ----- the cascade's id ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    """Accept any answer that has a probability: the judge rule when people follow a judge that has no
    two orders to compare (a synthetic one, or an LLM judge asked one order)."""

    def __call__(self, j: Judgment) -> bool:
        return j.p_a is not None


def judge_accept(cfg):
    """When people follow, which judge answers are final (the others go on to people)."""
    if not cfg.people:
        return None
    return OrdersAgree() if cfg.judge.compares_orders else Answered()


def cascade_oracle_id(config: CampaignConfig, judge_id: str, people_id: str | None, first_id: str | None = None) -> str:
    """The campaign's cascade id: its rules, its first stage (a local judge's id, or the learned model
    but not its version: see the module docstring), its judge and its people (their ids), so the solver
    reads every round's judgments under it."""
    cfg = config.oracle
    rule = judge_accept(cfg)
    stages = [
        {"oracle": first_id or f"learned: {MODELS}/ of the store, the version in each judgment's detail", "accept": repr(Confident(cfg.confidence))},
        {"oracle": judge_id, "accept": repr(rule) if rule is not None else None},
    ]
    if cfg.people:
        stages.append({"oracle": people_id, "accept": None})
    return make_oracle_id("cascade", config.name, {"stages": stages})


# ----- the cascade oracle of a campaign ---------------------------------------------------------------------


@dataclass
class _Round:
    cascade: Cascade
    model_round: int | None  # the round of the preference model that judges (None: a local judge is the first stage)
    budgets: dict[str, Budget]  # stage name → its budget for this round and phase


class CampaignCascade:
    """The ``cascade`` oracle of a campaign: one object for every round, with the campaign's stable
    ``oracle_id``. It judges each training pair with the cascade of the pair's round (read from the
    store): the learned model of that round, answering when ``|P − ½| ≥ confidence``; else the judge
    within the round's budget; else, with ``people``, people. Held-out (evaluation) pairs go to the
    judge alone, outside the budget: the model never grades the policy trained on its answers.

    Budgets are per round, split evenly over the round's phases (an extragradient round judges the
    midpoint's samples too, and each phase needs labels), and count what the store already holds for
    the round and phase, so a retried task or a rerun round spends nothing twice. Pairs past a budget,
    and those handed to people, are returned as judgments without a probability
    (``detail["not_judged"]``: "budget" or "people"), so they are stored and a rerun does not ask the
    model and pay the judge for them again; people's answers come in later under their own id. A
    round's pairs are taken one prompt at a time in turn, so a budget covers many prompts rather than
    the first few.

    ``judge``, ``people`` (None: no people) and ``first`` (``oracle.first``, a local judge in place of the
    learned model; None: the learned model) are oracles not built yet (pipelines/oracle_factory's
    ``OracleSpec``: an ``oracle_id`` and ``build()``); the judge and the first stage are built now,
    people when first asked."""

    def __init__(self, config: CampaignConfig, world: World, *, judge, people=None, first=None, store: Store | None = None):
        self.config, self.world = config, world
        self.store = store if store is not None else Store(config.store)
        self.judge_oracle = HoldingGpu(judge.build()) if judge.runs_model else judge.build()  # a local judge model holds the slot while it judges
        self.first_oracle = HoldingGpu(first.build()) if first is not None else None
        self._people_spec = people
        self.oracle_id = cascade_oracle_id(config, self.judge_oracle.oracle_id, people.oracle_id if people else None, first.oracle_id if first else None)
        self._models: dict[int, tuple[LearnedOracle, int]] = {}
        self._phases: dict[tuple[int, str], _Round] = {}
        self._last: tuple[int, str] | None = None
        self._people = None
        self._where: dict[str, tuple[int, str]] = {}  # response_id → (round, sampling policy)
        self._splits: dict[str, str] = {}  # prompt_id → split

    def __repr__(self) -> str:
        return f"CampaignCascade({self.oracle_id!r}, judge={self.judge_oracle.oracle_id!r})"

    def judge(self, pairs: list[Pair]) -> list[Judgment]:
        if not pairs:
            return []
        where = self._locate(pairs)
        out: list[Judgment | None] = [None] * len(pairs)
        groups: dict[tuple[int, str] | None, list[int]] = defaultdict(list)
        for i, key in enumerate(where):
            groups[key].append(i)
        for key, idx in groups.items():
            if key is None:  # held out
                for i, j in zip(idx, self.judge_oracle.judge([pairs[i] for i in idx])):
                    out[i] = self._held_out(j)
                continue
            state = self.for_round(*key)
            order = [idx[k] for k in _by_prompt_in_turn([pairs[i] for i in idx])]
            for i, j in zip(order, state.cascade.judge([pairs[i] for i in order])):
                out[i] = self._stored_form(j, state)
            self._last = key
        return out  # type: ignore[return-value]

    def metrics(self, judgments: list[Judgment]) -> dict:
        """The routing of the last round and phase judged (``Cascade.metrics``: cascade/share/<stage>,
        cascade/cost_usd/<stage>, budgets left, …), with the pairs past a budget or sent to people
        counted as not judged / pending; and cascade/prefmodel_version, the model round that judged."""
        routed = [replace(j, skipped=True) if "not_judged" in j.detail else j for j in judgments if not j.detail.get("held_out")]
        out: dict = {}
        if routed and self._last is not None:
            state = self._phases[self._last]
            out = state.cascade.metrics(routed)
            for name, b in state.budgets.items():
                if b.pairs is not None:
                    out[f"cascade/budget_left_pairs/{name}"] = b.pairs - b.spent_pairs
                if b.usd is not None:
                    out[f"cascade/budget_left_usd/{name}"] = b.usd - b.spent_usd
            if state.model_round is not None:
                out["cascade/prefmodel_version"] = state.model_round
        if len(routed) < len(judgments):
            out["cascade/held_out_pairs"] = len(judgments) - len(routed)
        return out

    def for_round(self, round: int, sampled: str | None = None) -> _Round:
        """The cascade for the pairs of ``round`` among responses of policy version ``sampled`` (the
        phase; None: the round's first): the round's model, the phase's share of the round's budgets,
        charged with what the store holds for it already."""
        sampled = sampled or version(round - 1)
        if (round, sampled) in self._phases:
            return self._phases[(round, sampled)]
        cfg = self.config.oracle
        if self.first_oracle is not None:
            first, model_version = Stage(self.first_oracle, accept=Confident(cfg.confidence), name=cfg.first.kind), None
        else:
            learned, model_version = self._model(round)
            first = Stage(HoldingGpu(learned), accept=Confident(cfg.confidence), name="learned")  # the judge and people run without the slot
        n, k = len(self.config.solver.entry.phases), int(sampled == version(round, "midpoint"))
        budgets = {"judge": _share(cfg.budget.pairs, cfg.budget.usd, cfg.budget.usd_per_pair, k, n)}
        over_budget = "pass_on" if cfg.people else "stop"  # people take the judge's overflow
        stages = [
            first,
            Stage(self.judge_oracle, accept=judge_accept(cfg), budget=budgets["judge"], name="judge", over_budget=over_budget),
        ]
        if cfg.people:
            budgets["people"] = _share(cfg.people_pairs, None, None, k, n)
            stages.append(Stage(self._people_oracle(), budget=budgets["people"], name="people"))
        cascade = Cascade(stages, name=self.config.name)
        cascade.start_round(round)
        state = _Round(cascade, model_version, {name: b for name, b in budgets.items() if b is not None})
        self._charge_stored(state, round, sampled)
        self._phases[(round, sampled)] = state
        return state

    # ----- pieces ------------------------------------------------------------------------------------

    def _model(self, round: int) -> tuple[LearnedOracle, int]:
        """Round ``round``'s learned oracle (loaded once) and its model's round."""
        if round in self._models:
            return self._models[round]
        from solvers.preference_model import load_preference_model

        cfg = self.config.oracle
        k = model_for_round(self.store, self.config, round)
        with tempfile.TemporaryDirectory() as tmp, gpu_slot():
            model = load_preference_model(local_folder(self.store, model_dir(k), tmp), device=cfg.device)
        expected = read_manifest(self.store, k)["fingerprint"]
        if model.fingerprint != expected:
            raise ValueError(
                f"{self.store.path(model_dir(k))} changed after it was written (fingerprint {model.fingerprint[:12]}, its manifest says {expected[:12]}): "
                f"restore it, or delete it with its manifest {marks.manifest_path(model_dir(k))} to fall back to an earlier model"
            )
        self._models[round] = (LearnedOracle(model, name=model.config.head, batch_size=cfg.batch_size), k)
        return self._models[round]

    def _locate(self, pairs: list[Pair]) -> list[tuple[int, str] | None]:
        """Per pair: (its round, the policy version of its responses), or None when its prompt is held out."""
        if any(p.a_id not in self._where or p.prompt_id not in self._splits for p in pairs):
            self._read_locations()
        missing = [p.a_id for p in pairs if p.a_id not in self._where]
        if missing:
            raise ValueError(f"the cascade judges responses of its campaign's store; {missing[0]} (and {len(missing) - 1} more) is not in {self.store}")
        return [None if self._splits.get(p.prompt_id) == "eval" else self._where[p.a_id] for p in pairs]

    def _read_locations(self) -> None:
        """Every stored response's (round, sampling policy) and every prompt's split. Read again only when
        a pair names one not seen yet: a stored row is never rewritten (a write skips stored keys), and a
        response's round and policy version are part of its id, so what is held cannot go stale."""
        rows = self.store.read("responses", columns=["response_id", "round", "policy_version"])
        self._where = {rid: (int(r), sampling_policy(v)) for rid, r, v in zip(rows["response_id"], rows["round"], rows["policy_version"])}
        prompts = self.store.read("prompts", columns=["prompt_id", "split"])
        self._splits = dict(zip(prompts["prompt_id"], prompts["split"]))

    def _people_oracle(self):
        if self._people is None:
            self._people = self._people_spec.build()
        return self._people

    def _stored_form(self, j: Judgment, state: _Round) -> Judgment:
        """Name the model version; turn 'past a budget' and 'sent to people' into stored non-answers."""
        detail = {**j.detail, **({"prefmodel": model_dir(state.model_round)} if state.model_round is not None else {})}
        if j.skipped and ("pending" in detail or any(step.get("over_budget") for step in detail.get("route", []))):
            detail["not_judged"] = "people" if "pending" in detail else "budget"
            return replace(j, skipped=False, p_a=None, n_votes=0, detail=detail)
        return replace(j, detail=detail)

    def _held_out(self, j: Judgment) -> Judgment:
        if j.skipped:
            return replace(j, detail={"held_out": True, "answer": j.detail})
        step = {"stage": "judge", "oracle": self.judge_oracle.oracle_id, "p_a": j.p_a, "cost_usd": j.cost_usd, "accepted": True}
        detail = {"answered_by": self.judge_oracle.oracle_id, "stage": "judge", "held_out": True, "route": [step], "answer": j.detail}
        return replace(j, detail=detail)

    def _charge_stored(self, state: _Round, round: int, sampled: str) -> None:
        """Charge each budget with what the store's judgments of this round and phase already spent there."""
        if not state.budgets:
            return
        stored = self.store.read("comparisons", rounds=[round], columns=["prompt_id", "a_id", "oracle_id", "route"])
        stored = stored[stored["oracle_id"] == self.oracle_id]
        if not set(stored["a_id"]) <= self._where.keys():
            self._read_locations()
        mine = stored[stored["a_id"].map(lambda a: self._where.get(a, (None, None))[1]) == sampled]
        for prompt, route in zip(mine["prompt_id"], mine["route"]):
            if route is None or self._splits.get(prompt) == "eval":  # held-out pairs are judged outside the budget
                continue
            for step in route:
                budget = state.budgets.get(step.get("stage"))
                if budget is None or step.get("over_budget") or str(step.get("error") or "").startswith(NOT_JUDGED):
                    continue
                budget.spend(1, float(step.get("cost_usd") or 0.0))


def _share(pairs: int | None, usd: float | None, usd_per_pair: float | None, k: int, n: int) -> Budget | None:
    """Phase k's share (of n) of a round's budget: pairs split as evenly as whole pairs allow, USD evenly."""
    if pairs is None and usd is None:
        return None
    part = None if pairs is None else pairs * (k + 1) // n - pairs * k // n
    return Budget(pairs=part, usd=None if usd is None else usd / n, usd_per_pair=usd_per_pair)


def _by_prompt_in_turn(pairs: list[Pair]) -> list[int]:
    """Positions of ``pairs`` taking one pair of each prompt in turn (first pairs first)."""
    queues: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        queues[p.prompt_id].append(i)
    longest = max(len(q) for q in queues.values())
    return [q[k] for k in range(longest) for q in queues.values() if k < len(q)]
