"""Campaign ratio: frozen model + MLP probe versus the extracted method, on Kang 2018, in one run (issue 18).

    python benchmarks/campaign_ratio.py [--shared ../shared] [--out benchmarks/results] [--human-sample 128]

Both routes run the Kang 2018 campaign (8 donors, leave-one-donor-out, ``benchmarks/campaigns/kang2018_donor_holdout
.toml``) end to end with their one-time costs included:

* frozen route  = embed every cell once with the foundation model (mean-pooled) + per split a 3-layer MLP probe
  per endpoint (the bench's ``mlp_probe``);
* extracted route = export the ov operators once from 128 label-free cells + per split the adaptor, the
  extracted readouts and the shared readouts (the bench's ``sclens_extracted``).

Two models:

``default``      the embedded default model (6 x 8 heads, d 128). Both routes are run in full;
                 ``ratio_default`` = frozen total / extracted total.
``whole_human``  a whole-human-sized scGPT architecture (12 x 8 heads, d 512, d_hid 512, 60,697 tokens, ~51 M
                 parameters) with RANDOM weights (timing only: its scores mean nothing). The extracted route is run
                 in full. The frozen route's forward pass over all cells would take ~1.7 h on 2 cores, so it is
                 measured on a seeded sample of ``--human-sample`` cells and scaled linearly to every cell (the
                 forward pass costs the same per cell; tokenisation is included); its MLP fits are taken from the
                 default run (128-d inputs: a lower bound for 512-d ones). ``ratio_whole_human`` = that frozen
                 total / the measured extracted total.

Writes ``campaign_ratio.{json,md}``. Run it alone on the machine: it is a timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "campaigns" / "kang2018_donor_holdout.toml"
KANG = "data/kang2018_pbmc/kang2018_ctrl_8donors.h5ad"


def whole_human_model(genes, seed: int = 0):
    """A random-weights scGPT of whole-human size whose vocabulary holds ``genes`` (padded with fillers)."""
    import torch

    from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig

    torch.manual_seed(seed)
    genes = list(dict.fromkeys(map(str, genes)))
    vocab = GeneVocab.from_genes(genes + [f"FILLER{i}" for i in range(max(0, 60694 - len(genes)))])
    return HookedScGPT(ScGPTConfig(embsize=512, nheads=8, d_hid=512, nlayers=12, dropout=0.0), vocab).eval()


def totals(res) -> dict:
    """Seconds per method: one-time (prepare), per split (fit + embed + readouts) and total."""
    rt = res.runtime
    out = {}
    for m, g in rt.groupby("method"):
        once = float(g.loc[g.split < 0, "seconds"].sum())
        per = g[g.split >= 0].groupby("split")["seconds"].sum()
        out[m] = {"one_time_s": once, "per_split_s": float(per.mean()), "n_splits": int(len(per)),
                  "total_s": float(g["seconds"].sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--human-sample", type=int, default=128, help="cells whose forward pass times the whole-human "
                                                                  "frozen route (scaled to every cell)")
    args = ap.parse_args()
    import torch

    from sclens import __version__
    from sclens.bench import run_campaign
    from sclens.evaluation import campaign_inputs, read_bench_config
    from sclens.models import embed_cells, load_default_model
    from sclens.utils import atomic_write, write_json

    torch.set_num_threads(2)
    t_run = time.perf_counter()
    adata = ad.read_h5ad(args.shared / KANG)
    cfg = read_bench_config(CONFIG, methods=["sclens_extracted", "mlp_probe"])
    default = load_default_model()
    print("default model: both routes in full ...", flush=True)
    res_d = run_campaign(adata, cfg, model=default, name="ratio_default", progress=True)
    t_d = totals(res_d)
    ratio_default = t_d["mlp_probe"]["total_s"] / t_d["sclens_extracted"]["total_s"]

    print("whole-human-sized random model: extracted route in full ...", flush=True)
    var_key = cfg.var_key
    genes = adata.var[var_key] if var_key else adata.var_names
    human = whole_human_model(genes, seed=cfg.seed)
    cfg_h = read_bench_config(CONFIG, methods=["sclens_extracted"])
    res_h = run_campaign(adata, cfg_h, model=human, name="ratio_whole_human", progress=True)
    t_h = totals(res_h)["sclens_extracted"]

    print(f"whole-human-sized random model: frozen forward pass on {args.human_sample} cells ...", flush=True)
    ci = campaign_inputs(adata, cfg_h, human)
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(ci.adata.n_obs, size=min(args.human_sample, ci.adata.n_obs), replace=False))
    sample = ad.AnnData(ci.adata.X[idx], var=ci.adata.var[[]].copy())
    t0 = time.perf_counter()
    embed_cells(sample, human, pooling="avg", progress=False, seed=cfg.seed, copy=True)
    t_sample = time.perf_counter() - t0
    n_cells = int(ci.adata.n_obs)
    forward_all = t_sample / len(idx) * n_cells
    mlp_fits = t_d["mlp_probe"]["total_s"] - t_d["mlp_probe"]["one_time_s"]
    frozen_human = forward_all + mlp_fits
    ratio_human = frozen_human / t_h["total_s"]

    result = {
        "ratio_default": ratio_default, "ratio_whole_human": ratio_human,
        "default": {"n_parameters": default.n_parameters(), "seconds": t_d,
                    "frozen_total_s": t_d["mlp_probe"]["total_s"], "extracted_total_s": t_d["sclens_extracted"]["total_s"]},
        "whole_human": {"n_parameters": human.n_parameters(), "random_weights": True,
                        "extracted_seconds": t_h, "extracted_total_s": t_h["total_s"],
                        "frozen_forward_sample_cells": int(len(idx)), "frozen_forward_sample_s": t_sample,
                        "frozen_forward_cells_per_s": len(idx) / t_sample, "frozen_forward_all_s_scaled": forward_all,
                        "frozen_mlp_fits_s_from_default": mlp_fits, "frozen_total_s": frozen_human},
        "n_cells": n_cells, "n_splits": len(ci.splits), "campaign": str(CONFIG.name),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__, "sclens": __version__, "seed": cfg.seed,
        "wall_s": time.perf_counter() - t_run,
        "note": ("timings on one machine in one run; whole-human weights are random (timing only); its frozen forward "
                 "pass is scaled from a seeded sample, its MLP fits taken from the default run (128-d: a lower bound)"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "campaign_ratio.json", result)
    d, h = result["default"], result["whole_human"]
    lines = [
        f"# Campaign ratio on Kang 2018 ({n_cells:,} cells, {len(ci.splits)} leave-one-donor-out splits, "
        f"{result['threads']} threads)", "",
        "| model | parameters | frozen + MLP probe (s) | extracted (s) | ratio |", "|---|---|---|---|---|",
        f"| default (6 x 8, d 128) | {d['n_parameters']:,} | {d['frozen_total_s']:.0f} "
        f"(forward {t_d['mlp_probe']['one_time_s']:.0f} + {t_d['mlp_probe']['per_split_s']:.1f}/split) | "
        f"{d['extracted_total_s']:.0f} (export {t_d['sclens_extracted']['one_time_s']:.0f} + "
        f"{t_d['sclens_extracted']['per_split_s']:.1f}/split) | **{ratio_default:.1f}x** |",
        f"| whole-human size, random weights (12 x 8, d 512) | {h['n_parameters']:,} | {frozen_human:.0f} "
        f"(forward {forward_all:.0f}, scaled from {len(idx)} cells at {h['frozen_forward_cells_per_s']:.2f} cells/s; "
        f"MLP fits {mlp_fits:.0f} from the default run) | {t_h['total_s']:.0f} (export {t_h['one_time_s']:.0f} + "
        f"{t_h['per_split_s']:.1f}/split) | **{ratio_human:.1f}x** |", "",
        result["note"] + ".",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "campaign_ratio.md", lambda p: Path(p).write_text(text))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
