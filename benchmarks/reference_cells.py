"""How many reference cells the extracted method's operator export needs (issue 18), on Kang 2018.

    python benchmarks/reference_cells.py [--shared ../shared] [--out benchmarks/results] [--counts 32,64,128,256]

The ov operators are built from each panel gene's mean residual over ``n_ref_cells`` label-free cells; the export's
forward pass over them is the extracted route's one-time cost (most of it on a whole-human-sized model). For each
count the Kang 2018 leave-one-donor-out campaign (8 splits, the default model's drift operator, the ruler adaptor,
the shared readouts) is run with the extracted method only, and every endpoint-metric and both manifold diagnostics
are compared with the 128-cell export (the earlier default) by a paired two-sided Wilcoxon test across splits, BH
over the whole table. Writes ``reference_cells.{json,md}`` with the export seconds of each count (run it alone).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import anndata as ad
import pandas as pd

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "campaigns" / "kang2018_donor_holdout.toml"
KANG = "data/kang2018_pbmc/kang2018_ctrl_8donors.h5ad"
BASE = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--counts", default="32,64,128,256")
    args = ap.parse_args()
    import torch

    from sclens import __version__
    from sclens.bench import read_bench_config, run_campaign
    from sclens.stats import bh_qvalues, paired_wilcoxon
    from sclens.models import load_default_model
    from sclens.utils import atomic_write, write_json

    counts = sorted({int(c) for c in args.counts.split(",")} | {BASE})
    torch.set_num_threads(2)
    adata = ad.read_h5ad(args.shared / KANG)
    model = load_default_model()
    values, export_s = {}, {}
    for n in counts:
        cfg = read_bench_config(CONFIG, methods=["sclens_extracted"], n_ref_cells=n)
        print(f"{n} reference cells ...", flush=True)
        res = run_campaign(adata, cfg, model=model, name=f"reference_cells_{n}", progress=False)
        s, rt = res.scores, res.runtime
        values[n] = s[s.method == "sclens_extracted"].set_index(["split", "endpoint", "metric"])["value"]
        export_s[n] = float(rt.loc[(rt.method == "sclens_extracted") & (rt.split < 0), "seconds"].sum())
    df = pd.DataFrame(values)
    rows = []
    for (ep, metric), sub in df.groupby(level=["endpoint", "metric"]):
        for n in counts:
            row = {"endpoint": ep, "metric": metric, "n_ref_cells": n, "mean": float(sub[n].mean())}
            if n != BASE:
                w = paired_wilcoxon(sub[n].values, sub[BASE].values)
                row.update(diff_vs_128=w["mean_diff"], wins=w["wins"], losses=w["losses"], p=w["p"])
            rows.append(row)
    table = pd.DataFrame(rows)
    tested = table["p"].notna()
    table.loc[tested, "q"] = bh_qvalues(table.loc[tested, "p"].values)
    result = {"campaign": CONFIG.name, "model": "embedded default", "base": BASE, "export_seconds": export_s,
              "table": table.to_dict(orient="records"), "threads": torch.get_num_threads(),
              "machine": platform.machine(), "torch": torch.__version__, "sclens": __version__}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "reference_cells.json", result)
    lines = [f"# Reference cells of the operator export (Kang 2018, 8 leave-one-donor-out splits, default model, "
             f"{result['threads']} threads)", "",
             "| endpoint | metric | " + " | ".join(f"{n} cells" for n in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for (ep, metric), g in table.groupby(["endpoint", "metric"], sort=False):
        cells = []
        for n in counts:
            r = g[g.n_ref_cells == n].iloc[0]
            cells.append(f"{r['mean']:.4f}" if n == BASE else f"{r['mean']:.4f} ({r['diff_vs_128']:+.4f}, q {r['q']:.2f})")
        lines.append(f"| {ep} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "export seconds (one-time): " + ", ".join(f"{n}: {export_s[n]:.1f}" for n in counts), "",
              "In brackets: mean paired difference against the 128-cell export and its BH q (paired Wilcoxon)."]
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "reference_cells.md", lambda p: Path(p).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
