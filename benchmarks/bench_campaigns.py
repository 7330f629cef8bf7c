"""Run the benchmark campaigns of issue 10 on the offline real data (and the simulator) and write
``benchmarks/results/bench/bench_<name>.{json,md,html}``.

    python benchmarks/bench_campaigns.py kang2018 onek1k paul15 ginhoux pbmc68k_to_mudan synthetic \
        [--shared ../shared] [--scvi-epochs 50] [--model CHECKPOINT_DIR] [--operator L3H5]
        [--methods a,b] [--suffix _x]

Campaign families (kept apart in every report):
  (a) real donor holdout: kang2018 (8 donors, leave-one-out), onek1k (100 donors, grouped 10-fold)
  (b) real single source: paul15, ginhoux (cell-level splits), pbmc68k_to_mudan (cross-source) -
      source and donor coincide
  (c) synthetic: simulate_hematopoiesis, 16 new donors, 12 donor-holdout splits

The endpoint files in ``benchmarks/campaigns/`` are what a user would pass to ``sclens bench --endpoints``;
the loaders below only put the offline files into the shape those files expect (upper-cased mouse symbols,
two PBMC sources joined on their shared genes, a simulated cohort).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import pandas as pd

from sclens.bench import read_bench_config, run_campaign
from sclens.bench_report import summary_markdown

HERE = Path(__file__).resolve().parent
CAMPAIGNS = {
    "kang2018": "kang2018_donor_holdout.toml",
    "onek1k": "onek1k_bcell_donor_kfold.toml",
    "paul15": "paul15_cells.toml",
    "ginhoux": "ginhoux_cells.toml",
    "pbmc68k_to_mudan": "pbmc68k_to_mudan_sorted.toml",
    "synthetic": "synthetic_donor_holdout.toml",
}


def _upper_symbols(a: ad.AnnData) -> ad.AnnData:
    a.var_names = [g.upper() for g in a.var_names]
    return a[:, ~a.var_names.duplicated()].copy()


def load(name: str, shared: Path) -> ad.AnnData:
    d = shared / "data"
    if name == "kang2018":
        return ad.read_h5ad(d / "kang2018_pbmc/kang2018_ctrl_8donors.h5ad")
    if name == "onek1k":
        return ad.read_h5ad(d / "onek1k_bcell/onek1k_bcell_100donors_pseudotime.h5ad")
    if name == "paul15":
        return _upper_symbols(ad.read_h5ad(d / "paul15_tradeseq/paul15_tradeseq.h5ad"))
    if name == "ginhoux":
        return _upper_symbols(ad.read_h5ad(d / "ginhoux_dc/ginhoux_dc.h5ad"))
    if name == "pbmc68k_to_mudan":
        from sclens.datasets import pbmc68k

        train = pbmc68k()
        train.obs = pd.DataFrame({"source": "pbmc68k", "label": train.obs["cell_type"].astype(str)}, index=train.obs_names)
        test = ad.read_h5ad(d / "mudan_pbmc/referenceCounts_sorted.h5ad")
        test.obs = pd.DataFrame({"source": "mudan_sorted", "label": test.obs["sorted_population"].astype(str)},
                                index=test.obs_names)
        return ad.concat([train, test], join="inner", index_unique="-")
    if name == "synthetic":
        from sclens.datasets import simulate_hematopoiesis

        return simulate_hematopoiesis(n_donors=16, cells_per_donor=150, seed=0, donor_seed=11)
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("campaigns", nargs="+", choices=sorted(CAMPAIGNS))
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench")
    ap.add_argument("--scvi-epochs", type=int, default=50)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--suffix", default="", help="appended to the report names (e.g. _controls for a methods subset)")
    ap.add_argument("--operator", default=None,
                    help="the extracted methods' operator: 'drift' (the endpoint file's default) or L<layer>H<head>")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint folder behind the extracted methods (default: the embedded default model)")
    args = ap.parse_args()
    for name in args.campaigns:
        cfg = read_bench_config(HERE / "campaigns" / CAMPAIGNS[name], scvi_epochs=args.scvi_epochs,
                                methods=args.methods.split(",") if args.methods else None,
                                **({"operator": args.operator} if args.operator else {}))
        cfg.notes = list(cfg.notes) + [f"scVI trained for {cfg.scvi_epochs} epochs (CPU budget; scvi-tools' own rule "
                                       "would give up to 400)."]
        adata = load(name, args.shared)
        t0 = time.perf_counter()
        if args.model is not None:
            cfg.notes = list(cfg.notes) + [f"Model: {args.model.name} (checkpoint folder passed with --model)."]
        res = run_campaign(adata, cfg, model=args.model, name=name + args.suffix)
        paths = res.save(args.out)
        print(summary_markdown(res))
        print(f"{name}: {time.perf_counter() - t0:.0f} s; skipped {res.skipped}; runtime {res.info['runtime_ratio']}")
        print(paths)


if __name__ == "__main__":
    main()
