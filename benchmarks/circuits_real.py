"""Circuits on REAL data (issue 8): transcoders, interpretability, traced decisions, and the SAE atlas.

    python benchmarks/circuits_real.py [--shared ../shared] [--out benchmarks/results/circuits]

1. The embedded cell-sentence model (trained by scripts/build_default_c2s.py on the 10x FACS-sorted PBMC
   populations) gets a TopK transcoder on each of its 4 MLP layers, trained on the model's own training cells;
   the evaluation cells are the model's held-out cells (the same stratified 80/20 split, seed 0). Reported:
   L0, FVU, dead features, losses clean vs transcoders spliced in vs MLPs zero-ablated; the gene-level
   interpretable fraction of 20 random live features; the traced "monocytes" and "nk" decisions.
2. The SAE atlas of the embedded scGPT-architecture model: one TopK SAE per residual layer on the same cells
   (gene positions of the official embed_data tokenisation, 256 tokens per cell).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "circuits")
    ap.add_argument("--skip-sae", action="store_true")
    ap.add_argument("--sae-random-control", type=int, default=1,
                    help="also build the atlas of this many random-weights copies of the model (the control every "
                         "learning claim needs; 0: skip)")
    ap.add_argument("--skip-transcoders", action="store_true",
                    help="only the SAE atlas (e.g. after the scGPT default changed; the cell-sentence model did not)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from sclens.circuits.pipeline import run_circuits
    from sclens.circuits.sae import train_sae_atlas
    from sclens.circuits.transcoders import TranscoderConfig

    adata = ad.read_h5ad(args.shared / "data" / "mudan_pbmc" / "referenceCounts_sorted.h5ad")
    if not args.skip_transcoders:
        t0 = time.perf_counter()
        res = run_circuits(adata, "sorted_population", config=TranscoderConfig(seed=0),
                           decisions=("monocytes", "nk"), seed=0)
        paths = res.save(args.out)
        print(paths["report_md"].read_text())
        print(f"circuits: {time.perf_counter() - t0:.0f} s")
    if not args.skip_sae:
        sae_config = TranscoderConfig(kind="topk", expansion=4, k=16, epochs=4, max_tokens=100_000)
        t0 = time.perf_counter()
        atlas = train_sae_atlas(adata, "sorted_population", config=sae_config)
        apaths = atlas.save(args.out)
        _write_summary(atlas, args.out / "sae_atlas_summary.txt", f"SAE atlas: {time.perf_counter() - t0:.0f} s")
        print(f"SAE atlas: {time.perf_counter() - t0:.0f} s -> {apaths['html']}")
        from sclens.circuits.sae import atlas_html
        from sclens.models import load_default_model
        from sclens.models.controls import randomize
        from sclens.utils import atomic_write

        for seed in range(args.sae_random_control):
            t0 = time.perf_counter()
            ctl = train_sae_atlas(adata, "sorted_population", model=randomize(load_default_model(), seed),
                                  config=sae_config)
            page = atlas_html(ctl)  # the page only: the control's weights are not kept
            atomic_write(args.out / f"sae_atlas_random_weights{seed}.html", lambda p: Path(p).write_text(page))
            _write_summary(ctl, args.out / f"sae_atlas_random_weights{seed}_summary.txt",
                           f"SAE atlas of a random-weights copy of the default model (randomize seed {seed}): "
                           f"{time.perf_counter() - t0:.0f} s")


def _write_summary(atlas, path: Path, title: str) -> None:
    """The per-layer table (with which gene list made each call) and the five best features per layer."""
    lines = [title, atlas.summary().to_string(index=False)]
    for l, t in atlas.tables.items():
        good = t[t.interpretable].sort_values("q").head(5)
        for r in good.itertuples():
            lines.append(f"L{l} F{r.feature}: {r.label} (q={r.q:.2g}, from {r.label_from}: {r.overlap}) "
                         f"top genes {', '.join(r.top_genes[:8])} | top cell type {r.top_cell_type}")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
