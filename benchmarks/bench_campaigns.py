"""Run the benchmark campaigns of issue 10 on the offline real data (and the simulator) and write
``benchmarks/results/bench/bench_<name>.{json,md,html}``.

    python benchmarks/bench_campaigns.py kang2018 onek1k [--shared ../shared] [--scvi-epochs 50]

The endpoint files in ``benchmarks/campaigns/`` are what a user would pass to ``sclens bench --endpoints``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad

from sclens.bench import read_bench_config, run_campaign
from sclens.bench_report import summary_markdown

HERE = Path(__file__).resolve().parent
CAMPAIGNS = {
    "kang2018": ("kang2018_pbmc/kang2018_ctrl_8donors.h5ad", "kang2018_donor_holdout.toml"),
    "onek1k": ("onek1k_bcell/onek1k_bcell_100donors_pseudotime.h5ad", "onek1k_bcell_donor_kfold.toml"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("campaigns", nargs="+", choices=sorted(CAMPAIGNS))
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench")
    ap.add_argument("--scvi-epochs", type=int, default=50)
    ap.add_argument("--methods", default=None)
    args = ap.parse_args()
    for name in args.campaigns:
        data, toml = CAMPAIGNS[name]
        cfg = read_bench_config(HERE / "campaigns" / toml, scvi_epochs=args.scvi_epochs,
                                methods=args.methods.split(",") if args.methods else None)
        cfg.notes = list(cfg.notes) + [f"scVI trained for {cfg.scvi_epochs} epochs (CPU budget; scvi-tools' own rule "
                                       "would give up to 400)."]
        adata = ad.read_h5ad(args.shared / "data" / data)
        t0 = time.perf_counter()
        res = run_campaign(adata, cfg, name=name)
        paths = res.save(args.out)
        print(summary_markdown(res))
        print(f"{name}: {time.perf_counter() - t0:.0f} s; skipped {res.skipped}; runtime {res.info['runtime_ratio']}")
        print(paths)


if __name__ == "__main__":
    main()
