"""``nashflow eval``: a finished campaign's versions on its held-out prompts, as the papers report them.

Per version against an opponent (the reference v0, or the previous version): raw and length-controlled
win-rate with 95% intervals and the response lengths. Across the versions (a round-robin: every pair of
versions on the same prompts and sample slots): the win-rate matrix, Bradley–Terry ratings, cyclic
triples, the maximal lottery and each version's win-rate against it (solvers/evaluation.py).

It reads and writes the campaign's tables. A version's held-out samples are reused where the store has
them (the round's evaluation stage samples v_t and v0 in round t, with this same seed) and sampled into
the version's own round otherwise; judgments are stored like any others, so a second run asks nothing.
They are evaluation judgments by the prompts' split ("eval"): the solver (``stages.judged_pairs``, the
LM update's ``training_pairs``) and the learned oracle (``examples_from_store``) read training prompts only.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from data import Store, comparison_id, prompt_id, response_id
from data.keys import stable_hash
from oracles.protocol import Pair
from pipelines.config import CampaignConfig, ConfigError, load_config, parse_config
from pipelines.oracle_factory import oracle_spec
from pipelines.stages import EVAL_SEED_OFFSET, judge_pairs, sample_responses
from pipelines.versions import has_checkpoint, load_policy
from pipelines.world import World
from solvers import evaluation

CONFIG_FILE = "campaign.json"  # the campaign's config as the run saw it, written into the store when it starts


def save_campaign_config(store: Store, config: CampaignConfig) -> None:
    """Keep the config beside the data (names of secrets only, never their values), so that
    ``nashflow eval STORE`` knows the campaign's policy, prompts and oracle."""
    store.write_bytes(CONFIG_FILE, config.model_dump_json(exclude_unset=True).encode())


def campaign_config(store: Store, path: str | None = None) -> CampaignConfig:
    """The campaign's config: ``path`` (a YAML) when given, else the one the campaign saved in the store."""
    if path:
        return load_config(path, store=store.uri)
    if not store.exists(CONFIG_FILE):
        raise ConfigError(f"{store.path(CONFIG_FILE)} does not exist (a store written before campaigns saved their config): pass the campaign's YAML with --config")
    raw = json.loads(store.read_bytes(CONFIG_FILE))
    raw["store"] = store.uri
    return parse_config(raw, source=store.path(CONFIG_FILE))


def with_oracle(config: CampaignConfig, path: str) -> CampaignConfig:
    """The campaign with the ``oracle:`` section of another YAML (validated by the same config model)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict) or "oracle" not in raw:
        raise ConfigError(f"{path}: expected a mapping with an `oracle:` section")
    return parse_config({**config.model_dump(exclude_unset=True), "oracle": raw["oracle"]}, source=path)


@dataclass
class EvalReport:
    versions: list[str]
    against: str
    oracle_id: str
    rows: list[dict]  # one per version: vs its opponent, and its population figures
    population: dict = field(default_factory=dict)  # W, ratings, cycles, lottery (with ≥ 2 versions)
    sampled: int = 0  # responses sampled now (0 when the store had them all)
    judged_now: int = 0


def finished_versions(store: Store) -> list[str]:
    rounds = store.read("rounds", columns=["round"])["round"]
    return [f"v{t}" for t in range(0, int(rounds.max()) + 1 if len(rounds) else 1) if t == 0 or has_checkpoint(store, f"v{t}")]


def evaluate(store: Store, config: CampaignConfig, *, versions: list[str] | None = None, against: str = "reference") -> EvalReport:
    """The report of ``nashflow eval`` (see the module's docstring). ``against``: ``reference`` (v0),
    ``previous`` (v_{t−1}), ``population`` (every pair of versions), or a JSONL file of reference outputs
    (``{"prompt", "output"}`` per line, the AlpacaEval way: its prompts are the held-out set)."""
    if config.policy.kind == "tabular":
        raise ValueError("a tabular campaign has no held-out prompts to sample: its rounds report the exact duality gap and win-rate (nashflow status)")
    world = World(config)
    from_file = against.endswith(".jsonl")
    if not from_file and against not in ("reference", "previous", "population"):
        raise ValueError(f"--against: expected reference, previous, population or a .jsonl file of reference outputs, got {against!r}")
    store.write("prompts", world.prompt_rows())
    prompts, file_version = store_reference_outputs(store, config, world, against) if from_file else (world.eval_prompts, None)
    if not prompts:
        raise ValueError("the campaign has no held-out prompts (prompts.limit_eval, or 'split': 'eval' rows of its prompts file); pass --against FILE.jsonl")
    versions = versions or finished_versions(store)
    for v in versions:
        if not re.fullmatch(r"v\d+", v) or (v != "v0" and not has_checkpoint(store, v)):
            raise ValueError(f"--versions: {v} is not a version with a checkpoint in {store.path('checkpoints')} (v0, v1, …)")
    m = config.evaluation.samples_per_prompt
    samples = _Samples(store, config, world, prompts, m)
    if against == "population":
        matchups = [(i, j) for i in range(len(versions)) for j in range(i)]
    elif from_file:
        matchups = [(i, len(versions)) for i in range(len(versions))]
        versions = versions + [file_version]
    else:
        opponent = (lambda v: "v0") if against == "reference" else (lambda v: f"v{max(_number(v) - 1, 0)}")
        versions = [v for v in versions if v != "v0"] if against == "reference" else versions
        extra = sorted({opponent(v) for v in versions} - set(versions), key=_number)
        versions = extra + versions
        matchups = [(versions.index(v), versions.index(opponent(v))) for v in versions if v not in extra and opponent(v) != v]
    pairs = []  # (i, j, storage round, Pair) with version i as a
    for i, j in matchups:
        r_i = samples.round_of(versions[i], prefer=_number(versions[i]))
        r_j = 0 if from_file else samples.round_of(versions[j], prefer=r_i)
        for p in prompts:
            pid = prompt_id(p)
            for slot in range(m):
                a, b = response_id(pid, versions[i], r_i, slot), response_id(pid, versions[j], r_j, 0 if from_file else slot)
                pairs.append((i, j, max(r_i, r_j), Pair(pid, p, a, samples.text(a), b, samples.text(b))))
    oracle = oracle_spec(config.oracle, config, world).build()
    judged_now = 0
    for r in sorted({x[2] for x in pairs}):
        judged_now += judge_pairs(store, oracle, [x[3] for x in pairs if x[2] == r], round=r)["pref/judged_now"]
    comps = store.read("comparisons", rounds=sorted({x[2] for x in pairs}), columns=["comparison_id", "p_a"]).set_index("comparison_id")["p_a"]
    judged = pd.DataFrame(
        [dict(i=i, j=j, prompt_id=q.prompt_id, a_id=q.a_id, b_id=q.b_id, p=comps.get(comparison_id(q.prompt_id, q.a_id, q.b_id, oracle.oracle_id))) for i, j, _, q in pairs]
    ).dropna(subset=["p"])
    resp = samples.responses()
    rows = []
    for i, v in enumerate(versions[:-1] if from_file else versions):
        row = {"version": v}
        # the head-to-head: vs the opponent; in a population, vs v0 (the round-robin's pairs with it)
        mine = judged[(judged["i"] == i) & ((judged["j"] == 0) if against == "population" else True)]
        if not mine.empty:
            a, b = resp.loc[mine["a_id"]], resp.loc[mine["b_id"]]
            row["opponent"] = versions[int(mine["j"].iloc[0])]
            row |= evaluation.head_to_head(mine["p"], a["n_tokens"], b["n_tokens"], mine["prompt_id"], a["finish_reason"], b["finish_reason"])
        rows.append(row)
    report = EvalReport(versions, against, oracle.oracle_id, rows, sampled=samples.sampled, judged_now=judged_now)
    if against == "population" and len(versions) >= 2:
        report.population = _population(judged, resp, versions, rows)
    return report


def store_reference_outputs(store: Store, config: CampaignConfig, world: World, path: str) -> tuple[list[str], str]:
    """A JSONL of reference outputs (``{"prompt": …, "output": …}`` per line) stored as held-out prompts
    and the responses of a pseudo-version ``file-<hash of the file>`` in round 0, with their length in
    the campaign policy's tokens (an end-of-sequence token included, as a sampled response counts it).
    Refuses a prompt that is one of the campaign's training prompts: its judgments would be trained on."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise ValueError(f"--against {path}: cannot read ({e.strerror})") from None
    rows, seen = [], {}
    for n, line in enumerate(content.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, output = row["prompt"], row["output"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and 'output'") from None
        if not isinstance(prompt, str) or not isinstance(output, str):
            raise ValueError(f"{path}:{n}: 'prompt' and 'output' must be strings")
        if prompt in seen:
            raise ValueError(f"{path}:{n}: the prompt of line {seen[prompt]} again (one reference output per prompt)")
        seen[prompt] = n
        rows.append((prompt, output))
    if not rows:
        raise ValueError(f"{path}: no reference outputs")
    split = store.read("prompts", columns=["prompt_id", "split"]).set_index("prompt_id")["split"]
    for prompt, _ in rows:
        if split.get(prompt_id(prompt)) == "train":
            raise ValueError(f"{path}:{seen[prompt]}: this prompt is one of the campaign's training prompts; an evaluation on it would be trained on")
    label = f"file-{stable_hash(content, length=6)}"
    source = f"eval-file:{os.path.basename(path)}"
    store.write("prompts", [dict(prompt_id=prompt_id(p), prompt=p, split="eval", source=source) for p, _ in rows])
    tokenizer = load_policy(store, "v0", config, world).tokenizer
    store.write(
        "responses",
        [
            dict(response_id=response_id(prompt_id(p), label, 0, 0), round=0, policy_version=label, prompt_id=prompt_id(p), text=o,
                 n_tokens=len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1, finish_reason="stop", token_ids=None)
            for p, o in rows
        ],
    )
    return [p for p, _ in rows], label


def _population(judged: pd.DataFrame, resp: pd.DataFrame, versions: list[str], rows: list[dict]) -> dict:
    k = len(versions)
    W = evaluation.win_rate_matrix(judged["i"], judged["j"], judged["p"], k)
    bt = evaluation.bradley_terry(judged["i"], judged["j"], judged["p"], k)
    cyclic, triples = evaluation.cyclic_triples(W)
    pop = evaluation.population(W)
    for i, row in enumerate(rows):
        ids = pd.concat([judged.loc[judged["i"] == i, "a_id"], judged.loc[judged["j"] == i, "b_id"]]).unique()
        mine = resp.loc[ids]
        # a row's lengths stay those of its head-to-head (beside its win-rates); v0 has none: all its pairs'
        row |= {k: v for k, v in evaluation.length_stats(mine["n_tokens"], mine["finish_reason"]).items() if k not in row}
        row |= {"bt_rating": float(bt["ratings"][i]), "bt_ci95": float(bt["ci95"][i]), "lottery": float(pop["maximal_lottery"][i]), "win_rate_vs_mix": float(pop["win_rate_vs_mix"][i])}
    return {"W": W, "cyclic_triples": cyclic, "triples": triples, **pop, **bt}


def _number(v: str) -> int:
    return int(v[1:])


class _Samples:
    """Each version's held-out samples in the store: which round holds all m slots of every held-out
    prompt; when none does, the missing prompts are sampled into the round that holds the others
    (or the version's own round, v_t → round t)."""

    def __init__(self, store: Store, config: CampaignConfig, world: World, prompts: list[str], m: int):
        self.store, self.config, self.world, self.prompts, self.m = store, config, world, prompts, m
        self.pids = {prompt_id(p) for p in prompts}
        self.sampled = 0
        self._read()

    def _read(self):
        r = self.store.read("responses", columns=["response_id", "round", "policy_version", "prompt_id", "text", "n_tokens", "finish_reason"])
        self._resp = r[r["prompt_id"].isin(self.pids)].set_index("response_id")
        need = {(pid, slot) for pid in self.pids for slot in range(self.m)}
        self._complete = defaultdict(set)
        for (v, rnd), group in self._resp.groupby(["policy_version", "round"]):
            if all(response_id(pid, v, int(rnd), slot) in group.index for pid, slot in need):
                self._complete[v].add(int(rnd))

    def round_of(self, v: str, *, prefer: int) -> int:
        rounds = self._complete[v]
        if prefer in rounds:
            return prefer
        if rounds:
            return max(rounds)
        # complete a round that holds some of them (only the missing prompts are sampled), else the version's own
        held = self._resp[self._resp["policy_version"] == v]["round"].value_counts()
        target = prefer if prefer in held.index else int(held.sort_index().idxmax()) if len(held) else _number(v)
        policy = load_policy(self.store, v, self.config, self.world)
        self.sampled += sample_responses(self.store, policy, self.prompts, round=target, policy_version=v, k=self.m, seed=self.config.seed + EVAL_SEED_OFFSET)["sampled"]
        self._read()
        return target

    def text(self, rid: str) -> str:
        return self._resp.at[rid, "text"]

    def responses(self) -> pd.DataFrame:
        return self._resp


def report_json(report: EvalReport) -> dict:
    """The report as plain JSON values (``nashflow eval --json``)."""
    pop = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in report.population.items()}
    return {"versions": report.versions, "against": report.against, "oracle_id": report.oracle_id, "rows": report.rows, "population": pop, "sampled": report.sampled, "judged_now": report.judged_now}
