"""Wall time of the full unit screen (every unit x attn/qk/ov x isomap/gmds/let, + drift + raw) on 2 cores.

Cases:
  default   the embedded default model (6 x 8 = 48 units), SYNTHETIC hematopoiesis, panel 1,200 genes
  human     a whole-human-sized random scGPT (12 x 8 = 96 units, d 512), ~600 anchors, panel 1,200 genes

    python benchmarks/screen_walltime.py --case default [--kinds attn,qk,ov] [--n-jobs 2]
    python benchmarks/screen_walltime.py --case human --tag _full                 # issue 19: < 600 s
    python benchmarks/screen_walltime.py --case human --controls 3 --tag _full_controls3   # < 1,800 s

Writes benchmarks/results/screen_walltime_<case><tag>.json with the wall time of each phase (data, export of the
model's operators, export of the random-weights copies' operators, anchors, screen), ``total_seconds`` (their
sum: everything a user waits for), the mean seconds per hypothesis for each fitter (both rulers, one core), where
the staged engine stopped each hypothesis and what its batched permutation tests cost. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["default", "human"], required=True)
    ap.add_argument("--kinds", default="attn,qk,ov")
    ap.add_argument("--fitters", default="isomap,gmds,let")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--n-genes", type=int, default=1200)
    ap.add_argument("--n-ref-cells", type=int, default=64)
    ap.add_argument("--max-units", type=int, default=None,
                    help="Screen only the first N units (to measure per-hypothesis cost of slow fitters).")
    ap.add_argument("--tag", default="", help="Suffix of the result file name.")
    ap.add_argument("--exact", action="store_true", help="the earlier evaluation path (screen(exact=True))")
    ap.add_argument("--controls", type=int, default=0, help="random-weights copies screened beside the model")
    ap.add_argument("--note", default="", help="how the machine was shared during the run, if it was")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from sclens.anchors import build_anchors
    from sclens.data import select_panel
    from sclens.datasets import simulate_hematopoiesis
    from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig, load_default_model
    from sclens.operators import export_operators, export_random_controls
    from sclens.screen import screen

    phases = {}
    t = time.perf_counter()
    if args.case == "default":
        model = load_default_model()
        sim = simulate_hematopoiesis(12, 600, seed=0, vocabulary=model.vocab.genes)
    else:
        sim = simulate_hematopoiesis(24, 1000, seed=0)
        torch.manual_seed(0)
        vocab = GeneVocab.from_genes(list(sim.var_names) + [f"FILLER{i}" for i in range(60694 - sim.n_vars)])
        model = HookedScGPT(ScGPTConfig(embsize=512, nheads=8, d_hid=512, nlayers=12, dropout=0.0), vocab).eval()
    panel = select_panel(sim, model.vocab.genes, n_genes=args.n_genes)
    phases["data_and_panel_s"] = time.perf_counter() - t
    t = time.perf_counter()
    banks = export_operators(model, sim, panel, args.kinds.split(","), n_ref_cells=args.n_ref_cells, progress=False)
    phases["export_operators_s"] = time.perf_counter() - t
    t = time.perf_counter()
    controls = (export_random_controls(model, sim, panel, args.kinds.split(","), n_copies=args.controls,
                                       n_ref_cells=args.n_ref_cells, progress=False) if args.controls else None)
    phases["export_random_controls_s"] = time.perf_counter() - t
    t = time.perf_counter()
    anchors = build_anchors(sim, panel, label_key="cell_type", donor_key="donor", tissue_key="tissue")
    phases["anchors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    units = None
    if args.max_units:
        units = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)][: args.max_units]
    rep = screen(banks, anchors, fitters=args.fitters.split(","), n_jobs=args.n_jobs, progress=True, units=units,
                 include_drift=units is None, include_raw=units is None, exact=args.exact, controls=controls)
    phases["screen_s"] = time.perf_counter() - t
    per_fitter = rep.table.groupby("fitter")["seconds"].agg(["mean", "sum", "count"]).to_dict(orient="index")
    result = {
        "case": args.case, "synthetic": True, "units": model.n_layers * model.n_heads, "kinds": args.kinds.split(","),
        "fitters": args.fitters.split(","), "panel_genes": len(panel), "anchors": len(anchors),
        "n_hypotheses": len(rep.table), "n_jobs": args.n_jobs, "phases": phases, "max_units": args.max_units,
        "exact": args.exact, "random_weights_copies": args.controls,
        "n_control_rows": 0 if rep.controls is None else len(rep.controls),
        "total_seconds": sum(phases.values()), "screen_seconds": phases["screen_s"],
        "seconds_per_hypothesis_by_fitter (both rulers, one core)": per_fitter,
        "engine": rep.info.get("engine"), "stopped_at": rep.info.get("stopped_at"),
        "null_evaluated": int((rep.table.get("null_stopped_at", "") != "not evaluated").sum()),
        "permutation_tests": rep.info.get("permutation_tests"),
        "n_cpus": os.cpu_count(), "machine_note": args.note or "alone on the machine",
        "versions": rep.info.get("versions"),
        "n_passing": int(rep.table["passes_all"].sum()),
        "top": rep.table.head(3)[["featurisation", "layer", "head", "fitter", "ruler_spearman_resid",
                                  "passes_all"]].to_dict(orient="records"),
    }
    (HERE / "results").mkdir(exist_ok=True)
    rep.save(HERE / "results" / f"screen_{args.case}{args.tag}", anchors, banks)  # full table + figures
    (HERE / "results" / f"screen_walltime_{args.case}{args.tag}.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
