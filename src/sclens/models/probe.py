"""Learning probes: does a checkpoint know anything about cells? (DESIGN section 5)

A masked-value loss below a constant predictor is no evidence that a model uses context: per-cell quantile
bins are nearly uniform, so a per-gene mean already does well. :func:`probe_model` measures, on held-out
labelled cells, what a user needs to decide whether a model's heads can give anything:

* **Masked values** — cells are tokenised as in pretraining (non-zero genes plus a share of zero genes,
  official per-cell bins, a fraction masked), and the expression decoder's MSE on the masked positions is
  split by zero and non-zero targets, next to two baselines that see the same positions: the per-gene mean
  target (estimated on other cells drawn the same way) and kNN imputation (k = 15 neighbours among other cells
  in a PCA of the binned profiles, the held-out cell placed by least squares on its unmasked genes only).
* **Cell embeddings** — CLS and mean-pooled, from the last and the penultimate layer (official ``embed_data``
  tokenisation), scored by kNN-15 balanced accuracy and a logistic-regression probe, both cross-validated
  with folds grouped by donor when a donor column is given; against PCA-50 of log1p(CP10k) on the same genes
  and against the same architecture with random weights (:func:`sclens.models.controls.randomize`).
* **Effective rank** of each embedding (exp of the entropy of its normalised singular values): a collapse check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..utils import array_sha256, atomic_write, package_versions, write_json


@dataclass
class ProbeResult:
    """What :func:`probe_model` measured. ``embeddings``: one row per (source, layer, pooling)."""

    name: str
    masked: dict
    embeddings: pd.DataFrame
    info: dict = field(default_factory=dict)

    def goals(self) -> dict:
        """The headline numbers in the shape of ``benchmarks/results/model_probe.json`` (best embedding per source)."""
        e = self.embeddings
        best = lambda src, col: (float(e.loc[e.source == src, col].max())  # noqa: E731
                                 if (e.source == src).any() else float("nan"))
        m = self.masked
        return {
            "knn_balanced_accuracy": {s: best(s, "knn_balanced_accuracy") for s in ("model", "pca50", "random_weights")},
            "probe_balanced_accuracy": {s: best(s, "probe_balanced_accuracy") for s in ("model", "pca50", "random_weights")},
            "masked_mse": {k: m["nonzero"][k] for k in ("model", "per_gene_mean", "knn_impute")},
            "masked_mse_zero_targets": {k: m["zero"][k] for k in ("model", "per_gene_mean", "knn_impute")},
        }

    def to_dict(self) -> dict:
        rows = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in self.embeddings.to_dict("records")]
        return {"name": self.name, "goals": self.goals(), "masked": self.masked, "embeddings": rows, "info": self.info}

    def table(self) -> str:
        """A Markdown summary."""
        g = self.goals()
        m = self.masked
        lines = [f"### Learning probe: {self.name}", "",
                 f"{self.info.get('n_cells_embedded')} cells embedded, {self.info.get('n_masked_cells')} masked-value "
                 f"cells; CV: {self.info.get('cv')}.", "",
                 "| masked-value MSE | model | per-gene mean | kNN impute | n positions |", "|---|---|---|---|---|"]
        for part in ("nonzero", "zero", "all"):
            r = m[part]
            lines.append(f"| {part} targets | {r['model']:.2f} | {r['per_gene_mean']:.2f} | {r['knn_impute']:.2f} | "
                         f"{r['n']:,} |")
        lines += ["", "| source | layer | pooling | kNN-15 bal. acc | probe bal. acc | effective rank |",
                  "|---|---|---|---|---|---|"]
        for r in self.embeddings.itertuples():
            lines.append(f"| {r.source} | {r.layer} | {r.pooling} | {r.knn_balanced_accuracy:.3f} | "
                         f"{r.probe_balanced_accuracy:.3f} | {r.effective_rank:.1f} |")
        k = g["knn_balanced_accuracy"]
        lines += ["", f"Best kNN-15 balanced accuracy: model {k['model']:.3f}, PCA-50 {k['pca50']:.3f}, random weights "
                  f"{k['random_weights']:.3f}."]
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``probe_<name>.json``, ``.md`` and ``.png`` in ``out_dir`` (atomic writes)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": write_json(out / f"probe_{self.name}.json", self.to_dict())}
        md = self.table()
        paths["md"] = atomic_write(out / f"probe_{self.name}.md", lambda p: Path(p).write_text(md + "\n"))
        paths["png"] = self.plot(out / f"probe_{self.name}.png")
        return paths

    @classmethod
    def load(cls, path: str | Path) -> "ProbeResult":
        import json

        d = json.loads(Path(path).read_text())
        return cls(d["name"], d["masked"], pd.DataFrame(d["embeddings"]).fillna(np.nan), d["info"])

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        e = self.embeddings
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = [f"{r.source}\n{r.layer} {r.pooling}" if r.source != "pca50" else "PCA-50" for r in e.itertuples()]
        colors = ["C0" if s == "model" else "C7" if s == "random_weights" else "C2" for s in e.source]
        x = np.arange(len(e))
        for ax, col, title in ((axes[0], "knn_balanced_accuracy", "kNN-15 balanced accuracy"),
                               (axes[1], "probe_balanced_accuracy", "logistic probe balanced accuracy")):
            ax.bar(x, e[col], color=colors)
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
            ax.set_ylim(0, 1)
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"learning probe: {self.name} (blue: model, grey: random weights, green: PCA-50)", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)
        return path


# ------------------------------------------------------------------------------------------ statistics
def effective_rank(Z: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values of the centred embedding (1 = collapsed to a line)."""
    Z = np.asarray(Z, dtype=np.float64)
    s = np.linalg.svd(Z - Z.mean(0), compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def probe_folds(y: np.ndarray, groups: np.ndarray | None, seed: int, n_folds: int = 5):
    """Cross-validation folds of the probes: grouped by donor (``GroupKFold``) when ``groups`` holds at least two,
    else stratified by label; returns (the fold list, a description of the scheme)."""
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    if groups is not None and len(np.unique(groups)) >= 2:
        k = min(n_folds, len(np.unique(groups)))
        return list(GroupKFold(n_splits=k).split(np.zeros(len(y)), y, groups)), f"GroupKFold({k}) by donor"
    counts = pd.Series(y).value_counts()
    k = int(max(2, min(n_folds, counts.min())))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)), \
        f"StratifiedKFold({k}), no donor column"


def embedding_scores(Z: np.ndarray, y: np.ndarray, folds) -> dict:
    """kNN-15 and logistic-probe balanced accuracy over out-of-fold predictions, and the effective rank."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Z = np.asarray(Z, dtype=np.float64)
    knn, lr = np.empty(len(y), dtype=object), np.empty(len(y), dtype=object)
    for tr, te in folds:
        k = min(15, len(tr))
        knn[te] = KNeighborsClassifier(n_neighbors=k).fit(Z[tr], y[tr]).predict(Z[te])
        if len(np.unique(y[tr])) < 2:
            lr[te] = y[tr][0]
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        lr[te] = clf.fit(Z[tr], y[tr]).predict(Z[te])
    return {"knn_balanced_accuracy": float(balanced_accuracy_score(y, knn.astype(str))),
            "probe_balanced_accuracy": float(balanced_accuracy_score(y, lr.astype(str))),
            "effective_rank": effective_rank(Z), "dim": int(Z.shape[1])}


# ------------------------------------------------------------------------------------------ masked values
def _binned_dense(X: sp.csr_matrix, n_bins: int, rng: np.random.RandomState) -> np.ndarray:
    """Every cell's official per-cell bins over all its genes (0 = not expressed), dense [cells, genes]."""
    from .tokenize import bin_values

    out = np.zeros(X.shape, dtype=np.float32)
    for i in range(X.shape[0]):
        s, e = X.indptr[i], X.indptr[i + 1]
        cols, vals = X.indices[s:e], X.data[s:e]
        keep = vals > 0
        out[i, cols[keep]] = bin_values(vals[keep].astype(np.float64), n_bins, rng)
    return out


def masked_value_probe(model, X: sp.csr_matrix, ids: np.ndarray, fit_rows: np.ndarray, eval_rows: np.ndarray, *,
                       seq_len: int = 256, zero_fraction: float = 0.3, mask_ratio: float = 0.4, n_components: int = 50,
                       k: int = 15, seed: int = 0, batch_size: int = 32) -> dict:
    """MSE on masked bins for the model's expression decoder, the per-gene mean and kNN imputation.

    ``X``: counts [cells, genes] (CSR), ``ids``: the vocabulary id of each column. Baselines are estimated on
    ``fit_rows`` only; every predictor is scored on the same masked positions of ``eval_rows``."""
    import torch

    from .pretrain import PretrainConfig, CellSampler

    cfg = PretrainConfig(train_seq_len=seq_len, zero_fraction=zero_fraction, mask_ratio=mask_ratio,
                         n_bins=model.config.n_bins, batch_size=batch_size)
    col_of = {int(t): j for j, t in enumerate(ids)}
    # per-gene mean of the targets of sequences drawn as in training, on other cells
    fit_sampler = CellSampler([(X[fit_rows], ids)], cfg, model.vocab, np.random.default_rng(seed))
    sums, counts = np.zeros(len(ids)), np.zeros(len(ids))
    for start in range(0, len(fit_rows), batch_size):
        cells = [(0, int(r)) for r in range(start, min(start + batch_size, len(fit_rows)))]
        for rep in range(2):
            b, target, _ = fit_sampler.batch(cells)
            g, t = b.gene_ids.numpy(), target.numpy()
            ok = t > -2
            cols = np.array([col_of.get(int(x), -1) for x in g[ok]])
            np.add.at(sums, cols[cols >= 0], t[ok][cols >= 0])
            np.add.at(counts, cols[cols >= 0], 1)
    overall = float(sums.sum() / max(counts.sum(), 1))
    gene_mean = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
    # kNN imputation: PCA of the fit cells' dense bins; a held-out cell is placed from its unmasked genes only
    B = _binned_dense(X[fit_rows], model.config.n_bins, np.random.RandomState(seed))
    mu = B.mean(0)
    _, _, Vt = np.linalg.svd(B - mu, full_matrices=False)
    V = Vt[: min(n_components, len(Vt))].T  # [genes, c]
    Zfit = (B - mu) @ V
    # the model on held-out cells
    ev_sampler = CellSampler([(X[eval_rows], ids)], cfg, model.vocab, np.random.default_rng(seed + 1))
    preds = {"model": [], "per_gene_mean": [], "knn_impute": []}
    targets = []
    model.eval()
    for start in range(0, len(eval_rows), batch_size):
        cells = [(0, int(r)) for r in range(start, min(start + batch_size, len(eval_rows)))]
        b, target, masked = ev_sampler.batch(cells)
        with torch.no_grad():
            bd = b.to(model.device)
            hidden = model(bd.gene_ids, bd.values, bd.padding_mask)
            out = model.decoder(hidden).float().cpu().numpy()
        g, t, m, v = b.gene_ids.numpy(), target.numpy(), masked.numpy(), b.values.numpy()
        for i in range(len(cells)):
            mi = np.flatnonzero(m[i])
            if not len(mi):
                continue
            cols_m = np.array([col_of.get(int(x), -1) for x in g[i, mi]])
            obs = np.flatnonzero((t[i] > -2) & ~m[i])
            cols_o = np.array([col_of.get(int(x), -1) for x in g[i, obs]])
            okc = cols_o >= 0
            if okc.sum() >= 2:
                A = V[cols_o[okc]]
                z = np.linalg.lstsq(A, v[i, obs][okc] - mu[cols_o[okc]], rcond=None)[0]
                nn = np.argsort(((Zfit - z) ** 2).sum(1))[:k]
                knn_pred = np.where(cols_m >= 0, B[nn][:, np.maximum(cols_m, 0)].mean(0), overall)
            else:
                knn_pred = np.where(cols_m >= 0, gene_mean[np.maximum(cols_m, 0)], overall)
            preds["model"].append(out[i, mi])
            preds["per_gene_mean"].append(np.where(cols_m >= 0, gene_mean[np.maximum(cols_m, 0)], overall))
            preds["knn_impute"].append(knn_pred)
            targets.append(t[i, mi])
    y = np.concatenate(targets)
    P = {k2: np.concatenate(v2) for k2, v2 in preds.items()}
    res = {}
    for part, sel in (("all", np.ones(len(y), bool)), ("nonzero", y > 0), ("zero", y == 0)):
        res[part] = {k2: float(((P[k2][sel] - y[sel]) ** 2).mean()) if sel.any() else float("nan") for k2 in P}
        res[part]["n"] = int(sel.sum())
    res["settings"] = {"seq_len": seq_len, "zero_fraction": zero_fraction, "mask_ratio": mask_ratio,
                       "pca_components": int(V.shape[1]), "k": k, "n_fit_cells": int(len(fit_rows)),
                       "n_eval_cells": int(len(eval_rows))}
    return res


# ------------------------------------------------------------------------------------------ the probe
def _embeddings(model, adata: ad.AnnData, *, seed: int, batch_size: int, progress: bool) -> dict[tuple[str, str], np.ndarray]:
    """CLS / mean-pooled embeddings of the last and the penultimate layer (official non-zero tokenisation)."""
    import torch
    from tqdm.auto import tqdm

    from .api import tokenize_adata

    batch = tokenize_adata(adata, model, seed=seed)
    L = model.n_layers
    layers = ("last", "penultimate") if L >= 2 else ("last",)
    out: dict[tuple[str, str], list] = {(ly, p): [] for ly in layers for p in ("cls", "avg")}
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(batch), batch_size), disable=not progress, desc="probe embeddings", unit="batch"):
            b = batch[start : start + batch_size].to(model.device)
            # one pass: the penultimate layer's output is the last layer's input
            x, _ = model.embed(b.gene_ids, b.values)
            pad = b.padding_mask if bool(b.padding_mask.any()) else None
            hidden = {}
            for i, block in enumerate(model.blocks):
                if i == L - 1 and "penultimate" in layers:
                    hidden["penultimate"] = x
                x = block(x, pad)
            hidden["last"] = x
            for ly, h in hidden.items():
                for p in ("cls", "avg"):
                    out[(ly, p)].append(model.pool(h, b.padding_mask, p).float().cpu().numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def probe_model(
    model, adata: ad.AnnData, *, label_key: str, donor_key: str | None = None, name: str = "data",
    n_cells: int = 2000, n_masked_cells: int = 256, n_fit_cells: int = 1000, random_weights: bool = True,
    random_seed: int = 0, min_class_cells: int = 10, seed: int = 0, batch_size: int = 32, var_key: str | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Probe a checkpoint on labelled cells (see the module docstring).

    Parameters
    ----------
    model
        A loaded :class:`~sclens.models.HookedScGPT`, a checkpoint directory, or None (the embedded default).
    adata
        Raw counts with a label column (and optionally a donor column); gene symbols or Ensembl ids (``var_key``).
    n_cells
        Cells embedded (seeded sample, classes with fewer than ``min_class_cells`` cells dropped).
    n_masked_cells, n_fit_cells
        Held-out cells scored on masked values, and other cells that the baselines are estimated on.
    random_weights
        Also embed with a random-weights copy (``random_seed``) of the same architecture.

    Returns
    -------
    :class:`ProbeResult`; ``.goals()`` gives the headline numbers, ``.save(dir)`` JSON + Markdown + PNG.
    """
    from ..data import harmonize_gene_ids, require_obs_columns, validate
    from .api import resolve_model
    from .controls import randomize

    model = resolve_model(model)
    require_obs_columns(adata, [label_key, donor_key])
    validate(adata, require="counts")
    adata = harmonize_gene_ids(adata, var_key=var_key, vocabulary=model.vocab.genes)
    ids = model.vocab.lookup(adata.var_names.astype(str))
    keep = np.flatnonzero(ids >= 0)
    adata = adata[:, keep].copy()
    ids = ids[keep]
    labels = adata.obs[label_key].astype(str).to_numpy()
    vc = pd.Series(labels).value_counts()
    ok_classes = vc[vc >= min_class_cells].index
    if len(ok_classes) < 2:
        raise InputError(f"{label_key!r} needs at least 2 classes with >= {min_class_cells} cells; counts: {vc.to_dict()}")
    rng = np.random.default_rng(seed)
    usable = np.flatnonzero(np.isin(labels, ok_classes))
    emb_rows = np.sort(rng.choice(usable, size=min(n_cells, len(usable)), replace=False))
    y = labels[emb_rows]
    groups = adata.obs[donor_key].astype(str).to_numpy()[emb_rows] if donor_key else None
    folds, cv = probe_folds(y, groups, seed)
    sub = adata[emb_rows].copy()
    rows = []
    sources = [("model", model)] + ([("random_weights", randomize(model, random_seed))] if random_weights else [])
    for src, m in sources:
        for (ly, pool), Z in _embeddings(m, sub, seed=seed, batch_size=batch_size, progress=progress).items():
            rows.append({"source": src, "layer": ly, "pooling": pool, **embedding_scores(Z, y, folds)})
    # PCA-50 of log1p(CP10k) on the same genes (label-free, all embedded cells)
    from sklearn.decomposition import PCA

    from ..data import log_normalize

    Xl = log_normalize(sub.X)
    Xl = Xl.toarray() if sp.issparse(Xl) else np.asarray(Xl)
    Zp = PCA(n_components=min(50, Xl.shape[1], len(Xl) - 1), random_state=seed).fit_transform(Xl)
    rows.append({"source": "pca50", "layer": "-", "pooling": "-", **embedding_scores(Zp, y, folds)})
    # masked values on cells outside the embedded sample where possible
    rest = np.setdiff1d(np.arange(adata.n_obs), emb_rows)
    pool_rows = rest if len(rest) >= n_masked_cells + 50 else np.arange(adata.n_obs)
    perm = rng.permutation(pool_rows)
    ev = np.sort(perm[:n_masked_cells])
    fit = np.sort(perm[n_masked_cells : n_masked_cells + n_fit_cells])
    if len(fit) < 20:
        raise InputError(f"too few cells for the masked-value baselines ({adata.n_obs} cells in all)")
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.sort_indices()
    masked = masked_value_probe(model, X, ids, fit, ev, seed=seed, batch_size=batch_size)
    info = {"model": getattr(model, "source", "in-memory"), "model_sha256": getattr(model, "checkpoint_sha256", None),
            "n_cells_embedded": int(len(emb_rows)), "n_masked_cells": int(len(ev)), "n_fit_cells": int(len(fit)),
            "n_genes_in_vocab": int(len(ids)), "classes": {str(k): int(v) for k, v in vc[ok_classes].items()},
            "label_key": label_key, "donor_key": donor_key, "cv": cv, "seed": seed, "random_seed": random_seed,
            "input_sha256": array_sha256(np.asarray(adata.obs_names.astype(str)), ids),
            "versions": package_versions()}
    return ProbeResult(name, masked, pd.DataFrame(rows), info)
