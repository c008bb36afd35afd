"""The ``nashflow`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

# rich_markup_mode=None: click's plain help. Typer's rich help panel prints each parameter's type, flags
# and --help included ("--fit-gap <bool>"), which reads as a value to pass; the plain help shows a type
# only for options that take a value ("--epochs <int range>").
app = typer.Typer(
    help="Nash learning from human feedback as scheduled, inspectable Prefect rounds.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)
console = Console(stderr=True, soft_wrap=True)


def _quiet() -> None:
    """Keep a local run's terminal for nashflow's own progress; the logs are in the Prefect UI/API."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # with no PREFECT_API_URL a run starts its own Prefect server; Prefect gives it 20 s, which a busy
    # 2-core machine can exceed (seen once in CI: "Timed out while attempting to connect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _run_campaign(config) -> None:
    _quiet()
    from data import Store, StoreError
    from data.rounds import rounds_table
    from pipelines.flows import alignment_campaign
    from pipelines.progress import Reporter, reporting

    class Progress(Reporter):
        def __init__(self):
            self.t0 = self.round_t0 = time.perf_counter()
            self.header = None

        def round_started(self, round, total):
            # shown with the round's first stage: a round the store has finished already starts none
            self.round_t0, self.header = time.perf_counter(), f"[bold]round {round}/{total}[/bold]"

        def stage(self, round, stage):
            if self.header:
                console.print(self.header, end=" ")
                self.header = None
            console.print(stage, end=" ", style="dim")

        def round_finished(self, round, metrics):
            now = time.perf_counter()
            console.print("→ " + progress_figures(metrics) + f"  (round took {now - self.round_t0:.0f} s; {now - self.t0:.0f} s since start)", highlight=False)

    console.print(f"campaign [bold]{config.name}[/bold]: {config.rounds} rounds of {config.solver.algorithm}, store {config.store}")
    store = Store(config.store)
    try:
        store.verify_files()  # a corrupt file stops the run here, named, not deep inside a round
        with reporting(Progress()):
            alignment_campaign(config)
    except StoreError as e:
        console.print()
        _fail(str(e))
    console.print()
    _print_rounds(rounds_table(store), store)
    from pipelines.artifacts import PLOT

    if store.exists(PLOT):
        console.print(f"plot: {store.path(PLOT)}")


def progress_figures(metrics: dict) -> str:
    """A finished round's headline numbers, named as in the rounds table."""
    parts = []
    for key in ("eval/duality_gap", "eval/kl_to_nash"):
        if key in metrics:
            parts.append(f"{SHORT_NAMES[key]} {metrics[key]:.3g}")
    if "eval/win_rate_vs_ref" in metrics:
        ci = metrics.get("eval/win_rate_ci95")
        parts.append(f"win vs ref {metrics['eval/win_rate_vs_ref']:.3f}" + (f" ± {ci:.3f}" if ci is not None else ""))
    if "eval/lc_win_rate_vs_ref" in metrics:
        parts.append(f"LC {metrics['eval/lc_win_rate_vs_ref']:.3f} ± {metrics['eval/lc_win_rate_ci95']:.3f}")
    if "eval/mean_tokens" in metrics:
        parts.append(f"{metrics['eval/mean_tokens']:.1f} tokens (ref {metrics['eval/ref_mean_tokens']:.1f})")
    if "pref/round_judged" in metrics:
        parts.append(f"train judged {metrics['pref/round_judged']}")
    return ", ".join(parts)


# Column headers of the rounds table, in order. The counts are the round's judgments as the store holds
# them (data.diagnostics.judgment_counts), so the columns add up to the line printed under the table.
SHORT_NAMES = {
    "round": "round",
    "eval/duality_gap": "gap",
    "eval/duality_gap_exact_solver": "gap (exact solver)",
    "eval/kl_to_nash": "KL(π*‖π)",
    "eval/win_rate_vs_ref": "win vs ref ±95%",
    "eval/lc_win_rate_vs_ref": "LC win ±95%",
    "eval/mean_tokens": "tokens (ref)",
    "eval/truncated_share": "cut",
    "intransitivity/cycle_share": "cyclic triples",
    "cascade/share/learned": "by model",
    "cascade/share/judge": "by judge",
    "prefmodel/eval_logloss": "model log-loss",
    "pref/round_judged": "train judged",
    "pref/round_abstained": "abstained",
    "eval/pairs": "eval judged",
    "cost/usd": "cost $",
    "loss": "loss",
    "perf/round_seconds": "stage time",
}


def _print_rounds(table, store=None) -> None:
    """The rounds table and, given the store, what its judgments add up to."""
    if table.empty:
        console.print("no finished rounds in this store")
        return
    solver = table["solver"].iloc[-1]
    table = table.assign(loss=table[f"loss/{solver}"]) if f"loss/{solver}" in table else table
    cols = [c for c in SHORT_NAMES if c in table.columns]
    out = Table(*[SHORT_NAMES[c] for c in cols], title=f"rounds ({solver})")
    for _, row in table.iterrows():
        out.add_row(*[_cell(c, row) for c in cols])
    wide = Console(width=max(Console().width, 120 if Console().is_terminal else 400))  # piped: every column whole
    wide.print(out)
    notes = []
    if "intransitivity/cycle_share" in cols:
        notes.append("cyclic triples: the round's response triples of a prompt, all three pairs judged, whose majorities go round")
    if "eval/lc_win_rate_vs_ref" in cols:
        notes.append("LC win: the win-rate with the judge's taste for length taken out (AlpacaEval 2's length-controlled win-rate); tokens: mean response length of the policy (of the reference); cut: share stopped at max_new_tokens")
    if "perf/round_seconds" in cols:
        notes.append("stage time: seconds the round's stages took, in the run that finished it")
    if store is not None:
        from data.diagnostics import judgment_counts

        notes.append(judgments_line(judgment_counts(store)))
    for note in notes:
        wide.print(note, style="dim")


# a cell that shows a second metric beside its own: "value ± half-width", "tokens (reference's)"
BESIDE = {"eval/win_rate_vs_ref": ("eval/win_rate_ci95", "{:.3f} ± {:.3f}"), "eval/lc_win_rate_vs_ref": ("eval/lc_win_rate_ci95", "{:.3f} ± {:.3f}"), "eval/mean_tokens": ("eval/ref_mean_tokens", "{:.1f} ({:.1f})")}


def _cell(column: str, row) -> str:
    v = row[column]
    if column in BESIDE and BESIDE[column][0] in row and row[BESIDE[column][0]] == row[BESIDE[column][0]] and v == v:  # x == x: not NaN
        return BESIDE[column][1].format(v, row[BESIDE[column][0]])
    if column == "intransitivity/cycle_share" and all(k in row and row[k] == row[k] for k in ("intransitivity/cyclic_triples", "intransitivity/triples")):  # x == x: not NaN
        return f"{int(row['intransitivity/cyclic_triples'])} of {int(row['intransitivity/triples'])}"
    if isinstance(v, float) and v.is_integer() and column.startswith(("pref/", "eval/pairs")):
        return str(int(v))
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def judgments_line(counts: dict) -> str:
    """The store's judgments, split the way every command counts them (see judgment_counts)."""
    rounds = counts["rounds"]
    where = f"rounds {rounds[0]}–{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]}" if rounds else "no round"
    return (
        f"store: {counts['judgments']} judgments ({where}) = {counts['train']} of training pairs + {counts['eval']} of evaluation pairs; "
        f"{counts['abstained']} abstained, {counts['ties']} ties (P = ½)" + (f", {counts['learned']} by a learned model" if counts["learned"] else "")
    )


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def run(
    config: Annotated[str, typer.Argument(metavar="CONFIG", help="campaign config (YAML)")],
    store: Annotated[Optional[str], typer.Option(help="override the config's store")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="override the config's number of rounds")] = None,
):
    """Run a campaign from a YAML config.

    Rounds its store has finished already are skipped."""
    from pipelines.config import ConfigError, load_config

    try:
        cfg = load_config(config, store=store, rounds=rounds)
    except ConfigError as e:
        _fail(str(e))
    _run_campaign(cfg)


@app.command()
def demo(store: Annotated[str, typer.Option(help="where the demo's store goes")] = "nashflow-demo"):
    """Run the default campaign (tiny LM, intransitive text world).

    A tiny language model learns an intransitive text world with 3 rounds of INPO."""
    from pipelines.config import default_config_path, load_config

    _run_campaign(load_config(default_config_path(), store=store))


@app.command()
def status(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store (folder or URI)")],
    fit_gap: Annotated[
        bool,
        typer.Option(
            "--fit-gap",
            help="also train a Bradley–Terry and a pairwise preference model on the store's judgments and print their held-out log-loss gap and the share of cyclic triples: do Nash methods matter for these data? (a training run: seconds for 'tiny', longer for a real backbone)",
        ),
    ] = False,
    backbone: Annotated[str, typer.Option(help="--fit-gap: the models' backbone, 'tiny' (built from a config, offline) or a folder / hub id")] = "tiny",
    epochs: Annotated[int, typer.Option(min=1, help="--fit-gap: passes over the training pairs")] = 4,
    lr: Annotated[Optional[float], typer.Option(help="--fit-gap: learning rate (default 3e-3 for 'tiny', 5e-5 for a backbone)")] = None,
    seed: Annotated[int, typer.Option(help="--fit-gap: held-out prompts, batch order and initialization")] = 0,
):
    """Show a store's finished rounds and their metrics."""
    from data import Store, StoreError
    from data.rounds import rounds_table

    try:
        opened = Store(store, must_exist=True)
        opened.verify_files()
        _print_rounds(rounds_table(opened), opened)
        if fit_gap:
            _print_fit_gap(opened, backbone=backbone, epochs=epochs, lr=lr, seed=seed)
    except StoreError as e:
        _fail(str(e))


def _print_fit_gap(store, *, backbone: str, epochs: int, lr: float | None, seed: int) -> None:
    """The two numbers that say whether a scalar reward would do for a store's judgments."""
    _quiet()
    from data.diagnostics import CYCLE_THRESHOLD, GAP_THRESHOLD, intransitivity, intransitivity_verdict, judgment_counts
    from solvers import preference_model as pm

    examples = pm.examples_from_store(store, splits=None)  # every oracle's judgments but a learned model's own, on every prompt
    counts = judgment_counts(store)
    tiny = backbone == "tiny"
    model_config = pm.PreferenceModelConfig(head_hidden=64 if tiny else 256, max_prompt_tokens=64 if tiny else 256, max_response_tokens=64 if tiny else 256)
    train_config = pm.PreferenceTrainConfig(
        lr=lr or (3e-3 if tiny else 5e-5), schedule="constant", warmup_steps=10, micro_batch_size=32, epochs=epochs, eval_share=0.2, seed=seed
    )
    build = (lambda cfg: pm.tiny_preference_model(cfg, seed=seed)) if tiny else backbone
    console.print(
        f"fitting Bradley–Terry and pairwise models ({backbone}) on {len(examples)} judged pairs: the store's {counts['judgments']} judgments"
        f" (training and evaluation pairs, every round, ties included) less {counts['abstained']} abstained and {counts['learned']} by a learned model …"
    )
    try:
        gap = pm.compare_bt_pairwise(examples, backbone=build, model_config=model_config, train_config=train_config)
    except (pm.PreferenceDataError, pm.ModelLoadError) as e:
        _fail(f"--fit-gap: {e}")
    cycles = intransitivity(store)
    bt, pairwise, diff = (gap[f"intransitivity/logloss_{k}"] for k in ("bt", "pairwise", "gap"))
    share, triples = cycles["intransitivity/cycle_share"], cycles["intransitivity/triples"]
    held_out = int(gap["intransitivity/eval_pairs"])
    out = Console(soft_wrap=True)
    out.print(f"held-out log-loss on {held_out} pairs of unseen prompts: Bradley–Terry {bt:.4f}, pairwise {pairwise:.4f}")
    out.print(f"log-loss gap (BT − pairwise): {diff:+.4f}  (a sign of intransitivity above {GAP_THRESHOLD})")
    if share is None:
        out.print("cyclic triples: n/a (no response triple has all three pairs judged)")
    else:
        out.print(
            f"cyclic triples: {cycles['intransitivity/cyclic_triples']} of {triples} ({share:.1%}; a sign above {CYCLE_THRESHOLD:.0%}):"
            " response triples of one prompt with all three pairs judged (P̂ pooled over orders and oracles) whose majorities go round"
        )
    out.print(intransitivity_verdict(diff, share, triples, eval_pairs=held_out))
    if share == 0:
        out.print(
            "  (a world built to be intransitive shows cycles only among responses that differ on the properties its annotators"
            " disagree about; samples that tie on one property or vary along one line give none: see docs/solvers.md)",
            style="dim",
        )


@app.command(name="eval")
def eval_(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store (folder or URI)")],
    versions: Annotated[Optional[str], typer.Option(help="comma-separated versions, e.g. v0,v2,v3 (default: every finished one)")] = None,
    against: Annotated[str, typer.Option(help="reference (v0), previous (v_{t−1}), population (a round-robin among the versions), or FILE.jsonl of reference outputs ({prompt, output} per line)")] = "reference",
    oracle: Annotated[Optional[str], typer.Option(metavar="CONFIG", help="a YAML whose `oracle:` section judges instead of the campaign's")] = None,
    config: Annotated[Optional[str], typer.Option(help="the campaign's YAML, for a store that did not save its config (campaign.json)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
):
    """Evaluate a campaign's versions on its held-out prompts.

    Raw and length-controlled win-rate (AlpacaEval 2) with 95% intervals and response lengths per
    version; with --against population, the win-rate matrix, Bradley–Terry ratings, cyclic triples, the
    maximal lottery (which mixture of versions to deploy) and each version's win-rate against it.
    Stored samples and judgments are reused; new ones are stored as evaluation judgments (held-out
    prompts), never trained on."""
    _quiet()
    from data import Store, StoreError
    from pipelines import evaluation
    from pipelines.config import ConfigError

    try:
        opened = Store(store, must_exist=True)
        cfg = evaluation.campaign_config(opened, config)
        if oracle:
            cfg = evaluation.with_oracle(cfg, oracle)
        report = evaluation.evaluate(opened, cfg, versions=versions.split(",") if versions else None, against=against)
    except (StoreError, ConfigError, ValueError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(evaluation.report_json(report)))
        return
    _print_eval(report)


def _print_eval(report) -> None:
    out = Console(width=max(Console().width, 120))
    population = report.against == "population"
    cols = [("version", "version", None), ("opponent", "vs", None), ("win_rate", "win", "win_rate_ci95"), ("lc_win_rate", "LC win", "lc_win_rate_ci95"), ("pairs", "pairs", None)]
    if population:
        cols += [("bt_rating", "BT rating", "bt_ci95"), ("lottery", "max. lottery", None), ("win_rate_vs_mix", "win vs mix", None)]
    cols += [("mean_tokens", "tokens", None), ("median_tokens", "median", None), ("truncated_share", "cut", None)]
    table = Table(*[c[1] for c in cols], title=f"{report.against}: judged by {report.oracle_id}")
    for row in report.rows:
        cells = []
        for key, _, half in cols:
            v = row.get(key)
            cell = "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
            if half and row.get(half) is not None and cell:
                cell += f" ± {row[half]:.3f}"
            cells.append(cell)
        table.add_row(*cells)
    out.print(table)
    if population and report.population:
        pop = report.population
        W = Table("P(row ≻ column)", *report.versions, title="win-rate matrix")
        for v, w in zip(report.versions, pop["W"]):
            W.add_row(v, *[f"{x:.3f}" for x in w])
        out.print(W)
        out.print(f"cyclic version triples: {pop['cyclic_triples']} of {pop['triples']}; maximal lottery: " + ", ".join(f"{v} {p:.3f}" for v, p in zip(report.versions, pop["maximal_lottery"]) if p > 0))
    out.print(f"sampled now: {report.sampled} responses; judged now: {report.judged_now} pairs (the rest came from the store)", style="dim")


@app.command()
def solve(
    game: Annotated[str, typer.Option(help="'cyclic', 'random', or a .npy preference matrix")] = "random",
    n: Annotated[int, typer.Option(help="number of responses of a generated game")] = 100,
    seed: Annotated[int, typer.Option(help="seed of a random game")] = 0,
    beta: Annotated[float, typer.Option(help="KL regularization")] = 0.1,
    algorithm: Annotated[str, typer.Option(help="an algorithm with exact tabular dynamics (docs/solvers.md lists them)")] = "nash_mp",
    iterations: Annotated[int, typer.Option(help="iterations to run")] = 50,
    eta: Annotated[Optional[float], typer.Option(help="step size (default: the algorithm's)")] = None,
    every: Annotated[int, typer.Option(help="print every k-th iteration")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
):
    """Run an exact tabular solver on a game.

    Prints the KL to the equilibrium and the duality gap per iteration."""
    import numpy as np

    from oracles.games import GameError, load_game, make_game
    from solvers import algorithms, tabular

    try:
        P = load_game(game) if game.endswith(".npy") else make_game(game, n, seed)
        entry = algorithms.get(algorithm)
        sol = entry.solve(P, np.full(len(P), 1 / len(P)), beta, iterations, eta)
    except (GameError, ValueError) as e:
        _fail(str(e))
    mu = np.full(len(P), 1 / len(P))
    eq = tabular.regularized_nash(P, mu, beta)
    policies = sol.average if entry.averaged else sol.policies
    rows = [
        {"iteration": t, "kl_to_nash": tabular.kl(eq.pi, policies[t]), "duality_gap": tabular.duality_gap(policies[t], P, mu, beta)}
        for t in range(iterations + 1)
    ]
    if as_json:
        print(json.dumps({"game": game, "n": len(P), "beta": beta, "algorithm": algorithm, "eta": sol.params.eta, "nash_residual": eq.residual, "iterations": rows}))
        return
    out = Table("iteration", "KL(π*‖π)", "duality gap", title=f"{algorithm} on {game} n={len(P)}, β={beta}, η={sol.params.eta:.4g}")
    for r in rows:
        if r["iteration"] % every == 0 or r["iteration"] == iterations:
            out.add_row(str(r["iteration"]), f"{r['kl_to_nash']:.3e}", f"{r['duality_gap']:.3e}")
    Console().print(out)


@app.command()
def export(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store")],
    dest: Annotated[str, typer.Argument(metavar="DEST", help="output file, .parquet or .jsonl")],
    include_ties: Annotated[bool, typer.Option(help="keep pairs judged exactly ½")] = False,
):
    """Export judged pairs as prompt/chosen/rejected (TRL style).

    Each with the preference probability: every answered judgment of every round, training and
    evaluation pairs alike (ties only with --include-ties)."""
    from data import Store, StoreError
    from data.diagnostics import judgment_counts
    from data.export import export_preferences

    try:
        n = export_preferences(Store(store), dest, include_ties=include_ties)
        counts = judgment_counts(Store(store))
    except StoreError as e:
        _fail(str(e))
    ties = "ties kept" if include_ties else f"{counts['ties']} ties (--include-ties keeps them)"
    console.print(
        f"wrote {n} pairs to {dest}: the store's {counts['judgments']} judgments ({counts['train']} of training pairs + {counts['eval']} of evaluation pairs,"
        f" every round) less {counts['abstained']} abstained and {ties}"
    )


@app.command("export-model")
def export_model(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store")],
    version: Annotated[str, typer.Argument(metavar="VERSION", help="a policy version of the store, e.g. v3")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="a new folder for the model")],
):
    """Write a policy version as a plain model folder to serve or publish.

    transformers' save_pretrained and the tokenizer, loadable without nashflow or peft: a LoRA version
    is merged into its base model; a full version is copied without its optimizer state."""
    from data import Store, StoreError
    from pipelines.versions import export_model as export

    try:
        export(Store(store, must_exist=True), version, out)
    except (StoreError, FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"wrote {version} of {store} to {out}")


@app.command()
def compact(
    store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store (folder or URI)")],
    table: Annotated[Optional[str], typer.Option(help="only this table (default: all)")] = None,
):
    """Merge each partition's small files into one, atomically.

    Readers running meanwhile see the old files or the merged one, never both; nothing is lost or
    duplicated."""
    from data import Store, StoreError

    try:
        report = Store(store, must_exist=True).compact(table)
    except StoreError as e:
        _fail(str(e))
    out = Table("table", "files before", "files after", title=f"compacted {store}")
    for name, counts in report.items():
        out.add_row(name, str(counts["files_before"]), str(counts["files_after"]))
    Console().print(out)


@app.command()
def check(store: Annotated[str, typer.Argument(metavar="STORE", help="a campaign's store (folder or URI)")]):
    """Check every file of a store; say what to do about each problem.

    Reports unreadable or foreign files, keys stored twice with different contents and references that
    do not resolve, each with its path; exits 1 if there is any."""
    from data import Store, StoreError

    try:
        problems = Store(store, must_exist=True).check()
    except StoreError as e:
        _fail(str(e))
    if not problems:
        console.print(f"{store}: every file reads, keys are unique and references resolve")
        return
    for p in problems:
        console.print(f"[red]problem:[/red] {p.path}: {p.what}\n  what to do: {p.todo}")
    console.print(f"{len(problems)} problem(s)")
    raise typer.Exit(1)


if __name__ == "__main__":
    sys.exit(app())
