"""Forward throughput (cells/s) and peak memory of scGPT-architecture models, on CPU or a CUDA GPU.

Cases (each in its own process so peak RSS is that case's own):
  default-fused      embedded default model, 1,200 panel tokens/cell, no hooks (fused attention kernel)
  default-hooked     same, caching every layer's attention pattern (averaged over cells: reduce="sum")
  human-fused        whole-human-sized random model (12 layers x 8 heads, d 512, d_hid 512, 60,697 tokens)
  human-hooked       same, caching every layer's attention pattern

    python benchmarks/forward_throughput.py [--cells 32] [--threads 2] [--device cpu|cuda]

Writes benchmarks/results/forward_throughput.json and .md. Rows are kept per (case, device): a GPU run adds its
rows beside the CPU ones (peak memory is then the GPU's peak allocation) instead of replacing them.
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


def run_case(case: str, n_cells: int, threads: int, batch_size: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
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
    model = model.to(device)
    # realistic sparsity: ~25 % of panel genes non-zero, NB-like counts
    X = rng.negative_binomial(1, 0.3, size=(n_cells, len(genes))) * (rng.random((n_cells, len(genes))) < 0.25)
    X[:, 0] += 1
    batch = Tokenizer.for_model(model, genes, mode="all").encode(X.astype(np.float32), rng=0)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)] if case.endswith("hooked") else None
    warm = batch[:batch_size]
    with torch.no_grad():
        model.forward_batch(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if names:
        model.run_with_cache(batch, names, batch_size=batch_size, reduce="sum", progress=False)
    else:
        with torch.no_grad():
            for s in range(0, len(batch), batch_size):
                model.forward_batch(batch[s : s + batch_size])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"case": case, "device": device, "gpu": torch.cuda.get_device_name() if cuda else None, "cells": n_cells,
            "tokens_per_cell": int(batch.gene_ids.shape[1]), "threads": threads,
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU run adds rows beside the CPU rows)")
    args = ap.parse_args()
    if args.case:
        n = args.human_cells if args.case.startswith("human") else args.cells
        print(json.dumps(run_case(args.case, n, args.threads, args.batch_size, args.device)))
        return
    results = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--cells", str(args.cells), "--human-cells",
               str(args.human_cells), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"{case:15s} {r['cells_per_s']:8.2f} cells/s  peak {r['peak_rss_mb']:7.0f} MB", flush=True)
    import platform

    import torch

    path = HERE / "results" / "forward_throughput.json"
    old = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "results": []}
    kept = [r for r in old["results"] if r.get("device", "cpu") != args.device]
    meta = dict(old.get("meta", {}))
    if "machine" in meta:  # a file written before GPU rows existed: its meta is the CPU run's
        meta = {"cpu": meta}
    meta[args.device] = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                         "threads": args.threads, "note": "1,200 panel tokens (+<cls>) per cell; times exclude "
                                                          "tokenisation; peak memory: RSS on CPU, allocated on GPU"}
    results = kept + results
    (HERE / "results").mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| case | device | params | layers x heads, d | tokens/cell | cells/s | peak memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r.get('gpu') or r.get('device', 'cpu')} | {r['parameters']:,} | {r['layers']} x "
                     f"{r['heads']}, {r['d_model']} | {r['tokens_per_cell']} | {r['cells_per_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    (HERE / "results" / "forward_throughput.md").write_text(
        f"# Forward throughput (CPU: {args.threads} threads; torch {torch.__version__})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
