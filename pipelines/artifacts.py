"""What a person sees: Prefect artifacts per round and a PNG plot of the campaign's metrics."""

from __future__ import annotations

import base64
import io

import pandas as pd

from data import Store

PLOT = "plots/metrics.png"


def _key(*parts) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join(str(p) for p in parts).lower().replace("_", "-").replace(".", "-")


HEADLINE = (
    "eval/duality_gap",
    "eval/duality_gap_exact_solver",
    "eval/kl_to_nash",
    "eval/win_rate_vs_ref",
    "eval/win_rate_ci95",
    "eval/lc_win_rate_vs_ref",
    "eval/lc_win_rate_ci95",
    "eval/mean_tokens",
    "eval/median_tokens",
    "eval/truncated_share",
    "eval/ref_mean_tokens",
    "pref/pairs",
    "pref/judged_now",
    "pref/cached",
    "pref/abstained",
    "cost/usd",
)
MAX_INLINE_PLOT = 400_000  # bytes of PNG embedded in the summary; a bigger plot is shown as its path


def publish_round(campaign: str, round: int, metrics: dict, timings: dict, plot_path: str | None, *, store: Store | None = None, solver: str | None = None) -> None:
    """The round's artifacts: a table of every metric (``<campaign>-round-<r>-metrics``) and a markdown
    summary with its key numbers and the plot of all rounds (``<campaign>-summary``, one version per
    round, so the Artifacts page shows the latest and keeps the history)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = [{"metric": k, "value": _fmt(v)} for k, v in sorted(metrics.items())]
    table += [{"metric": f"perf/seconds_{k}", "value": _fmt(v)} for k, v in sorted(timings.items())]
    create_table_artifact(key=_key(campaign, "round", round, "metrics"), table=table, description=f"{campaign}: metrics of round {round}")
    create_markdown_artifact(key=_key(campaign, "summary"), markdown=summary_markdown(campaign, round, metrics, timings, plot_path, store=store, solver=solver), description=f"{campaign}: round {round} summary")


def summary_markdown(campaign: str, round: int, metrics: dict, timings: dict, plot_path: str | None, *, store: Store | None = None, solver: str | None = None) -> str:
    rows = [f"| {k} | {_fmt(metrics[k])} |" for k in HEADLINE if k in metrics]
    lines = [f"## {campaign} — round {round}" + (f" ({solver})" if solver else ""), "", "| metric | value |", "|---|---|", *rows, ""]
    lines.append(f"Stages took {sum(timings.values()):.1f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    if plot_path:
        png = _plot_bytes(store)
        if png is not None and len(png) <= MAX_INLINE_PLOT:
            lines += ["", f"![metrics of every round](data:image/png;base64,{base64.b64encode(png).decode()})"]
        lines += ["", f"Plot of all rounds: `{plot_path}`"]
    return "\n".join(lines)


def _plot_bytes(store: Store | None) -> bytes | None:
    if store is None or not store.exists(PLOT):
        return None
    return store.read_bytes(PLOT)


class JudgeProgress:
    """A Prefect progress artifact (``<campaign>-judge-progress``) that fills as the judge stage stores
    each chunk of answers: the UI shows how far a long judging stage is."""

    def __init__(self, campaign: str, round: int, phase: str, oracle_id: str, pairs: int):
        from prefect.artifacts import create_progress_artifact

        self.what = f"{campaign} round {round} {phase}: {oracle_id} on {pairs} pairs"
        self.id = create_progress_artifact(progress=0.0, key=_key(campaign, "judge-progress"), description=self.what)

    def update(self, done: int, todo: int) -> None:
        """``stages.judge_pairs``' on_chunk: ``done`` of the ``todo`` pairs the store did not hold."""
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.id, progress=100.0 * done / max(todo, 1))

    def finish(self, summary: dict) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(
            self.id,
            progress=100.0,
            description=f"{self.what}: {summary['pref/judged_now']} judged now, {summary['pref/cached']} from the store, ${summary['cost/usd']:.4f}",
        )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


LEGEND = {  # what each plotted metric is, for a reader of the plot (docs/solvers.md lists the keys)
    "eval/duality_gap": "duality gap of the policy",
    "eval/duality_gap_exact_solver": "duality gap of the exact solver (same iterations)",
    "eval/kl_to_nash": "KL(π*‖π) to the regularized equilibrium",
    "eval/win_rate_vs_ref": "win-rate of the policy against the reference",
    "eval/lc_win_rate_vs_ref": "length-controlled win-rate (AlpacaEval 2)",
    "eval/mean_tokens": "policy",
    "eval/ref_mean_tokens": "reference",
}
BANDS = {  # metric → (its 95% half-width, the band's legend)
    "eval/win_rate_vs_ref": ("eval/win_rate_ci95", "95% interval of the win-rate"),
    "eval/lc_win_rate_vs_ref": ("eval/lc_win_rate_ci95", "95% interval of the LC win-rate"),
}


def plot_metrics(store: Store, table: pd.DataFrame) -> str | None:
    """Write a PNG of the per-round metrics into the store; returns its path."""
    fig = metrics_figure(table)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return store.write_bytes(PLOT, buf.getvalue())


def metrics_figure(table: pd.DataFrame):
    """The per-round metrics as a matplotlib figure (None when the table has none to draw): distances to
    the equilibrium on one panel; the raw and length-controlled win-rates against the reference on
    another, each with its 95% interval (``BANDS``: the half-widths) as a band and ½ — no better than the
    reference — as a line; the mean response lengths of policy and reference on a third (a win-rate
    that rises with the length while the LC win-rate does not is the judge's taste for long answers)."""
    if table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = [
        ("distance to the Nash equilibrium", ["eval/duality_gap", "eval/duality_gap_exact_solver", "eval/kl_to_nash"], True),
        ("win-rate against the reference", ["eval/win_rate_vs_ref", "eval/lc_win_rate_vs_ref"], False),
        ("mean response length (tokens)", ["eval/mean_tokens", "eval/ref_mean_tokens"], False),
    ]
    groups = [(t, [c for c in cols if c in table], log) for t, cols, log in groups]
    groups = [g for g in groups if g[1]]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    rounds = table["round"]
    for ax, (title, cols, log) in zip(axes[0], groups):
        for c in cols:
            line = ax.plot(rounds, table[c], marker="o", label=LEGEND.get(c, c))[0]
            band, label = BANDS.get(c, (None, None))
            if band in table and table[band].notna().any():
                half = table[band]
                ax.fill_between(rounds, table[c] - half, table[c] + half, color=line.get_color(), alpha=0.2, label=label)
        if "eval/win_rate_vs_ref" in cols:
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="½: no better than the reference")
            ax.set_ylabel("P(policy preferred to reference)")
        if log and (table[cols] > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
