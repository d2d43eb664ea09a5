"""Metrics per group of cases (site, scanner, sex, age band: any manifest column), the worst group, and the
largest gap between groups with a bootstrap confidence interval.

The gap's interval resamples the cases of each group with replacement (``n_boot`` times, seeded), recomputes
every group's metric and takes the 2.5th and 97.5th percentiles of max - min: a gap whose interval holds 0 is
not distinguishable from sampling noise at that group size. AUROC is the rank (Mann-Whitney) statistic,
computed from ranks (scipy) so that a thousand resamples take a second.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

N_BOOT = 1000
MIN_GROUP = 10  # cases a group needs to be ranked (worst group, gap)


def rank_auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Binary AUROC as the probability that a positive outscores a negative (ties count half); NaN when one
    class is missing."""
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)  # ties get their average rank
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def group_metric_fns(num_classes: int, threshold: float = 0.5) -> dict[str, Callable]:
    """The metrics compared between groups: accuracy, and for binary tasks AUROC. Each takes (probs, target)."""
    def predict(p):
        return (p[:, 1] >= threshold).astype(int) if num_classes == 2 else p.argmax(1)

    fns = {"accuracy": lambda p, y: float((predict(p) == y).mean()) if len(y) else float("nan")}
    if num_classes == 2:
        fns["auroc"] = lambda p, y: rank_auroc(p[:, 1], y)
    return fns


def group_report(probs, target, groups: Sequence, threshold: float = 0.5, n_boot: int = N_BOOT,
                 seed: int = 0, min_size: int = MIN_GROUP) -> dict:
    """Per group: ``n`` and each metric; the worst group and the largest gap (max - min over the groups of at
    least ``min_size`` cases where the metric is defined) with its bootstrap 95 % interval, for each metric.
    Smaller groups are listed but not ranked: a worst group of five cases says little."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(target).astype(int)
    g = np.asarray([str(v) for v in groups])
    fns = group_metric_fns(p.shape[1], threshold)
    members = {k: np.flatnonzero(g == k) for k in dict.fromkeys(g)}
    per = {k: {"n": int(len(idx)), **{m: f(p[idx], y[idx]) for m, f in fns.items()}} for k, idx in members.items()}
    names = [k for k in members if len(members[k]) >= min_size]
    out: dict = {"groups": per, "worst": {}, "gap": {}, "min_size": min_size}
    rng = np.random.default_rng(seed)
    draws = [{k: rng.integers(0, len(members[k]), len(members[k])) for k in names} for _ in range(n_boot)]
    for m, f in fns.items():
        defined = [k for k in names if not np.isnan(per[k][m])]
        if len(defined) < 2:
            continue
        worst = min(defined, key=lambda k: per[k][m])
        best = max(defined, key=lambda k: per[k][m])
        gaps = []
        for d in draws:
            vals = [f(p[members[k][d[k]]], y[members[k][d[k]]]) for k in defined]
            vals = [v for v in vals if not np.isnan(v)]
            if len(vals) >= 2:
                gaps.append(max(vals) - min(vals))
        lo, hi = (np.percentile(gaps, [2.5, 97.5]) if gaps else (float("nan"), float("nan")))
        out["worst"][m] = {"group": worst, "value": per[worst][m]}
        out["gap"][m] = {"value": per[best][m] - per[worst][m], "between": [best, worst],
                         "ci95": [float(lo), float(hi)], "n_boot": len(gaps)}
    return out
