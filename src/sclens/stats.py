"""sclens.stats: the statistics every stage shares (metrics, paired tests, multiple testing, intervals, enrichment).

Nothing here knows about models, operators or campaigns: inputs are arrays, outputs floats or small dicts, so
that ``bench``, ``compress``, ``viz`` and ``circuits`` all sit above it. Tests and corrections come from scipy
(``wilcoxon``, ``false_discovery_control``, ``t``, ``hypergeom``) and metrics from scikit-learn.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes PRESENT in ``y`` (a class only predicted does not add a zero)."""
    y, pred = np.asarray(y).astype(str), np.asarray(pred).astype(str)
    if len(y) == 0:
        return float("nan")
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in ``y``."""
    from sklearn.metrics import f1_score

    y, pred = np.asarray(y).astype(str), np.asarray(pred).astype(str)
    if len(y) == 0:
        return float("nan")
    return float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))


def abs_spearman(depth: np.ndarray, score: np.ndarray) -> float:
    from scipy.stats import spearmanr

    depth, score = np.asarray(depth, float), np.asarray(score, float)
    if len(depth) < 3 or np.ptp(depth) == 0 or np.ptp(score) == 0:
        return float("nan")
    return float(abs(spearmanr(depth, score).statistic))


def depth_ceiling(depth: np.ndarray) -> float:
    """|Spearman| of a perfect ordering that breaks the ties within each depth level (a continuous score)."""
    depth = np.asarray(depth, float)
    if len(depth) < 3 or np.ptp(depth) == 0:
        return float("nan")
    ranks = np.empty(len(depth))
    ranks[np.argsort(depth, kind="stable")] = np.arange(len(depth))  # strictly increasing, consistent with depth
    return abs_spearman(depth, ranks)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided paired Wilcoxon signed-rank test across splits (NaN pairs dropped).

    Zero differences are kept with Pratt's treatment (ranked, then dropped), so ties count against a
    difference; all-zero differences give p = 1. Fewer than 2 usable pairs give p = NaN. Exact p without
    zeros or tied magnitudes (n <= 50), else the tie-corrected normal approximation."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    out = {"n": int(ok.sum()), "mean_diff": float(d.mean()) if len(d) else float("nan"),
           "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}
    if len(d) < 2:
        return {**out, "statistic": float("nan"), "p": float("nan")}
    if np.all(d == 0):
        return {**out, "statistic": 0.0, "p": 1.0}
    absd = np.abs(d)
    exact = len(d) <= 50 and not (d == 0).any() and len(np.unique(absd)) == len(absd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # exact null distribution when there are no zeros or tied |d|; otherwise the normal approximation
        # with tie and Pratt zero corrections, no continuity correction (chosen explicitly, not by version)
        r = wilcoxon(d, zero_method="pratt", alternative="two-sided", method="exact" if exact else "approx")
    return {**out, "statistic": float(r.statistic), "p": float(r.pvalue)}


def bh_qvalues(p: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count in the family."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, float)
    q = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def mean_ci(v: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval across splits (NaNs dropped)."""
    from scipy.stats import t

    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h





def hypergeom_enrichment(selected: Sequence[str], gene_set: Sequence[str], universe: Sequence[str]) -> dict:
    """One-sided hypergeometric p-value of the overlap between ``selected`` and ``gene_set`` within
    ``universe`` (both restricted to it): P(X >= k), X ~ Hypergeom(M = |universe|, n = |set|, N = |selected|)."""
    from scipy.stats import hypergeom

    uni = set(universe)
    sel, gs = set(selected) & uni, set(gene_set) & uni
    k = len(sel & gs)
    p = float(hypergeom.sf(k - 1, len(uni), len(gs), len(sel))) if gs and sel else 1.0
    return {"overlap": k, "set_size_in_universe": len(gs), "n_selected": len(sel), "p": p,
            "genes": sorted(sel & gs)}
