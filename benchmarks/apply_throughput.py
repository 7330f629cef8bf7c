"""Apply throughput (cells/s) and peak memory of extracted algorithms vs the foundation-model forward pass.

Setup (all SYNTHETIC, seeded):
  * a 1,200-gene panel and the embedded default model's ``ov`` operators on a simulated cohort;
  * two artifacts over unit L0H0: the dense 1,200 x 1,200 head and its rank-64 truncated-SVD surrogate
    (each with its own cell-trained adaptor and readouts);
  * backed ``.h5ad`` files of N cells (CSR counts over ~1,330 genes, written chunk by chunk): rows resampled
    from the simulated cohort with binomial thinning (p = 0.85) so no two cells are identical.

Cases, each in its own process (peak RSS = that case's own):
  stream   read the backed file chunk by chunk (20,000 cells), normalise, apply, keep nothing (pure compute + I/O)
  file     ``sclens.extract.apply_file``: copy the input and write every output into the copy (the CLI path)
  explicit like ``stream`` but with the explicit chain x·A -> standardise -> encoder (no folding)
  (the input file is read once before the cases, so all start from a warm page cache)
  fm       the default foundation model's forward pass (CLS embedding, official tokenisation: non-zero genes
           up to 1,200 tokens) on the first ``--fm-cells`` cells of the same file

    python benchmarks/apply_throughput.py [--sizes 100000,300000,1000000] [--fm-cells 400] [--threads 2]

Writes benchmarks/results/apply_throughput.json and .md. Temporary data go to --workdir (deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0


def build_artifacts(work: Path) -> dict:
    from sclens.data import select_panel
    from sclens.datasets import simulate_hematopoiesis
    from sclens.extract import extract, select_operator
    from sclens.models import load_default_model
    from sclens.operators import export_operators

    model = load_default_model()
    cohort = simulate_hematopoiesis(n_donors=8, cells_per_donor=500, seed=SEED, n_background_genes=1200,
                                    median_library_size=2500, vocabulary=model.vocab.genes)
    panel = select_panel(cohort, model.vocab.genes, n_genes=1200)
    t = time.perf_counter()
    bank = export_operators(model, cohort, panel, kinds=["ov"], n_ref_cells=32, seed=SEED, progress=False)["ov"]
    export_s = time.perf_counter() - t
    out = {"n_panel_genes": len(panel), "n_genes_total": cohort.n_vars, "export_seconds": export_s}
    for name, rank in (("dense", None), ("rank64", 64)):
        op = select_operator(bank, unit=(0, 0), rank=rank)
        t = time.perf_counter()
        m = extract(cohort, op, label_key="cell_type", donor_key="donor", tissue_key="tissue", seed=SEED, progress=False,
                    n_perm=200)
        path = m.save(work / f"{name}.safetensors")
        out[name] = {"path": str(path), "bytes": path.stat().st_size, "operator_values": op.n_values,
                     "n_trainable": m.n_trainable()["total"], "extract_seconds": time.perf_counter() - t}
    cohort.write_h5ad(work / "template.h5ad")
    return out


def write_cells(template: Path, n: int, path: Path, chunk: int = 50_000) -> float:
    """A backed-readable .h5ad with n cells written chunk by chunk (CSR float32 counts)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    t0 = time.perf_counter()
    tpl = ad.read_h5ad(template)
    T = sp.csr_matrix(tpl.X, dtype=np.float32)
    rng = np.random.default_rng(SEED)
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, T.shape[1])})
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        nnz = 0
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            block = T[rng.integers(0, T.shape[0], m)]
            block.data = rng.binomial(block.data.astype(np.int64), 0.85).astype(np.float32)
            block.data[block.indptr[1:] - 1] += 1  # keep every cell non-empty
            block.eliminate_zeros()
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:] = block.data
            indices[nnz:] = block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + nnz)
            nnz += block.nnz
        g.create_dataset("indptr", data=np.concatenate(indptr))
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n)]))
        write_elem(f, "var", pd.DataFrame(index=tpl.var_names.astype(str)))
        for key in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            write_elem(f, key, {})
    return time.perf_counter() - t0


def worker(case: str, artifact: str, data: str, out: str, fm_cells: int, threads: int) -> dict:
    from sclens.extract import store as _store
    from sclens.extract import ExtractedModel, apply_file, head_value_kind, panel_index

    t0 = time.perf_counter()
    if case == "fm":
        import anndata as ad
        import torch

        torch.set_num_threads(threads)
        from sclens.models import load_default_model
        from sclens.models.api import embed_cells

        a = ad.read_h5ad(data, backed="r")[:fm_cells].to_memory()
        model = load_default_model()
        t0 = time.perf_counter()
        embed_cells(a, model, batch_size=16, seed=SEED)
        n = a.n_obs
    elif case == "file":
        rec = apply_file(ExtractedModel.load(artifact), data, out, chunk_size=20_000, progress=False)
        n = rec["n_cells"]
    else:
        model = ExtractedModel.load(artifact)
        src = _store.open_store(data)
        mat = _store.RowMatrix(src)
        idx = panel_index(model.panel, mat.var_names)
        kind = head_value_kind(mat.rows(0, 2000))
        n, checksum = 0, 0.0
        for _, X in mat.iter_chunks(20_000):
            P = model.predict_packed(model.panel.transform(X, idx, kind), fold=case != "explicit")
            n += len(P)
            checksum += float(P[:, 0].sum())
        _store.close_store(src)
    seconds = time.perf_counter() - t0
    return {"case": case, "n_cells": n, "seconds": seconds, "cells_per_second": n / seconds,
            "cells_per_minute": 60 * n / seconds, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM; ru_maxrss would include the parent's memory at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_page_cache(path: Path) -> None:
    """Read the file once so every case starts from the same (warm) page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def spawn(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    threads = str(args[-1])  # BLAS threads of numpy in the apply cases (torch sets its own in the fm case)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--fm-cells", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/sclens_apply_bench")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", nargs=6)
    args = ap.parse_args()
    if args.worker:
        case, artifact, data, out, fm_cells, threads = args.worker
        print(json.dumps(worker(case, artifact, data, out, int(fm_cells), int(threads))))
        return
    from sclens.utils import package_versions

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    t_all = time.perf_counter()
    setup = build_artifacts(work)
    print(json.dumps(setup, indent=1), flush=True)
    rows = []
    for n in sizes:
        data = work / f"cells_{n}.h5ad"
        gen_s = write_cells(work / "template.h5ad", n, data)
        print(f"wrote {n:,} cells in {gen_s:.0f} s ({data.stat().st_size / 1e9:.2f} GB)", flush=True)
        warm_page_cache(data)
        for art in ("dense", "rank64"):
            cases = ["stream", "file"] + (["explicit"] if n == sizes[0] else [])
            for case in cases:
                out = work / f"out_{n}_{art}.h5ad"
                r = spawn(case, setup[art]["path"], data, out, args.fm_cells, args.threads)
                r.update({"artifact": art, "n_requested": n, "input_gb": data.stat().st_size / 1e9})
                rows.append(r)
                print(f"{art:7s} {case:8s} n={n:>9,}  {r['cells_per_second']:>10,.0f} cells/s  "
                      f"{r['cells_per_minute'] / 1e6:6.2f} M cells/min  peak {r['peak_rss_mb']:7.0f} MB", flush=True)
                if out.exists():
                    out.unlink()
        if n == sizes[-1]:
            fm = spawn("fm", "-", data, "-", args.fm_cells, args.threads)
            fm.update({"artifact": "foundation model (default, CLS)", "n_requested": n})
            rows.append(fm)
            print(f"foundation model forward: {fm['cells_per_second']:.2f} cells/s on {fm['n_cells']} of the same cells "
                  f"(peak {fm['peak_rss_mb']:.0f} MB)", flush=True)
        data.unlink()
    fm = next(r for r in rows if r["case"] == "fm")
    for r in rows:
        r["speedup_vs_foundation_model"] = r["cells_per_second"] / fm["cells_per_second"]
    result = {"benchmark": "apply_throughput", "synthetic": True, "seed": SEED, "threads": args.threads,
              "cpu_count": os.cpu_count(), "versions": package_versions(), "setup": setup, "rows": rows,
              "goal": ">= 1e6 cells/min for rank-64 with memory flat in cell count",
              "wall_seconds": time.perf_counter() - t_all}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "apply_throughput.json").write_text(json.dumps(result, indent=1))
    lines = ["| artifact | case | cells | cells/s | M cells/min | peak RSS (MB) | x foundation model |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['case']} | {r['n_cells']:,} | {r['cells_per_second']:,.1f} | "
                     f"{r['cells_per_minute'] / 1e6:.3f} | {r['peak_rss_mb']:.0f} | {r['speedup_vs_foundation_model']:,.0f} |")
    (out_dir / "apply_throughput.md").write_text(
        f"# Apply throughput (SYNTHETIC cells, {args.threads} threads, {os.cpu_count()} cores)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
