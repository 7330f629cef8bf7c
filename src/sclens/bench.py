"""sclens.bench: donor-holdout benchmark campaigns against the tools people already use.

A campaign = a dataset, a list of :class:`Endpoint` s, seeded grouped splits (no donor on both sides) and a
list of methods from :data:`METHODS`. Every method follows one protocol (``prepare`` once, ``fit(train)``,
``embed_or_predict(cells)``); embedding methods are scored through the SAME readouts (standardised logistic
regression for classes, linear regression for depth), fitted on the training split only. Scores are computed
per test donor and averaged per split; the extracted algorithm is compared with every other method by a
paired two-sided Wilcoxon test across splits, with Benjamini-Hochberg over endpoints x comparisons.

Every endpoint states its room: depth endpoints carry the ceiling (the |Spearman| a perfect ordering reaches
given the tied depth levels) and each method's fraction of it; classification endpoints carry a no-training
floor (a marker rule where the markers exist, else chance). An endpoint whose floor lies inside the best
method's confidence interval is marked saturated, and no win is claimed there.

Pseudotime methods (DPT, Palantir) are rooted by one documented rule on TRAINING cells only
(:func:`root_cell`): among training cells at the lowest depth level, the one with the highest progenitor
marker score (mean z-scored log1p of ``ROOT_MARKERS`` present in the panel), or the medoid when none are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import __version__
from .data import GenePanel, detect_value_kind, log_normalize, require_obs_columns
from .errors import DATA_ERRORS, InputError
from .utils import array_sha256, package_versions

EndpointKind = Literal["binary", "multiclass", "depth"]
METRICS: dict[str, tuple[str, ...]] = {"binary": ("auroc", "balanced_accuracy"),
                                       "multiclass": ("balanced_accuracy", "macro_f1"),
                                       "depth": ("abs_spearman",)}
DIAGNOSTICS = "manifold"  # the endpoint name under which per-split diagnostics are stored (reported, not tested)
ROOT_MARKERS = ("CD34", "PROM1", "SPINK2", "CRHBP", "HLF", "AVP", "MEIS1", "Cd34", "Kit", "Flt3")
log = logging.getLogger(__name__)


# ==================================================================================== endpoints
@dataclass
class Endpoint:
    """One thing to predict on held-out cells.

    * ``binary``: ``positive`` vs ``negative`` label groups of ``column`` (cells in neither are ignored);
      score = P(positive); metrics AUROC and balanced accuracy. ``floor_markers`` = {"positive": [...],
      "negative": [...]} gives the no-training marker rule (mean log1p positive minus negative markers).
    * ``multiclass``: every label of ``column`` with at least ``min_cells`` training cells; balanced accuracy
      and macro-F1. ``label_map`` {label: class} groups labels into classes (e.g. two sources' vocabularies,
      or stages into branches); labels it does not name are left out. Floor: ``floor_markers``
      {class: [genes]} (argmax of marker means) or chance (1/C).
    * ``depth``: a numeric ``column`` or ``depth_map`` {label: depth}; |Spearman| per test donor.
    """

    name: str
    kind: EndpointKind
    column: str
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    depth_map: dict[str, float] | None = None
    floor_markers: dict[str, list[str]] | None = None
    label_map: dict[str, str] | None = None
    min_cells: int = 10

    def __post_init__(self):
        if self.kind not in METRICS:
            raise InputError(f"endpoint {self.name!r}: kind must be one of {sorted(METRICS)}, got {self.kind!r}")
        if self.kind == "binary":
            self.positive, self.negative = [str(x) for x in self.positive], [str(x) for x in self.negative]
            if not self.positive or not self.negative:
                raise InputError(f"binary endpoint {self.name!r} needs non-empty 'positive' and 'negative' label lists")
            both = set(self.positive) & set(self.negative)
            if both:
                raise InputError(f"binary endpoint {self.name!r}: labels {sorted(both)} are on both sides")

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]

    def targets(self, obs: pd.DataFrame) -> np.ndarray:
        """Per-cell target: 1/0/NaN for binary, label or None for multiclass, float or NaN for depth."""
        if self.column not in obs.columns:
            raise InputError(f"endpoint {self.name!r}: obs column {self.column!r} not found; "
                             f"available: {list(obs.columns)}")
        col = obs[self.column]
        if self.kind == "binary":
            lab = col.astype(str).to_numpy()
            out = np.full(len(lab), np.nan)
            out[np.isin(lab, self.positive)] = 1.0
            out[np.isin(lab, self.negative)] = 0.0
            return out
        if self.kind == "multiclass":
            if self.label_map is not None:
                mapped = col.astype(str).map({str(k): str(v) for k, v in self.label_map.items()})
                return np.where(mapped.isna() | col.isna(), None, mapped).astype(object)
            return np.where(col.isna(), None, col.astype(str)).astype(object)
        if self.depth_map is not None:
            return col.astype(str).map({str(k): float(v) for k, v in self.depth_map.items()}).to_numpy(dtype=float)
        vals = pd.to_numeric(col, errors="coerce")
        if vals.notna().sum() == 0:
            raise InputError(f"depth endpoint {self.name!r}: column {self.column!r} is not numeric; "
                             "give a depth_map {label: depth}")
        return vals.to_numpy(dtype=float)

    def check(self, obs: pd.DataFrame) -> None:
        t = self.targets(obs)
        if self.kind == "binary":
            have = set(obs[self.column].astype(str))
            missing = [lab for lab in self.positive + self.negative if lab not in have]
            if int(np.nansum(t == 1)) == 0 or int(np.nansum(t == 0)) == 0:
                raise InputError(f"binary endpoint {self.name!r}: no cells on one side; labels not found in "
                                 f"{self.column!r}: {missing}; present: {sorted(have)[:20]}")
        elif self.kind == "multiclass" and self.label_map is not None and len(set(t[pd.notna(t)])) < 2:
            raise InputError(f"multiclass endpoint {self.name!r}: label_map leaves fewer than 2 classes; its keys "
                             f"{sorted(self.label_map)[:10]} vs labels of {self.column!r}: "
                             f"{sorted(set(obs[self.column].astype(str)))[:20]}")
        elif self.kind == "depth" and np.isfinite(t).sum() < 10:
            raise InputError(f"depth endpoint {self.name!r}: fewer than 10 cells have a depth "
                             f"(depth_map keys vs labels of {self.column!r}?)")


def parse_label_groups(spec: str) -> tuple[list[str], list[str]]:
    """``"CD4 T | Treg vs CD8 T"`` -> (``["CD4 T", "Treg"]``, ``["CD8 T"]``): two label groups, '|' between labels."""
    if " vs " not in spec:
        raise InputError(f"{spec!r}: expected 'A vs B' or 'A | B vs C' (several labels per side separated by '|')")
    left, right = spec.split(" vs ", 1)
    split = lambda s: [x.strip() for x in s.split("|") if x.strip()]  # noqa: E731
    neg, pos = split(left), split(right)
    if not neg or not pos:
        raise InputError(f"{spec!r}: both sides need at least one label")
    return neg, pos


def parse_binary_spec(spec: str, column: str, name: str | None = None) -> Endpoint:
    """``"CD4 T | Treg vs CD8 T"`` -> a binary endpoint on ``column`` (groups separated by '|').

    As for sclens' probes, the score is P(second group): the right-hand side is the positive class."""
    neg, pos = parse_label_groups(spec)
    return Endpoint(name or spec.replace(" ", "_"), "binary", column, positive=pos, negative=neg)


@dataclass
class BenchConfig:
    """What a campaign needs besides the data; read from TOML with :func:`read_bench_config`."""

    endpoints: list[Endpoint]
    donor_key: str | None = None
    label_key: str | None = None
    stage_map: dict[str, str] = field(default_factory=dict)
    scheme: Literal["shuffle", "kfold", "loo", "cells", "source"] = "shuffle"
    n_splits: int = 12
    test_sources: list[str] = field(default_factory=list)
    test_fraction: float = 0.2
    seed: int = 0
    methods: list[str] | None = None
    var_key: str | None = None
    n_genes: int = 1200
    operator: str = "drift"
    n_ref_cells: int = 64  # label-free cells behind the operator export (benchmarks/results/reference_cells.md)
    scvi_epochs: int = 100
    adaptor: str = "ruler"  # the extracted method's adaptor: "ruler" (closed form), "cell" (trained) or "let"
    adaptor_epochs: int | None = None  # training epochs of the "cell" / "let" adaptor (the ruler adaptor has none)
    random_control: int = 3  # random-weights copies behind extracted_random (split i uses copy i mod K); 0 skips it
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        from .extract import ADAPTORS

        if self.adaptor not in ADAPTORS:
            raise InputError(f"adaptor must be one of {list(ADAPTORS)}, got {self.adaptor!r}")


def read_bench_config(path: str | Path, **overrides) -> BenchConfig:
    """A TOML file: top-level settings plus ``[[endpoint]]`` tables and an optional ``[stage_map]``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"endpoint file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"endpoint file {path} is not valid TOML: {exc}") from None
    eps = raw.pop("endpoint", [])
    if not isinstance(eps, list) or not eps:
        raise InputError(f"{path}: declare at least one [[endpoint]] table (name, kind, column, ...)")
    endpoints = []
    for i, e in enumerate(eps):
        unknown = set(e) - {f for f in Endpoint.__dataclass_fields__}
        if unknown or "name" not in e or "kind" not in e:
            raise InputError(f"{path}: endpoint #{i + 1} needs name and kind; unknown keys {sorted(unknown)}")
        e = dict(e)
        e.setdefault("column", raw.get("label_key"))
        if e["column"] is None:
            raise InputError(f"{path}: endpoint {e['name']!r} has no column and no top-level label_key")
        endpoints.append(Endpoint(**e))
    known = set(BenchConfig.__dataclass_fields__) - {"endpoints"}
    unknown = set(raw) - known
    if unknown:
        raise InputError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(endpoints=endpoints, **raw)


# ==================================================================================== splits
@dataclass
class Split:
    index: int
    train: np.ndarray  # cell indices
    test: np.ndarray
    test_groups: list[str]


def donor_splits(donors: Sequence[str], *, scheme: str = "shuffle", n_splits: int = 12, test_fraction: float = 0.2,
                 seed: int = 0, strata: Sequence[str] | None = None,
                 test_sources: Sequence[str] | None = None) -> list[Split]:
    """Seeded splits. ``shuffle``: ``n_splits`` random donor draws (``test_fraction`` of donors, >= 1);
    ``kfold``: donors shuffled then cut into ``n_splits`` groups; ``loo``: one donor per split; ``cells``:
    stratified cell-level splits for single-source data (source and donor coincide: say so in reports);
    ``source``: train on the sources (values of ``donors``) not in ``test_sources``, test on ``test_sources``
    — split k trains on a seeded stratified ``1 - test_fraction`` subsample of the training sources and tests
    on the k-th of ``n_splits`` disjoint stratified folds of the test sources' cells.
    No donor is ever on both sides of a donor split."""
    donors = np.asarray(donors, dtype=object).astype(str)
    n = len(donors)
    idx = np.arange(n)
    if scheme == "source":
        return _source_splits(donors, test_sources, n_splits, test_fraction, seed, strata)
    if scheme == "cells":
        from sklearn.model_selection import StratifiedShuffleSplit

        y = _stratum(strata if strata is not None else np.zeros(n))
        sss = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_fraction, random_state=seed)
        return [Split(i, np.sort(tr), np.sort(te), ["cells"]) for i, (tr, te) in enumerate(sss.split(idx, y))]
    uniq = np.array(sorted(set(donors)))
    need = {"loo": 3, "kfold": max(3, n_splits), "shuffle": 3}
    if scheme not in need:
        raise InputError(f"scheme must be one of shuffle, kfold, loo, cells, source; got {scheme!r}")
    if len(uniq) < need[scheme]:
        raise InputError(f"donor-holdout scheme {scheme!r} with {n_splits} splits needs at least {need[scheme]} donors; "
                         f"the data have {len(uniq)} ({', '.join(uniq[:10])}). Use scheme='cells' for single-source "
                         "data (and report that source and donor coincide), or fewer splits.")
    rng = np.random.default_rng(seed)
    groups: list[np.ndarray]
    if scheme == "loo":
        groups = [np.array([d]) for d in uniq]
    elif scheme == "kfold":
        groups = [g for g in np.array_split(rng.permutation(uniq), n_splits)]
    else:
        k = max(1, int(round(test_fraction * len(uniq))))
        k = min(k, len(uniq) - 2)
        groups = [np.sort(rng.choice(uniq, size=k, replace=False)) for _ in range(n_splits)]
    out = []
    for i, g in enumerate(groups):
        te = np.isin(donors, g)
        out.append(Split(i, idx[~te], idx[te], [str(x) for x in g]))
    return out


def _stratum(y: np.ndarray) -> np.ndarray:
    """Labels for stratification; classes with fewer than 2 cells pooled so sklearn accepts them."""
    y = np.asarray(y, dtype=object).astype(str)
    counts = pd.Series(y).value_counts()
    return np.where(np.isin(y, counts[counts >= 2].index), y, "__rare__")


def _source_splits(sources: np.ndarray, test_sources, n_splits: int, test_fraction: float, seed: int,
                   strata) -> list[Split]:
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    uniq = sorted(set(sources))
    test_sources = [str(t) for t in (test_sources or [])]
    missing = [t for t in test_sources if t not in uniq]
    if not test_sources or missing:
        raise InputError(f"scheme 'source' needs test_sources naming values of the donor/source column; "
                         f"missing {missing or '(none given)'}; present: {uniq[:20]}")
    is_test = np.isin(sources, test_sources)
    if is_test.all():
        raise InputError(f"scheme 'source': every cell is in test_sources {test_sources}; nothing is left to train on")
    if n_splits < 2:
        raise InputError("scheme 'source' needs n_splits >= 2 (disjoint folds of the test sources)")
    idx = np.arange(len(sources))
    y = _stratum(strata if strata is not None else np.zeros(len(sources)))
    tr_all, te_all = idx[~is_test], idx[is_test]
    if len(te_all) < n_splits:
        raise InputError(f"scheme 'source': {len(te_all)} test cells cannot make {n_splits} folds")
    y_te = _stratum(y[te_all])
    skf_min = pd.Series(y_te).value_counts().min()
    folds = (StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(te_all, y_te) if skf_min >= n_splits
             else _plain_folds(len(te_all), n_splits, seed))
    sss = StratifiedShuffleSplit(n_splits=n_splits, train_size=1.0 - test_fraction, random_state=seed)
    subs = [tr for tr, _ in sss.split(tr_all, _stratum(y[tr_all]))]
    return [Split(i, np.sort(tr_all[sub]), np.sort(te_all[fold]), list(test_sources))
            for i, (sub, (_, fold)) in enumerate(zip(subs, folds))]


def _plain_folds(n: int, n_splits: int, seed: int):
    from sklearn.model_selection import KFold

    return KFold(n_splits, shuffle=True, random_state=seed).split(np.arange(n))


# ==================================================================================== metrics
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


def score_endpoint(ep: Endpoint, target: np.ndarray, out: dict, groups: np.ndarray) -> dict[str, float]:
    """Per-group (test donor) metrics averaged over groups. ``out``: {"score"} / {"pred"} / {"pseudotime"}."""
    res: dict[str, list[float]] = {m: [] for m in ep.metrics}
    for g in np.unique(groups):
        m = groups == g
        if ep.kind == "binary":
            ok = m & np.isfinite(target)
            y = target[ok].astype(int)
            if len(np.unique(y)) < 2:
                continue
            res["auroc"].append(auroc(y, out["score"][ok]))
            res["balanced_accuracy"].append(balanced_accuracy(y, (out["score"][ok] >= 0.5).astype(int)))
        elif ep.kind == "multiclass":
            ok = m & pd.notna(target)
            if ok.sum() == 0:
                continue
            res["balanced_accuracy"].append(balanced_accuracy(target[ok], out["pred"][ok]))
            res["macro_f1"].append(macro_f1(target[ok], out["pred"][ok]))
        else:
            ok = m & np.isfinite(target)
            v = abs_spearman(target[ok], out["pseudotime"][ok])
            if np.isfinite(v):
                res["abs_spearman"].append(v)
    return {k: (float(np.mean(v)) if v else float("nan")) for k, v in res.items()}


# ==================================================================================== statistics
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


# ==================================================================================== data handed to methods
class MethodSkipped(Exception):
    """A method cannot run here (missing extra, wrong input kind); the reason goes into the report."""


@dataclass
class Cells:
    """The cells one call may see: a train OR a test subset (methods never get both in ``fit``)."""

    adata: ad.AnnData  # symbols as var_names; X as given (counts or log)
    x: np.ndarray  # panel log1p-normalised values [n, G]
    panel: GenePanel
    donors: np.ndarray
    stage_labels: np.ndarray  # label after the config's stage_map (for the extracted adaptor)
    value_kind: str

    @property
    def n(self) -> int:
        return len(self.donors)


class Method:
    """Protocol every benchmarked method follows. ``output`` is ``embedding`` (scored through the shared
    readouts), ``pseudotime`` (depth endpoints only) or ``predictions`` (per-endpoint scores/labels)."""

    name = "method"
    output: Literal["embedding", "pseudotime", "predictions"] = "embedding"
    requires: tuple[str, ...] = ()
    description = ""

    def __init__(self, config: BenchConfig, model=None):
        self.config, self.model, self.n_trainable, self.info = config, model, 0, {}
        self.progress = False  # set by the harness: long one-time work shows a bar

    @classmethod
    def unavailable(cls) -> str | None:
        import importlib.util

        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return (f"needs {', '.join(missing)} (pip install 'sclens[bench]')") if missing else None

    def prepare(self, data: "Cells") -> None:
        """One-time work on ALL cells that uses no labels (e.g. a frozen model's embeddings)."""

    def fit(self, train: Cells, endpoints: list[Endpoint], targets: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def embed_or_predict(self, cells: Cells, idx: np.ndarray) -> dict:
        raise NotImplementedError

    def diagnostics(self, test: Cells) -> dict[str, float]:
        """Per-split diagnostics on the test cells beside the endpoint scores (reported, not tested); none by default."""
        return {}


def root_cell(train: Cells, depth: np.ndarray | None) -> int:
    """Documented root rule (training cells only): lowest depth level, then highest progenitor-marker score,
    else the medoid of that level in panel space. Returns an index into ``train``."""
    cand = np.arange(train.n)
    if depth is not None and np.isfinite(depth).any():
        low = np.nanmin(depth)
        cand = np.flatnonzero(depth == low)
    where = _gene_positions(train.panel)
    genes = [g for g in ROOT_MARKERS if g in where]
    if genes:
        cols = [where[g] for g in genes]
        X = train.x[:, cols]
        z = (X - X.mean(0)) / (X.std(0) + 1e-8)
        return int(cand[np.argmax(z[cand].mean(1))])
    Xc = train.x[cand]
    centre = Xc.mean(0)
    return int(cand[np.argmin(((Xc - centre) ** 2).sum(1))])


class RawMethod(Method):
    name, description = "raw_log1p", "panel genes, log1p(normalised counts), shared readouts"

    def fit(self, train, endpoints, targets):
        self.n_trainable = 0

    def embed_or_predict(self, cells, idx):
        return {"embedding": cells.x}


class PCAMethod(Method):
    name, description = "pca10", "PCA (10 components, fitted on training cells) of the panel log1p values"

    def fit(self, train, endpoints, targets):
        from sklearn.decomposition import PCA

        self.pca = PCA(n_components=min(10, train.x.shape[1], train.n - 1), random_state=self.config.seed).fit(train.x)
        self.n_trainable = int(self.pca.components_.size + self.pca.mean_.size)

    def embed_or_predict(self, cells, idx):
        return {"embedding": self.pca.transform(cells.x).astype(np.float32)}


class ExtractedMethod(Method):
    name = "sclens_extracted"
    requires = ("torch",)
    description = "sclens: frozen operator from the foundation model + cell-trained adaptor (d=10), shared readouts"

    def prepare(self, data):
        """Export the frozen operators ONCE from a seeded, label-free sample of cells (like the MLP probe's
        embeddings, this uses no labels and no split; it is the one-time cost of opening the model)."""
        t0 = time.perf_counter()
        self.operator = self._operator_of(self.model, data)
        self.export_seconds = time.perf_counter() - t0

    def _operator_of(self, model, data):
        """The configured operator (``drift`` or ``L<l>H<h>`` of the ov kind) of ``model``."""
        from .extract import select_operator
        from .operators import export_operators

        a = ad.AnnData(data.adata.X, var=pd.DataFrame(index=data.adata.var_names))
        banks = export_operators(model, a, data.panel, kinds=["ov"], n_ref_cells=min(self.config.n_ref_cells, data.n),
                                 seed=self.config.seed, progress=False)
        spec = self.config.operator
        if spec == "drift":
            return select_operator(banks, drift=True)
        try:
            layer, head = (int(v) for v in spec.upper().replace("L", "").replace("H", ",").split(","))
        except ValueError:
            raise InputError(f"operator must be 'drift' or 'L<layer>H<head>' (e.g. L0H3), got {spec!r}") from None
        return select_operator(banks, unit=(layer, head))

    def fit(self, train, endpoints, targets):
        op = self.operator
        try:
            self.extracted = fit_extracted(train, op, self.config)
        except InputError as exc:
            raise MethodSkipped(f"labels do not map to stages of the DAG ({exc}); add a [stage_map] to the "
                                f"endpoint file ({int(pd.notna(train.stage_labels).sum())} cells mapped)") from None
        n = self.extracted.n_trainable()
        self.n_trainable = int(n["adaptor"])  # the shared readouts are counted by the harness
        self.info = {"operator": op.describe(), "operator_values_frozen": int(op.n_values),
                     "export_seconds_one_time": self.export_seconds}

    def embed_or_predict(self, cells, idx):
        return {"embedding": self.extracted.latent(cells.x)}

    def diagnostics(self, test):
        """The manifold beside the endpoints: trustworthiness (k = 15) of the latent against the operator features
        on up to 1,000 test cells, and the held-out ruler Spearman (latent angular distances of the test donors'
        anchors against the DAG ruler)."""
        return manifold_diagnostics(self.extracted, test, self.config.seed)


def manifold_diagnostics(model, test: "Cells", seed: int, max_cells: int = 1000) -> dict[str, float]:
    """Trustworthiness and held-out ruler Spearman of an extracted model on test cells (NaN where undefined,
    e.g. fewer than 3 mapped stages among the test cells)."""
    from .anchors import build_anchors
    from .manifold import spearman_pairs, trustworthiness

    out = {"trustworthiness": float("nan"), "heldout_ruler_spearman": float("nan")}
    F = model.operator.features(test.x)
    if len(F) > 15 * 2 + 1:
        rng = np.random.default_rng(seed)
        s = np.sort(rng.choice(len(F), size=min(max_cells, len(F)), replace=False))
        out["trustworthiness"] = trustworthiness(F[s], model.adaptor.transform(F[s]))
    a = _stage_labelled(test)
    try:
        anchors = build_anchors(a, test.panel, label_key=STAGE_LABEL, dag=model.dag,
                                donor_key="_donor" if "_donor" in a.obs else None, min_cells=5, seed=seed)
    except InputError:
        return out
    if anchors.obs["stage"].nunique() >= 3:
        Z = model.adaptor.transform(model.operator.features(anchors.X))
        R = model.dag.ruler_matrix[np.ix_(anchors.stage_index, anchors.stage_index)]
        out["heldout_ruler_spearman"] = spearman_pairs(model.adaptor.angular_distances(Z), R)
    return out


STAGE_LABEL = "_sclens_stage_label"


def _stage_labelled(cells: "Cells") -> ad.AnnData:
    """The cells' counts with their DAG stage labels in ``obs[STAGE_LABEL]`` (what extraction and anchors read)."""
    obs = cells.adata.obs.copy()
    obs[STAGE_LABEL] = cells.stage_labels
    return ad.AnnData(cells.adata.X, obs=obs, var=pd.DataFrame(index=cells.adata.var_names))


def fit_extracted(train: "Cells", operator, config: BenchConfig, **extract_kw):
    """Stage 2 (:func:`sclens.extract.extract` with ``fit_readouts=False``) on a split's training cells, their DAG
    stage labels as the labels, whole training set used (no inner holdout): the campaign reads the latent with
    its shared readouts, so the extracted file's own readouts and scores are not fitted."""
    from .extract import extract

    a = _stage_labelled(train)
    epochs = None if config.adaptor == "ruler" else config.adaptor_epochs
    return extract(a, operator, label_key=STAGE_LABEL, donor_key="_donor" if "_donor" in a.obs else None,
                   holdout_fraction=0.0, seed=config.seed, adaptor=config.adaptor, epochs=epochs, progress=False,
                   n_perm=0, fit_readouts=False, **extract_kw)


class ExtractedIdentityMethod(ExtractedMethod):
    """Control: the extracted method with its operator replaced by the identity (the gene panel itself).

    Against ``sclens_extracted`` it shows what the model's operator adds; against ``pca10`` (another 10-d linear
    map of the same panel, read by the same readouts) what the adaptor's objective and training cost."""

    name = "extracted_identity"
    description = "control: the extracted method's adaptor + shared readouts on the identity operator (the panel itself)"

    def prepare(self, data):
        from .extract import Operator, OperatorBlock

        G = len(data.panel)
        self.operator = Operator([OperatorBlock(dense=np.eye(G, dtype=np.float32))], data.panel, {"type": "identity"})
        self.export_seconds = 0.0


class ExtractedRandomMethod(ExtractedMethod):
    """Control: the extracted method with its operator exported, the same way, from random-weights copies of the
    model (:func:`sclens.models.controls.randomize`, seeds 0..K-1, embeddings kept). Split i uses copy i mod K, so
    the copies' spread enters the split-to-split variance that the paired tests see."""

    name = "extracted_random"
    description = ("control: the extracted method on the operator of random-weights copies of the model "
                   "(transformer blocks re-drawn, embeddings kept; split i uses copy i mod K)")

    def prepare(self, data):
        from .models.controls import randomize

        K = int(self.config.random_control)
        if K < 1:
            raise MethodSkipped("random_control = 0: no random-weights copies requested")
        t0 = time.perf_counter()
        self.operators = [self._operator_of(randomize(self.model, seed), data) for seed in range(K)]
        self.export_seconds = time.perf_counter() - t0
        self._n_fits = 0

    def fit(self, train, endpoints, targets):
        # the harness fits a method once per split, in split order
        self.operator = self.operators[self._n_fits % len(self.operators)]
        self._n_fits += 1
        super().fit(train, endpoints, targets)
        self.info["random_copies"] = len(self.operators)


class DPTMethod(Method):
    name, output, requires = "dpt", "pseudotime", ("scanpy",)
    description = "scanpy diffusion pseudotime on train+test cells (PCA-30, 15 neighbours), rooted on a training cell"

    def fit(self, train, endpoints, targets):
        self.train = train
        self.depth = _first_depth(endpoints, targets)

    def _joint(self, cells):
        X = np.concatenate([self.train.x, cells.x])
        a = ad.AnnData(X)
        return a, root_cell(self.train, self.depth)

    def embed_or_predict(self, cells, idx):
        import scanpy as sc

        a, root = self._joint(cells)
        sc.pp.pca(a, n_comps=min(30, a.n_vars - 1, a.n_obs - 1), random_state=self.config.seed)
        sc.pp.neighbors(a, n_neighbors=15, random_state=self.config.seed)
        sc.tl.diffmap(a, random_state=self.config.seed)
        a.uns["iroot"] = root
        sc.tl.dpt(a)
        return {"pseudotime": _finite(a.obs["dpt_pseudotime"].to_numpy()[self.train.n:])}


class PalantirMethod(DPTMethod):
    name, requires = "palantir", ("palantir",)
    description = "Palantir (10 diffusion components, multiscale space) on train+test cells, rooted on a training cell"

    def embed_or_predict(self, cells, idx):
        import palantir
        import scanpy as sc

        a, root = self._joint(cells)
        a.obs_names = [f"c{i}" for i in range(a.n_obs)]
        sc.pp.pca(a, n_comps=min(30, a.n_vars - 1, a.n_obs - 1), random_state=self.config.seed)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            palantir.utils.run_diffusion_maps(a, n_components=10, seed=self.config.seed)
            palantir.utils.determine_multiscale_space(a)
            res = palantir.core.run_palantir(a, a.obs_names[root], use_early_cell_as_start=True,
                                             num_waypoints=min(1200, a.n_obs), seed=self.config.seed)
        pt = res.pseudotime if hasattr(res, "pseudotime") else a.obs["palantir_pseudotime"]
        return {"pseudotime": _finite(np.asarray(pt)[self.train.n:])}


class SCVIMethod(Method):
    name, requires = "scvi10", ("scvi",)
    description = "scVI (10 latent dims) on the panel genes' raw counts, trained on the training cells; shared readouts"

    def fit(self, train, endpoints, targets):
        if train.value_kind != "counts":
            raise MethodSkipped(f"scVI needs raw counts; these values are {train.value_kind}")
        import scvi

        logging.getLogger("scvi").setLevel(logging.WARNING)
        for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        scvi.settings.verbosity = logging.WARNING
        scvi.settings.seed = self.config.seed
        a = self._counts(train)
        scvi.model.SCVI.setup_anndata(a)
        self.model_ = scvi.model.SCVI(a, n_latent=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model_.train(max_epochs=self.config.scvi_epochs, enable_progress_bar=False, accelerator="cpu")
        self.n_trainable = int(sum(p.numel() for p in self.model_.module.parameters() if p.requires_grad))
        self.info = {"max_epochs": self.config.scvi_epochs}

    @staticmethod
    def _counts(cells):
        idx = cells.panel.column_index(cells.adata.var_names.astype(str))
        X = cells.adata.X
        X = X.to_memory() if hasattr(X, "to_memory") else X
        X = sp.csr_matrix(X)[:, np.where(idx >= 0, idx, 0)]
        X = X.multiply((idx >= 0)[None, :].astype(np.float32)).tocsr().astype(np.float32)
        return ad.AnnData(X)

    def embed_or_predict(self, cells, idx):
        import scvi

        a = self._counts(cells)
        scvi.model.SCVI.setup_anndata(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"embedding": self.model_.get_latent_representation(a).astype(np.float32)}


class CellTypistMethod(Method):
    name, output, requires = "celltypist", "predictions", ("celltypist",)
    description = "CellTypist logistic model trained on the training cells (all genes, log1p CP10k), per endpoint"

    def fit(self, train, endpoints, targets):
        import os

        os.environ.setdefault("CELLTYPIST_FOLDER", str(Path.home() / ".cache" / "sclens_celltypist"))
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        import celltypist

        root.setLevel(level)
        root.handlers = handlers  # importing celltypist reconfigures the root logger
        celltypist.logger.set_level(logging.WARNING)
        if train.value_kind not in ("counts", "log1p_normalized"):
            raise MethodSkipped(f"CellTypist accepts only log1p(CP10k) expression (it checks), and these data are "
                                f"{train.value_kind.replace('_', ' ')} values that cannot be converted to it exactly")
        Xn = _lognorm_all(train)
        self.models, self.n_trainable = {}, 0
        for ep in endpoints:
            if ep.kind == "depth":
                continue
            y = targets[ep.name]
            lab, keep = _classifier_labels(ep, y)
            if keep.sum() < 10 or len(np.unique(lab[keep])) < 2:
                continue
            a = ad.AnnData(Xn[keep], obs=pd.DataFrame({"y": lab[keep]}))
            a.var_names = train.adata.var_names.astype(str)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                m = celltypist.train(a, labels="y", check_expression=False, n_jobs=1, feature_selection=False)
            self.models[ep.name] = m
            self.n_trainable += int(m.classifier.coef_.size + m.classifier.intercept_.size)

    def embed_or_predict(self, cells, idx):
        import celltypist

        Xn = _lognorm_all(cells)
        a = ad.AnnData(Xn)
        a.var_names = cells.adata.var_names.astype(str)
        out = {}
        for name, m in self.models.items():
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                pred = celltypist.annotate(a, model=m)
            labels = pred.predicted_labels["predicted_labels"].astype(str).to_numpy()
            if "pos" in m.cell_types and set(m.cell_types) == {"pos", "neg"}:
                p = pred.probability_matrix
                out[name] = {"score": (p["pos"] / (p["pos"] + p["neg"] + 1e-12)).to_numpy(),
                             "pred": (labels == "pos").astype(int)}
            else:
                out[name] = {"pred": labels}
        return {"predictions": out}


class MLPProbeMethod(Method):
    name, output, requires = "mlp_probe", "predictions", ("torch",)
    description = ("3-layer MLP probe (d_model->256->128->64->C, ReLU) on frozen mean-pooled embeddings of the "
                   "foundation model")

    def prepare(self, data):
        from .models import embed_cells

        a = ad.AnnData(data.adata.X, var=pd.DataFrame(index=data.adata.var_names))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.E = embed_cells(a, self.model, pooling="avg", progress=self.progress, seed=self.config.seed,
                                 copy=False)

    def fit(self, train, endpoints, targets):
        from sklearn.neural_network import MLPClassifier, MLPRegressor
        from sklearn.preprocessing import StandardScaler

        E = self.E[self._rows(train)]
        self.scaler = StandardScaler().fit(E)
        E = self.scaler.transform(E)
        self.probes, self.n_trainable = {}, 0
        for ep in endpoints:
            y = targets[ep.name]
            kw = dict(hidden_layer_sizes=(256, 128, 64), activation="relu", random_state=self.config.seed,
                      max_iter=200, early_stopping=True, n_iter_no_change=10)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if ep.kind == "depth":
                    keep = np.isfinite(y)
                    if keep.sum() < 10:
                        continue
                    m = MLPRegressor(**kw).fit(E[keep], y[keep])
                else:
                    lab, keep = _classifier_labels(ep, y)
                    if keep.sum() < 10 or len(np.unique(lab[keep])) < 2:
                        continue
                    # integer targets: sklearn's early-stopping scorer rejects string labels
                    classes, codes = np.unique(lab[keep], return_inverse=True)
                    m = MLPClassifier(**kw).fit(E[keep], codes)
                    m.label_names_ = classes
            self.probes[ep.name] = (ep, m)
            self.n_trainable += int(sum(w.size for w in m.coefs_) + sum(b.size for b in m.intercepts_))

    def _rows(self, cells):
        return cells.adata.obs["_row"].to_numpy()

    def embed_or_predict(self, cells, idx):
        E = self.scaler.transform(self.E[self._rows(cells)])
        out = {}
        for name, (ep, m) in self.probes.items():
            if ep.kind == "depth":
                out[name] = {"pseudotime": m.predict(E)}
            elif ep.kind == "binary":
                p = m.predict_proba(E)
                out[name] = {"score": p[:, list(m.label_names_).index("pos")]}
            else:
                out[name] = {"pred": m.label_names_[m.predict(E)]}
        return {"predictions": out}


METHODS: dict[str, type[Method]] = {m.name: m for m in (ExtractedMethod, ExtractedIdentityMethod, ExtractedRandomMethod,
                                                        RawMethod, PCAMethod, DPTMethod, PalantirMethod, SCVIMethod,
                                                        CellTypistMethod, MLPProbeMethod)}
# the two ablations every campaign reports next to the extracted method: (question, method, baseline)
ABLATIONS = (("model contribution", "sclens_extracted", "extracted_random"),
             ("adaptor cost", "extracted_identity", "pca10"))
REFERENCE = "sclens_extracted"


def _gene_positions(panel: GenePanel) -> dict[str, int]:
    return {g: i for i, g in enumerate(panel.genes)}


def _first_depth(endpoints, targets):
    for ep in endpoints:
        if ep.kind == "depth":
            return targets[ep.name]
    return None


def _finite(v):
    v = np.asarray(v, float)
    fin = np.isfinite(v)
    if not fin.all():
        v = v.copy()
        v[~fin] = (v[fin].max() + 1.0) if fin.any() else 0.0  # unreachable cells (disconnected graph) go last
    return v


def _lognorm_all(cells: Cells) -> np.ndarray:
    X = cells.adata.X
    X = X.to_memory() if hasattr(X, "to_memory") else X
    Xn = log_normalize(X, cells.value_kind)
    return Xn.toarray() if sp.issparse(Xn) else np.asarray(Xn)


def _classifier_labels(ep: Endpoint, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training labels for a classifier: 'pos'/'neg' for binary, the label for multiclass (rare classes dropped)."""
    if ep.kind == "binary":
        keep = np.isfinite(y)
        return np.where(y == 1, "pos", "neg").astype(str), keep
    keep = pd.notna(y)
    counts = pd.Series(y[keep]).value_counts()
    keep &= np.isin(y.astype(str), counts[counts >= ep.min_cells].index.astype(str))
    return y.astype(str), keep


# ==================================================================================== the harness
@dataclass
class SharedReadouts:
    """The SAME readouts for every embedding method: a training-set StandardScaler, then per endpoint a
    logistic regression (C = 1) or, for depth, a linear regression. ``predict`` maps any latent to the
    per-endpoint outputs :func:`score_endpoint` reads (used again on ablated latents by the factor audit)."""

    scaler: object
    models: dict
    n_params: int

    def predict(self, Z: np.ndarray) -> dict:
        B = self.scaler.transform(Z)
        out = {}
        for name, (kind, m) in self.models.items():
            if kind == "depth":
                out[name] = {"pseudotime": m.predict(B)}
            elif kind == "binary":
                out[name] = {"score": m.predict_proba(B)[:, list(m.classes_).index("pos")]}
            else:
                out[name] = {"pred": m.predict(B)}
        return out


def fit_shared_readouts(Ztr: np.ndarray, endpoints, targets_tr, seed: int, max_cells: int = 20_000) -> SharedReadouts:
    """Fit :class:`SharedReadouts` on training cells only (scaler included); endpoints with fewer than 10
    usable training cells or a single class get no readout."""
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(Ztr)
    A = scaler.transform(Ztr)
    rng = np.random.default_rng(seed)
    models, n_params = {}, 0
    for ep in endpoints:
        y = targets_tr[ep.name]
        if ep.kind == "depth":
            keep = np.flatnonzero(np.isfinite(y))
        else:
            lab, keep_mask = _classifier_labels(ep, y)
            keep = np.flatnonzero(keep_mask)
        if len(keep) < 10:
            continue
        if len(keep) > max_cells:
            keep = np.sort(rng.choice(keep, size=max_cells, replace=False))
        if ep.kind == "depth":
            reg = LinearRegression().fit(A[keep], y[keep])
            models[ep.name] = ("depth", reg)
            n_params += reg.coef_.size + 1
            continue
        if len(np.unique(lab[keep])) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(A[keep], lab[keep])
        n_params += clf.coef_.size + clf.intercept_.size
        models[ep.name] = (ep.kind, clf)
    return SharedReadouts(scaler, models, int(n_params))


def _shared_readouts(Ztr: np.ndarray, Zte: np.ndarray, endpoints, targets_tr, seed: int, max_cells: int = 20_000):
    ro = fit_shared_readouts(Ztr, endpoints, targets_tr, seed, max_cells)
    return ro.predict(Zte), ro.n_params, ro.scaler


def _floor(ep: Endpoint, cells: Cells, target: np.ndarray, groups: np.ndarray) -> dict:
    """No-training floor: the marker rule where its genes exist, else chance."""
    if ep.kind == "depth":
        return {}
    fm = ep.floor_markers or {}
    where = _gene_positions(cells.panel)
    if ep.kind == "binary":
        pos = [g for g in fm.get("positive", []) if g in where]
        neg = [g for g in fm.get("negative", []) if g in where]
        if fm and (pos or neg):
            s = (cells.x[:, [where[g] for g in pos]].mean(1) if pos else 0.0) - \
                (cells.x[:, [where[g] for g in neg]].mean(1) if neg else 0.0)
            s = np.asarray(s, float)
            # a marker rule has no fitted threshold: call "positive" above the midpoint of the score's range
            out = score_endpoint(ep, target, {"score": 1 / (1 + np.exp(-(s - np.median(s)) * 4))}, groups)
            return {**out, "rule": f"mean log1p({'+'.join(pos) or '-'}) - mean log1p({'+'.join(neg) or '-'})",
                    "missing_markers": [g for g in fm.get("positive", []) + fm.get("negative", []) if g not in where]}
        missing = fm.get("positive", []) + fm.get("negative", [])
        return {"auroc": 0.5, "balanced_accuracy": 0.5,
                "rule": "chance" + (f" (marker genes {missing} absent from the panel)" if missing else "")}
    classes = sorted(set(target[pd.notna(target)].astype(str)))
    usable = {c: [g for g in genes if g in where] for c, genes in fm.items()}
    usable = {c: g for c, g in usable.items() if g}
    if usable:
        names = list(usable)
        S = np.stack([cells.x[:, [where[g] for g in usable[c]]].mean(1) for c in names], axis=1)
        S = (S - S.mean(0)) / (S.std(0) + 1e-8)  # markers differ in level; compare z-scores
        pred = np.asarray(names)[S.argmax(1)]
        out = score_endpoint(ep, target, {"pred": pred}, groups)
        return {**out, "rule": "argmax of z-scored marker means (" + ", ".join(names) + ")"}
    return {"balanced_accuracy": 1.0 / max(1, len(classes)), "macro_f1": float("nan"), "rule": f"chance (1/{len(classes)})"}


@dataclass
class BenchResult:
    """Everything a campaign measured. ``scores``: one row per (split, method, endpoint, metric)."""

    name: str
    scores: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    runtime: pd.DataFrame
    params: dict
    skipped: dict
    info: dict
    ablations: pd.DataFrame = field(default_factory=pd.DataFrame)  # the controls' paired tests (see ABLATIONS)

    def to_dict(self) -> dict:
        rec = lambda df: json_records(df)  # noqa: E731
        return {"name": self.name, "info": self.info, "summary": rec(self.summary), "comparisons": rec(self.comparisons),
                "ablations": rec(self.ablations), "runtime": rec(self.runtime), "params": self.params,
                "skipped": self.skipped, "scores": rec(self.scores)}

    @classmethod
    def from_json(cls, path: str | Path) -> "BenchResult":
        """Reload a saved campaign (``bench_<name>.json``), e.g. to re-render its report."""
        import json

        d = json.loads(Path(path).read_text())
        df = lambda k: pd.DataFrame(d[k]).astype({"value": float} if k == "scores" else {})  # noqa: E731
        return cls(d["name"], df("scores"), df("summary").fillna(np.nan), df("comparisons"), df("runtime"),
                   d["params"], d["skipped"], d["info"], pd.DataFrame(d.get("ablations", [])))

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        from .bench_report import write_report

        return write_report(self, Path(out_dir))


def json_records(df: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]


def prepare_dataset(adata: ad.AnnData, config: BenchConfig, vocabulary: Iterable[str], *, layer: str | None = None,
                    panel: GenePanel | None = None):
    """Symbol gene ids, the panel (genes the data and the model share; HVG-ranked, label-free, when there
    are more than ``config.n_genes``; or the given ``panel``, e.g. an artifact's), panel values, value kind."""
    from .data import detect_gene_id_type, harmonize_gene_ids, select_panel

    require_obs_columns(adata, [config.donor_key] + [ep.column for ep in config.endpoints] + [config.label_key])
    if config.var_key is not None or detect_gene_id_type(adata.var_names.astype(str)) != "symbol":
        adata = harmonize_gene_ids(adata, var_key=config.var_key)
    if layer:
        adata = ad.AnnData(adata.layers[layer], obs=adata.obs, var=adata.var)
    vocab = set(vocabulary)
    shared = [g for g in adata.var_names.astype(str) if g in vocab]
    if len(shared) < 20:
        raise InputError(f"only {len(shared)} genes are shared by the data and the model vocabulary "
                         f"(e.g. {list(adata.var_names[:5])}); are the gene ids symbols or Ensembl (var_key=)?")
    if panel is None:
        panel = select_panel(adata, vocab, n_genes=config.n_genes)
    for ep in config.endpoints:
        ep.check(adata.obs)
    kind, _ = detect_value_kind(adata.X[: min(2000, adata.n_obs)])
    from .extract import panel_rows

    x = panel_rows(adata, panel)
    return adata, panel, x, kind


@dataclass
class CampaignInputs:
    """What every split of a campaign reads: panel values, targets, stage labels, donors and the splits."""

    adata: ad.AnnData
    panel: GenePanel
    x: np.ndarray
    kind: str
    donors: np.ndarray
    targets: dict[str, np.ndarray]
    stage_labels: np.ndarray
    mapped: np.ndarray
    splits: list[Split]
    libsize: np.ndarray | None

    def cells(self, idx: np.ndarray) -> "Cells":
        a = self.adata
        obs = pd.DataFrame({"_row": idx, "_donor": self.donors[idx]}, index=a.obs.index[idx].astype(str))
        sub = ad.AnnData(a.X[idx], obs=obs, var=pd.DataFrame(index=a.var_names.astype(str)))
        return Cells(sub, self.x[idx], self.panel, self.donors[idx], self.stage_labels[idx], self.kind)


def campaign_inputs(adata: ad.AnnData, config: BenchConfig, model, *, layer: str | None = None,
                    panel: GenePanel | None = None) -> CampaignInputs:
    """Panel, per-cell targets, DAG stage labels (through ``config.stage_map``) and the seeded splits."""
    from .ontology import StageDAG

    adata, panel, x, kind = prepare_dataset(adata, config, model.vocab.genes, layer=layer, panel=panel)
    obs = adata.obs
    if config.scheme != "cells" and not config.donor_key:
        raise InputError("donor-holdout schemes need donor_key; use scheme='cells' for single-source data")
    donors = (obs[config.donor_key].astype(str).to_numpy() if config.donor_key
              else np.full(adata.n_obs, "source", dtype=object))
    targets = {ep.name: ep.targets(obs) for ep in config.endpoints}
    labels = obs[config.label_key].astype(str).to_numpy() if config.label_key else np.full(adata.n_obs, None, object)
    stage_labels = np.array([config.stage_map.get(v, v) for v in labels], dtype=object)
    mapped = StageDAG.default().map_labels(pd.Series(stage_labels).astype(str)).stage.notna().to_numpy()
    stage_labels[~mapped] = None
    splits = donor_splits(donors, scheme=config.scheme, n_splits=config.n_splits, test_fraction=config.test_fraction,
                          seed=config.seed, strata=labels if config.label_key else None,
                          test_sources=config.test_sources)
    libsize = None
    if kind == "counts":
        X = adata.X.to_memory() if hasattr(adata.X, "to_memory") else adata.X
        libsize = np.asarray(X.sum(1), dtype=float).ravel()
    return CampaignInputs(adata, panel, x, kind, donors, targets, stage_labels, mapped, splits, libsize)


def _check_embedding(Z: np.ndarray, which: str) -> None:
    Z = np.asarray(Z)
    bad = int((~np.isfinite(Z)).sum()) if Z.dtype.kind == "f" else 0
    if bad:
        raise ValueError(f"the {which} embedding has {bad} non-finite values (NaN/inf) out of {Z.size}")
    if Z.ndim != 2 or Z.shape[1] == 0:
        raise ValueError(f"the {which} embedding has shape {Z.shape}; expected [cells, dimensions]")
    if len(Z) > 1 and float(np.ptp(Z, axis=0).max()) == 0.0:
        raise ValueError(f"the {which} embedding is constant across cells")


def run_campaign(adata: ad.AnnData, config: BenchConfig, *, model=None, name: str = "campaign",
                 layer: str | None = None, progress: bool = True) -> BenchResult:
    """Run every method on every split and score every endpoint; see the module docstring."""
    from .models.api import resolve_model

    t_start = time.perf_counter()
    model = resolve_model(model)
    ci = campaign_inputs(adata, config, model, layer=layer)
    adata, panel, x, kind, donors, targets, splits = ci.adata, ci.panel, ci.x, ci.kind, ci.donors, ci.targets, ci.splits
    obs, libsize, mapped, cells = adata.obs, ci.libsize, ci.mapped, ci.cells

    wanted = config.methods or list(METHODS)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise InputError(f"unknown methods {unknown}; available: {list(METHODS)}")
    has_depth = any(ep.kind == "depth" for ep in config.endpoints)
    methods, skipped = {}, {}
    for mname in wanted:
        cls = METHODS[mname]
        reason = cls.unavailable()
        if reason is None and cls.output == "pseudotime" and not has_depth:
            reason = "pseudotime-only method and no depth endpoint is declared"
        if reason:
            skipped[mname] = reason
        else:
            methods[mname] = cls(config, model)
            methods[mname].progress = progress
    rows, runtime = [], []
    all_cells = cells(np.arange(adata.n_obs))
    for mname, m in list(methods.items()):
        t0 = time.perf_counter()
        try:
            m.prepare(all_cells)
        except MethodSkipped as exc:
            skipped[mname] = str(exc)
            methods.pop(mname)
            continue
        except DATA_ERRORS as exc:
            skipped[mname] = f"failed while preparing: {type(exc).__name__}: {exc}"
            methods.pop(mname)
            continue
        runtime.append({"method": mname, "split": -1, "stage": "prepare (one-time)", "seconds": time.perf_counter() - t0})
    params: dict[str, dict] = {}
    floors: dict[str, list] = {ep.name: [] for ep in config.endpoints}
    ceilings: dict[str, list] = {ep.name: [] for ep in config.endpoints}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(splits) * len(methods), desc=f"bench {name}", unit="fit", disable=not progress)
    for sp_ in splits:
        train, test = cells(sp_.train), cells(sp_.test)
        t_tr = {k: v[sp_.train] for k, v in targets.items()}
        t_te = {k: v[sp_.test] for k, v in targets.items()}
        groups = test.donors if config.scheme != "cells" else np.full(test.n, "cells", dtype=object)
        for ep in config.endpoints:
            f = _floor(ep, test, t_te[ep.name], groups)
            floors[ep.name].append(f)
            if ep.kind == "depth":
                vals = [depth_ceiling(t_te[ep.name][(groups == g) & np.isfinite(t_te[ep.name])]) for g in np.unique(groups)]
                ceilings[ep.name].append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
        for mname, m in list(methods.items()):
            bar.set_postfix_str(f"split {sp_.index} {mname}")
            try:
                t0 = time.perf_counter()
                m.fit(train, config.endpoints, t_tr)
                t1 = time.perf_counter()
                if m.output == "embedding":
                    Ztr = m.embed_or_predict(train, sp_.train)["embedding"]
                    Zte = m.embed_or_predict(test, sp_.test)["embedding"]
                    _check_embedding(Ztr, "training")
                    _check_embedding(Zte, "test")
                    t2 = time.perf_counter()
                    preds, n_ro, _ = _shared_readouts(Ztr, Zte, config.endpoints, t_tr, config.seed)
                    t3 = time.perf_counter()
                else:
                    res = m.embed_or_predict(test, sp_.test)
                    t2 = t3 = time.perf_counter()
                    n_ro = 0
                    preds = res.get("predictions") or {ep.name: {"pseudotime": res["pseudotime"]}
                                                       for ep in config.endpoints if ep.kind == "depth"}
            except MethodSkipped as exc:
                skipped[mname] = str(exc)
                methods.pop(mname)
                bar.update(1)
                continue
            except DATA_ERRORS as exc:  # a method that breaks is reported as failed, with why; the others go on
                skipped[mname] = f"failed on split {sp_.index}: {type(exc).__name__}: {exc}"
                methods.pop(mname)
                bar.update(1)
                continue
            for metric, v in m.diagnostics(test).items():
                rows.append({"split": sp_.index, "method": mname, "endpoint": DIAGNOSTICS, "metric": metric,
                             "value": v, "test_groups": ",".join(sp_.test_groups)})
            runtime += [{"method": mname, "split": sp_.index, "stage": "fit", "seconds": t1 - t0},
                        {"method": mname, "split": sp_.index, "stage": "embed/predict", "seconds": t2 - t1},
                        {"method": mname, "split": sp_.index, "stage": "readouts", "seconds": t3 - t2}]
            params[mname] = {"method": int(m.n_trainable), "readouts": n_ro, "total": int(m.n_trainable) + n_ro, **m.info}
            for ep in config.endpoints:
                if ep.name not in preds:
                    continue
                sc_ = score_endpoint(ep, t_te[ep.name], preds[ep.name], groups)
                if ep.kind == "depth" and libsize is not None:
                    # negative control: an ordering that follows sequencing depth is not maturation
                    sc_["libsize_abs_spearman"] = score_endpoint(
                        ep, libsize[sp_.test], preds[ep.name], groups)["abs_spearman"]
                for metric, v in sc_.items():
                    rows.append({"split": sp_.index, "method": mname, "endpoint": ep.name, "metric": metric, "value": v,
                                 "test_groups": ",".join(sp_.test_groups)})
            bar.update(1)
    bar.close()
    # a method skipped on any split is reported as skipped, with no partial scores or times
    rows = [r for r in rows if r["method"] not in skipped]
    runtime = [r for r in runtime if r["method"] not in skipped]
    params = {k: v for k, v in params.items() if k not in skipped}
    scores = pd.DataFrame(rows, columns=["split", "method", "endpoint", "metric", "value", "test_groups"])
    summary = _summarise(scores, config.endpoints, floors, ceilings)
    comparisons = _compare(scores)
    runtime_df = pd.DataFrame(runtime, columns=["method", "split", "stage", "seconds"])
    info = {"name": name, "title": config.title or name, "notes": config.notes, "sclens_version": __version__,
            "versions": package_versions(("sclens", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn",
                                          "scvi-tools", "palantir", "celltypist")),
            "n_cells": int(adata.n_obs), "n_donors": int(len(set(donors))), "panel_size": len(panel),
            "value_kind": kind, "scheme": config.scheme, "n_splits": len(splits), "seed": config.seed,
            "splits": [{"index": s.index, "test_groups": s.test_groups, "n_train": int(len(s.train)),
                        "n_test": int(len(s.test))} for s in splits],
            "endpoints": [asdict(ep) for ep in config.endpoints], "stage_map": config.stage_map,
            "n_cells_stage_mapped": int(mapped.sum()), "operator": config.operator,
            "input_hashes": {"x_panel": array_sha256(x), "obs_names": array_sha256(np.asarray(obs.index.astype(str)))},
            "root_rule": "training cells at the lowest depth level; highest mean z-scored log1p of "
                         f"{list(ROOT_MARKERS)} present in the panel, else the medoid",
            "wall_seconds": time.perf_counter() - t_start,
            "source_equals_donor": config.scheme in ("cells", "source"),
            "test_sources": list(config.test_sources) if config.scheme == "source" else None}
    info["runtime_ratio"] = _runtime_ratio(runtime_df)
    return BenchResult(name, scores, summary, comparisons, runtime_df, params, skipped, info, ablations(scores))


def _summarise(scores: pd.DataFrame, endpoints, floors, ceilings) -> pd.DataFrame:
    out = []
    for ep in endpoints:
        extra = ("libsize_abs_spearman",) if ep.kind == "depth" and "libsize_abs_spearman" in set(scores.metric) else ()
        for metric in ep.metrics + extra:
            sub = scores[(scores.endpoint == ep.name) & (scores.metric == metric)]
            fl = [f.get(metric) for f in floors[ep.name] if f.get(metric) is not None]
            floor = float(np.nanmean(fl)) if fl and np.isfinite(fl).any() else float("nan")
            ceiling = float(np.nanmean(ceilings[ep.name])) if ep.kind == "depth" and ceilings[ep.name] else 1.0
            rule = floors[ep.name][0].get("rule", "") if floors[ep.name] else ""
            if metric == "libsize_abs_spearman":
                floor, ceiling = float("nan"), float("nan")
                rule = "negative control: |Spearman| of the depth prediction with library size (lower is better)"
            best_lo = -np.inf
            rows_ep = []
            for mname, g in sub.groupby("method", sort=False):
                m, lo, hi = mean_ci(g["value"])
                rows_ep.append({"endpoint": ep.name, "kind": ep.kind, "metric": metric, "method": mname, "mean": m,
                                "ci_low": lo, "ci_high": hi, "n_splits": int(g["value"].notna().sum()),
                                "fraction_of_ceiling": m / ceiling if ceiling and np.isfinite(ceiling) else float("nan"),
                                "floor": floor, "floor_rule": rule, "ceiling": ceiling})
                if np.isfinite(m):
                    best_lo = max(best_lo, lo if np.isfinite(lo) else m)
            saturated = bool(np.isfinite(floor) and floor >= best_lo)
            for r in rows_ep:
                r["saturated"] = saturated
            out += rows_ep
    diag = scores[scores.endpoint == DIAGNOSTICS]
    for (metric, mname), g in diag.groupby(["metric", "method"], sort=False):
        m, lo, hi = mean_ci(g["value"])
        out.append({"endpoint": DIAGNOSTICS, "kind": "diagnostic", "metric": metric, "method": mname, "mean": m,
                    "ci_low": lo, "ci_high": hi, "n_splits": int(g["value"].notna().sum()),
                    "fraction_of_ceiling": float("nan"), "floor": float("nan"),
                    "floor_rule": "diagnostic of the extracted manifold (reported, not tested)", "ceiling": float("nan"),
                    "saturated": False})
    return pd.DataFrame(out)


def _tested_splits(scores: pd.DataFrame):
    """(endpoint, metric, split x method table) for every tested metric; diagnostics (the library-size control)
    are reported, not tested."""
    tested = sum(METRICS.values(), ())
    for (ep, metric), sub in scores.groupby(["endpoint", "metric"], sort=False):
        if metric in tested:
            yield ep, metric, sub.pivot_table(index="split", columns="method", values="value", dropna=False)


def _compare(scores: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    rows = []
    if reference not in set(scores.method):
        return pd.DataFrame(columns=["endpoint", "metric", "method", "p", "q"])
    for ep, metric, wide in _tested_splits(scores):
        if reference not in wide:
            continue
        for other in wide.columns:
            if other == reference:
                continue
            r = paired_wilcoxon(wide[reference].to_numpy(), wide[other].to_numpy())
            rows.append({"endpoint": ep, "metric": metric, "reference": reference, "method": other, **r})
    df = pd.DataFrame(rows)
    if len(df):
        df["q"] = bh_qvalues(df["p"].to_numpy())
        df["verdict"] = [("win" if d > 0 else "loss") if (np.isfinite(q) and q <= 0.05) else "tie"
                         for d, q in zip(df["mean_diff"], df["q"])]
    return df


def ablations(scores: pd.DataFrame) -> pd.DataFrame:
    """Per endpoint-metric, the two control questions of :data:`ABLATIONS`: what the model contributes
    (``sclens_extracted`` - ``extracted_random``) and what the adaptor costs (``extracted_identity`` - ``pca10``),
    as paired two-sided Wilcoxon tests across splits with BH over every row of this table."""
    cols = ["question", "endpoint", "metric", "method", "baseline", "n", "mean_method", "mean_baseline", "mean_diff",
            "wins", "ties", "losses", "statistic", "p", "q", "verdict"]
    rows = []
    for ep, metric, wide in _tested_splits(scores):
        for question, a, b in ABLATIONS:
            if a not in wide or b not in wide:
                continue
            r = paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())
            rows.append({"question": question, "endpoint": ep, "metric": metric, "method": a, "baseline": b,
                         "mean_method": float(np.nanmean(wide[a])), "mean_baseline": float(np.nanmean(wide[b])), **r})
    df = pd.DataFrame(rows)
    if not len(df):
        return pd.DataFrame(columns=cols)
    df["q"] = bh_qvalues(df["p"].to_numpy())
    df["verdict"] = [("method higher" if d > 0 else "baseline higher") if (np.isfinite(q) and q <= 0.05) else "no difference"
                     for d, q in zip(df["mean_diff"], df["q"])]
    return df[cols]


def _runtime_ratio(runtime: pd.DataFrame) -> dict:
    tot = runtime.groupby("method")["seconds"].sum()
    out = {k: float(v) for k, v in tot.items()}
    if REFERENCE in tot and "mlp_probe" in tot and tot[REFERENCE] > 0:
        out["mlp_probe_over_extracted"] = float(tot["mlp_probe"] / tot[REFERENCE])
    return out
