"""Compare two sclens output folders file by file, for bit-for-bit checks before / after a code change.

    python scripts/compare_runs.py BEFORE_DIR AFTER_DIR [--strip-prefix OLD=NEW ...]

JSON files are compared value by value after dropping what a re-run changes by itself: timings (keys containing
seconds, time, runtime, per_second, wall, ratio, created), package versions, and the sha256 / byte counts of files
that embed a timestamp; ``--strip-prefix`` treats two checkout paths as equal. CSV files are compared as tables
(same columns, same values), ``.safetensors`` tensor by tensor, ``.h5ad`` by obs and obsm, ``.pt`` state dicts
tensor by tensor. Exit code 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SKIP = ("per_second", "sha256", "file_bytes", "seconds", "time", "timing", "runtime", "versions", "version", "wall",
        "date", "ratio", "created")


def clean(o):
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items() if not any(s in k.lower() for s in SKIP)}
    if isinstance(o, list):
        return [clean(v) for v in o]
    return o


def diff(a, b, prefixes, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one run" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += diff(a[k], b[k], prefixes, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, prefixes, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return []
    if isinstance(a, str) and isinstance(b, str):
        for old, new in prefixes:
            a, b = a.replace(old, "\0"), b.replace(new, "\0")
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def compare_file(f: Path, g: Path, prefixes) -> list[str] | None:
    if f.suffix == ".json":
        return diff(clean(json.loads(f.read_text())), clean(json.loads(g.read_text())), prefixes)
    if f.suffix == ".csv":
        import pandas as pd

        x, y = pd.read_csv(f), pd.read_csv(g)
        x, y = (t[[c for c in t.columns if not any(s in c.lower() for s in SKIP)]] for t in (x, y))
        return [] if x.equals(y) else ["tables differ"]
    if f.suffix == ".safetensors":
        from safetensors.numpy import load_file

        x, y = load_file(str(f)), load_file(str(g))
        return [] if set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) else ["tensors differ"]
    if f.suffix == ".h5ad":
        import anndata as ad

        x, y = ad.read_h5ad(f), ad.read_h5ad(g)
        same = x.obs.equals(y.obs) and set(x.obsm) == set(y.obsm) and all(
            np.array_equal(np.asarray(x.obsm[k]), np.asarray(y.obsm[k])) for k in x.obsm)
        return [] if same else ["obs / obsm differ"]
    if f.suffix == ".pt":
        import torch

        x, y = torch.load(f, weights_only=True), torch.load(g, weights_only=True)
        return [] if set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) else ["state dicts differ"]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--strip-prefix", action="append", default=[], metavar="OLD=NEW",
                    help="treat strings starting with these two paths as equal (two checkouts)")
    args = ap.parse_args()
    prefixes = [tuple(p.split("=", 1)) for p in args.strip_prefix]
    same, differ = 0, 0
    for f in sorted(args.before.rglob("*")):
        if not f.is_file() or "cache" in f.relative_to(args.before).parts:
            continue
        g = args.after / f.relative_to(args.before)
        if not g.is_file():
            print(f"only before: {f.relative_to(args.before)}")
            differ += 1
            continue
        d = compare_file(f, g, prefixes)
        if d is None:
            continue
        if d:
            differ += 1
            print(f"DIFF {f.relative_to(args.before)}: {len(d)}, e.g. {d[:3]}")
        else:
            same += 1
    print(f"{same} files identical (timings, versions, hashes of timestamped files and checkout paths aside), "
          f"{differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
