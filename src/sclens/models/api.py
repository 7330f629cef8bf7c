"""AnnData-level entry points for the models stage (scanpy style: AnnData in, results in ``.obsm``)."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np

from ..data import GenePanel, harmonize_gene_ids, iter_chunks, log_normalize, validate
from ..errors import InputError
from .scgpt import HookedScGPT
from .tokenize import TokenBatch, Tokenizer


def resolve_model(model) -> HookedScGPT:
    """Accept a loaded model, a checkpoint directory, or None (the embedded default)."""
    from . import load_default_model
    from .io import load_scgpt

    if model is None:
        return load_default_model()
    if isinstance(model, HookedScGPT):
        return model
    return load_scgpt(model)


def tokenize_adata(
    adata: ad.AnnData, model: HookedScGPT, *, panel: GenePanel | None = None, mode: Literal["nonzero", "all"] = "nonzero",
    layer: str | None = None, var_key: str | None = None, seed: int = 0, max_len: int | None = None,
) -> TokenBatch:
    """Tokenise cells for ``model``.

    ``mode="nonzero"`` is the official ``embed_data`` path over all genes the vocabulary knows (values are
    binned per cell, so counts and log data give the same bins). ``mode="all"`` uses exactly the ``panel``
    genes in panel order, zeros included, on ``log1p(normalize_total)`` values.
    """
    validate(adata, layer=layer, require="log")
    adata = harmonize_gene_ids(adata, var_key=var_key, vocabulary=model.vocab.genes if panel is None else None)
    if mode == "all":
        if panel is None:
            raise InputError("mode='all' needs a gene panel (sclens.data.select_panel)")
        missing = [g for g in panel.genes if g not in model.vocab]
        if missing:
            raise InputError(f"{len(missing)} panel genes are not in the model vocabulary (e.g. {missing[:5]})")
        X = panel.matrix(adata, layer=layer)
        tok = Tokenizer.for_model(model, panel.genes, mode="all")
        return tok.encode(X, rng=seed)
    X = adata.layers[layer] if layer else adata.X
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    genes = list(adata.var_names)
    if panel is not None:
        idx = panel.column_index(genes)
        X = log_normalize(X)[:, idx[idx >= 0]]
        genes = [panel.genes[i] for i in np.flatnonzero(idx >= 0)]
    kw = {"max_len": max_len} if max_len else {}
    tok = Tokenizer.for_model(model, genes, mode="nonzero", **kw)
    return tok.encode(X, rng=seed)


def embed_cells(
    adata: ad.AnnData, model=None, *, layer: str | None = None, var_key: str | None = None,
    pooling: Literal["cls", "avg"] = "cls", batch_size: int = 64, key_added: str = "X_scgpt", seed: int = 0,
    chunk_size: int = 20_000, progress: bool = True, copy: bool = False,
) -> ad.AnnData | np.ndarray:
    """Cell embeddings of a foundation model, written to ``adata.obsm[key_added]``.

    Follows the official ``embed_data``: non-zero genes, value binning, ``<cls>`` embedding, L2-normalised.
    Works chunk by chunk, so backed AnnData need not fit in memory (the embeddings do). With ``copy=True``
    a new AnnData is returned; otherwise the embeddings are written in place and also returned.
    """
    if adata.n_obs == 0:
        raise InputError("the AnnData has 0 cells: there is nothing to embed")
    model = resolve_model(model)
    _note_value_kind(adata, layer)
    out = adata.copy() if copy else adata
    embs = []
    for sl, _ in iter_chunks(adata, chunk_size):
        sub = adata[sl]
        batch = tokenize_adata(sub, model, layer=layer, var_key=var_key, seed=seed + sl.start)
        embs.append(model.cell_embeddings(batch, mode=pooling, batch_size=batch_size, progress=progress))
    E = np.concatenate(embs).astype(np.float32)
    if not getattr(out, "isbacked", False):
        out.obsm[key_added] = E
        out.uns.setdefault("sclens", {})[key_added] = {
            "model": getattr(model, "source", "in-memory"), "pooling": pooling, "seed": seed,
            "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        }
    return out if copy else E


def _note_value_kind(adata: ad.AnnData, layer: str | None) -> None:
    """Warn when the input is not raw counts, and say what the official rules then do with it."""
    import warnings

    from ..data import detect_value_kind

    X = adata.layers[layer] if layer else adata.X
    kind, _ = detect_value_kind(X[: min(2000, adata.n_obs)])
    if kind in ("log1p_normalized", "log_other", "normalized"):
        warnings.warn(
            f"{'layer ' + layer if layer else 'X'} holds {kind.replace('_', ' ')} values, not raw counts. The official "
            "embed_data rules bin each cell's non-zero values by their quantiles within that cell, and normalising and "
            "log-transforming a cell are monotone within the cell, so the bins (and the embeddings) are the same as "
            "from the counts; only the set of non-zero genes matters beyond ranks", UserWarning, stacklevel=3)
