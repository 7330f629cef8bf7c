"""Apply an extracted model: AnnData in memory, backed .h5ad / .zarr files in chunks, Dask arrays."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .. import __version__
from ..data import gene_symbols, iter_chunks
from ..errors import InputError
from .artifact import ExtractedModel
from .panel import head_rows, head_value_kind, panel_index
from .readouts import PROBES


OBS_KEYS = {"pseudotime": "sclens_pseudotime", "branch": "sclens_branch", "stage": "sclens_stage"}


OBSM_LATENT = "X_sclens"


def _write_results(adata: ad.AnnData, model: ExtractedModel, res: dict[str, np.ndarray], info: dict) -> None:
    adata.obsm[OBSM_LATENT] = res["latent"]
    adata.obs[OBS_KEYS["pseudotime"]] = res["pseudotime"]
    for name in ("branch", "stage"):
        r = model.readouts[name]
        adata.obs[OBS_KEYS[name]] = pd.Categorical(np.asarray(r.classes)[res[name].argmax(1)], categories=r.classes)
        adata.obsm[f"sclens_{name}_proba"] = res[name]
    for probe in PROBES:
        if probe in model.readouts:
            adata.obs[f"sclens_{probe}_score"] = res[probe][:, 1]
    adata.uns["sclens"] = info


def _apply_info(model: ExtractedModel, coverage: float, kind: str, fold: bool) -> dict:
    info = {"artifact_sha256": model.content_sha256, "sclens_version": __version__, "panel_coverage": coverage,
            "input_kind": kind, "folded": fold, "latent_key": f"obsm/{OBSM_LATENT}", **{f"{k}_key": v for k, v in OBS_KEYS.items()}}
    for name, r in model.readouts.items():
        if r.kind == "classifier":
            info[f"{name}_classes"] = list(r.classes)
    for probe in PROBES:
        if probe in model.readouts:
            info[f"{probe}_score"] = (f"P({model.readouts[probe].classes[1]}) vs {model.readouts[probe].classes[0]}; "
                                      "meaningful only for cells of that lineage")
    return info


def apply(
    adata: ad.AnnData, model: ExtractedModel | str | Path, *, layer: str | None = None, chunk_size: int = 10_000,
    fold: bool = True, copy: bool = False, progress: bool = False,
) -> ad.AnnData | None:
    """Run the extracted algorithm on cells and write its outputs (scanpy style).

    Writes ``obs['sclens_pseudotime']``, ``obs['sclens_branch']``, ``obs['sclens_stage']`` (probabilities in
    ``obsm['sclens_branch_proba']`` / ``obsm['sclens_stage_proba']``, class names in ``uns['sclens']``),
    ``obs['sclens_<probe>_score']`` for each binary probe and ``obsm['X_sclens']``. ``adata.X`` (or ``layer``)
    holds counts or log1p-normalised values over any genes; the panel is gathered by name (missing genes
    zero-filled with a warning, below 50 % coverage an error). Works chunk by chunk on in-memory and backed
    AnnData; a Dask array ``X`` is computed with Dask (on whatever scheduler / cluster is active).

    Parameters
    ----------
    adata
        Cells to annotate (never needs the training data).
    model
        An :class:`ExtractedModel` or the path of its ``.safetensors`` file.
    fold, chunk_size, layer, copy
        Use the folded G x d map (default) or the explicit chain; cells per chunk; layer to read; return a copy.

    Returns
    -------
    None (``adata`` annotated in place) or the annotated copy (``copy=True``).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, ExtractedModel):
        model = ExtractedModel.load(model)
    out = adata.copy() if copy else adata
    X0 = out.layers[layer] if layer else out.X
    if _is_dask(X0):
        res, kind = apply_dask(model, X0, out.var_names, fold=fold)
    else:
        idx = panel_index(model.panel, out.var_names)
        kind = head_value_kind(head_rows(X0))
        n = out.n_obs
        P = np.empty((n, sum(w for _, w in model.output_columns())), dtype=np.float32)
        chunks = iter_chunks(out, chunk_size, layer)
        for sl, X in tqdm(chunks, total=-(-n // chunk_size), desc="applying", unit="chunk", disable=not progress):
            P[sl] = model.predict_packed(model.panel.transform(X, idx, kind), fold)
        res = model.unpack(P)
    coverage = model.panel.coverage(gene_symbols(out.var_names))
    _write_results(out, model, res, _apply_info(model, coverage, kind, fold))
    return out if copy else None


def _is_dask(X) -> bool:
    return type(X).__module__.startswith("dask")


def apply_dask(model: ExtractedModel, X, var_names: Sequence[str], *, fold: bool = True, kind: str | None = None):
    """Apply over a Dask array [cells, genes] (chunked by rows; any scheduler, e.g. ``dask.distributed``).

    Returns ``(outputs dict of numpy arrays, input kind)``. Each block runs exactly the in-memory code path.
    """
    import dask.array as da

    idx = panel_index(model.panel, var_names)
    if len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})  # every block needs a cell's whole library to normalise it
    kind = kind or head_value_kind(_to_numpy_or_sparse(X[: min(2000, X.shape[0])].compute()))
    width = sum(w for _, w in model.output_columns())
    panel = model.panel
    # every worker gets the compiled model once (folded matrix etc.), not the whole AnnData
    folded = model.folded() if fold else None
    light = ExtractedModel(model.operator, model.adaptor, model.readouts, {}, folded)

    def block(Xb):
        return light.predict_packed(panel.transform(_to_numpy_or_sparse(Xb), idx, kind), fold)

    P = da.map_blocks(block, X, dtype=np.float32, chunks=(X.chunks[0], (width,)), meta=np.empty((0, 0), np.float32))
    return model.unpack(np.asarray(P.compute())), kind


def _to_numpy_or_sparse(X):
    import scipy.sparse as sp

    if sp.issparse(X):
        return X.tocsr()
    return np.asarray(X)


def apply_file(
    model: ExtractedModel | str | Path, in_path: str | Path, out_path: str | Path, *, layer: str | None = None,
    chunk_size: int = 20_000, fold: bool = True, progress: bool = True,
) -> dict:
    """Stream ``in_path`` (.h5ad or .zarr) through the algorithm into ``out_path`` (same format), memory flat.

    The input is opened read-only and copied; results are written into the copy one chunk at a time and the
    copy is renamed onto ``out_path`` only when complete (atomic). Returns a small run record.
    """
    import os
    import shutil
    import tempfile

    from tqdm.auto import tqdm

    from . import store

    if not isinstance(model, ExtractedModel):
        model = ExtractedModel.load(model)
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise InputError("the output path must differ from the input: sclens never overwrites its input")
    if store.is_zarr(in_path) != (out_path.suffix == ".zarr"):
        raise InputError(f"output {out_path.name} must have the input's format "
                         f"({'.zarr' if store.is_zarr(in_path) else '.h5ad'})")
    t0 = time.perf_counter()
    src = store.open_store(in_path, "r")
    try:
        mat = store.RowMatrix(src, layer)
        names = gene_symbols(mat.var_names)
        idx, coverage = model.panel.column_index(names), model.panel.coverage(names)
        kind = head_value_kind(mat.rows(0, min(2000, mat.n_obs)))
        n = mat.n_obs
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.")) / out_path.name
        try:
            store.copy_store(in_path, tmp)
            dst = store.open_store(tmp, "r+")
            try:
                obsm = store.require_group(dst, "obsm")
                latent = store.create_array(obsm, OBSM_LATENT, (n, model.adaptor.d), np.float32)
                proba = {name: store.create_array(obsm, f"sclens_{name}_proba", (n, len(model.readouts[name].classes)),
                                                   np.float32) for name in ("branch", "stage")}
                pt = np.empty(n, np.float32)
                codes = {name: np.empty(n, np.int16) for name in ("branch", "stage")}
                probe_scores = {p: np.empty(n, np.float32) for p in PROBES if p in model.readouts}
                for sl, X in tqdm(mat.iter_chunks(chunk_size), total=-(-n // chunk_size), desc="applying",
                                  unit="chunk", disable=not progress):
                    res = model.unpack(model.predict_packed(model.panel.transform(X, idx, kind), fold))
                    latent[sl] = res["latent"]
                    for name in ("branch", "stage"):
                        proba[name][sl] = res[name]
                        codes[name][sl] = res[name].argmax(1)
                    for p in probe_scores:
                        probe_scores[p][sl] = res[p][:, 1]
                    pt[sl] = res["pseudotime"]
                obs = store.read_obs(dst)
                obs[OBS_KEYS["pseudotime"]] = pt
                for name in ("branch", "stage"):
                    classes = model.readouts[name].classes
                    obs[OBS_KEYS[name]] = pd.Categorical.from_codes(codes[name], categories=classes)
                for p, v in probe_scores.items():
                    obs[f"sclens_{p}_score"] = v
                store.replace_elem(dst, "obs", obs)
                uns = store.require_group(dst, "uns")
                store.replace_elem(uns, "sclens", _apply_info(model, coverage, kind, fold))
            finally:
                store.close_store(dst)
            store.reconsolidate(tmp)
            if out_path.exists():
                shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            os.replace(tmp, out_path)
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    finally:
        store.close_store(src)
    seconds = time.perf_counter() - t0
    return {"n_cells": n, "seconds": seconds, "cells_per_second": n / seconds if seconds else float("nan"),
            "out": str(out_path), "input_kind": kind, "panel_coverage": coverage}
