"""sclens.methods: the methods a benchmark campaign compares, behind one protocol.

Every method follows ``prepare`` once, ``fit(train)``, ``embed_or_predict(cells)``; embedding methods are scored
through the shared readouts of :mod:`sclens.evaluation`. The extracted algorithm and its two controls (identity
operator, random-weights operator), raw expression and PCA are built in; DPT, Palantir, scVI, CellTypist and an
MLP probe on frozen embeddings run through their own libraries (optional extras) and are reported as skipped,
with the reason, where a library is missing.

Pseudotime methods (DPT, Palantir) are rooted by one documented rule on TRAINING cells only
(:func:`root_cell`): among training cells at the lowest depth level, the one with the highest progenitor
marker score (mean z-scored log1p of ``ROOT_MARKERS`` present in the panel), or the medoid when none are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import log_normalize
from .errors import InputError
from .evaluation import (STAGE_LABEL, BenchConfig, Cells, Endpoint, classifier_labels, fit_extracted, gene_positions,
                         stage_labelled)


ROOT_MARKERS = ("CD34", "PROM1", "SPINK2", "CRHBP", "HLF", "AVP", "MEIS1", "Cd34", "Kit", "Flt3")


class MethodSkipped(Exception):
    """A method cannot run here (missing extra, wrong input kind); the reason goes into the report."""


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
    where = gene_positions(train.panel)
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
    a = stage_labelled(test)
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
            lab, keep = classifier_labels(ep, y)
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
                    lab, keep = classifier_labels(ep, y)
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
