"""What a person sees: Prefect artifacts per round and a PNG plot of the campaign's metrics."""

from __future__ import annotations

import io

import pandas as pd

from data import Store

PLOT = "plots/metrics.png"


def _key(*parts) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join(str(p) for p in parts).lower().replace("_", "-").replace(".", "-")


def publish_round(campaign: str, round: int, metrics: dict, timings: dict, plot_path: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = [{"metric": k, "value": _fmt(v)} for k, v in sorted(metrics.items())]
    table += [{"metric": f"perf/seconds_{k}", "value": _fmt(v)} for k, v in sorted(timings.items())]
    create_table_artifact(key=_key(campaign, "round", round, "metrics"), table=table, description=f"{campaign}: metrics of round {round}")
    headline = [f"- **{k}**: {_fmt(metrics[k])}" for k in ("eval/duality_gap", "eval/duality_gap_exact_solver", "eval/kl_to_nash", "eval/win_rate_vs_ref", "pref/judged_now", "pref/abstained", "cost/usd") if k in metrics]
    md = "\n".join(
        [f"## {campaign} — round {round}", "", *headline, "", f"Stages took {sum(timings.values()):.1f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())]
        + ([f"", f"Plot of all rounds: `{plot_path}`"] if plot_path else [])
    )
    create_markdown_artifact(key=_key(campaign, "summary"), markdown=md, description=f"{campaign}: latest round summary")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_metrics(store: Store, table: pd.DataFrame) -> str | None:
    """Write a PNG of the per-round metrics into the store; returns its path."""
    if table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("distance to the Nash equilibrium", ["eval/duality_gap", "eval/duality_gap_exact_solver", "eval/kl_to_nash"], True),
        ("win-rate against the reference", ["eval/win_rate_vs_ref"], False),
    ]
    groups = [(t, [c for c in cols if c in table], log) for t, cols, log in groups]
    groups = [g for g in groups if g[1]]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    for ax, (title, cols, log) in zip(axes[0], groups):
        for c in cols:
            ax.plot(table["round"], table[c], marker="o", label=c)
        if log and (table[cols] > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return store.write_bytes(PLOT, buf.getvalue())
