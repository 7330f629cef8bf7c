"""Compression ladder, factor audit and gene programs on REAL donor-holdout data (issue 6).

    python benchmarks/compress_real.py [--shared ../shared] [--out benchmarks/results/compress]

Kang 2018 (8 donors, leave-one-donor-out): reference = the default model's ov drift (the operator the
benchmark's extracted method uses); single head = the best single-unit hypothesis of the real-data screen
(benchmarks/results/real_screen/kang2018, written by examples/real_data_screen.py); SVD ranks 64/32/16/8;
sparse = 16 factors x 50 read / write genes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad

from sclens.bench import read_bench_config
from sclens.compress import CompressConfig, compress

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "compress")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="where the variant files go (default: a temporary folder; they are measured, not committed)")
    args = ap.parse_args()
    adata = ad.read_h5ad(args.shared / "data" / "kang2018_pbmc" / "kang2018_ctrl_8donors.h5ad")
    cfg = read_bench_config(HERE / "campaigns" / "kang2018_compress.toml")
    t0 = time.perf_counter()
    res = compress(adata, cfg, CompressConfig(), report=HERE / "results" / "real_screen" / "kang2018",
                   name="kang2018", artifact_dir=args.artifacts)
    paths = res.save(args.out)
    print(paths["md"].read_text())
    print(f"kang2018 compress: {time.perf_counter() - t0:.0f} s -> {paths}")


if __name__ == "__main__":
    main()
