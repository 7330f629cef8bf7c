"""Zero-shot transfer of extracted heads between REAL PBMC sources (reads ../shared/data; nothing is shipped).

    python examples/real_transfer.py [--shared ../shared] [--out benchmarks/results/real_transfer]

Pairings (fit on one source, validate the frozen file on another):
  A  Kang 2018 control PBMCs, 8 donors (independent of the default model's pretraining)
       -> 10x FACS-sorted PBMC populations (MUDAN; ground-truth sort gates incl. CD4 / CD8)
  B  10x FACS-sorted PBMC populations (one donor)
       -> scanpy's PBMC set (pbmc68k_reduced with counts rebuilt; part of the default model's pretraining data)

For each pairing the panel is chosen on the training source among genes that the model and BOTH sources
have (so the transfer is not crippled by missing genes); operators of the embedded default model are exported
on the training source. Heads: the top operator hypothesis of the training source's own screen (recomputed
on this panel with Isomap and geodesic MDS, gates as shipped) and the unit ov L0H0 as a fixed reference.
Each head is extracted (cell-trained adaptor, seed 0), written to a file, reloaded and validated on the
target with `validate_transfer` (single-donor targets use pseudo-replicate anchors; the donor-blocked
permutation then has one block).
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
    from sclens.data import harmonize_gene_ids
    from sclens.datasets import pbmc68k

    d = shared / "data"
    if name == "kang2018":
        return harmonize_gene_ids(ad.read_h5ad(d / "kang2018_pbmc/kang2018_ctrl_8donors.h5ad")), \
            dict(label_key="cell_type", donor_key="donor"), 1
    if name == "mudan_sorted":
        return ad.read_h5ad(d / "mudan_pbmc/referenceCounts_sorted.h5ad"), dict(label_key="sorted_population"), 3
    if name == "pbmc68k":
        return pbmc68k(), dict(label_key="cell_type"), 2
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/real_transfer"))
    ap.add_argument("--pairs", default="kang2018:mudan_sorted,mudan_sorted:pbmc68k")
    args = ap.parse_args()
    from sclens.anchors import build_anchors
    from sclens.data import select_panel
    from sclens.extract import ExtractedModel, extract, select_operator, validate_transfer
    from sclens.models import load_default_model
    from sclens.operators import export_operators
    from sclens.screen import screen
    from sclens.utils import package_versions

    model = load_default_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"versions": package_versions(), "model_sha256": model.checkpoint_sha256, "pairs": {}}
    for pair in args.pairs.split(","):
        t0 = time.perf_counter()
        src_name, dst_name = pair.split(":")
        src, src_kw, src_rep = load(src_name, Path(args.shared))
        dst, dst_kw, dst_rep = load(dst_name, Path(args.shared))
        shared_genes = sorted(set(src.var_names) & set(dst.var_names) & set(model.vocab.genes))
        panel = select_panel(src[:, shared_genes].copy(), model.vocab.genes, n_genes=1200)
        banks = export_operators(model, src, panel, n_ref_cells=64, progress=False)
        anchors = build_anchors(src, panel, replicates=src_rep, **src_kw)
        rep = screen(banks, anchors, fitters=["isomap", "gmds"], n_jobs=2, progress=False,
                     cache_dir=out / f"{src_name}_screen_cache")
        rep.save(out / f"{src_name}_screen", anchors, banks)
        heads = {"screen_top": dict(report=rep), "ov_L0H0": dict(unit=(0, 0), kind="ov")}
        res = {"source": src_name, "target": dst_name, "n_shared_genes_in_vocab": len(shared_genes),
               "panel": len(panel), "source_cells": src.n_obs, "target_cells": dst.n_obs,
               "source_anchors": len(anchors), "screen_passing": int(rep.table["passes_all"].sum()), "heads": {}}
        for head, sel in heads.items():
            op = select_operator(banks, **sel)
            m = extract(src, op, tissue_key=None, seed=0, progress=False, **src_kw)
            path = m.save(out / f"{src_name}_{head}.safetensors")
            frozen = ExtractedModel.load(path)
            tr = validate_transfer(frozen, dst, replicates=dst_rep, seed=0, **dst_kw)
            res["heads"][head] = {"operator": op.describe(), "operator_source": op.source,
                                  "file_bytes": path.stat().st_size, "n_trainable": frozen.n_trainable()["total"],
                                  "metrics_at_extraction": frozen.manifest["metrics"], "transfer": tr.metrics}
            path.unlink()  # the files are reproducible from this script; keep the repository small
            print(f"{src_name} -> {dst_name} [{head}: {op.describe()}]\n{tr.summary()}", flush=True)
        res["seconds"] = time.perf_counter() - t0
        summary["pairs"][pair] = res
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    lines = ["| source -> target | head | anchors | trust | ruler Spearman (resid) | perm p | null Spearman | null p | "
             "passes | branch bal. acc (cells) | pseudotime-depth Spearman | CD4/CD8 AUROC |", "|---" * 12 + "|"]
    for pair, res in summary["pairs"].items():
        for head, h in res["heads"].items():
            t = h["transfer"]
            c = t.get("cells", {})
            lines.append(f"| {pair.replace(':', ' -> ')} | {h['operator']} | {t['n_anchors']} | {t['trustworthiness']:.3f} | "
                         f"{t['ruler_spearman']:.3f} ({t['ruler_spearman_resid']:.3f}) | {t['perm_p']:.2g} | "
                         f"{t['null_ruler_spearman']:.3f} | {t['null_perm_p']:.2g} | {t['passes']} | "
                         f"{c.get('branch_balanced_accuracy', float('nan')):.3f} | "
                         f"{c.get('pseudotime_depth_spearman', float('nan')):.3f} | {c.get('cd4_cd8_auroc', float('nan')):.3f} |")
    (out / "summary.md").write_text("# Zero-shot transfer on real PBMC sources (default model)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
