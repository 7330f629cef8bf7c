"""Small shared helpers: atomic writes, hashing, provenance records."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1, default=json_default)))


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars and arrays, tuples, sets and paths."""
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if type(o).__name__ == "NAType":  # pandas' missing value (e.g. a gate that was not evaluated)
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(*arrays) -> str:
    """Hash of array contents (shape, dtype and bytes); used as an input hash in reports."""
    import numpy as np
    import scipy.sparse as sp

    h = hashlib.sha256()
    for a in arrays:
        if sp.issparse(a):
            a = a.tocsr()
            for part in (a.data, a.indices, a.indptr):
                h.update(np.ascontiguousarray(part).tobytes())
            h.update(str(a.shape).encode())
        else:
            a = np.ascontiguousarray(np.asarray(a))
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes() if a.dtype != object else str(a.tolist()).encode())
    return h.hexdigest()


def package_versions(names=("sclens", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn", "safetensors")) -> dict:
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def restores_torch_threads(fn: Callable) -> Callable:
    """Decorator: whatever thread count ``fn`` sets for torch (``torch.set_num_threads``) is undone when it returns
    or raises, so a training or screening call does not leave the caller's process single-threaded."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    return wrapper


def result_file(path, pattern: str, what: str) -> Path:
    """``path`` itself when it is a file, else the one file matching ``pattern`` in the folder ``path`` (a clear
    error when there is none or several)."""
    from .errors import InputError

    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob(pattern)) if path.is_dir() else []
    if len(found) != 1:
        raise InputError(f"{path}: expected one {pattern} ({what}), found "
                         f"{[f.name for f in found] if found else 'none'}; pass the file itself")
    return found[0]
