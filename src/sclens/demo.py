"""``sclens demo``: the whole pipeline that exists so far, on the embedded default model, offline.

Stages run (each prints what it does and lands in ``report.json`` + PNG figures in the output folder):

1. **model**    load the embedded default scGPT-architecture model
2. **data**     real PBMC cells (scanpy's bundled set, counts rebuilt) and a SYNTHETIC multi-donor
                hematopoiesis; validation, gene panel (HVG among vocabulary genes), stage mapping
3. **embed**    official-style cell embeddings (CLS) and masked mean-pooling; how well they separate cell
                types (kNN, 5-fold), beside PCA of log1p expression
4. **heads**    panel-mode run with hooks on every layer: per-head attention entropy and top attended genes
5. **screen**   gene-space operators (attn / qk / ov) of all units, donor x tissue x cell-type anchors, and
                the gated unit screen (Isomap and geodesic MDS; the full screen adds LET - `sclens screen`)
6. **extract**  the top screened operator -> closed-form ruler adaptor -> readouts as ONE .safetensors file,
                reloaded (content hash checked), applied by streaming to a held-out SYNTHETIC cohort of new
                donors written as .h5ad, and the zero-shot transfer check on that cohort
7. **bench**    a short donor-holdout campaign on the synthetic cohort (fast methods)
8. **compress** single head, SVD ranks, sparse factors, factor audit and gene programs; the 3-D viewer
9. **pretrain** a small scGPT model trained from scratch on the synthetic cells, written in the official
                layout and read back through the same loader
10. **circuits** the embedded cell-sentence model on the real pbmc68k cells (labels mapped to its FACS sort
                gates): transcoders on its MLP layers, feature interpretation, the traced "monocytes" and "nk"
                decisions; and a short SAE atlas of the default scGPT model's residual stream
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .utils import array_sha256, package_versions, write_json


def _console():
    from rich.console import Console

    return Console()


def _knn_accuracy(E: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    _, counts = np.unique(labels, return_counts=True)
    folds = int(min(5, counts.min()))
    if folds < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(15), E, labels, cv=cv, scoring="balanced_accuracy").mean())


def _scatter(E2: np.ndarray, labels: np.ndarray, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cats = sorted(set(labels))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(cats):
        m = labels == c
        ax.scatter(E2[m, 0], E2[m, 1], s=5, color=cmap(i % 20), label=f"{c} ({m.sum()})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(M: np.ndarray, title: str, path: Path, cbar: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    im = ax.imshow(M, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(M.shape[1]))
    ax.set_yticks(range(M.shape[0]))
    for (i, j), v in np.ndenumerate(M):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < M.mean() else "k")
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(out_dir: str | Path = "sclens_demo", *, quick: bool = False, seed: int = 0) -> dict:
    """Run the demo and write ``out_dir/report.json`` plus figures; returns the report dict."""
    import torch
    from sklearn.decomposition import PCA

    from .data import select_panel, validate
    from .datasets import pbmc68k, simulate_hematopoiesis
    from .models import default_model_dir, load_default_model, load_scgpt
    from .models.api import tokenize_adata
    from .models.pretrain import PretrainConfig, pretrain_scgpt
    from .ontology import StageDAG
    from .operators import attention_entropy

    con = _console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    report: dict = {"sclens_version": __version__, "seed": seed, "quick": quick, "versions": package_versions(),
                    "stages": {}, "figures": {}, "timings_s": {}}
    t_all = time.perf_counter()

    # 1. model -------------------------------------------------------------------------------
    con.rule("[bold]1/10 model")
    t = time.perf_counter()
    model = load_default_model()
    log_path = Path(str(default_model_dir())) / "training_log.json"
    training = json.loads(log_path.read_text()) if log_path.is_file() else {}
    cfg = model.config
    report["stages"]["model"] = {
        "source": "embedded default (sclens/_default_model)", "checkpoint_sha256": model.checkpoint_sha256,
        "layers": cfg.nlayers, "heads": cfg.nheads, "d_model": cfg.embsize, "d_hid": cfg.d_hid,
        "vocab_size": len(model.vocab), "parameters": model.n_parameters(), "hook_points": len(model.hook_dict),
        "pretraining": {k: training.get(k) for k in ("n_cells", "train_seconds", "final_eval",
                                                     "eval_constant_predictor_mse")},
    }
    con.print(f"default model: {cfg.nlayers} layers x {cfg.nheads} heads, d_model {cfg.embsize}, "
              f"{len(model.vocab):,} gene tokens, {model.n_parameters():,} parameters, {len(model.hook_dict)} hook points")
    report["timings_s"]["model"] = time.perf_counter() - t

    # 2. data --------------------------------------------------------------------------------
    con.rule("[bold]2/10 data")
    t = time.perf_counter()
    dag = StageDAG.default()
    pbmc = pbmc68k()
    n_donors, per_donor = (4, 150) if quick else (8, 400)
    sim = simulate_hematopoiesis(n_donors=n_donors, cells_per_donor=per_donor, seed=seed,
                                 vocabulary=model.vocab.genes)
    data_rep = {}
    for name, a, synthetic in (("pbmc68k", pbmc, False), ("simulated_hematopoiesis", sim, True)):
        v = validate(a, obs_keys=["cell_type", "donor"], require="counts")
        panel = select_panel(a, model.vocab.genes, n_genes=1200)
        mapping = dag.map_labels(a.obs["cell_type"].astype(str))
        data_rep[name] = {"synthetic": synthetic, "validation": v.to_dict(), "panel_size": len(panel),
                          "panel_flavor": panel.flavor, "panel_head": list(panel.genes[:12]),
                          "stage_mapping": mapping.summary(), "n_donors": int(a.obs["donor"].nunique()),
                          "input_sha256": array_sha256(a.X)}
        con.print(f"[cyan]{name}[/]{' (SYNTHETIC)' if synthetic else ''}: {v.n_cells} cells x {v.n_genes} genes, "
                  f"{v.kind}, panel {len(panel)} genes ({panel.flavor}); {mapping.summary()}")
    report["stages"]["data"] = data_rep
    report["timings_s"]["data"] = time.perf_counter() - t

    # 3. embeddings --------------------------------------------------------------------------
    con.rule("[bold]3/10 cell embeddings")
    t = time.perf_counter()
    emb_rep = {}
    sim_sub = sim[np.sort(np.random.default_rng(seed).choice(sim.n_obs, size=min(sim.n_obs, 300 if quick else 600),
                                                                 replace=False))].copy()
    for name, a in (("pbmc68k", pbmc), ("simulated_hematopoiesis", sim_sub)):
        batch = tokenize_adata(a, model, seed=seed)
        both = model.cell_embeddings(batch, batch_size=64, progress=True, mode=("cls", "avg"))
        E, E_avg = both["cls"], both["avg"]
        from .data import log_normalize

        X = log_normalize(a.X)
        X = X.toarray() if hasattr(X, "toarray") else X
        P = PCA(n_components=min(50, X.shape[1] - 1), random_state=seed).fit_transform(X)
        labels = a.obs["cell_type"].astype(str).to_numpy()
        acc_emb, acc_pca = _knn_accuracy(E, labels, seed), _knn_accuracy(P, labels, seed)
        acc_avg = _knn_accuracy(E_avg, labels, seed)
        E2 = PCA(n_components=2, random_state=seed).fit_transform(E)
        fig = _scatter(E2, labels, f"{name}: default-model cell embeddings (PCA of CLS)"
                       + (" - SYNTHETIC" if name.startswith("sim") else ""), out / f"embedding_{name}.png")
        report["figures"][f"embedding_{name}"] = fig.name
        emb_rep[name] = {"n_cells": int(E.shape[0]), "knn15_balanced_accuracy_embedding": acc_emb,
                         "knn15_balanced_accuracy_avgpool": acc_avg,
                         "knn15_balanced_accuracy_pca50_log1p": acc_pca, "mean_tokens_per_cell":
                         float((~batch.padding_mask).sum(1).float().mean())}
        con.print(f"[cyan]{name}[/]: kNN(15) balanced accuracy of cell types, 5-fold: "
                  f"model CLS embedding {acc_emb:.3f}, mean-pooled {acc_avg:.3f}, PCA-50 of log1p {acc_pca:.3f}")
    report["stages"]["embeddings"] = emb_rep
    report["timings_s"]["embeddings"] = time.perf_counter() - t

    # 4. attention heads ---------------------------------------------------------------------
    con.rule("[bold]4/10 attention heads (hooks)")
    t = time.perf_counter()
    panel = select_panel(sim, model.vocab.genes, n_genes=300 if quick else 600)
    rng = np.random.default_rng(seed)
    ref = sim[np.sort(rng.choice(sim.n_obs, size=min(sim.n_obs, 48 if quick else 128), replace=False))]
    heads = attention_entropy(model, ref, panel, seed=seed)
    entropy, top_genes, names = heads["entropy"], heads["top_received_genes"], heads["hooks"]
    L, H = entropy.shape
    fig = _heatmap(entropy, "normalised attention entropy among panel genes\n(1 = uniform; SYNTHETIC cells)",
                   out / "head_entropy.png", "entropy / log(G)")
    report["figures"]["head_entropy"] = fig.name
    focused = np.unravel_index(np.argmin(entropy), entropy.shape)
    report["stages"]["heads"] = {
        "reference_cells": heads["n_cells"], "panel_genes": len(panel), "hooks_cached": names,
        "normalised_entropy": entropy.round(4).tolist(), "top_received_genes": top_genes,
        "most_focused_unit": {"layer": int(focused[0]), "head": int(focused[1]),
                              "entropy": float(entropy[focused]), "top_genes": top_genes[f"L{focused[0]}H{focused[1]}"]},
    }
    con.print(f"cached attention patterns of {L * H} units over {heads['n_cells']} cells x {len(panel) + 1} tokens; "
              f"most focused unit L{focused[0]}H{focused[1]} (entropy {entropy[focused]:.3f}) attends to "
              f"{', '.join(top_genes[f'L{focused[0]}H{focused[1]}'][:5])}")
    report["timings_s"]["heads"] = time.perf_counter() - t

    # 5. operators + screen ------------------------------------------------------------------
    con.rule("[bold]5/10 operators and gated unit screen")
    t = time.perf_counter()
    from .anchors import build_anchors
    from .operators import export_operators, export_random_controls
    from .screen import screen

    spanel = select_panel(sim, model.vocab.genes, n_genes=150 if quick else 300)
    banks = export_operators(model, sim, spanel, n_ref_cells=32 if quick else 64, seed=seed)
    n_copies = 1 if quick else 3
    controls = export_random_controls(model, sim, spanel, n_copies=n_copies, n_ref_cells=32 if quick else 64, seed=seed)
    anchors = build_anchors(sim, spanel, label_key="cell_type", donor_key="donor", tissue_key="tissue", seed=seed)
    con.print(f"exported {len(banks)} x {cfg.nlayers * cfg.nheads} operators ({len(spanel)} x {len(spanel)}); "
              f"{len(anchors)} anchors (donor x tissue x cell type, >= 5 cells) on {anchors.info['n_stages']} stages")
    rep = screen(banks, anchors, fitters=["isomap", "gmds"], seed=seed, n_jobs=2, cache_dir=out / "screen" / "cache",
                 controls=controls)
    lg = rep.info["learned_gate"]
    rep.save(out / "screen", anchors, banks)
    top = rep.top
    for k, v in rep.figures.items():
        report["figures"][k] = f"screen/{v}"
    report["stages"]["screen"] = {
        "data": "SYNTHETIC (simulate_hematopoiesis)", "panel_genes": len(spanel), "anchors": len(anchors),
        "fitters": ["isomap", "gmds"], "n_hypotheses": len(rep.table), "n_passing": int(rep.table["passes_all"].sum()),
        "n_passing_published": lg["n_passing_published"], "n_passing_learned": lg["n_passing_learned"],
        "random_weights_copies": n_copies, "n_failed": rep.info["n_failed"],
        "gates_sha256": rep.gates_sha256, "wall_seconds": rep.info["wall_seconds"],
        "top": {c: (top[c].item() if hasattr(top[c], "item") else top[c]) for c in
                ("featurisation", "layer", "head", "fitter", "trustworthiness", "ruler_spearman_resid",
                 "holdout_random", "holdout_donor", "holdout_branch", "perm_p", "q", "passes_gates", "null_passes",
                 "margin_over_raw", "margin_over_random", "passes_all")},
        "report_dir": "screen",
    }
    unit = "" if top["layer"] < 0 else f" L{int(top['layer'])}H{int(top['head'])}"
    con.print(f"{len(rep.table)} hypotheses; {lg['n_passing_published']} pass the published gates (null failing), "
              f"{lg['n_passing_learned']} beat the raw panel and {n_copies} random-weights copies (learned gate); "
              f"{int(rep.table['passes_all'].sum())} pass every gate. "
              f"Top: {top['featurisation']}{unit} {top['fitter']} (resid. Spearman {top['ruler_spearman_resid']:.3f}, "
              f"branch holdout {top['holdout_branch']:.3f}, null passes: "
              f"{'not evaluated' if pd.isna(top['null_passes']) else bool(top['null_passes'])})")
    report["timings_s"]["screen"] = time.perf_counter() - t

    # 6. extraction ---------------------------------------------------------------------------
    con.rule("[bold]6/10 extraction: operator -> adaptor -> readouts, apply, zero-shot transfer")
    t = time.perf_counter()
    import warnings

    from .extract import ExtractedModel, apply_file, extract, select_operator, validate_transfer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = select_operator(banks, report=rep)
    model_x = extract(sim, op, label_key="cell_type", donor_key="donor", tissue_key="tissue", seed=seed,
                      progress=True)
    art = model_x.save(out / "extracted_head.safetensors")
    reloaded_x = ExtractedModel.load(art)
    heldout = simulate_hematopoiesis(n_donors=2 if quick else 4, cells_per_donor=per_donor, seed=seed,
                                     donor_seed=seed + 1000, vocabulary=model.vocab.genes)
    heldout.write_h5ad(out / "heldout_cohort.h5ad")
    run = apply_file(reloaded_x, out / "heldout_cohort.h5ad", out / "heldout_cohort_sclens.h5ad", progress=False)
    transfer = validate_transfer(reloaded_x, heldout, label_key="cell_type", donor_key="donor", tissue_key="tissue",
                                 seed=seed)
    import anndata as ad

    applied = ad.read_h5ad(out / "heldout_cohort_sclens.h5ad")
    Zp = PCA(n_components=2, random_state=seed).fit_transform(applied.obsm["X_sclens"])
    fig = _scatter(Zp, applied.obs["branch"].astype(str).to_numpy(),
                   "held-out donors: X_sclens (PCA), true branch - SYNTHETIC",
                   out / "extracted_latent_heldout.png")
    report["figures"]["extracted_latent_heldout"] = fig.name
    report["stages"]["extract"] = {
        "data": "SYNTHETIC (train: the screen cohort; transfer: new donors of the same simulated biology)",
        "operator": op.describe(), "operator_source": op.source,
        "operator_warnings": [str(w.message) for w in caught], "artifact": art.name,
        "artifact_bytes": art.stat().st_size, "content_sha256": reloaded_x.content_sha256,
        "n_trainable": reloaded_x.n_trainable(), "metrics_at_extraction": model_x.manifest["metrics"],
        "apply": {k: run[k] for k in ("n_cells", "seconds", "cells_per_second", "panel_coverage")},
        "applied_file": "heldout_cohort_sclens.h5ad", "zero_shot_transfer": transfer.metrics,
        "train_seconds": model_x.manifest["train_seconds"],
    }
    tm = transfer.metrics
    con.print(f"extracted {op.describe()} -> {art.name} ({art.stat().st_size / 1e3:.0f} kB, "
              f"{reloaded_x.n_trainable()['total']:,} trainable parameters); applied to {run['n_cells']} held-out cells "
              f"({run['cells_per_second']:,.0f} cells/s incl. file copy). Zero-shot on new donors: trust "
              f"{tm['trustworthiness']:.3f}, ruler Spearman {tm['ruler_spearman']:.3f} (null {tm['null_ruler_spearman']:.3f}), "
              f"p {tm['perm_p']:.2g}, passes gates: {tm['passes']}; branch bal. acc "
              f"{tm['cells'].get('branch_balanced_accuracy', float('nan')):.3f}, pseudotime-depth Spearman "
              f"{tm['cells']['pseudotime_depth_spearman']:.3f}")
    report["timings_s"]["extract"] = time.perf_counter() - t

    # 7. benchmark ---------------------------------------------------------------------------
    con.rule("[bold]7/10 benchmark: a short donor-holdout campaign (SYNTHETIC)")
    t = time.perf_counter()
    from .bench import BenchConfig, Endpoint, run_campaign

    bcfg = BenchConfig(
        endpoints=[Endpoint("branch", "multiclass", "branch"),
                   Endpoint("cd4_vs_cd8", "binary", "cell_type", negative=["Naive CD4 T", "Memory CD4 T"],
                            positive=["Naive CD8 T", "Memory CD8 T"], floor_markers={"positive": ["CD8A", "CD8B"],
                                                                                     "negative": ["CD4"]}),
                   Endpoint("pseudotime_depth", "depth", "depth")],
        donor_key="donor", label_key="cell_type", scheme="shuffle", n_splits=2 if quick else 3, seed=seed,
        methods=["sclens_extracted", "extracted_identity", "extracted_random", "raw_log1p", "pca10", "dpt"],
        random_control=1 if quick else 3,
        n_ref_cells=32 if quick else 128, title="demo campaign on the simulated cohort (SYNTHETIC)",
        notes=["SYNTHETIC data; fast methods only (the full campaigns: benchmarks/bench_campaigns.py)."])
    bres = run_campaign(sim, bcfg, model=model, name="demo", progress=True)
    bpaths = bres.save(out / "bench")
    report["stages"]["bench"] = {"data": "SYNTHETIC", "summary": bres.to_dict()["summary"],
                                 "comparisons": bres.to_dict()["comparisons"], "ablations": bres.to_dict()["ablations"],
                                 "skipped": bres.skipped,
                                 "runtime_seconds": bres.info["runtime_ratio"], "report": "bench/" + bpaths["html"].name}
    report["figures"]["bench_report"] = "bench/" + bpaths["html"].name
    head = bres.summary[bres.summary.metric.isin(["balanced_accuracy", "auroc", "abs_spearman"])]
    for (ep, metric), sub in head.groupby(["endpoint", "metric"], sort=False):
        con.print(f"{ep} {metric}: " + ", ".join(f"{r.method} {r['mean']:.3f}" for _, r in sub.iterrows()))
    for _, r in bres.ablations.iterrows():
        if r["metric"] in ("balanced_accuracy", "abs_spearman"):
            con.print(f"control, {r['question']} ({r['method']} - {r['baseline']}), {r['endpoint']} {r['metric']}: "
                      f"{r['mean_diff']:+.3f} (q {r['q']:.3g})")
    report["timings_s"]["bench"] = time.perf_counter() - t

    # 8. compression ------------------------------------------------------------------------
    con.rule("[bold]8/10 compression: single head, SVD ranks, sparse factors, factor audit, gene programs (SYNTHETIC)")
    t = time.perf_counter()
    from .compress import CompressConfig, compaction_table, compress

    ccfg = BenchConfig(endpoints=bcfg.endpoints + [Endpoint("stage", "multiclass", "stage")], donor_key="donor",
                       label_key="cell_type", scheme="shuffle", n_splits=2 if quick else 3, seed=seed,
                       n_ref_cells=32 if quick else 64)
    cc = CompressConfig(ranks=(8,) if quick else (64, 32, 16, 8), audit_rank=8 if quick else 64,
                        sparse_factors=4 if quick else 16, sparse_genes=25, core_size=4, n_cards=8)
    cres = compress(sim, ccfg, cc, model=model, report=rep, artifact=reloaded_x, name="demo",
                    artifact_dir=out / "compress" / "artifacts", progress=True)
    cpaths = cres.save(out / "compress")
    ctab = compaction_table(cres)
    report["stages"]["compress"] = {"data": "SYNTHETIC", "compaction": json.loads(ctab.to_json(orient="records")),
                                    "top_k_share": cres.shares, "single_head": cres.info["single_head"],
                                    "factor_labels": {c["factor"]: c["label"] for c in cres.cards},
                                    "report": "compress/" + cpaths["html"].name}
    report["figures"]["compress_report"] = "compress/" + cpaths["html"].name
    for r in ctab.to_dict("records"):
        con.print(f"{r['variant']}: {r['file_bytes'] / 1e3:.1f} kB file ({r['operator_bytes'] / 1e3:.1f} kB operator); "
                  f"significant losses vs previous: {r['significant losses vs previous']}")
    con.print("share of factor impact, top " + ", ".join(f"{k}: {v:.2f}" for k, v in cres.shares.items())
              + "; factors: " + "; ".join(f"f{c['factor']} {c['label']}" for c in cres.cards[:4]))
    from .viz import manifold_3d

    variants = {"extracted (demo artifact)": reloaded_x}
    for vname in ("rank8", "sparse"):
        variants[f"compressed: {vname}"] = out / "compress" / "artifacts" / f"demo_{vname}.safetensors"
    view = manifold_3d(sim, variants, label_key="cell_type", donor_key="donor", tissue_key="tissue",
                       contrast="Naive CD4 T | Memory CD4 T vs Naive CD8 T | Memory CD8 T",
                       n_cells=min(sim.n_obs, 20_000), seed=seed)
    vpath = view.save(out / "viewer.html")
    report["figures"]["viewer"] = vpath.name
    report["stages"]["viewer"] = {"data": "SYNTHETIC", "file": vpath.name, "bytes": vpath.stat().st_size,
                                  "lens": view.info["lens"]}
    con.print(f"3-D viewer of {len(variants)} artifacts -> {vpath.name} ({vpath.stat().st_size / 1e6:.1f} MB); lens "
              + ", ".join(f"{v.name}: axis {v.lens['axis']} AUROC {v.lens['auroc']:.3f}" for v in view.views))
    report["timings_s"]["compress"] = time.perf_counter() - t

    # 9. pretraining -------------------------------------------------------------------------
    con.rule("[bold]9/10 pretraining (masked expression)")
    t = time.perf_counter()
    pcfg = PretrainConfig(n_layers=2, n_heads=4, d_model=64, d_hid=128, train_seq_len=96, batch_size=16,
                          steps=40 if quick else 200, warmup_steps=10, eval_every=20 if quick else 50,
                          eval_cells=64, seed=seed, lr=2e-3)
    res = pretrain_scgpt(sim, pcfg, out_dir=out / "pretrained_model",
                         extra_provenance={"data": "simulate_hematopoiesis (SYNTHETIC)", "seed": seed})
    reloaded = load_scgpt(out / "pretrained_model")
    same = all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), reloaded.state_dict().values()))
    (out / "pretrained_model" / "loss_curve.png").replace(out / "pretrain_loss_curve.png")
    report["figures"]["pretrain_loss_curve"] = "pretrain_loss_curve.png"
    report["stages"]["pretrain"] = {
        "config": res.log["config"], "n_parameters": res.log["n_parameters"], "train_seconds": res.log["train_seconds"],
        "first_eval": res.log["eval"][0], "final_eval": res.log["final_eval"],
        "constant_predictor_mse": res.log["eval_constant_predictor_mse"], "reloaded_identical": same,
        "checkpoint_dir": "pretrained_model", "data": "SYNTHETIC (simulate_hematopoiesis)",
    }
    con.print(f"pretrained {res.log['n_parameters']:,} parameters for {pcfg.steps} steps: held-out masked MSE "
              f"{res.log['eval'][0]['mlm']:.1f} -> {res.log['final_eval']['mlm']:.1f} (constant predictor "
              f"{res.log['eval_constant_predictor_mse']:.1f}); written in the official layout and reloaded "
              f"{'bit-identically' if same else 'WITH DIFFERENCES'}")
    report["timings_s"]["pretrain"] = time.perf_counter() - t


    # 10. circuits ----------------------------------------------------------------------------
    con.rule("[bold]10/10 circuits: cell-sentence LM, transcoders, traced decisions, SAE atlas (pbmc68k, real)")
    t = time.perf_counter()
    from .circuits.lm import load_default_cell_lm
    from .circuits.pipeline import run_circuits
    from .circuits.sae import train_sae_atlas
    from .circuits.transcoders import TranscoderConfig, transcoder_table

    clm = load_default_cell_lm()
    pb = pbmc68k()
    gates = {"CD14+ Monocyte": "monocytes", "CD56+ NK": "nk", "CD19+ B": "bcells", "CD4+/CD45RO+ Memory": "memoryt",
             "CD8+ Cytotoxic T": "cytotoxict", "CD4+/CD25 T Reg": "regulatoryt", "CD4+/CD45RA+/CD25- Naive T": "naivet",
             "CD8+/CD45RA+ Naive Cytotoxic": "naivecytotoxic", "CD4+ T Helper2": "thelper"}
    pb = pb[pb.obs["cell_type"].astype(str).isin(list(gates))].copy()
    pb.obs["sort_gate"] = pb.obs["cell_type"].astype(str).map(gates)
    tcfg = TranscoderConfig(expansion=4, k=8, epochs=2 if quick else 6, max_tokens=20_000 if quick else 60_000,
                            seed=seed)
    circ = run_circuits(pb, "sort_gate", model=clm, config=tcfg, layers=[1, 3] if quick else None,
                        decisions=("monocytes", "nk"), seed=seed, max_nodes=12 if quick else 24,
                        eval_fraction=0.5, known_genes_only=True)  # pbmc68k: 765 genes; sentences of known ones
    cpaths = circ.save(out / "circuits")
    lm = circ.transcoders.metrics["lm"]
    report["stages"]["circuits"] = {
        "data": "pbmc68k (real; labels mapped to the model's FACS sort gates)", "n_cells": int(pb.n_obs),
        "transcoders": transcoder_table(circ.transcoders), "lm": {k: lm[k] for k in ("clean", "spliced", "mlp_ablated")},
        "recovered_celltype_ce": lm["recovered_celltype_ce"], "recovered_gene_ce": lm["recovered_gene_ce"],
        "interpretable": {k: circ.sample[k] for k in ("n_sampled", "n_interpretable", "fraction")},
        "circuits": {k: {"predicted": g.target["predicted"], "nodes": g.scores["nodes"],
                         "genes": [n["gene"] for n in g.nodes if n["type"] == "embed" and n.get("gene")]}
                     for k, g in circ.circuits.items()},
        "report": "circuits/" + cpaths["report_html"].name}
    report["figures"]["circuits_report"] = "circuits/" + cpaths["report_html"].name
    for name in circ.circuits:
        report["figures"][f"circuit_{name}"] = "circuits/" + cpaths[f"circuit_{name}_png"].name
    con.print(f"cell-sentence model on {pb.n_obs} pbmc68k cells: cell-type accuracy {lm['clean']['celltype_accuracy']:.3f} "
              f"(transcoders spliced in {lm['spliced']['celltype_accuracy']:.3f}, MLPs ablated "
              f"{lm['mlp_ablated']['celltype_accuracy']:.3f}); loss recovered {lm['recovered_celltype_ce']:.2f}")
    for r in transcoder_table(circ.transcoders):
        con.print(f"transcoder L{r['layer']}: L0 {r['l0']:.1f}, FVU {r['fvu']:.3f}, dead {r['dead_fraction']:.3f}")
    con.print(f"gene-level interpretable: {circ.sample['n_interpretable']} of {circ.sample['n_sampled']} sampled features")
    for k, g in circ.circuits.items():
        genes = [n["gene"] for n in g.nodes if n["type"] == "embed" and n.get("gene")]
        con.print(f"circuit '{k}': {g.scores['nodes']} nodes; input genes {', '.join(genes[:8])}")
    atlas = train_sae_atlas(pb, "sort_gate", model=model, layers=[0, cfg.nlayers - 1],
                            config=TranscoderConfig(expansion=4, k=16, epochs=2 if quick else 4,
                                                    max_tokens=20_000 if quick else 60_000, seed=seed),
                            max_len=128 if quick else 256)
    apaths = atlas.save(out / "circuits")
    report["stages"]["sae_atlas"] = {"data": "pbmc68k (real)", "summary": json.loads(atlas.summary().to_json(orient="records")),
                                     "atlas": "circuits/" + apaths["html"].name}
    report["figures"]["sae_atlas"] = "circuits/" + apaths["html"].name
    for r in atlas.summary().to_dict("records"):
        con.print(f"SAE layer {r['layer']}: L0 {r['l0']:.1f}, FVU {r['fvu']:.3f}, {r['live_features']} live features, "
                  f"{r['interpretable']} interpretable")
    report["timings_s"]["circuits"] = time.perf_counter() - t

    report["timings_s"]["total"] = time.perf_counter() - t_all
    write_json(out / "report.json", report)
    from .report import build_report

    page = build_report(out, title="sclens demo report (pbmc68k real; everything else SYNTHETIC)")
    con.rule("[bold green]done")
    con.print(f"figures: {', '.join(report['figures'].values())}")
    con.print(f"[bold]report: {page}[/bold] (open it in any browser; it works offline)")
    return report
