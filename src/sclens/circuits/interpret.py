"""Feature interpretation: top genes and cells per feature, marker-set enrichment, "gene-level interpretable".

Works for any sparse dictionary (transcoder or SAE) applied at token positions that stand for genes (cell-
sentence tokens, scGPT gene tokens). For each feature:

* **top genes**: genes ranked by the feature's mean activation at positions holding that gene (genes seen at
  least ``min_count`` times; only positive means);
* **top cells**: the cells with the largest activation anywhere in the cell, and their cell types;
* **context genes**: the genes most over-represented in the top cells' token sets (share of top cells holding
  the gene minus the share of all cells) -- what the feature's cells have in common, which suits features
  that fire at a summary position (``<celltype>``) rather than on one gene;
* **cell-type specificity**: per cell type, the mean over its cells of the feature's largest activation in
  the cell; specificity = the top cell type's share of the sum over cell types (1 = only one type);
* **enrichment**: one-sided hypergeometric test of the top genes and of the context genes against each
  curated marker set (the universe = the genes that could be ranked), Benjamini-Hochberg over every
  (feature, gene list, set) test of the call; a feature is **gene-level interpretable** when some test has
  q <= alpha, and takes that set's label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import InputError


@dataclass
class FeatureActivity:
    """Activation statistics of a dictionary's features over a set of cells."""

    genes: list[str]  # the gene universe: columns of gene_sum
    gene_sum: np.ndarray  # [G, F] summed activation at positions holding gene g
    gene_count: np.ndarray  # [G] positions holding gene g
    cell_max: np.ndarray  # [N, F] largest activation in each cell
    fire_count: np.ndarray  # [F] positions where the feature is active
    n_tokens: int
    cell_labels: np.ndarray | None = None  # [N]
    cell_genes: object = None  # scipy.sparse [N, G] bool: gene g occurs in cell n's tokens

    @property
    def n_features(self) -> int:
        return self.gene_sum.shape[1]

    @property
    def density(self) -> np.ndarray:
        return self.fire_count / max(1, self.n_tokens)

    def live_features(self) -> np.ndarray:
        return np.flatnonzero(self.fire_count > 0)


@torch.no_grad()
def feature_activity(encode: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, token_gene: torch.Tensor,
                     cell: torch.Tensor, n_cells: int, genes: Sequence[str], cell_labels=None,
                     chunk: int = 8192) -> FeatureActivity:
    """Accumulate :class:`FeatureActivity` from token rows ``X`` [T, d] (``token_gene`` [T]: gene index or -1;
    ``cell`` [T]: the cell each row belongs to)."""
    if not (len(X) == len(token_gene) == len(cell)):
        raise InputError("X, token_gene and cell must have one entry per token")
    G = len(genes)
    gene_sum = gene_count = cell_max = fire = None
    for s in range(0, len(X), chunk):
        a = encode(X[s: s + chunk]).float()
        if gene_sum is None:
            F = a.shape[1]
            gene_sum, cell_max = torch.zeros(G, F, dtype=torch.float64), torch.zeros(n_cells, F)
            gene_count, fire = torch.zeros(G, dtype=torch.long), torch.zeros(F, dtype=torch.long)
        g = token_gene[s: s + chunk]
        m = g >= 0
        gene_sum.index_add_(0, g[m], a[m].double())
        gene_count += torch.bincount(g[m], minlength=G)
        c = cell[s: s + chunk]
        cell_max.scatter_reduce_(0, c[:, None].expand(-1, a.shape[1]), a, reduce="amax")
        fire += (a > 0).sum(0)
    if gene_sum is None:
        raise InputError("no tokens to interpret")
    import scipy.sparse as sp

    m = (token_gene >= 0).numpy()
    cg = sp.csr_matrix((np.ones(int(m.sum()), dtype=bool), (cell.numpy()[m], token_gene.numpy()[m])),
                       shape=(n_cells, G))
    return FeatureActivity(list(genes), gene_sum.numpy(), gene_count.numpy(), cell_max.numpy(), fire.numpy(),
                           int(len(X)), None if cell_labels is None else np.asarray(cell_labels, dtype=str), cg)


def interpret_features(act: FeatureActivity, features: Sequence[int] | None = None, *, n_genes: int = 25,
                       min_count: int = 5, alpha: float = 0.05, n_cells: int = 20, n_context_cells: int = 50,
                       sets: dict | None = None) -> pd.DataFrame:
    """One row per feature: density, top and context genes, top cells' types, specificity, best set, q, label."""
    from ..datasets import marker_set_table
    from ..stats import bh_qvalues, hypergeom_enrichment

    sets = sets or marker_set_table()
    features = act.live_features() if features is None else np.asarray(features, dtype=int)
    ok = act.gene_count >= min_count
    universe = [g for g, keep in zip(act.genes, ok) if keep]
    idx_ok = np.flatnonzero(ok)
    mean = act.gene_sum[idx_ok] / act.gene_count[idx_ok, None]
    rows, tests = [], []
    labels = act.cell_labels
    types = sorted(set(labels)) if labels is not None else []
    cg = act.cell_genes.tocsc()[:, idx_ok].astype(np.float32) if act.cell_genes is not None else None
    base = np.asarray(cg.mean(0)).ravel() if cg is not None else None
    for f in features:
        m = mean[:, f]
        order = np.argsort(-m, kind="stable")[:n_genes]
        top = [universe[i] for i in order if m[i] > 0]
        row = {"feature": int(f), "density": float(act.density[f]), "top_genes": top}
        lists = {"tokens": top}
        if cg is not None:
            cm = act.cell_max[:, f]
            ctx_cells = np.argsort(-cm, kind="stable")[:n_context_cells]
            ctx_cells = ctx_cells[cm[ctx_cells] > 0]
            if len(ctx_cells):
                over = np.asarray(cg[ctx_cells].mean(0)).ravel() - base
                order = np.argsort(-over, kind="stable")[:n_genes]
                lists["context"] = row["context_genes"] = [universe[i] for i in order if over[i] > 0]
            else:
                row["context_genes"] = []
        if labels is not None:
            cm = act.cell_max[:, f]
            best_cells = np.argsort(-cm, kind="stable")[:n_cells]
            best_cells = best_cells[cm[best_cells] > 0]
            comp = pd.Series(labels[best_cells]).value_counts()
            per_type = np.array([cm[labels == t].mean() for t in types])
            tot = per_type.sum()
            row.update(top_cell_types={k: int(v) for k, v in comp.items()},
                       top_cell_type=types[int(per_type.argmax())] if tot > 0 else None,
                       specificity=float(per_type.max() / tot) if tot > 0 else float("nan"))
        rows.append(row)
        for source, genes_ in lists.items():
            for key, spec in sets.items():
                e = hypergeom_enrichment(genes_, spec["genes"], universe)
                tests.append({"feature": int(f), "genes_from": source, "set": key, "set_label": spec["label"], **e})
    table = pd.DataFrame(rows)
    tt = pd.DataFrame(tests)
    if len(tt):
        tt["q"] = bh_qvalues(tt["p"].to_numpy())
        best = tt.sort_values(["feature", "q", "p"]).groupby("feature").first()
        table["best_set"] = table.feature.map(best["set_label"])
        table["overlap"] = table.feature.map(best["genes"].map(", ".join))
        table["label_from"] = table.feature.map(best["genes_from"])
        table["q"] = table.feature.map(best["q"])
        table["interpretable"] = table["q"] <= alpha
        table["label"] = np.where(table["interpretable"], table["best_set"], "unresolved")
    else:
        table = table.assign(best_set=None, overlap="", q=np.nan, interpretable=False, label="unresolved")
    table.attrs["universe_size"] = len(universe)
    table.attrs["alpha"] = alpha
    return table


def interpretable_fraction(act: FeatureActivity, n: int = 20, seed: int = 0, **kw) -> dict:
    """Sample ``n`` live features at random (seeded) and interpret them together (BH over the sample)."""
    live = act.live_features()
    if len(live) == 0:
        raise InputError("no live features to sample")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(live, size=min(n, len(live)), replace=False))
    tab = interpret_features(act, pick, **kw)
    return {"n_sampled": int(len(pick)), "n_interpretable": int(tab["interpretable"].sum()),
            "fraction": float(tab["interpretable"].mean()), "features": pick.tolist(), "table": tab}


def cell_lm_activity(model, transcoders: dict, sentences, labels=None, *, progress: bool = True) -> dict[int, FeatureActivity]:
    """:class:`FeatureActivity` of each transcoder of a gene-level cell-sentence model over ``sentences``.

    Activity is read without the label tokens (cells as the model sees them at prediction time); gene
    positions give the gene statistics, every position (``<celltype>`` included) the per-cell maxima.
    """
    from .transcoders import harvest_mlp_io

    if model.vocab is None:
        raise InputError("gene-level interpretation needs an sclens gene-level model")
    v = model.vocab
    h = harvest_mlp_io(model, sentences, sorted(transcoders), max_tokens=10**12, progress=progress)
    token_gene = torch.full((len(v),), -1, dtype=torch.long)
    token_gene[v.gene_offset: v.label_offset] = torch.arange(len(v.genes))
    tg = token_gene[h.token_ids]
    return {l: feature_activity(tc.encode, h.x[l], tg, h.cell, len(sentences), v.genes, cell_labels=labels)
            for l, tc in transcoders.items()}
