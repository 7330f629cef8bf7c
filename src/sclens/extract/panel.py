"""The artifact's gene panel in a user's AnnData: positions, value kind, the panel rows of chosen cells."""

from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np

from ..data import GenePanel, detect_value_kind, gene_symbols, iter_chunks
from ..errors import InputError


def head_value_kind(X_head) -> str:
    """Counts vs log1p data, decided once from the first cells so every chunking sees the same rule."""
    kind, stats = detect_value_kind(X_head)
    if kind == "scaled":
        raise InputError(f"the expression values contain negatives (min {stats['min']:g}) or NaN: this looks like "
                         "scaled data; sclens needs raw counts or log1p-normalised values (use the counts layer)")
    return kind


def panel_index(panel: GenePanel, var_names: Sequence[str]) -> np.ndarray:
    """Column of each panel gene in the data; Ensembl ids are mapped to symbols, missing genes -> -1."""
    return panel.column_index(gene_symbols(var_names))


def head_rows(X, n: int = 2000):
    sub = X[: min(n, X.shape[0])]
    return sub.to_memory() if hasattr(sub, "to_memory") else sub


def panel_rows(adata: ad.AnnData, panel: GenePanel, rows: np.ndarray | None = None, *, layer: str | None = None,
               chunk_size: int = 20_000, kind: str | None = None) -> np.ndarray:
    """Panel vectors ``x`` of the given cells (all when ``rows`` is None), streamed over chunks."""
    idx = panel_index(panel, adata.var_names)
    X0 = adata.layers[layer] if layer else adata.X
    kind = kind or head_value_kind(head_rows(X0))
    if rows is None:
        return np.concatenate([panel.transform(X, idx, kind) for _, X in iter_chunks(adata, chunk_size, layer)]) \
            if adata.n_obs else np.zeros((0, len(panel)), np.float32)
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.zeros((len(rows), len(panel)), dtype=np.float32)
    sorted_rows = rows[order]
    for sl, X in iter_chunks(adata, chunk_size, layer):
        lo, hi = np.searchsorted(sorted_rows, [sl.start, sl.stop])
        if hi > lo:
            local = sorted_rows[lo:hi] - sl.start
            out[order[lo:hi]] = panel.transform(X[local], idx, kind)
    return out
