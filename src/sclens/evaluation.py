"""sclens.evaluation: what every evaluating stage shares (endpoints, campaign configuration, donor splits,
scoring, the data a method sees, the shared readouts and fitting the extracted method on a training split).

``bench`` (campaigns against other methods) and ``compress`` (the compaction ladder) are peers above this
module; the statistics they report come from :mod:`sclens.stats`.
"""

from __future__ import annotations

import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .data import GenePanel, detect_value_kind, require_obs_columns
from .errors import InputError
from .ontology import parse_label_groups
from .stats import abs_spearman, auroc, balanced_accuracy, macro_f1


EndpointKind = Literal["binary", "multiclass", "depth"]


METRICS: dict[str, tuple[str, ...]] = {"binary": ("auroc", "balanced_accuracy"),
                                       "multiclass": ("balanced_accuracy", "macro_f1"),
                                       "depth": ("abs_spearman",)}


DIAGNOSTICS = "manifold"  # the endpoint name under which per-split diagnostics are stored (reported, not tested)


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


STAGE_LABEL = "_sclens_stage_label"


def stage_labelled(cells: "Cells") -> ad.AnnData:
    """The cells' counts with their DAG stage labels in ``obs[STAGE_LABEL]`` (what extraction and anchors read)."""
    obs = cells.adata.obs.copy()
    obs[STAGE_LABEL] = cells.stage_labels
    return ad.AnnData(cells.adata.X, obs=obs, var=pd.DataFrame(index=cells.adata.var_names))


def fit_extracted(train: "Cells", operator, config: BenchConfig, **extract_kw):
    """Stage 2 (:func:`sclens.extract.extract` with ``fit_readouts=False``) on a split's training cells, their DAG
    stage labels as the labels, whole training set used (no inner holdout): the campaign reads the latent with
    its shared readouts, so the extracted file's own readouts and scores are not fitted."""
    from .extract import extract

    a = stage_labelled(train)
    epochs = None if config.adaptor == "ruler" else config.adaptor_epochs
    return extract(a, operator, label_key=STAGE_LABEL, donor_key="_donor" if "_donor" in a.obs else None,
                   holdout_fraction=0.0, seed=config.seed, adaptor=config.adaptor, epochs=epochs, progress=False,
                   n_perm=0, fit_readouts=False, **extract_kw)


def gene_positions(panel: GenePanel) -> dict[str, int]:
    return {g: i for i, g in enumerate(panel.genes)}


def classifier_labels(ep: Endpoint, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training labels for a classifier: 'pos'/'neg' for binary, the label for multiclass (rare classes dropped)."""
    if ep.kind == "binary":
        keep = np.isfinite(y)
        return np.where(y == 1, "pos", "neg").astype(str), keep
    keep = pd.notna(y)
    counts = pd.Series(y[keep]).value_counts()
    keep &= np.isin(y.astype(str), counts[counts >= ep.min_cells].index.astype(str))
    return y.astype(str), keep


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
            lab, keep_mask = classifier_labels(ep, y)
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


def shared_readouts(Ztr: np.ndarray, Zte: np.ndarray, endpoints, targets_tr, seed: int, max_cells: int = 20_000):
    ro = fit_shared_readouts(Ztr, endpoints, targets_tr, seed, max_cells)
    return ro.predict(Zte), ro.n_params, ro.scaler


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


def check_embedding(Z: np.ndarray, which: str) -> None:
    Z = np.asarray(Z)
    bad = int((~np.isfinite(Z)).sum()) if Z.dtype.kind == "f" else 0
    if bad:
        raise ValueError(f"the {which} embedding has {bad} non-finite values (NaN/inf) out of {Z.size}")
    if Z.ndim != 2 or Z.shape[1] == 0:
        raise ValueError(f"the {which} embedding has shape {Z.shape}; expected [cells, dimensions]")
    if len(Z) > 1 and float(np.ptp(Z, axis=0).max()) == 0.0:
        raise ValueError(f"the {which} embedding is constant across cells")


def bench_config(endpoints_file: str | Path | None = None, *, binary: Sequence[str] = (),
                 multiclass: Sequence[str] = (), depth: Sequence[str] = (), **settings) -> BenchConfig:
    """A campaign configuration from a TOML endpoint file and/or endpoint specs (as ``sclens bench`` takes them).

    ``binary`` specs ``"A | B vs C"`` name labels of ``label_key``; ``multiclass`` and ``depth`` name obs columns.
    ``settings`` are :class:`BenchConfig` fields; ``None`` values are ignored (the file's or the defaults stay).
    """
    settings = {k: v for k, v in settings.items() if v is not None}
    if binary and not (settings.get("label_key") or endpoints_file):
        raise InputError("--binary needs --label-key (the column whose labels it names)")
    if endpoints_file:
        cfg = read_bench_config(endpoints_file, **settings)
    else:
        if not (binary or multiclass or depth):
            raise InputError("declare endpoints: --endpoints FILE.toml, or --binary / --multiclass / --depth")
        cfg = BenchConfig(endpoints=[], **settings)
    cfg.endpoints += [parse_binary_spec(spec, cfg.label_key) for spec in binary]
    cfg.endpoints += [Endpoint(c, "multiclass", c) for c in multiclass] + [Endpoint(c, "depth", c) for c in depth]
    return cfg
