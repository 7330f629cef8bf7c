"""Forward throughput (cells/s) and peak memory of scGPT-architecture models on CPU.

Cases (each in its own process so peak RSS is that case's own):
  default-fused      embedded default model, 1,200 panel tokens/cell, no hooks (fused attention kernel)
  default-hooked     same, caching every layer's attention pattern (averaged over cells: reduce="sum")
  human-fused        whole-human-sized random model (12 layers x 8 heads, d 512, d_hid 512, 60,697 tokens)
  human-hooked       same, caching every layer's attention pattern

    python benchmarks/forward_throughput.py [--cells 32] [--threads 2]

Writes benchmarks/results/forward_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ["default-fused", "default-hooked", "human-fused", "human-hooked"]


def run_case(case: str, n_cells: int, threads: int, batch_size: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig, Tokenizer, load_default_model

    rng = np.random.default_rng(0)
    if case.startswith("default"):
        model = load_default_model()
        genes = model.vocab.genes[:1200]
    else:
        torch.manual_seed(0)
        genes = [f"GENE{i}" for i in range(60694)]
        vocab = GeneVocab.from_genes(genes)
        model = HookedScGPT(ScGPTConfig(embsize=512, nheads=8, d_hid=512, nlayers=12, dropout=0.0), vocab).eval()
        genes = genes[:1200]
    # realistic sparsity: ~25 % of panel genes non-zero, NB-like counts
    X = rng.negative_binomial(1, 0.3, size=(n_cells, len(genes))) * (rng.random((n_cells, len(genes))) < 0.25)
    X[:, 0] += 1
    batch = Tokenizer.for_model(model, genes, mode="all").encode(X.astype(np.float32), rng=0)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)] if case.endswith("hooked") else None
    warm = batch[:batch_size]
    with torch.no_grad():
        model.forward_batch(warm)
    t0 = time.perf_counter()
    if names:
        model.run_with_cache(batch, names, batch_size=batch_size, reduce="sum", progress=False)
    else:
        with torch.no_grad():
            for s in range(0, len(batch), batch_size):
                model.forward_batch(batch[s : s + batch_size])
    dt = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": case, "cells": n_cells, "tokens_per_cell": int(batch.gene_ids.shape[1]), "threads": threads,
            "batch_size": batch_size, "seconds": dt, "cells_per_s": n_cells / dt, "peak_rss_mb": peak_mb,
            "parameters": model.n_parameters(), "layers": model.n_layers, "heads": model.n_heads,
            "d_model": model.config.embsize}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--cells", type=int, default=32)
    ap.add_argument("--human-cells", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if args.case:
        n = args.human_cells if args.case.startswith("human") else args.cells
        print(json.dumps(run_case(args.case, n, args.threads, args.batch_size)))
        return
    results = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--cells", str(args.cells), "--human-cells",
               str(args.human_cells), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"{case:15s} {r['cells_per_s']:8.2f} cells/s  peak {r['peak_rss_mb']:7.0f} MB", flush=True)
    import platform

    import torch

    meta = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "note": "CPU only; 1,200 panel tokens (+<cls>) per cell; times exclude tokenisation"}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "forward_throughput.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| case | params | layers x heads, d | tokens/cell | cells/s | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['parameters']:,} | {r['layers']} x {r['heads']}, {r['d_model']} | "
                     f"{r['tokens_per_cell']} | {r['cells_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    (HERE / "results" / "forward_throughput.md").write_text(
        f"# Forward throughput ({args.threads} threads, torch {torch.__version__})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
