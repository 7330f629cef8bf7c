"""The objective ablation of issue 17: learning probes of several pretrained candidates side by side.

    python scripts/build_default_model.py --data all --design DESIGN --steps 600 --eval-every 200 \\
        --threads 1 --out /tmp/abl/DESIGN --probe            # once per design
    python benchmarks/pretrain_ablation.py /tmp/abl/mvc /tmp/abl/contrastive ... [--datasets kang2018,onek1k]
        [--n-cells 2000] [--out benchmarks/results]
    python benchmarks/pretrain_ablation.py part1/pretrain_ablation.json part2/pretrain_ablation.json  # merge runs

Writes ``pretrain_ablation.json`` and ``pretrain_ablation.md``: per candidate its design, training budget
(steps, cells seen, seconds, threads; whether runs shared the machine is the caller's to say via ``--note``),
the last in-training probe on the Zheng 2017 sorted populations, and the test-set probes (kNN-15 and logistic
balanced accuracy of the best embedding against PCA-50 and the random-weights copy; masked-value MSE on
non-zero targets against the per-gene mean) with the issue-17 goals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from model_probe import probe_datasets  # noqa: E402


def candidate_row(path: Path, datasets: list[str], shared: Path, n_cells: int) -> dict:
    from sclens.models import load_scgpt

    log = json.loads((path / "training_log.json").read_text())
    cfg = log["config"]
    model = load_scgpt(path)
    last = log["final_eval"]
    return {
        "candidate": path.name, "path": str(path), "model_sha256": model.checkpoint_sha256,
        # builds made before --design / --data existed were the masked-value + MVC design on the first sources
        "design": log["provenance"].get("design", "mvc"), "data": log["provenance"].get("data", "first"),
        "vocab_size": log["vocab_size"],
        "steps": cfg["steps"], "batch_size": cfg["batch_size"], "cells_seen": cfg["steps"] * cfg["batch_size"],
        "n_training_cells": log["n_cells"], "train_seq_len": cfg["train_seq_len"], "threads": cfg["threads"],
        "train_seconds": log["train_seconds"],
        "objective": {k: cfg.get(k) for k in ("mvc_scope", "mlm_weight", "mvc_weight", "contrastive_weight",
                                              "contrastive_temperature", "contrastive_views", "mask_ratios", "mask_ratio")},
        "training_probe": {k: last.get(k) for k in ("probe_knn_balanced_accuracy", "probe_logreg_balanced_accuracy",
                                                    "probe_effective_rank", "mlm", "mvc")},
        "training_eval_constant_predictor_mse": log["eval_constant_predictor_mse"],
        **training_trace(log),
        "test_sets": probe_datasets(model, datasets, shared, n_cells),
    }


def training_trace(log: dict) -> dict:
    """Every in-training evaluation and the InfoNCE averaged over each 100 steps (the learning curves)."""
    h = log["history"]
    nce = [round(sum(r["contrastive"] for r in h[i : i + 100]) / len(h[i : i + 100]), 4)
           for i in range(0, len(h), 100)] if h and "contrastive" in h[0] else None
    return {"training_evals": log["eval"], "infonce_per_100_steps": nce}


def table(rows: list[dict], datasets: list[str]) -> str:
    head = ["candidate", "design", "steps", "train s"]
    for d in datasets:
        head += [f"{d} kNN (PCA-50 / random)", f"{d} logistic (PCA-50 / random)", f"{d} masked MSE nz (gene mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["candidate"], str(r["design"]), str(r["steps"]), f"{r['train_seconds']:.0f}"]
        for d in datasets:
            g = r["test_sets"][d]
            k, p, m = g["knn_balanced_accuracy"], g["probe_balanced_accuracy"], g["masked_mse"]
            cells += [f"{k['model']:.3f} ({k['pca50']:.3f} / {k['random_weights']:.3f})",
                      f"{p['model']:.3f} ({p['pca50']:.3f} / {p['random_weights']:.3f})",
                      f"{m['model']:.1f} ({m['per_gene_mean']:.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(rows: list[dict]) -> str:
    lines = ["| candidate | held-out masked MSE (constant) | GEPC/MVC MSE | Zheng kNN | Zheng logistic | effective rank |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["training_probe"]
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['candidate']} | {f(t.get('mlm'), '.1f')} ({r['training_eval_constant_predictor_mse']:.1f}) | "
                     f"{f(t.get('mvc'), '.1f')} | {f(t.get('probe_knn_balanced_accuracy'), '.3f')} | "
                     f"{f(t.get('probe_logreg_balanced_accuracy'), '.3f')} | {f(t.get('probe_effective_rank'), '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", nargs="+", type=Path, help="pretrained model folders (official layout + training_log.json), or earlier "
                    "pretrain_ablation.json files whose rows are merged as they are")
    ap.add_argument("--datasets", default="kang2018")
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--n-cells", type=int, default=2000)
    ap.add_argument("--note", default="", help="how the runs were made (e.g. two trainings shared the 2 cores)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    datasets = args.datasets.split(",")
    rows = []
    for p in args.candidates:  # a model folder is probed; an earlier pretrain_ablation.json contributes its rows
        rows += (json.loads(p.read_text())["candidates"] if p.suffix == ".json"
                 else [candidate_row(p, datasets, args.shared, args.n_cells)])
    for r in rows:  # merged rows made before the learning curves were recorded: read them from the log if it is there
        log = Path(r["path"]) / "training_log.json"
        if "training_evals" not in r and log.exists():
            r.update(training_trace(json.loads(log.read_text())))
    out = {"datasets": datasets, "n_cells": args.n_cells, "note": args.note, "candidates": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain_ablation.json").write_text(json.dumps(out, indent=1))
    md = ["# Pretraining objective ablation (issue 17)", "", args.note, "",
          "Best embedding of each model (kNN-15 / logistic balanced accuracy, folds grouped by donor) against PCA-50 "
          "of log1p and the random-weights copy of the same model; masked-value MSE on held-out non-zero targets "
          "against the per-gene mean.", "", table(rows, datasets), "",
          "Last in-training evaluation (held-out training cells; <cls> probe on 500 Zheng 2017 sorted cells, which "
          "are trained on unlabelled, stratified 5-fold):", "", training_table(rows), ""]
    (args.out / "pretrain_ablation.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
