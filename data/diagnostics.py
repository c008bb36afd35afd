"""Are these preferences intransitive? Diagnostics over the comparisons table (pandas and numpy only).

Two numbers tell a team whether Nash methods matter for its data:

- ``cycle_share``: among a prompt's response triples whose three pairs each rest on at least
  ``min_votes`` votes, the share whose majority preferences form a cycle (i ≻ j ≻ k ≻ i). A
  Bradley–Terry (scalar reward) world has none; a population of annotators who weigh different
  properties has some (Condorcet).
- the held-out log-loss gap between a Bradley–Terry fit and a pairwise fit (``logloss_gap``, from the
  two models' predicted probabilities; ``solvers/preference_model.compare_bt_pairwise`` trains both).
  BT can only order responses, so a gap well above zero says the data holds preferences no reward
  model can represent.

``judgment_counts`` is the one home of what a store's judgments are counted as (training and evaluation
pairs, abstentions, ties, a learned model's answers), so that ``nashflow status``, ``status --fit-gap``
and ``export`` state counts that add up.

``prediction_metrics`` is the one home of the scores a preference model reports on held-out pairs:
log-loss, accuracy and expected calibration error, all weighted by votes, with soft labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-12  # predicted probabilities are clipped to [EPS, 1 − EPS] inside the log-loss


def pair_preferences(comparisons: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt and unordered pair of responses: ``i`` < ``j`` (by id), ``p`` = P̂(i ≻ j)
    pooled over both orders of presentation and every oracle in ``comparisons`` (a vote-weighted mean,
    a judgment of (j, i) counting as 1 − p), and ``votes``, their total. Rows without a judgment
    (p_a missing or no votes) are left out."""
    c = comparisons[comparisons["p_a"].notna() & (comparisons["n_votes"] > 0)]
    if c.empty:
        return pd.DataFrame({"prompt_id": [], "i": [], "j": [], "p": [], "votes": []})
    swap = (c["a_id"] > c["b_id"]).to_numpy()
    a, b = c["a_id"].to_numpy(), c["b_id"].to_numpy()
    p = c["p_a"].to_numpy(dtype=float)
    w = c["n_votes"].to_numpy(dtype=float)
    frame = pd.DataFrame({
        "prompt_id": c["prompt_id"].to_numpy(),
        "i": np.where(swap, b, a),
        "j": np.where(swap, a, b),
        "wp": w * np.where(swap, 1.0 - p, p),
        "votes": w,
    })
    g = frame.groupby(["prompt_id", "i", "j"], as_index=False, sort=True)[["wp", "votes"]].sum()
    g["p"] = g["wp"] / g["votes"]
    return g[["prompt_id", "i", "j", "p", "votes"]]


def cycle_share(comparisons: pd.DataFrame, *, min_votes: float = 1, min_margin: float = 0.0) -> dict:
    """Share of prompt-level response triples that form a preference cycle.

    A triple counts when each of its three pairs rests on at least ``min_votes`` votes (both orders and
    all oracles pooled, see ``pair_preferences``). It is a cycle when its majority preferences go round:
    i ≻ j, j ≻ k, k ≻ i, each with P̂ > ½ + ``min_margin`` (a tie, or a margin below it, breaks the
    cycle). Per prompt, with W the 0/1 matrix of clear preferences and E that of pairs with enough
    votes: cycles = trace(W³)/3 (each directed 3-cycle is counted once per vertex), triples =
    trace(E³)/6.

    Returns ``cycle_share`` (None when no triple counts), ``triples``, ``cyclic_triples`` and
    ``prompts`` (prompts with at least one counted triple).
    """
    if min_margin < 0 or min_margin >= 0.5:
        raise ValueError(f"min_margin must be in [0, 0.5), got {min_margin}")
    pairs = pair_preferences(comparisons)
    pairs = pairs[pairs["votes"] >= min_votes].sort_values("prompt_id", kind="stable")
    triples = cycles = prompts = 0
    prompt, i_ids, j_ids, p_all = (pairs[c].to_numpy() for c in ("prompt_id", "i", "j", "p"))
    starts = np.flatnonzero(np.r_[True, prompt[1:] != prompt[:-1]]) if len(prompt) else np.array([], int)
    for lo, hi in zip(starts, np.r_[starts[1:], len(prompt)]):
        ids, local = np.unique(np.concatenate([i_ids[lo:hi], j_ids[lo:hi]]), return_inverse=True)
        if len(ids) < 3:
            continue
        i, j, p = local[: hi - lo], local[hi - lo :], p_all[lo:hi].astype(float)
        E = np.zeros((len(ids), len(ids)), dtype=np.int64)
        E[i, j] = E[j, i] = 1
        W = np.zeros_like(E)
        W[i, j] = p > 0.5 + min_margin
        W[j, i] = p < 0.5 - min_margin
        t = int(np.trace(E @ E @ E)) // 6
        if t:
            triples += t
            cycles += int(np.trace(W @ W @ W)) // 3
            prompts += 1
    return {"cycle_share": cycles / triples if triples else None, "triples": triples, "cyclic_triples": cycles, "prompts": prompts}


def prediction_metrics(p_true, p_pred, weights=None, *, bins: int = 10) -> dict:
    """How well predicted P(a ≻ b) match soft labels, weighted by ``weights`` (votes):

    logloss        Σ w · −[p log q + (1 − p) log(1 − q)] / Σ w (q clipped to [1e−12, 1 − 1e−12])
    logloss_floor  the same with q = p: the labels' own entropy, the least any model can reach
    accuracy       among pairs with p ≠ ½: weighted share with q on p's side of ½ (q = ½ counts half)
    ece            expected calibration error: q cut into ``bins`` equal bins; Σ_bins (mass of the bin)
                   · |mean q − mean p| in the bin (Naeini et al. 2015, AAAI, "Obtaining well calibrated
                   probabilities using Bayesian binning")
    pairs, votes   how many pairs and votes these rest on
    """
    p = np.asarray(p_true, dtype=float)
    q = np.asarray(p_pred, dtype=float)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=float)
    if not (p.shape == q.shape == w.shape) or p.ndim != 1:
        raise ValueError(f"p_true, p_pred and weights must be 1-D of one length, got {p.shape}, {q.shape}, {w.shape}")
    if p.size == 0:
        raise ValueError("prediction_metrics: no pairs")
    for name, x in (("p_true", p), ("p_pred", q)):
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1]; found {x[~(np.isfinite(x) & (x >= 0) & (x <= 1))][:5]}")
    if not np.all(np.isfinite(w)) or w.min() <= 0:
        raise ValueError("weights must be positive and finite")
    total = w.sum()
    decided = p != 0.5
    hit = np.where(q == 0.5, 0.5, ((q > 0.5) == (p > 0.5)).astype(float))
    which = np.minimum((q * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += abs(np.sum(w[m] * (q[m] - p[m]))) / total
    return {
        "logloss": float(np.sum(w * _bce(p, q)) / total),
        "logloss_floor": float(np.sum(w * _bce(p, p)) / total),
        "accuracy": float(np.sum((w * hit)[decided]) / w[decided].sum()) if decided.any() else None,
        "ece": float(ece),
        "pairs": int(p.size),
        "votes": float(total),
    }


def logloss_gap(p_true, p_bt, p_pairwise, weights=None) -> dict:
    """The Bradley–Terry fit's held-out log-loss minus the pairwise fit's, on the same pairs. Above zero:
    the pairwise model explains what a scalar reward cannot (on intransitive data, where BT must get at
    least one pair of every cycle wrong)."""
    bt = prediction_metrics(p_true, p_bt, weights)["logloss"]
    pw = prediction_metrics(p_true, p_pairwise, weights)["logloss"]
    return {"logloss_bt": bt, "logloss_pairwise": pw, "logloss_gap": bt - pw}


GAP_THRESHOLD = 0.01  # nats of held-out log-loss that BT must lose to count as a sign
CYCLE_THRESHOLD = 0.05  # share of judged triples that must cycle to count as a sign


def intransitivity_verdict(gap: float, share: float | None, triples: int, *, eval_pairs: int | None = None) -> str:
    """What the two numbers say together, in words: a verdict of "intransitive" needs both signs (the
    pairwise model fits held-out pairs better than Bradley–Terry by more than ``GAP_THRESHOLD``, and more
    than ``CYCLE_THRESHOLD`` of the judged triples cycle); one sign alone is inconclusive."""
    fits = gap > GAP_THRESHOLD
    few = f" ({eval_pairs} held-out pairs: the gap is noisy)" if eval_pairs is not None and eval_pairs < 500 else ""
    if share is None:
        if fits:
            return f"→ inconclusive: the pairwise model fits better{few}, but no response triple has all three pairs judged, so no cycle can be seen"
        return f"→ no sign of intransitivity{few}; no response triple has all three pairs judged, so cycles cannot be checked"
    cycles = share > CYCLE_THRESHOLD
    if fits and cycles:
        return (
            f"→ signs of intransitive preferences: {share:.0%} of {triples} judged triples cycle and the pairwise model fits better;"
            " no scalar reward represents them: Nash methods matter for these data"
        )
    if cycles:
        return f"→ inconclusive: {share:.0%} of {triples} judged triples cycle, but the pairwise model does not fit held-out pairs better{few}"
    seen = "no judged triple cycles" if share == 0 else f"only {share:.1%} of judged triples cycle"
    if fits:
        return (
            f"→ inconclusive: the pairwise model fits better{few}, but {seen}: the gap alone does not show intransitivity (it can also come"
            " from probabilities a logistic reward fits poorly, or from noise); a scalar reward may do for these data"
        )
    return f"→ no sign of intransitivity: {seen} and a Bradley–Terry reward model fits about as well{few}"


def intransitivity(store, *, rounds=None, oracle_ids=None, min_votes: float = 1, min_margin: float = 0.0) -> dict:
    """``cycle_share`` over a store's comparisons (optionally some rounds and oracles), as round metrics
    namespaced ``intransitivity/``. Judgments that a learned model made are left out (``answered_by``
    of kind ``learned``): a model's own cycles say nothing about the people or judges it imitates."""
    c = store.read("comparisons", rounds=rounds, columns=["prompt_id", "a_id", "b_id", "oracle_id", "p_a", "n_votes", "answered_by"])
    if oracle_ids is not None:
        c = c[c["oracle_id"].isin(set(oracle_ids))]
    c = c[answered_kind(c) != "learned"]
    out = cycle_share(c, min_votes=min_votes, min_margin=min_margin)
    return {f"intransitivity/{k}": v for k, v in out.items()}


def _starts_with(column, prefix: str):
    """``pc.starts_with`` of a dictionary-encoded string column, computed once per distinct value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = [pc.take(pc.starts_with(chunk.dictionary, prefix), chunk.indices) for chunk in column.chunks]
    return pa.chunked_array(chunks, pa.bool_())


def answered_kind(comparisons: pd.DataFrame) -> pd.Series:
    """The kind (the oracle id's first part, see oracles/protocol.make_oracle_id) of the oracle that
    answered each stored judgment: ``answered_by``, or the row's own ``oracle_id`` where that is null."""
    who = comparisons["answered_by"].where(comparisons["answered_by"].notna(), comparisons["oracle_id"]).astype(str)
    return who.str.split(":", n=1).str[0]


def judgment_counts(store, *, rounds=None) -> dict:
    """What a store's ``comparisons`` table holds (optionally some rounds), counted once, every way the
    commands count it. A row is one judgment: an ordered pair (a pair asked in both orders is two rows)
    by one oracle, in one round.

    judgments          every stored row = train + eval
    train, eval        rows on training prompts (the pairs the solver learns from) and on held-out
                       prompts (the win-rate's policy-vs-reference pairs, never trained on)
    abstained          rows without an answer (p_a missing): no solver, fit or export uses them
    train_answered     train − the abstentions among them (what the rounds table's ``train judged`` sums to)
    eval_answered      eval − the abstentions among them (``eval judged``, the win-rate's ``eval/pairs``)
    ties               answered rows with p_a = ½ (``export`` leaves them out unless asked)
    learned            answered rows a learned model gave (``status --fit-gap`` leaves them out)
    rounds             the rounds these rows come from
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.compute as pc

    prompts = store.read_arrow("prompts", columns=["prompt_id", "split"])
    ids_of = {name: prompts["prompt_id"].filter(pc.equal(prompts["split"], name)) for name in ("train", "eval")}

    def count(mask) -> int:
        return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)

    def counts_of(round: int) -> dict:
        """One round's counts, in Arrow (a long campaign's store holds millions of rows, and `nashflow
        status` counts them: a round at a time, rounds in parallel, nothing concatenated)."""
        strings = ["prompt_id", "oracle_id", "answered_by"]  # few distinct values: compared as dictionaries
        c = store.read_arrow("comparisons", rounds=[round], columns=[*strings, "p_a"], dictionary=strings)
        train, held_out = (pc.is_in(c["prompt_id"], value_set=ids_of[name]) for name in ("train", "eval"))
        answered = pc.is_valid(c["p_a"])
        by_model = pc.if_else(pc.is_valid(c["answered_by"]), _starts_with(c["answered_by"], "learned:"), _starts_with(c["oracle_id"], "learned:"))
        learned = pc.and_(answered, pc.fill_null(by_model, False))
        return {
            "judgments": c.num_rows,
            "train": count(train),
            "eval": count(held_out),
            "abstained": c.num_rows - count(answered),
            "train_answered": count(pc.and_(train, answered)),
            "eval_answered": count(pc.and_(held_out, answered)),
            "ties": count(pc.fill_null(pc.equal(c["p_a"], 0.5), False)),
            "learned": count(learned),
        }

    stored = [r for r in store.rounds("comparisons") if rounds is None or r in set(rounds)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        per_round = {r: c for r, c in zip(stored, pool.map(counts_of, stored)) if c["judgments"]}
    keys = ("judgments", "train", "eval", "abstained", "train_answered", "eval_answered", "ties", "learned")
    return {**{k: sum(c[k] for c in per_round.values()) for k in keys}, "rounds": sorted(per_round)}


def _bce(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    q = np.clip(q, EPS, 1 - EPS)
    return -(p * np.log(q) + (1 - p) * np.log1p(-q))
