"""The plot a person looks at: whole-number rounds, metrics named in words, the win-rate's interval as a
band and ½ as a line."""

from __future__ import annotations

import pandas as pd
import pytest

from data import Store
from pipelines.artifacts import LEGEND, PLOT, metrics_figure, plot_metrics


def _lm_table():
    return pd.DataFrame(
        {"round": [1, 2, 3], "policy_version": ["v1", "v2", "v3"], "solver": "inpo", "eval/win_rate_vs_ref": [0.50, 0.55, 0.60], "eval/win_rate_ci95": [0.07, 0.07, 0.08]}
    )


def test_win_rate_plot_has_integer_rounds_a_band_and_the_half_line():
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    fig = metrics_figure(_lm_table())
    (ax,) = fig.axes
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks == [1.0, 2.0, 3.0]  # no 1.5, 2.5
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [LEGEND["eval/win_rate_vs_ref"], "95% interval of the win-rate", "½: no better than the reference"]
    assert not any("/" in label for label in labels)  # no raw metric keys
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert (min(ys), max(ys)) == pytest.approx((0.50 - 0.07, 0.60 + 0.08))
    half = [line for line in ax.get_lines() if list(line.get_ydata()) == [0.5, 0.5]]
    assert len(half) == 1
    plt.close(fig)


def test_tabular_plot_names_its_metrics(tmp_path):
    import matplotlib.pyplot as plt

    table = pd.DataFrame({"round": [1, 2], "eval/duality_gap": [0.2, 0.1], "eval/duality_gap_exact_solver": [0.1, 0.05], "eval/kl_to_nash": [0.3, 0.2], "eval/win_rate_vs_ref": [0.55, 0.6]})
    fig = metrics_figure(table)
    gap_ax, win_ax = fig.axes
    assert [t.get_text() for t in gap_ax.get_legend().get_texts()] == [LEGEND[k] for k in ("eval/duality_gap", "eval/duality_gap_exact_solver", "eval/kl_to_nash")]
    assert all(float(t).is_integer() for t in gap_ax.get_xticks()) and all(float(t).is_integer() for t in win_ax.get_xticks())
    assert "95% interval of the win-rate" not in [t.get_text() for t in win_ax.get_legend().get_texts()]  # no interval column: no band
    plt.close(fig)
    store = Store(str(tmp_path / "store"))
    assert plot_metrics(store, table) == store.path(PLOT) and store.read_bytes(PLOT)[:4] == b"\x89PNG"


def test_lc_win_rate_and_lengths_are_plotted_and_summarized():
    import matplotlib.pyplot as plt

    from pipelines.artifacts import summary_markdown

    table = _lm_table().assign(
        **{"eval/lc_win_rate_vs_ref": [0.5, 0.52, 0.53], "eval/lc_win_rate_ci95": [0.06, 0.06, 0.07], "eval/mean_tokens": [15.0, 18.0, 22.0], "eval/ref_mean_tokens": [15.0, 15.2, 14.9]}
    )
    fig = metrics_figure(table)
    win, lengths = fig.axes
    labels = [t.get_text() for t in win.get_legend().get_texts()]
    assert LEGEND["eval/lc_win_rate_vs_ref"] in labels and "95% interval of the LC win-rate" in labels
    assert [t.get_text() for t in lengths.get_legend().get_texts()] == [LEGEND["eval/mean_tokens"], LEGEND["eval/ref_mean_tokens"]]
    plt.close(fig)
    md = summary_markdown("c", 3, dict(table.iloc[-1].drop(["policy_version", "solver"])), {"judge": 1.0}, None)
    assert "| eval/lc_win_rate_vs_ref | 0.53 |" in md and "| eval/mean_tokens | 22 |" in md
