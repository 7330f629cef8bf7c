"""Rebuild the embedded default model (``src/sclens/_default_model/``) deterministically.

Pretrains a compact scGPT-architecture model (6 layers x 8 heads, d_model 128) with the masked-expression
and MVC objectives on the REAL raw-count cells available offline:

  * ../shared/data/mudan_pbmc/pbmcA.h5ad                      10x frozen PBMC, donor A (2,896 cells)
  * ../shared/data/mudan_pbmc/referenceCounts_sorted.h5ad     10x FACS-sorted PBMC populations (2,140 cells)
  * ../shared/data/celltypist_sample_pbmc/...h5ad             CellTypist's sample immune cells (559 cells)
  * scanpy's pbmc68k_reduced with integer counts rebuilt      (700 cells)
  * ../shared/data/paul15_tradeseq/paul15_tradeseq.h5ad       mouse myeloid progenitors, symbols mapped to
                                                              human by upper-casing (2,660 cells, 240 genes)

and, with ``--data all`` (issue 17: every real offline cell except the test sets, ~22,000 cells):

  * ../shared/data/pellin2019_hsc_mpp/...h5ad                 sorted bone-marrow HSC / MPP (1,497 cells)
  * ../shared/data/fasttopics_zheng2017_facs_pbmc/...h5ad     Zheng 2017 sorted PBMC incl. 687 CD34+ (3,774;
                                                              Ensembl ids mapped to symbols)
  * ../shared/data/soupx_pbmc4k_subset/...h5ad                10x pbmc4k (2,170)
  * ../shared/data/fhil_10x_pbmc3k/...h5ad                    10x pbmc3k (2,700)
  * ../shared/data/scwgparis_10x_pbmc_3batches/...h5ad        three 10x PBMC runs (2,902)

Objective designs (``--design``; the ablation of issue 17 compares them with the learning probes):
  mvc               masked values + MVC on the masked positions (the first default model)
  contrastive       + two-view InfoNCE on <cls> (T = 0.5), masking ratios drawn from {0.25, 0.5, 0.75}
  gepc_contrastive  whole-input decoding from <cls> (GEPC over every token, zeros included) + InfoNCE + drawn ratios
  gepc_contrastive_genes  as gepc_contrastive, but the second view re-draws the cell's genes (not only the mask)
  balanced          gepc_contrastive_genes with the two regression terms weighted 0.02 (MSE on bins ~170 vs
                    InfoNCE ~3.5: unweighted, the InfoNCE barely moved, 3.466 -> 3.35 in 600 steps)
  balanced_per_source  balanced, with every batch drawn from one source (negatives share the data set)

``--probe`` logs the learning probe (kNN / logistic balanced accuracy of <cls>) at every evaluation on the
Zheng 2017 sorted populations (cells seen unlabelled in training; labels only for the probe).

Labels are never used (self-supervised). Kang 2018 and OneK1K donors are NOT used, so they stay
independent test sets for the donor-holdout benchmark. Gene tokens are named as in the official scGPT
whole-human vocabulary (../shared/data/scgpt_human_meta/vocab.json): the vocabulary is every training gene
detected in >= 3 cells that the official vocabulary knows, in official-id order (``--vocab-hvg N``: only the N
of them most often highly variable across the training sources).

    python scripts/build_default_model.py [--shared ../shared] [--threads 1] [--out src/sclens/_default_model]

The defaults build the shipped model (since 2026-12-03; issue 17): ``--data all`` (21,998 cells),
``--design balanced_per_source``, ``--vocab-hvg 5000`` (5,003 tokens), 3,000 steps, ``--eval-every 500 --probe``.
The shipped file was trained with ``--threads 1`` (8,769 s on a shared 2-core machine); the first default model
(until 2026-12-03) was ``--data first --design mvc --vocab-hvg 0 --steps 1500 --eval-every 100 --no-probe``.

Deterministic for a given torch build and thread count (CPU, seed 0); another thread count may round
differently and so give a slightly different model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_sources(shared: Path, official_vocab: dict) -> tuple[list[ad.AnnData], dict]:
    from sclens.datasets import pbmc68k

    files = {
        "mudan_pbmcA": shared / "data/mudan_pbmc/pbmcA.h5ad",
        "mudan_sorted": shared / "data/mudan_pbmc/referenceCounts_sorted.h5ad",
        "celltypist_sample": shared / "data/celltypist_sample_pbmc/celltypist_sample_cell_by_gene.h5ad",
        "paul15": shared / "data/paul15_tradeseq/paul15_tradeseq.h5ad",
    }
    out, prov = [], {}
    for name, path in files.items():
        a = ad.read_h5ad(path)
        if name == "paul15":
            a.var_names = [g.upper() for g in a.var_names]  # mouse -> human symbol by case (orthologue names)
        a = a[:, ~a.var_names.duplicated()].copy()
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        a.obs = a.obs.iloc[:, :0]
        a.obs["source"] = name
        out.append(a)
        prov[name] = {"file": str(path.relative_to(shared)), "sha256_16": sha16(path), "shape": list(a.shape)}
    p = pbmc68k()
    p.obs = p.obs.iloc[:, :0]
    p.obs["source"] = "pbmc68k"
    out.append(p)
    prov["pbmc68k"] = {"file": "scanpy.datasets.pbmc68k_reduced (counts rebuilt)", "shape": list(p.shape)}
    return out, prov


EXTRA = {
    "pellin2019": "data/pellin2019_hsc_mpp/pellin2019_hsc_mpp.h5ad",
    "zheng2017_sorted": "data/fasttopics_zheng2017_facs_pbmc/fasttopics_zheng2017_facs_pbmc.h5ad",
    "pbmc4k": "data/soupx_pbmc4k_subset/soupx_pbmc4k_subset.h5ad",
    "pbmc3k": "data/fhil_10x_pbmc3k/fhil_10x_pbmc3k.h5ad",
    "pbmc_3batches": "data/scwgparis_10x_pbmc_3batches/scwgparis_10x_pbmc_3batches.h5ad",
}


def load_extra(shared: Path) -> tuple[list[ad.AnnData], dict]:
    """The five sets added for issue 17 (none of them Kang 2018 or OneK1K), gene ids harmonised to symbols."""
    from sclens.data import harmonize_gene_ids

    out, prov = [], {}
    for name, rel in EXTRA.items():
        path = shared / rel
        a = ad.read_h5ad(path)
        a = harmonize_gene_ids(a)
        a = a[:, ~a.var_names.duplicated()].copy()
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        a.obs = a.obs.iloc[:, :0]
        a.obs["source"] = name
        out.append(a)
        prov[name] = {"file": rel, "sha256_16": sha16(path), "shape": list(a.shape)}
    return out, prov


def hvg_genes(datasets: list[ad.AnnData], candidates: list[str], n: int) -> list[str]:
    """The ``n`` candidate genes most often highly variable across the training sources.

    Per source (>= 200 genes): scanpy's ``highly_variable_genes`` (flavor ``seurat``, log1p CP10k, top 2,000 of its
    candidate genes); a gene's score is the number of sources that flag it, ties broken by its mean normalised
    dispersion over the sources that measure it. Label-free; the test sets (Kang 2018, OneK1K) are not looked at.
    """
    import pandas as pd
    import scanpy as sc

    cand = set(candidates)
    votes, disp = pd.Series(0.0, index=sorted(cand)), []
    for a in datasets:
        keep = [g for g in a.var_names if g in cand]
        if len(keep) < 200:
            continue
        b = a[:, keep].copy()
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        sc.pp.highly_variable_genes(b, flavor="seurat", n_top_genes=min(2000, len(keep) - 1))
        votes[b.var_names[b.var["highly_variable"]]] += 1
        disp.append(b.var["dispersions_norm"].astype(float))
    mean_disp = pd.concat(disp, axis=1).mean(axis=1).reindex(votes.index).fillna(-np.inf)
    order = pd.DataFrame({"votes": votes, "disp": mean_disp}).sort_values(["votes", "disp"], ascending=False)
    return list(order.index[:n])


DESIGNS = {
    "mvc": {},
    "contrastive": dict(contrastive_weight=1.0, contrastive_temperature=0.5, mask_ratios=[0.25, 0.5, 0.75]),
    "gepc_contrastive": dict(mvc_scope="all", contrastive_weight=1.0, contrastive_temperature=0.5,
                             mask_ratios=[0.25, 0.5, 0.75]),
    "gepc_contrastive_genes": dict(mvc_scope="all", contrastive_weight=1.0, contrastive_temperature=0.5,
                                   contrastive_views="genes", mask_ratios=[0.25, 0.5, 0.75]),
    # the regression terms are MSEs on bins 0-50 (~170 at the start) against an InfoNCE of ~3.5: unweighted, the
    # contrastive term barely moves (gepc_contrastive*), so they are scaled down to its size
    "balanced": dict(mvc_scope="all", contrastive_weight=1.0, contrastive_temperature=0.5, contrastive_views="genes",
                     mask_ratios=[0.25, 0.5, 0.75], mlm_weight=0.02, mvc_weight=0.02),
    # 'balanced' learns to match views by their source (10 data sets; the <cls> effective rank falls to ~9):
    # with every batch from one source, the negatives share it
    "balanced_per_source": dict(mvc_scope="all", contrastive_weight=1.0, contrastive_temperature=0.5,
                                contrastive_views="genes", mask_ratios=[0.25, 0.5, 0.75], mlm_weight=0.02,
                                mvc_weight=0.02, source_batches=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "src/sclens/_default_model"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=["first", "all"], default="all",
                    help="'first': the five sources of the first default model; 'all': + the five sets of issue 17")
    ap.add_argument("--design", choices=sorted(DESIGNS), default="balanced_per_source",
                    help="objective mix (see the docstring)")
    ap.add_argument("--train-seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--vocab-hvg", type=int, default=5000,
                    help="restrict the vocabulary (and so every training token) to this many highly variable genes "
                         "of the training sources (0: every gene detected in >= 3 cells)")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (and probes)")
    ap.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="log the learning probe at every evaluation (--no-probe: skip it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from sclens.models import GeneVocab
    from sclens.models.pretrain import PretrainConfig, pretrain_scgpt

    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    official_path = shared / "data/scgpt_human_meta/vocab.json"
    official = json.loads(official_path.read_text())
    datasets, prov = load_sources(shared, official)
    if args.data == "all":
        more, more_prov = load_extra(shared)
        datasets += more
        prov.update(more_prov)
    print(f"{sum(a.n_obs for a in datasets):,} cells from {len(datasets)} sources")

    detected: dict[str, int] = {}
    for a in datasets:
        n = np.asarray((a.X > 0).sum(0)).ravel()
        for g, c in zip(a.var_names, n):
            detected[g] = detected.get(g, 0) + int(c)
    genes = sorted((g for g, c in detected.items() if c >= 3 and g in official and not g.startswith("<")),
                   key=lambda g: official[g])
    if args.vocab_hvg:
        chosen = set(hvg_genes(datasets, genes, args.vocab_hvg))
        genes = [g for g in genes if g in chosen]
    vocab = GeneVocab.from_genes(genes)
    print(f"vocabulary: {len(genes)} genes (of {len(detected)} seen) named as in the official scGPT vocab"
          + (f"; the {args.vocab_hvg} most often highly variable" if args.vocab_hvg else ""))

    cfg = PretrainConfig(n_layers=6, n_heads=8, d_model=128, d_hid=256, dropout=0.1, max_seq_len=1200,
                         train_seq_len=args.train_seq_len, zero_fraction=0.3, mask_ratio=0.4, mvc=True,
                         batch_size=32, steps=args.steps, lr=1e-3, warmup_steps=100, eval_every=args.eval_every, eval_cells=256,
                         seed=0, threads=args.threads, device=args.device, **DESIGNS[args.design])
    probe = None
    if args.probe:
        from sclens.data import harmonize_gene_ids

        z = harmonize_gene_ids(ad.read_h5ad(shared / EXTRA["zheng2017_sorted"]))
        probe = (z[:, ~z.var_names.duplicated()].copy(), "cell_type", None)
    t0 = time.time()
    res = pretrain_scgpt(datasets, cfg, vocab=vocab, out_dir=args.out, probe=probe,
                         extra_provenance={"sources": prov, "official_vocab_sha256_16": sha16(official_path),
                                           "builder": "scripts/build_default_model.py", "design": args.design,
                                           "data": args.data, "vocab_hvg": args.vocab_hvg})
    size = (Path(args.out) / "best_model.pt").stat().st_size
    print(f"done in {time.time() - t0:.0f}s; params {res.log['n_parameters']:,}; best_model.pt {size / 1e6:.1f} MB; "
          f"final held-out MLM {res.log['final_eval']['mlm']:.3f} (constant predictor "
          f"{res.log['eval_constant_predictor_mse']:.3f})")


if __name__ == "__main__":
    main()
