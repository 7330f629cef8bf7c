"""Build a compact Geneformer-architecture model on the same real cells as the scGPT default (issue 21).

    python scripts/build_default_geneformer.py [--shared ../shared] [--data all] [--steps 1500] [--threads 2]
        [--out /tmp/geneformer_default] [--probe]

Data: the sources of ``scripts/build_default_model.py`` (``--data first``: 8,955 cells; ``all``: ~22,000 cells; never
Kang 2018 or OneK1K). Recipe: ``sclens.models.pretrain_geneformer`` (corpus gene medians, official rank-value
sentences cut to their ``--train-len`` top-ranked genes, BERT masked-gene objective), 4 layers x 4 heads, d 128,
d_ff 256, input size 2,048 at inference. ``--probe`` then embeds Kang 2018 (8 donors never seen) by the EmbExtractor
rules and scores the embeddings as the learning probe does (kNN-15 and logistic balanced accuracy of cell types,
folds grouped by donor) against PCA-50 of log1p on the same genes and against a random-weights copy, written to
``kang_probe.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KANG = "data/kang2018_pbmc/kang2018_ctrl_8donors.h5ad"


def _builder():
    spec = importlib.util.spec_from_file_location("build_default_model", ROOT / "scripts" / "build_default_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kang_probe(model, shared: Path, n_cells: int = 2000, seed: int = 0) -> dict:
    """Embeddings of Kang 2018 cells vs PCA-50 of log1p (same genes) vs a random-weights copy."""
    import scanpy as sc

    from sclens.data import harmonize_gene_ids
    from sclens.models import embed_cells
    from sclens.models.controls import randomize
    from sclens.models.probe import embedding_scores, probe_folds

    a = harmonize_gene_ids(ad.read_h5ad(shared / KANG), var_key="gene_symbol")
    rng = np.random.default_rng(seed)
    a = a[np.sort(rng.choice(a.n_obs, size=min(n_cells, a.n_obs), replace=False))].copy()
    known = [g for g in a.var_names if g in model.vocab]
    y = a.obs["cell_type"].astype(str).to_numpy()
    folds, scheme = probe_folds(y, a.obs["donor"].astype(str).to_numpy(), seed)
    out = {"n_cells": int(a.n_obs), "n_genes_shared": len(known), "folds": scheme}
    for name, m in (("model", model), ("random_weights", randomize(model, seed=seed))):
        Z = embed_cells(a[:, known].copy(), m, copy=True, progress=False).obsm["X_geneformer"]
        out[name] = embedding_scores(Z, y, folds)
    b = a[:, known].copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.pca(b, n_comps=min(50, len(known) - 1), random_state=seed)
    out["pca50"] = embedding_scores(b.obsm["X_pca"], y, folds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=Path("/tmp/geneformer_default"))
    ap.add_argument("--data", choices=["first", "all"], default="all")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--probe", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from sclens.models.pretrain_geneformer import GeneformerPretrainConfig, pretrain_geneformer
    from sclens.utils import write_json

    torch.set_num_threads(args.threads)
    b = _builder()
    official = json.loads((args.shared / "data/scgpt_human_meta/vocab.json").read_text())
    datasets, prov = b.load_sources(args.shared, official)
    if args.data == "all":
        more, more_prov = b.load_extra(args.shared)
        datasets += more
        prov.update(more_prov)
    print(f"{sum(a.n_obs for a in datasets):,} cells from {len(datasets)} sources", flush=True)
    cfg = GeneformerPretrainConfig(n_layers=4, n_heads=4, d_model=128, d_hid=256, max_len=2048,
                                   train_len=args.train_len, steps=args.steps, batch_size=32, lr=1e-3,
                                   warmup_steps=100, eval_every=args.eval_every, eval_cells=256, seed=0,
                                   threads=args.threads)
    t0 = time.time()
    model, log = pretrain_geneformer(datasets, cfg, out_dir=args.out,
                                     extra_provenance={"sources": prov, "data": args.data,
                                                       "builder": "scripts/build_default_geneformer.py"})
    print(f"done in {time.time() - t0:.0f}s; {log['n_parameters']:,} parameters; held-out masked-gene CE "
          f"{log['eval'][0]['ce']:.3f} -> {log['final_eval']['ce']:.3f} (gene frequencies alone "
          f"{log['unigram_baseline_ce']:.3f}); accuracy {log['final_eval']['accuracy']:.3f}", flush=True)
    if args.probe:
        res = kang_probe(model, args.shared)
        write_json(args.out / "kang_probe.json", res)
        print(json.dumps({k: (v if not isinstance(v, dict) else {kk: round(vv, 3) if isinstance(vv, float) else vv
                                                                   for kk, vv in v.items()}) for k, v in res.items()},
                         indent=1))


if __name__ == "__main__":
    main()
