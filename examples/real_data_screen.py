"""Screen the embedded default model on the REAL offline data sets (not shipped; reads ../shared/data).

    python examples/real_data_screen.py [--shared ../shared] [--out benchmarks/results/real_screen]

Data sets and their developmental ruler:
  paul15   mouse myeloid progenitors (MPP -> GMP -> monocyte / neutrophil / basophil, MPP -> MEP -> erythroid /
           megakaryocyte); mouse symbols upper-cased to human; one source -> 5 pseudo-replicate anchors per type
  ginhoux  mouse DC progenitors MDP -> CDP -> pre-DC (log2 expression); one source -> 5 pseudo-replicates
  pbmc68k  scanpy's PBMCs incl. 13 CD34+ cells; one donor -> 2 pseudo-replicates
  kang2018 8 real donors of control PBMCs (mature types only; hop distances run through progenitor stages)

Caveats printed into the summary: the default model was pretrained (without labels) on paul15 and pbmc68k
cells, so those two are not independent of the model; single-source sets have one donor, so the donor
holdout gate cannot be evaluated and fails by rule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, shared: Path):
    from sclens.datasets import pbmc68k

    d = shared / "data"
    if name == "paul15":
        a = ad.read_h5ad(d / "paul15_tradeseq/paul15_tradeseq.h5ad")
        a.var_names = [g.upper() for g in a.var_names]
        return a, dict(label_key="cell_type", replicates=5), "pretraining data of the default model (unlabelled)"
    if name == "ginhoux":
        a = ad.read_h5ad(d / "ginhoux_dc/ginhoux_dc.h5ad")
        a.var_names = [g.upper() for g in a.var_names]
        a = a[:, ~a.var_names.duplicated()].copy()
        return a, dict(label_key="group_name", replicates=5), "independent of pretraining; log2 expression, Smart-seq"
    if name == "pbmc68k":
        return pbmc68k(), dict(label_key="cell_type", replicates=2), "pretraining data of the default model (unlabelled)"
    if name == "kang2018":
        a = ad.read_h5ad(d / "kang2018_pbmc/kang2018_ctrl_8donors.h5ad")
        return a, dict(label_key="cell_type", donor_key="donor"), "independent of pretraining; 8 real donors"
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/real_screen"))
    ap.add_argument("--datasets", default="paul15,ginhoux,pbmc68k,kang2018")
    ap.add_argument("--fitters", default="isomap,gmds,let")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--random-control", type=int, default=3, help="random-weights copies for the learned gate")
    args = ap.parse_args()
    from sclens.anchors import build_anchors
    from sclens.data import harmonize_gene_ids, select_panel
    from sclens.models import load_default_model
    from sclens.operators import export_operators, export_random_controls
    from sclens.screen import screen

    model = load_default_model()
    out = Path(args.out)
    summary = {}
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        a, kw, note = load(name, Path(args.shared))
        a = harmonize_gene_ids(a)
        keep = np.isin(a.var_names, model.vocab.genes)
        panel = select_panel(a, model.vocab.genes, n_genes=1200)
        banks = export_operators(model, a, panel, n_ref_cells=64, progress=False)
        controls = export_random_controls(model, a, panel, n_copies=args.random_control, n_ref_cells=64, progress=False)
        anchors = build_anchors(a, panel, **kw)
        rep = screen(banks, anchors, fitters=args.fitters.split(","), n_jobs=args.n_jobs,
                     cache_dir=out / name / "cache", progress=False, controls=controls)
        rep.save(out / name, anchors, banks)
        cols = ["featurisation", "layer", "head", "fitter", "trustworthiness", "ruler_spearman", "ruler_spearman_resid",
                "holdout_random", "holdout_donor", "holdout_branch", "perm_p", "q", "passes_gates", "null_passes",
                "passes_published", "learned_metric", "learned_value", "raw_value", "random_quantile_value",
                "margin_over_raw", "margin_over_random", "gate_learned", "passes_all"]
        best_unit = rep.table[rep.table["featurisation"].isin(["attn", "qk", "ov"])].iloc[0]
        raw = rep.table[rep.table["featurisation"] == "raw"].sort_values("ruler_spearman_resid", ascending=False).iloc[0]
        clean = lambda r: {c: (None if isinstance(r[c], float) and not np.isfinite(r[c]) else
                               (r[c].item() if hasattr(r[c], "item") else r[c])) for c in cols}
        summary[name] = {
            "note": note, "cells": a.n_obs, "genes_in_vocab": int(keep.sum()), "panel": len(panel),
            "anchors": len(anchors), "stages": anchors.info["n_stages"], "branches": anchors.info["n_branches"],
            "donors": anchors.info["n_donors"], "pseudo_replicates": anchors.info["pseudo_replicates"],
            "unmapped": anchors.info["unmapped"], "hypotheses": len(rep.table),
            "passing": int(rep.table["passes_all"].sum()),
            "passing_published": int(rep.table["passes_published"].sum()),
            "passing_learned": int(rep.table["gate_learned"].fillna(False).astype(bool).sum()),
            "random_weights_copies": args.random_control, "failed": rep.info["n_failed"],
            "best_margin_over_random": clean(rep.table[rep.table["featurisation"] != "raw"]
                                             .sort_values("margin_over_random", ascending=False).iloc[0]),
            "top": clean(rep.top), "best_unit": clean(best_unit),
            "best_raw": clean(raw), "seconds": time.perf_counter() - t0, "gates_sha256": rep.gates_sha256,
        }
        print(name, json.dumps(summary[name], indent=1, default=str), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
