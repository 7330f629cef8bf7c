"""Datasets available with no download: scanpy's bundled PBMC set, and a multi-donor hematopoiesis simulator.

Everything the simulator makes is labelled synthetic (``obs['synthetic']``, ``uns['sclens_synthetic']``),
and every report that uses it says so.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib.resources import files

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from .errors import InputError
from .ontology import StageDAG


# ----------------------------------------------------------------------------- real data
def pbmc68k() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` (700 cells x 765 genes) with integer counts rebuilt.

    The bundled object stores scaled values in ``X`` and ``log1p(counts / n_counts * 1e4)`` in ``.raw``
    (``n_counts`` = the full-transcriptome library). Counts are rebuilt exactly as
    ``rint(expm1(raw) * n_counts / 1e4)`` (99.999 % of values land within 0.05 of an integer). ``obs``
    gains ``cell_type`` (= ``bulk_labels``) and ``stage`` / ``branch`` / ``depth`` from the default stage DAG.
    All cells come from one donor (10x "Fresh 68k PBMCs"); ``obs['batch']`` is the GEM-well suffix.
    """
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray().astype(np.float64)
    counts = np.rint(np.expm1(raw) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    out = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    out.obs_names = src.obs_names.astype(str)
    out.var_names = src.raw.var_names.astype(str)
    out.obs["cell_type"] = src.obs["bulk_labels"].astype(str).values
    out.obs["louvain"] = src.obs["louvain"].astype(str).values
    out.obs["n_counts_full_library"] = src.obs["n_counts"].values
    out.obs["donor"] = "pbmc68k_donorA"
    out.obs["tissue"] = "peripheral_blood"
    out.obs["batch"] = [n.rsplit("-", 1)[-1] for n in out.obs_names]
    StageDAG.default().annotate(out, "cell_type", prefix="")
    out.uns["sclens_dataset"] = {
        "name": "pbmc68k", "source": "scanpy.datasets.pbmc68k_reduced (Zheng et al. 2017, 10x Fresh 68k PBMCs)",
        "counts": "rebuilt as rint(expm1(raw) * n_counts / 1e4) over the 765 bundled genes", "synthetic": False,
    }
    return out


# ----------------------------------------------------------------------------- simulator
@lru_cache(maxsize=1)
def marker_sets() -> dict:
    """The curated marker sets shipped with sclens (genes, label, literature sources)."""
    return yaml.safe_load(files("sclens").joinpath("resources/marker_sets.yaml").read_text())


# Expression modules used by the simulator (subsets of the curated marker sets).
MODULES: dict[str, list[str]] = {
    "stem": ["CD34", "PROM1", "CRHBP", "HLF", "AVP", "MLLT3", "SPINK2", "MEIS1", "HOPX"],
    "progenitor": ["CD34", "SOX4", "CD38", "KIT", "FLT3", "GATA2", "MECOM"],
    "lymphoid_prog": ["DNTT", "FLT3", "EBF1", "IL7R"],
    "myeloid_prog": ["MPO", "CEBPB", "CSF3R", "IRF8"],
    "mep": ["GATA1", "TAL1", "KLF1", "GATA2"],
    "mk": ["ITGA2B", "PF4", "PPBP", "GP9", "GP1BB", "VWF", "TUBB1"],
    "ery_early": ["GATA1", "KLF1", "TAL1", "TFRC", "CA1", "AHSP"],
    "ery_late": ["HBB", "HBA1", "HBA2", "HBD", "ALAS2", "GYPA"],
    "gran_early": ["MPO", "ELANE", "AZU1", "PRTN3", "CTSG", "CEBPE"],
    "gran_late": ["LTF", "CAMP", "LCN2", "MMP8", "MMP9", "CSF3R", "FCGR3B", "CXCR2", "S100A8", "S100A9"],
    "eos": ["CLC", "PRG2", "EPX"],
    "baso": ["HDC", "MS4A2", "CPA3", "GATA2"],
    "mono": ["CD14", "LYZ", "FCN1", "VCAN", "S100A8", "S100A9", "CSF1R", "CEBPB"],
    "ncmono": ["FCGR3A", "MS4A7", "CSF1R"],
    "mac": ["CD68", "C1QA", "C1QB", "C1QC", "APOE", "MARCO", "CD163"],
    "dc_prog": ["IRF8", "FLT3"],
    "cdc1": ["CLEC9A", "XCR1", "IRF8"],
    "cdc2": ["FCER1A", "CD1C", "CLEC10A", "HLA-DQA1"],
    "pdc": ["LILRA4", "IL3RA", "CLEC4C", "TCF4", "IRF8"],
    "b_early": ["VPREB1", "IGLL1", "DNTT", "EBF1", "PAX5", "CD19", "CD79A", "CD79B"],
    "b": ["MS4A1", "CD79A", "CD79B", "CD19", "PAX5", "CD22", "BANK1", "IGHM"],
    "b_naive": ["IGHD"],
    "b_mem": ["CD27"],
    "plasma": ["JCHAIN", "MZB1", "XBP1", "SDC1", "PRDM1"],
    "t": ["CD3E", "CD3D", "CD3G", "CD2", "CD5", "CD28"],
    "t_naive": ["CCR7", "SELL", "LEF1", "TCF7"],
    "t_mem": ["IL7R", "GZMK"],
    "cd4": ["CD4"],
    "cd8": ["CD8A", "CD8B"],
    "treg": ["FOXP3", "IL2RA", "CTLA4"],
    "cytotoxic": ["NKG7", "GNLY", "PRF1", "GZMB"],
    "nk": ["KLRD1", "NCAM1", "KLRF1", "KLRC1", "XCL1", "KLRB1"],
}

# Module activities (0..1) of each stage of the default DAG.
STAGE_PROGRAMS: dict[str, dict[str, float]] = {
    "HSC": {"stem": 1.0, "progenitor": 0.5},
    "MPP": {"stem": 0.6, "progenitor": 1.0},
    "LMPP": {"stem": 0.2, "progenitor": 0.9, "lymphoid_prog": 0.6},
    "CMP": {"stem": 0.2, "progenitor": 0.9, "myeloid_prog": 0.5, "mep": 0.3},
    "GMP": {"progenitor": 0.6, "myeloid_prog": 1.0, "gran_early": 0.5},
    "MEP": {"progenitor": 0.6, "mep": 1.0, "ery_early": 0.3, "mk": 0.2},
    "CLP": {"progenitor": 0.5, "lymphoid_prog": 1.0},
    "MDP": {"progenitor": 0.3, "myeloid_prog": 0.7, "mono": 0.3, "dc_prog": 0.7},
    "CDP": {"progenitor": 0.2, "dc_prog": 1.0, "pdc": 0.2},
    "Megakaryocyte": {"mep": 0.4, "mk": 1.0},
    "Platelet": {"mk": 0.8},
    "Erythroblast": {"mep": 0.5, "ery_early": 1.0, "ery_late": 0.4},
    "Erythrocyte": {"ery_early": 0.2, "ery_late": 1.0},
    "Myelocyte": {"myeloid_prog": 0.3, "gran_early": 1.0, "gran_late": 0.4},
    "Neutrophil": {"gran_late": 1.0},
    "Eosinophil": {"gran_early": 0.3, "eos": 1.0},
    "Basophil": {"baso": 1.0},
    "Classical monocyte": {"mono": 1.0, "myeloid_prog": 0.1},
    "Non-classical monocyte": {"mono": 0.4, "ncmono": 1.0},
    "Macrophage": {"mono": 0.3, "mac": 1.0},
    "Pre-DC": {"dc_prog": 0.7, "cdc2": 0.3, "cdc1": 0.2},
    "cDC1": {"dc_prog": 0.3, "cdc1": 1.0},
    "cDC2": {"dc_prog": 0.2, "cdc2": 1.0, "mono": 0.2},
    "pDC": {"pdc": 1.0},
    "Pro/Pre-B": {"lymphoid_prog": 0.4, "b_early": 1.0},
    "Naive B": {"b": 1.0, "b_naive": 1.0},
    "Memory B": {"b": 1.0, "b_mem": 1.0},
    "Plasma cell": {"b": 0.2, "plasma": 1.0},
    "T progenitor": {"lymphoid_prog": 0.5, "t": 0.7, "cd4": 0.4, "cd8": 0.4},
    "Naive CD4 T": {"t": 1.0, "t_naive": 1.0, "cd4": 1.0},
    "Memory CD4 T": {"t": 1.0, "t_mem": 1.0, "cd4": 1.0},
    "Regulatory T": {"t": 1.0, "cd4": 1.0, "treg": 1.0},
    "Naive CD8 T": {"t": 1.0, "t_naive": 1.0, "cd8": 1.0},
    "Memory CD8 T": {"t": 1.0, "t_mem": 0.7, "cd8": 1.0, "cytotoxic": 0.7},
    "CD56bright NK": {"nk": 1.0, "cytotoxic": 0.4, "lymphoid_prog": 0.1},
    "CD56dim NK": {"nk": 0.8, "cytotoxic": 1.0},
}

# Relative abundance of each stage in a sample (mature blood types dominate; progenitors are rare).
STAGE_WEIGHTS: dict[str, float] = {
    "HSC": 1.0, "MPP": 1.0, "LMPP": 0.8, "CMP": 0.8, "GMP": 1.0, "MEP": 0.8, "CLP": 0.6, "MDP": 0.6, "CDP": 0.5,
    "Megakaryocyte": 0.6, "Platelet": 1.0, "Erythroblast": 1.5, "Erythrocyte": 1.5, "Myelocyte": 1.5,
    "Neutrophil": 2.5, "Eosinophil": 0.6, "Basophil": 0.4, "Classical monocyte": 3.0, "Non-classical monocyte": 1.0,
    "Macrophage": 0.8, "Pre-DC": 0.4, "cDC1": 0.4, "cDC2": 0.8, "pDC": 0.6, "Pro/Pre-B": 1.0, "Naive B": 2.0,
    "Memory B": 1.2, "Plasma cell": 0.5, "T progenitor": 0.6, "Naive CD4 T": 3.5, "Memory CD4 T": 2.5,
    "Regulatory T": 0.8, "Naive CD8 T": 2.0, "Memory CD8 T": 2.0, "CD56bright NK": 0.5, "CD56dim NK": 2.0,
}


def marker_set_table() -> dict[str, dict]:
    """The shipped marker gene sets, ``{set name: {"genes": [...], ...}}`` (the ``sets`` of :func:`marker_sets`)."""
    return marker_sets()["sets"]


def _background_genes(n: int, exclude: set[str], vocabulary, rng: np.random.Generator) -> list[str]:
    from .data import gene_table

    pool = gene_table()["symbol"].tolist()
    if vocabulary is None:
        try:
            from .models import default_model_dir
            from .models.vocab import GeneVocab

            vocabulary = GeneVocab.from_json(default_model_dir() / "vocab.json").genes
        except Exception:  # noqa: BLE001 - no default model yet (while building it): use the full table
            vocabulary = None
    if vocabulary is not None:
        vocab = set(vocabulary)
        pool = [g for g in pool if g in vocab]
    pool = sorted(set(pool) - exclude)
    if len(pool) < n:
        raise InputError(f"only {len(pool)} background genes available, {n} requested")
    return list(rng.choice(pool, size=n, replace=False))


def simulate_hematopoiesis(
    n_donors: int = 12, cells_per_donor: int = 800, seed: int = 0, *, n_background_genes: int = 1800,
    median_library_size: float = 4000.0, donor_effect: float = 0.15, vocabulary=None, donor_seed: int | None = None,
) -> ad.AnnData:
    """Simulate multi-donor hematopoiesis: cells along the default stage DAG with NB counts.

    Model (all draws from one seeded generator):

    * **Stages**: each donor's composition is Dirichlet around :data:`STAGE_WEIGHTS` (donor-specific
      proportions). A cell of stage s sits between s and one of its parents: its module activities are
      ``(1-u) a_s + u a_parent`` with ``u ~ U(0, 0.35)``, so cells form continuous branches, not blobs.
    * **Expression**: curated marker modules (:data:`MODULES`, from ``resources/marker_sets.yaml`` with their
      literature sources) raise their genes by a per-gene log fold change of 2-4.5 times the activity;
      the ``n_background_genes`` background genes (real symbols) have log-normal baselines, and 15 % of them
      carry branch-specific shifts so that lineage structure is not carried by markers alone.
    * **Donors**: per-donor per-gene log scaling ``N(0, donor_effect)``, per-donor library-size factor, and
      donor-specific composition.
    * **Counts**: negative binomial (gamma-Poisson) with gene-wise dispersion and log-normal library sizes
      (median ``median_library_size``).

    ``obs``: ``donor``, ``tissue`` (bone marrow for progenitor / immature stages, peripheral blood for mature
    ones), ``cell_type`` (= stage), ``stage``, ``branch``, ``depth`` (hops from HSC), ``pseudotime``
    (depth minus the parent offset u), ``synthetic`` (True).

    ``donor_seed`` draws NEW donors and cells from the same biology (genes, modules, fold changes and branch
    shifts stay those of ``seed``): use it for an independent held-out cohort. Its donors are named
    ``donorNN_s<donor_seed>`` so they never collide with the training cohort's.
    """
    if n_donors < 1 or cells_per_donor < 1:
        raise InputError("n_donors and cells_per_donor must be at least 1")
    rng = np.random.default_rng(seed)
    dag = StageDAG.default()
    stages = dag.stages
    markers = sorted({g for genes in MODULES.values() for g in genes})
    background = _background_genes(n_background_genes, set(markers), vocabulary, rng)
    genes = markers + background
    G = len(genes)
    gidx = {g: i for i, g in enumerate(genes)}

    # gene-level parameters
    base = np.concatenate([rng.normal(-2.5, 0.7, len(markers)), rng.normal(0.0, 1.2, len(background))])
    theta = np.exp(rng.normal(np.log(3.0), 0.5, G))  # NB dispersion (size)
    module_lfc = {m: {g: rng.uniform(2.0, 4.5) for g in gs} for m, gs in MODULES.items()}
    branch_shift = {b: np.zeros(G) for b in dag.branches}
    shifted = rng.choice(np.arange(len(markers), G), size=int(0.15 * len(background)), replace=False)
    for b in dag.branches:
        branch_shift[b][shifted] = rng.normal(0.0, 0.6, len(shifted))

    def activity_logmean(stage: str) -> np.ndarray:
        lm = base.copy()
        for m, a in STAGE_PROGRAMS.get(stage, {}).items():
            for g, lfc in module_lfc[m].items():
                lm[gidx[g]] += a * lfc
        # progenitors get a damped version of their branch shift; mature stages the full one
        lm += branch_shift[dag.branch[stage]] * min(1.0, dag.depth(stage) / 4.0)
        return lm

    stage_lm = {s: activity_logmean(s) for s in stages}
    weights = np.array([STAGE_WEIGHTS.get(s, 1.0) for s in stages])
    weights = weights / weights.sum()
    immature = {s for s in stages if dag.branch[s] == "stem_progenitor" or dag.children[s]}

    if donor_seed is not None:
        rng = np.random.default_rng([seed, donor_seed])
    suffix = "" if donor_seed is None else f"_s{donor_seed}"
    X_parts, obs_rows = [], []
    for d in range(n_donors):
        donor = f"donor{d + 1:02d}{suffix}"
        props = rng.dirichlet(weights * 60.0)
        donor_scale = rng.normal(0.0, donor_effect, G)
        lib_factor = np.exp(rng.normal(0.0, 0.2))
        stage_of_cell = rng.choice(len(stages), size=cells_per_donor, p=props)
        u = rng.uniform(0.0, 0.35, cells_per_donor)
        logmeans = np.empty((cells_per_donor, G))
        parents = []
        for i, si in enumerate(stage_of_cell):
            s = stages[si]
            ps = dag.parents[s]
            if ps:
                p = ps[rng.integers(len(ps))]
                logmeans[i] = (1 - u[i]) * stage_lm[s] + u[i] * stage_lm[p]
            else:
                u[i] = 0.0
                logmeans[i] = stage_lm[s]
                p = ""
            parents.append(p)
        logmeans += donor_scale
        prof = np.exp(logmeans - logmeans.max(1, keepdims=True))
        prof /= prof.sum(1, keepdims=True)
        lib = np.exp(rng.normal(np.log(median_library_size), 0.35, cells_per_donor)) * lib_factor
        mu = prof * lib[:, None]
        lam = rng.gamma(theta[None, :], mu / theta[None, :])
        counts = rng.poisson(lam).astype(np.float32)
        X_parts.append(sp.csr_matrix(counts))
        for i, si in enumerate(stage_of_cell):
            s = stages[si]
            obs_rows.append({
                "donor": donor, "tissue": "bone_marrow" if s in immature else "peripheral_blood",
                "cell_type": s, "stage": s, "branch": dag.branch[s], "depth": dag.depth(s),
                "pseudotime": max(dag.depth(s) - u[i], 0.0), "parent_stage": parents[i],
            })
    obs = pd.DataFrame(obs_rows)
    obs.index = [f"sim{seed}{suffix}_{i}" for i in range(len(obs))]
    for c in ("donor", "tissue", "cell_type", "stage", "branch", "parent_stage"):
        obs[c] = pd.Categorical(obs[c])
    obs["synthetic"] = True
    out = ad.AnnData(sp.vstack(X_parts).tocsr(), obs=obs)
    out.var_names = genes
    module_of = {}
    for m, gs in MODULES.items():
        for g in gs:
            module_of.setdefault(g, []).append(m)
    out.var["marker_modules"] = [",".join(module_of.get(g, [])) for g in genes]
    out.var["is_marker"] = [g in module_of for g in genes]
    out.uns["sclens_synthetic"] = {
        "synthetic": True, "generator": "sclens.datasets.simulate_hematopoiesis", "seed": seed,
        "n_donors": n_donors, "cells_per_donor": cells_per_donor, "n_background_genes": n_background_genes,
        "median_library_size": median_library_size, "donor_effect": donor_effect, "dag": dag.name,
        "donor_seed": donor_seed,
    }
    return out
