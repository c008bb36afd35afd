"""Agreement among annotators who labelled the same items: percent agreement and Krippendorff's alpha.

A *unit* is one item and the values the annotators gave it (any hashable labels, e.g. "a" / "b" /
"tie"), missing values left out. Units with fewer than two values cannot show agreement and are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


def percent_agreement(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Mean over units of the share of annotator pairs that gave the same value.

    With m values in a unit there are m(m-1)/2 pairs; None when no unit has two values.
    """
    shares = []
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        same = sum(c * (c - 1) // 2 for c in Counter(unit).values())
        shares.append(same / (m * (m - 1) / 2))
    return sum(shares) / len(shares) if shares else None


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal values: alpha = 1 - D_o / D_e.

    Built from the coincidence matrix (Krippendorff, "Computing Krippendorff's Alpha-Reliability",
    2011, section C): each unit u with m_u >= 2 values adds, for every ordered pair of its values
    (c, k) taken from two different annotators, 1 / (m_u - 1) to o_ck. With n_c = sum_k o_ck and
    n = sum_c n_c,

        alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k.

    1 is perfect agreement, 0 is chance level, below 0 systematic disagreement. None when there are no
    pairable values or every value is the same (expected disagreement 0: alpha is undefined).
    """
    o: Counter = Counter()
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = Counter(unit)
        for c, n_uc in counts.items():
            for k, n_uk in counts.items():
                pairs = n_uc * (n_uk - 1) if c == k else n_uc * n_uk
                o[c, k] += pairs / (m - 1)
    n_c: Counter = Counter()
    for (c, _), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    observed = sum(v for (c, k), v in o.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n <= 1 or expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected
