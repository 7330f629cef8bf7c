"""Row-streaming access to AnnData stores on disk (``.h5ad`` via h5py, ``.zarr`` via zarr).

Used by :func:`sclens.extract.apply_file`: the expression matrix is read a block of cells at a time (never
whole), and results are written into a copy of the input store slice by slice, so memory stays flat in the
number of cells. Elements are read and written with anndata's own element I/O (``anndata.io``), so the
output is an ordinary AnnData file.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pandas as pd

from ..errors import InputError

ARRAY_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}
DICT_ENCODING = {"encoding-type": "dict", "encoding-version": "0.1.0"}


def is_zarr(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".zarr" or path.is_dir()


def open_store(path: str | Path, mode: str = "r"):
    """Open an AnnData store as an h5py File or a zarr Group."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    try:
        if is_zarr(path):
            import zarr

            # edits go through plain (non-consolidated) metadata; reconsolidate() refreshes it afterwards
            return zarr.open_group(str(path), mode=mode, use_consolidated=False if mode != "r" else None)
        import h5py

        return h5py.File(path, mode)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported plainly
        raise InputError(f"{path} could not be opened as an AnnData store ({type(exc).__name__}: {exc})") from None


def close_store(store) -> None:
    if hasattr(store, "close"):
        store.close()


def reconsolidate(path: str | Path) -> None:
    """Rewrite a zarr store's consolidated metadata after its elements were edited (no-op for .h5ad)."""
    if is_zarr(path):
        import zarr

        zarr.consolidate_metadata(str(path))


class RowMatrix:
    """The expression matrix (``X`` or a layer) of an open store, read by row blocks."""

    def __init__(self, store, layer: str | None = None):
        from anndata.io import read_elem, sparse_dataset

        key = f"layers/{layer}" if layer else "X"
        if layer and ("layers" not in store or layer not in store["layers"]):
            have = list(store["layers"].keys()) if "layers" in store else []
            raise InputError(f"layer {layer!r} not found; available layers: {have}")
        if key not in store:
            raise InputError("the store has no X matrix")
        elem = store[key]
        enc = dict(elem.attrs).get("encoding-type", "array")
        if enc in ("csr_matrix", "csc_matrix"):
            if enc == "csc_matrix":
                warnings.warn("X is stored column-major (CSC): streaming rows reads far more than needed; "
                              "rewrite it as CSR for speed", stacklevel=3)
            self.X = sparse_dataset(elem)
        else:
            self.X = elem
        self.shape = tuple(int(s) for s in self.X.shape)
        self.var_names = pd.Index(read_elem(store["var"]).index.astype(str))

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int):
        return self.X[start:stop]

    def iter_chunks(self, chunk_size: int):
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield slice(start, stop), self.rows(start, stop)


def copy_store(src: Path, dst: Path) -> None:
    if is_zarr(src):
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def create_array(group, name: str, shape: tuple[int, ...], dtype) -> object:
    """An empty on-disk array with AnnData's array encoding, filled later slice by slice."""
    if name in group:
        del group[name]
    if hasattr(group, "create_dataset") and type(group).__module__.startswith("h5py"):
        chunks = (min(shape[0], 16384),) + tuple(shape[1:]) if shape[0] else None
        arr = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    else:
        arr = group.create_array(name, shape=shape, dtype=dtype, chunks=(min(max(shape[0], 1), 65536),) + tuple(shape[1:]))
    arr.attrs.update(ARRAY_ENCODING)
    return arr


def require_group(store, name: str):
    if name not in store:
        g = store.create_group(name)
        g.attrs.update(DICT_ENCODING)
    return store[name]


def replace_elem(group, name: str, value) -> None:
    from anndata.io import write_elem

    if name in group:
        del group[name]
    write_elem(group, name, value)


def read_obs(store) -> pd.DataFrame:
    from anndata.io import read_elem

    return read_elem(store["obs"])

