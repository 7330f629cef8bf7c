"""AnnData-level entry points for the models stage (scanpy style: AnnData in, results in ``.obsm``)."""

from __future__ import annotations

import re
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ..data import GenePanel, harmonize_gene_ids, iter_chunks, log_normalize, validate
from ..errors import InputError
from .encoder import HookedEncoder
from .tokenize import TokenBatch, Tokenizer


def load_model(path, *, device: str = "cpu", allow_unsupported: bool = False) -> HookedEncoder:
    """Load a checkpoint folder of either family: scGPT (``args.json`` + ``vocab.json`` + ``best_model.pt``) or
    Geneformer (HF BERT ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` + its dictionaries).

    Parameters
    ----------
    path
        The checkpoint folder (official layout of either family; weights read with ``weights_only=True``).
    device
        ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`resolve_device` for ``auto``).
    allow_unsupported
        scGPT: ignore fine-tuning modules sclens does not model instead of refusing the checkpoint.

    Returns
    -------
    The hooked model (:class:`~sclens.models.HookedScGPT` or :class:`~sclens.models.geneformer.HookedGeneformer`),
    in eval mode, with TransformerLens hook names.
    """
    from pathlib import Path

    from ..errors import CheckpointError
    from .geneformer import load_geneformer
    from .io import load_scgpt

    d = Path(path)
    if (d / "args.json").is_file() or (d / "best_model.pt").is_file():
        return load_scgpt(d, device=device, allow_unsupported=allow_unsupported)
    if (d / "config.json").is_file():
        return load_geneformer(d, device=device)
    found = sorted(p.name for p in d.iterdir()) if d.is_dir() else None
    raise CheckpointError(
        f"{d} is not a model folder" + (f" (found {found})" if found is not None else " (it does not exist)")
        + ": scGPT needs args.json + vocab.json + best_model.pt; Geneformer needs config.json + model.safetensors or "
          "pytorch_model.bin + its token and gene-median dictionaries")


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a GPU asked for but not
    present is a clear error, not a silent fall-back."""
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", d):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); use "
                             "--device cpu or auto")
        idx = int(d.split(":")[1]) if ":" in d else 0
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return d
    raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_model(model, device: str | None = None) -> HookedEncoder:
    """Accept a loaded model (either family), a checkpoint directory, or None (the embedded default); with
    ``device`` (see :func:`resolve_device`) the model is placed there."""
    from . import load_default_model

    dev = resolve_device(device) if device is not None else None
    if model is None:
        return load_default_model(device=dev or "cpu")
    if isinstance(model, HookedEncoder):
        return model.to(dev) if dev else model
    return load_model(model, device=dev or "cpu")


def _tokenize_geneformer(adata: ad.AnnData, model, *, panel, mode, layer, var_key) -> TokenBatch:
    """Rank-value tokens. A cell's tokens depend only on its ranking of count / gene median, which scaling the cell
    leaves unchanged: raw counts, ``normalize_total`` output and its ``log1p`` (inverted with ``expm1``) give the
    same tokens. ``n_counts`` comes from ``obs['n_counts']`` or the totals over every gene of the AnnData."""
    from ..data import detect_value_kind

    if mode == "all":
        raise InputError("Geneformer reads rank-value sentences, which have no fixed panel positions: panel mode "
                         "('all') is scGPT's; Geneformer's operators average each panel gene over the cells that hold it")
    validate(adata, layer=layer)
    X = adata.layers[layer] if layer else adata.X
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    kind, _ = detect_value_kind(X[: min(2000, adata.n_obs)])
    if kind == "log1p_normalized":
        X = X.expm1() if sp.issparse(X) else np.expm1(np.asarray(X, dtype=np.float64))
    elif kind not in ("counts", "normalized_unlogged"):
        raise InputError(f"{'layer ' + layer if layer else 'X'} holds {kind.replace('_', ' ')} values: Geneformer's "
                         "rank-value tokens need raw counts (or normalize_total output, or its log1p); pass the "
                         "counts layer (layer='counts') or the raw matrix")
    genes = adata.var[var_key].astype(str).tolist() if var_key else list(map(str, adata.var_names))
    if "n_counts" in adata.obs and kind == "counts":
        n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)
    else:
        n_counts = np.asarray(X.sum(1)).ravel()
    if panel is not None:
        keep = np.flatnonzero(np.isin(genes, list(panel.genes)))
        if keep.size == 0:
            raise InputError(f"none of the {len(panel)} panel genes is in the data")
        X, genes = X[:, keep], [genes[i] for i in keep]
    return model.tokenize(X, genes, n_counts=n_counts)


def tokenize_adata(
    adata: ad.AnnData, model: HookedEncoder, *, panel: GenePanel | None = None, mode: Literal["nonzero", "all"] = "nonzero",
    layer: str | None = None, var_key: str | None = None, seed: int = 0, max_len: int | None = None,
) -> TokenBatch:
    """Tokenise cells for ``model``.

    ``mode="nonzero"`` is the official ``embed_data`` path over all genes the vocabulary knows (values are
    binned per cell, so counts and log data give the same bins). ``mode="all"`` uses exactly the ``panel``
    genes in panel order, zeros included, on ``log1p(normalize_total)`` values.
    """
    if getattr(model, "family", "scgpt") == "geneformer":
        return _tokenize_geneformer(adata, model, panel=panel, mode=mode, layer=layer, var_key=var_key)
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
    pooling: Literal["cls", "avg"] | None = None, batch_size: int = 64, key_added: str | None = None, seed: int = 0,
    chunk_size: int = 20_000, progress: bool = True, copy: bool = False,
) -> ad.AnnData | np.ndarray:
    """Cell embeddings of a foundation model, written to ``adata.obsm[key_added]``.

    scGPT follows the official ``embed_data``: non-zero genes, value binning, ``<cls>`` embedding (``pooling``
    None or "cls"; "avg" = mean over tokens), L2-normalised, into ``X_scgpt``. Geneformer follows ``EmbExtractor``:
    raw counts rank-value encoded, the second-to-last layer, mean over gene tokens (V1) or ``<cls>`` (V2; "avg"
    forces the mean), not normalised, into ``X_geneformer``. Works chunk by chunk, so backed AnnData need not fit
    in memory (the embeddings do). With ``copy=True`` a new AnnData is returned; otherwise the embeddings are
    written in place and also returned.

    Parameters
    ----------
    adata
        Cells x genes (raw counts or log1p values for scGPT; raw counts, ``normalize_total`` or its log1p for
        Geneformer); gene ids in ``var_names`` or ``var[var_key]`` (symbols or Ensembl ids).
    model
        A loaded model, a checkpoint folder, or None for the embedded default.
    pooling, batch_size, seed, chunk_size
        ``cls`` / ``avg`` (default: the family's official rule); forward-pass batch; tokenisation seed; cells per chunk.
    key_added
        The ``obsm`` key (default ``X_scgpt`` / ``X_geneformer``).

    Returns
    -------
    The embeddings [cells, d] (``copy=False``) or a new AnnData holding them (``copy=True``).
    """
    if adata.n_obs == 0:
        raise InputError("the AnnData has 0 cells: there is nothing to embed")
    model = resolve_model(model)
    family = getattr(model, "family", "scgpt")
    key_added = key_added or f"X_{family}"
    if pooling not in (None, "cls", "avg"):
        raise InputError(f"pooling must be 'cls' or 'avg', got {pooling!r}")
    if family == "geneformer":
        mode = {None: "auto", "cls": "cls", "avg": "cell"}[pooling]
    else:
        _note_value_kind(adata, layer)
        mode = pooling or "cls"
    out = adata.copy() if copy else adata
    embs = []
    for sl, _ in iter_chunks(adata, chunk_size):
        sub = adata[sl]
        batch = tokenize_adata(sub, model, layer=layer, var_key=var_key, seed=seed + sl.start)
        embs.append(model.cell_embeddings(batch, mode=mode, batch_size=batch_size, progress=progress))
    E = np.concatenate(embs).astype(np.float32)
    if not getattr(out, "isbacked", False):
        out.obsm[key_added] = E
        out.uns.setdefault("sclens", {})[key_added] = {
            "model": getattr(model, "source", "in-memory"), "family": family, "pooling": mode, "seed": seed,
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
