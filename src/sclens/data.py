"""Data layer: read and validate AnnData, harmonise gene ids, normalise, and choose the gene panel.

The cell input of every sclens stage is ``x = log1p(normalize_total(counts, 1e4))`` restricted to a gene
panel, genes in panel order. The panel is 1,200 highly variable genes (scanpy ``seurat_v3`` on counts,
``cell_ranger`` when only log data exist) chosen among the genes the model vocabulary knows, fixed at
extraction time and stored in every artifact.

No function here modifies the caller's AnnData unless it is given ``copy=False`` (scanpy convention).
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, preview

TARGET_SUM = 1e4
ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
ValueKind = Literal["counts", "log1p_normalized", "log_other", "normalized_unlogged", "scaled"]


# ----------------------------------------------------------------------------- reading
def read_h5ad(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file (``backed=True`` keeps X on disk, read-only) with clear errors."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.suffix == ".zarr" or path.is_dir():
        try:
            return ad.read_zarr(path)
        except Exception as exc:  # noqa: BLE001 - report any reader failure plainly
            raise InputError(f"{path} could not be read as a .zarr AnnData store: {exc}") from None
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path} could not be read as an .h5ad file ({type(exc).__name__}: {exc})") from None


def iter_chunks(adata: ad.AnnData, chunk_size: int = 10_000, layer: str | None = None) -> Iterator[tuple[slice, object]]:
    """Yield ``(row_slice, X_chunk)`` over cells; works for in-memory and backed AnnData alike."""
    n = adata.n_obs
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        X = adata.layers[layer][sl] if layer else adata.X[sl]
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        yield sl, X


# ----------------------------------------------------------------------------- gene ids
@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """sclens' shipped human gene table (``ensembl_id``, ``symbol``; from the Geneformer gc30M dictionary)."""
    with files("sclens").joinpath("resources/gene_ids.tsv.gz").open("rb") as fh:
        return pd.read_csv(gzip.open(fh), sep="\t", dtype=str)


def ensembl_to_symbol() -> dict[str, str]:
    """Human Ensembl gene id -> HGNC symbol (from the Geneformer gc30M dictionary, shipped as data)."""
    t = gene_table()
    return dict(zip(t["ensembl_id"], t["symbol"]))


def detect_gene_id_type(names: Sequence[str]) -> Literal["symbol", "ensembl", "mixed"]:
    """Classify gene identifiers; mixed means both kinds occur in substantial numbers."""
    names = [str(n) for n in names]
    if not names:
        raise InputError("the AnnData has no genes (var is empty)")
    is_ens = np.array([bool(ENSEMBL_RE.match(n)) for n in names])
    frac = is_ens.mean()
    if frac >= 0.95:
        return "ensembl"
    if frac <= 0.05:
        return "symbol"
    return "mixed"


def gene_symbols(ids: Sequence[str], *, min_matched: float = 0.5, hint_columns: Sequence[str] = ()) -> pd.Index:
    """Gene ids as HGNC symbols: symbols pass through, human Ensembl ids are mapped (unmapped ones kept here;
    :func:`harmonize_gene_ids` drops them).

    Mixed id types, or Ensembl ids of which fewer than ``min_matched`` map, raise a clear error.
    """
    ids = pd.Index([str(x) for x in ids])
    kind = detect_gene_id_type(ids)
    if kind == "mixed":
        n_ens = sum(bool(ENSEMBL_RE.match(x)) for x in ids)
        ens_ex = [x for x in ids if ENSEMBL_RE.match(x)][:3]
        sym_ex = [x for x in ids if not ENSEMBL_RE.match(x)][:3]
        raise InputError(
            f"gene ids are mixed: {n_ens} of {len(ids)} look like Ensembl ids (e.g. {ens_ex}) and the rest like "
            f"symbols (e.g. {sym_ex}). Pick one id column with var_key= (available: {list(hint_columns)})"
        )
    if kind == "symbol":
        return ids
    table = ensembl_to_symbol()
    symbols = [table.get(x.split(".")[0]) for x in ids]
    n_mapped = sum(s is not None for s in symbols)
    if n_mapped / len(ids) < min_matched:
        unmapped = [x for x, s in zip(ids, symbols) if s is None]
        raise InputError(
            f"only {n_mapped} of {len(ids)} Ensembl ids map to human gene symbols (unmapped e.g. "
            f"{preview(unmapped, 5)}); sclens knows human Ensembl ids only"
        )
    # unmapped genes keep their Ensembl id (they simply match no vocabulary token)
    return pd.Index([s if s is not None else x for x, s in zip(ids, symbols)])


MIN_SHARED_GENES = 200  # below this many genes shared with the vocabulary (and under both shares), ids are refused


def harmonize_gene_ids(
    adata: ad.AnnData, *, var_key: str | None = None, vocabulary: Iterable[str] | None = None,
    min_matched: float = 0.5, copy: bool = True,
) -> ad.AnnData:
    """Return an AnnData whose ``var_names`` are HGNC symbols.

    Human Ensembl ids are mapped with sclens' table; those it cannot map are dropped with a warning naming how
    many (a new AnnData is then returned even with ``copy=False``). Harmonising harmonised data changes nothing.

    Parameters
    ----------
    var_key
        Column of ``adata.var`` holding gene ids; default ``var_names``.
    vocabulary
        If given, the share of the data's genes found in it, or the share of its genes found in the data, must
        reach ``min_matched``; otherwise a clear error is raised when fewer than ``MIN_SHARED_GENES`` (200) genes
        are shared (the ids do not match), and a warning naming the shares when more are.
    """
    if var_key is not None and var_key not in adata.var.columns:
        raise InputError(
            f"var column {var_key!r} not found; available var columns: {list(adata.var.columns)}"
        )
    ids = pd.Index(adata.var[var_key].astype(str) if var_key else adata.var_names.astype(str))
    symbols = gene_symbols(ids, min_matched=min_matched, hint_columns=list(adata.var.columns))
    out = adata.copy() if copy else adata
    if not symbols.equals(ids):
        out.var["sclens_original_id"] = list(ids)
    # Ensembl ids with no symbol in the table match no vocabulary token and would make the ids "mixed" on the next
    # pass: they are dropped (and counted), so harmonising harmonised data is a no-op
    unmapped = np.array([bool(ENSEMBL_RE.match(s)) for s in symbols]) if detect_gene_id_type(ids) == "ensembl" \
        else np.zeros(len(ids), dtype=bool)
    out.var_names = symbols
    if unmapped.any():
        warnings.warn(f"{int(unmapped.sum())} of {len(ids)} Ensembl ids have no HGNC symbol in sclens' table and are "
                      f"dropped (e.g. {preview(list(symbols[unmapped]), 3)})", UserWarning, stacklevel=2)
        out = out[:, ~unmapped].copy()
    ids = out.var_names
    if not out.var_names.is_unique:
        dup = out.var_names[out.var_names.duplicated()].unique()
        raise InputError(
            f"{len(dup)} gene ids occur more than once after harmonisation ({preview(dup)}); "
            "sum or drop duplicates first (e.g. adata = adata[:, ~adata.var_names.duplicated()])"
        )
    if vocabulary is not None:
        # most of the data's genes are in the vocabulary, or (a small vocabulary, e.g. highly variable genes) most
        # of the vocabulary is in the data; neither, with few genes shared, means the ids do not match (e.g. mouse
        # symbols); neither, with many shared (a preprocessed gene subset against an HVG vocabulary), is a warning
        vocab = {str(g) for g in vocabulary if not str(g).startswith("<")}  # specials (<pad>, <cls>) are no genes
        in_vocab = np.isin(out.var_names, list(vocab))
        matched = in_vocab.mean()
        covered = in_vocab.sum() / max(len(vocab), 1)
        if matched < min_matched and covered < min_matched and in_vocab.sum() >= MIN_SHARED_GENES:
            warnings.warn(f"only {matched:.0%} of the {out.n_vars} genes are in the model vocabulary and only "
                          f"{covered:.0%} of the vocabulary's {len(vocab)} genes are in the data: the model sees "
                          f"{int(in_vocab.sum())} of the data's genes", UserWarning, stacklevel=2)
        elif matched < min_matched and covered < min_matched:
            raise InputError(
                f"only {matched:.0%} of the {out.n_vars} genes are in the model vocabulary and only {covered:.0%} of "
                f"the vocabulary's {len(vocab)} genes are in the data (need {min_matched:.0%} of either); "
                f"unmatched e.g. {preview([g for g in out.var_names if g not in vocab], 5)}. "
                "Vocabularies use case-sensitive human HGNC symbols; mouse symbols must be mapped first"
            )
    return out


# ----------------------------------------------------------------------------- validation
@dataclass
class ValidationReport:
    """What :func:`validate` found. ``kind`` is the detected value type of the matrix."""

    n_cells: int
    n_genes: int
    kind: str
    gene_id_type: str
    max_value: float
    min_value: float
    n_empty_cells: int
    n_empty_genes: int
    median_library_size: float | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.n_cells} cells x {self.n_genes} genes; values: {self.kind} (min {self.min_value:g}, max {self.max_value:g})",
            f"gene ids: {self.gene_id_type}; empty cells: {self.n_empty_cells}; empty genes: {self.n_empty_genes}",
        ]
        if self.median_library_size is not None:
            lines.append(f"median library size: {self.median_library_size:g}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _sample_rows(X, max_rows: int = 4000, seed: int = 0):
    n = X.shape[0]
    if n <= max_rows:
        idx = np.arange(n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    sub = X[idx]
    if hasattr(sub, "to_memory"):
        sub = sub.to_memory()
    return sub


def detect_value_kind(X) -> tuple[ValueKind, dict]:
    """Classify a matrix as raw counts, log1p-normalised, other log, normalised-unlogged or scaled."""
    sub = _sample_rows(X)
    data = sub.data if sp.issparse(sub) else np.asarray(sub).ravel()
    data = np.asarray(data, dtype=np.float64)
    stats = {"min": float(data.min()) if data.size else 0.0, "max": float(data.max()) if data.size else 0.0}
    if data.size and not np.isfinite(data).all():
        stats["n_nonfinite"] = int((~np.isfinite(data)).sum())
        return "scaled", stats
    if stats["min"] < 0:
        return "scaled", stats
    nz = data[data > 0]
    if nz.size == 0 or np.allclose(nz, np.rint(nz), atol=1e-4):
        return "counts", stats
    if stats["max"] <= 30:
        dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub, dtype=np.float64)
        sums = np.expm1(dense.astype(np.float64)).sum(1)
        sums = sums[sums > 0]
        stats["median_expm1_sum"] = float(np.median(sums)) if sums.size else 0.0
        if sums.size and abs(np.median(sums) - TARGET_SUM) / TARGET_SUM < 0.05:
            return "log1p_normalized", stats
        return "log_other", stats
    return "normalized_unlogged", stats


def require_obs_columns(adata: ad.AnnData, keys: Iterable[str | None]) -> None:
    """Raise a clear error naming every missing obs column and the available ones."""
    missing = [k for k in keys if k is not None and k not in adata.obs.columns]
    if missing:
        raise InputError(
            f"obs column(s) {missing} not found; available obs columns: {list(adata.obs.columns)}"
        )


def validate(
    adata: ad.AnnData, *, obs_keys: Iterable[str | None] = (), require: Literal["counts", "log", "any"] = "any",
    layer: str | None = None,
) -> ValidationReport:
    """Check an AnnData before any stage uses it; raise :class:`InputError` on anything unusable.

    Checks: obs columns present; genes present, unique and of one id type; values finite and
    non-negative; counts vs log data detected (and required where ``require`` says so); empty cells/genes.
    """
    require_obs_columns(adata, obs_keys)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found; available layers: {list(adata.layers.keys())}")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise InputError(
            f"{len(dup)} gene names are duplicated ({preview(dup)}); make them unique first "
            "(adata.var_names_make_unique()) or sum the duplicates"
        )
    id_type = detect_gene_id_type(adata.var_names)
    if id_type == "mixed":
        harmonize_gene_ids(adata)  # raises the detailed mixed-id error
    X = adata.layers[layer] if layer else adata.X
    full = X if not hasattr(X, "to_memory") or adata.n_obs <= 50_000 else None
    if full is not None and hasattr(full, "to_memory"):
        full = full.to_memory()
    data_all = (full.data if sp.issparse(full) else np.asarray(full)) if full is not None else None
    if data_all is not None:
        bad = ~np.isfinite(np.asarray(data_all, dtype=np.float64))
        if bad.any():
            dense_bad = (~np.isfinite(full.toarray() if sp.issparse(full) else np.asarray(full, dtype=np.float64)))
            rows, cols = np.nonzero(dense_bad)
            raise InputError(
                f"{int(bad.sum())} NaN/inf values in {'layer ' + layer if layer else 'X'} "
                f"(e.g. cell {adata.obs_names[rows[0]]!r}, gene {adata.var_names[cols[0]]!r}); "
                "sclens needs finite expression values"
            )
    kind, stats = detect_value_kind(full if full is not None else X)
    if stats.get("n_nonfinite"):
        raise InputError(f"NaN/inf values found in {'layer ' + layer if layer else 'X'}; sclens needs finite values")
    if kind == "scaled":
        raise InputError(
            f"{'layer ' + layer if layer else 'X'} contains negative values (min {stats['min']:g}): this looks like "
            "scaled / centred data (z-scores). sclens needs raw counts (or log1p-normalised data); use the counts "
            "layer or adata.raw"
        )
    if require == "counts" and kind != "counts":
        raise InputError(
            f"raw integer counts are needed here, but {'layer ' + layer if layer else 'X'} holds {kind.replace('_', ' ')} "
            f"values (max {stats['max']:g}, non-integer). Pass the counts layer (layer='counts') or the raw matrix"
        )
    if require == "log" and kind not in ("counts", "log1p_normalized", "log_other"):
        raise InputError(f"expected counts or log data, found {kind.replace('_', ' ')} values")
    M = full if full is not None else _sample_rows(X)
    lib = np.asarray(M.sum(1)).ravel()
    gene_tot = np.asarray(M.sum(0)).ravel()
    warns = []
    if kind == "log_other":
        warns.append(
            f"values look log-transformed but do not sum to {TARGET_SUM:g} after expm1 "
            f"(median {stats.get('median_expm1_sum', float('nan')):.0f}); they are used as given"
        )
    if kind == "normalized_unlogged":
        warns.append("values are non-integer and not logged; they will be log1p-transformed as if normalised")
    n_empty_cells = int((lib == 0).sum())
    if n_empty_cells:
        warns.append(f"{n_empty_cells} cells have no expression at all (filter them with sc.pp.filter_cells(min_counts=1))")
    return ValidationReport(
        n_cells=adata.n_obs, n_genes=adata.n_vars, kind=kind, gene_id_type=id_type,
        max_value=stats["max"], min_value=stats["min"], n_empty_cells=n_empty_cells,
        n_empty_genes=int((gene_tot == 0).sum()) if full is not None else -1,
        median_library_size=float(np.median(lib)) if kind == "counts" else None, warnings=warns,
    )


# ----------------------------------------------------------------------------- normalisation
def log_normalize(X, kind: str | None = None) -> np.ndarray | sp.csr_matrix:
    """``log1p(normalize_total(X, 1e4))`` for counts; log data are returned unchanged."""
    if kind is None:
        kind, _ = detect_value_kind(X)
    if kind in ("log1p_normalized", "log_other"):
        return X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        lib = np.asarray(X.sum(1)).ravel()
        if (lib == 0).any():
            raise InputError(f"{int((lib == 0).sum())} cells have zero total counts and cannot be normalised; filter them first")
        X = sp.diags(TARGET_SUM / lib) @ X
        X.data = np.log1p(X.data)
        return X.astype(np.float32)
    X = np.asarray(X, dtype=np.float64)
    lib = X.sum(1, keepdims=True)
    if (lib == 0).any():
        raise InputError(f"{int((lib == 0).sum())} cells have zero total counts and cannot be normalised; filter them first")
    return np.log1p(X * (TARGET_SUM / lib)).astype(np.float32)


def normalize(adata: ad.AnnData, *, layer: str | None = None, copy: bool = True) -> ad.AnnData | None:
    """Write ``log1p(normalize_total(counts, 1e4))`` to ``X`` and keep the counts in ``layers['counts']``."""
    report = validate(adata, layer=layer, require="log")
    out = adata.copy() if copy else adata
    X = out.layers[layer] if layer else out.X
    if report.kind == "counts" and "counts" not in out.layers:
        out.layers["counts"] = X.copy()
    out.X = log_normalize(X, report.kind)
    out.uns["sclens_normalization"] = {"target_sum": TARGET_SUM, "log1p": True, "input_kind": report.kind}
    return out if copy else None


# ----------------------------------------------------------------------------- panel
@dataclass
class GenePanel:
    """The ordered gene panel every featurisation uses; stored in every artifact.

    Attributes
    ----------
    genes
        Panel genes (HGNC symbols), in panel order.
    flavor
        HVG flavour used to choose them (``seurat_v3`` or ``cell_ranger``), or ``"given"``.
    """

    genes: tuple[str, ...]
    flavor: str = "given"
    n_requested: int = 1200
    target_sum: float = TARGET_SUM
    min_coverage: float = 0.5

    def __post_init__(self):
        self.genes = tuple(str(g) for g in self.genes)
        if len(set(self.genes)) != len(self.genes):
            raise InputError("panel genes must be unique")

    def __len__(self) -> int:
        return len(self.genes)

    def to_dict(self) -> dict:
        return {"genes": list(self.genes), "flavor": self.flavor, "n_requested": self.n_requested,
                "target_sum": self.target_sum, "normalization": "log1p(normalize_total(counts, 1e4))"}

    @classmethod
    def from_dict(cls, d: dict) -> "GenePanel":
        return cls(genes=tuple(d["genes"]), flavor=d.get("flavor", "given"), n_requested=d.get("n_requested", len(d["genes"])),
                   target_sum=d.get("target_sum", TARGET_SUM))

    def save(self, path: str | Path) -> Path:
        """Write the panel as JSON (``panel.json``), atomically."""
        from .utils import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "GenePanel":
        """Read a panel written by :meth:`save` (or by ``sclens data --panel-out``)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"panel file {path} not found") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not a panel JSON ({exc})") from None
        if not isinstance(d, dict) or not d.get("genes"):
            raise InputError(f"{path} holds no 'genes' list: not a panel written by sclens")
        return cls.from_dict(d)

    def coverage(self, var_names: Iterable[str]) -> float:
        present = set(map(str, var_names))
        return sum(g in present for g in self.genes) / len(self.genes)

    def column_index(self, var_names: Sequence[str]) -> np.ndarray:
        """Column of each panel gene in ``var_names`` (-1 where missing), with the coverage rule applied."""
        pos = {g: i for i, g in enumerate(map(str, var_names))}
        idx = np.array([pos.get(g, -1) for g in self.genes], dtype=np.int64)
        n_missing = int((idx < 0).sum())
        if n_missing:
            cov = 1 - n_missing / len(self.genes)
            missing = [g for g, i in zip(self.genes, idx) if i < 0]
            if cov < self.min_coverage:
                raise InputError(
                    f"only {cov:.0%} of the {len(self.genes)} panel genes are present (need {self.min_coverage:.0%}); "
                    f"missing e.g. {preview(missing, 6)}. Are the gene ids symbols of the same species?"
                )
            warnings.warn(
                f"{n_missing} of {len(self.genes)} panel genes are missing from the data and are zero-filled "
                f"(e.g. {preview(missing, 5)})", stacklevel=3,
            )
        return idx

    def matrix(self, adata: ad.AnnData, *, layer: str | None = None, kind: str | None = None) -> np.ndarray:
        """Dense ``x`` [cells, panel genes]: log1p-normalised over each cell's full library, panel order."""
        idx = self.column_index(adata.var_names)
        X = adata.layers[layer] if layer else adata.X
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        return self.transform(X, idx, kind=kind)

    def transform(self, X, idx: np.ndarray, kind: str | None = None) -> np.ndarray:
        """Normalise a raw chunk (full gene set) and gather the panel columns; missing genes are 0."""
        Xn = log_normalize(X, kind)
        out = np.zeros((X.shape[0], len(self.genes)), dtype=np.float32)
        have = idx >= 0
        sub = Xn[:, idx[have]]
        out[:, have] = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
        return out


def select_panel(
    adata: ad.AnnData, vocabulary: Iterable[str] | None = None, *, n_genes: int = 1200, layer: str | None = None,
    flavor: Literal["seurat_v3", "cell_ranger"] | None = None, min_cells: int = 3,
) -> GenePanel:
    """Choose the panel: the ``n_genes`` most variable genes among those the vocabulary knows.

    ``seurat_v3`` runs on raw counts and is the default for count data; ``cell_ranger`` (on log data) is
    used when only log values exist. Genes detected in fewer than ``min_cells`` cells are never chosen.
    Ties and the final order follow scanpy's ranking, so the panel is deterministic.

    Parameters
    ----------
    adata
        Cells with harmonised gene ids (:func:`harmonize_gene_ids`).
    vocabulary
        The model's genes (``model.vocab.genes``); None: every gene of ``adata``.
    n_genes, flavor, min_cells, layer
        Panel size; scanpy's HVG flavour (default: from the value kind); detection floor; the layer to read.

    Returns
    -------
    :class:`GenePanel` (ordered gene ids, flavour, provenance; ``to_dict`` / ``from_dict`` round-trip to JSON).
    """
    import scanpy as sc

    report = validate(adata, layer=layer, require="log")
    X = adata.layers[layer] if layer else adata.X
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    keep = np.ones(adata.n_vars, dtype=bool)
    if vocabulary is not None:
        vocab = set(vocabulary)
        keep &= np.isin(adata.var_names.astype(str), list(vocab))
        if not keep.any():
            raise InputError(
                f"none of the {adata.n_vars} genes is in the model vocabulary (e.g. {preview(adata.var_names[:5])}); "
                "convert ids with sclens.data.harmonize_gene_ids"
            )
    detected = np.asarray((X > 0).sum(0)).ravel() >= min_cells
    keep &= detected
    n_avail = int(keep.sum())
    if n_avail == 0:
        raise InputError(f"no vocabulary gene is detected in at least {min_cells} cells")
    flavor = flavor or ("seurat_v3" if report.kind == "counts" else "cell_ranger")
    if flavor == "seurat_v3" and report.kind != "counts":
        raise InputError("flavor='seurat_v3' needs raw counts; these values are log data (use flavor='cell_ranger')")
    # cell_ranger works on log data normalised over each cell's FULL library, so normalise before subsetting
    source = X if flavor == "seurat_v3" else log_normalize(X, report.kind)
    sub = ad.AnnData(np.asarray(source)[:, keep] if not sp.issparse(source) else sp.csr_matrix(source)[:, np.flatnonzero(keep)])
    sub.var_names = adata.var_names[keep].astype(str)
    n_top = min(n_genes, n_avail)
    if n_top == n_avail:
        genes = list(sub.var_names)
    else:
        if flavor == "seurat_v3":
            sub.X = sub.X.astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=n_top)
            ranked = sub.var.sort_values("highly_variable_rank")
            genes = list(ranked.index[ranked["highly_variable"]][:n_top])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.pp.highly_variable_genes(sub, flavor="cell_ranger", n_top_genes=n_top)
            disp = sub.var["dispersions_norm"].fillna(-np.inf)
            genes = list(disp.sort_values(ascending=False, kind="stable").index[:n_top])
    return GenePanel(genes=tuple(genes), flavor=flavor, n_requested=n_genes)
