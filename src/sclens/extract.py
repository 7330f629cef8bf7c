"""Extraction: a frozen operator, a small adaptor and readouts, shipped as ONE standalone ``.safetensors`` file.

Three stages (DESIGN "Extraction"):

1. **Operator** (:func:`select_operator`): one unit's G x G operator, a weighted pool of units, or the drift
   pair ``[A_early − A_mid, A_mid − A_late]`` taken from an :class:`~sclens.operators.OperatorBank` (or the
   top operator hypothesis of a :class:`~sclens.screen.ScreenReport`); optionally replaced by its truncated
   SVD (``rank``), stored as factors ``left = U_r S_r`` [G, r] and ``right = V_rᵀ`` [r, G].
2. **Adaptor** ``z = ((f − mean) / scale) · Wᵀ + c`` with ``f`` the operator features and d = 10.
   ``adaptor="ruler"`` (the default, :func:`fit_ruler_adaptor`) is closed form on all training cells: features
   centred and divided by one global scale, the stages placed on a sphere whose angles fit the DAG ruler, every
   cell regressed onto its stage's point (ridge on the top 100 PCs), the remaining dimensions filled with the
   top PCs of what the regression left (under 2 s on a Kang split; chosen by measurement over the trained
   adaptor, which lost CD4/CD8 accuracy to PCA-10: docs/extract.md). ``adaptor="let"`` is the anchor-trained
   LET of the screen; ``adaptor="cell"`` (the earlier default) is trained on stage-balanced cells (≤ 500 per stage, 120 epochs, batch 896) with
   ``1.0·L_stage + 0.1·L_local + 0.08·L_recon + 0.4·L_cls``, where (our choices; the papers leave them open)

   * ``L_stage``: LET's ruler fit on every pair of the batch, ``mean (β·arccos cos(z_i, z_j) − ruler_ij)²``;
   * ``L_local``: neighbourhood preservation, ``mean_i d̂(i, n_i)² / mean_{i<j} d̂(i, j)²`` for one random
     feature-space kNN neighbour ``n_i`` (k = 15) of each cell: neighbours must be closer than the batch spread;
   * ``L_recon``: tied-weight reconstruction ``mean ‖Wᵀz + b − f̃‖²`` of the standardised features ``f̃``;
   * ``L_cls``: cross-entropy of a linear stage classifier on ``z`` (used for training only; the shipped
     readouts are fitted in stage 3).
3. **Readouts** on ``z``: multinomial logistic probes for branch and stage, binary probes CD4 vs CD8 and
   monocyte vs macrophage where the training labels hold both classes, and pseudotime = linear regression
   of stage depth (hops from HSC) on ``z``.

Everything is linear up to the readouts, so at apply time operator, standardisation and encoder are folded
into one G x d matrix (computed once in float64 at load; ``fold=False`` runs the explicit chain). Apply
streams over cells in chunks from memory, backed ``.h5ad``, ``.zarr`` or a Dask array.

File format (``FORMAT_VERSION`` 1): tensors ``operator.{i}.dense`` or ``operator.{i}.left/right``,
``adaptor.{mean,scale,weight,bias,beta}``, ``readout.{name}.{coef,intercept}``; metadata ``format``,
``format_version``, ``manifest`` (JSON: panel, normalisation, DAG, label vocabularies, metrics, seeds,
versions, input hashes) and ``content_sha256`` (sha256 over the manifest and every tensor), checked at load.
Loading parses safetensors and JSON only: it never executes code.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__
from .data import GenePanel, detect_gene_id_type, detect_value_kind, gene_symbols, harmonize_gene_ids, iter_chunks, require_obs_columns
from .errors import ArtifactError, InputError
from .ontology import StageDAG
from .operators import OperatorBank
from .utils import array_sha256, atomic_write, package_versions

FORMAT = "sclens.extracted"
FORMAT_VERSION = 1
ADAPTORS = {"ruler": "closed form: stage targets on the ruler's sphere regressed from all training cells + PCs "
                    "(default)",
            "cell": "trained 120 epochs on stage-balanced z-scored cells (ruler / local / recon / stage loss)",
            "let": "the screen's anchor-trained LET as a linear map"}
LOSS_WEIGHTS = {"stage": 1.0, "local": 0.1, "recon": 0.08, "cls": 0.4}
RULER_PC_WEIGHT = 0.3  # spread of the ruler adaptor's principal-component block relative to its ruler block
# binary probes: name -> (negative class, positive class) -> stages of the default DAG in each class
PROBES = {
    "cd4_cd8": {"CD4": ("Naive CD4 T", "Memory CD4 T", "Regulatory T"), "CD8": ("Naive CD8 T", "Memory CD8 T")},
    "mono_macro": {"monocyte": ("Classical monocyte", "Non-classical monocyte"), "macrophage": ("Macrophage",)},
}
OBS_KEYS = {"pseudotime": "sclens_pseudotime", "branch": "sclens_branch", "stage": "sclens_stage"}
OBSM_LATENT = "X_sclens"


# ==================================================================================== stage 1: operator
@dataclass
class OperatorBlock:
    """One G x G operator, dense or as factors ``left`` [G, r] · ``right`` [r, G].

    ``sparse=True`` marks hard-sparse factors (each factor keeps the same number of read genes in its
    ``left`` column and write genes in its ``right`` row); they are stored as gene indices + values, so the
    file holds only those, and rebuilt as dense factors in memory."""

    dense: np.ndarray | None = None
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    sparse: bool = False

    def sparse_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """``{prefix}.read_idx/read_val`` [r, n] and ``write_idx/write_val`` [r, m] for a sparse block."""
        out = {}
        for side, M in (("read", self.left.T), ("write", self.right)):
            nnz = (M != 0).sum(1)
            n = int(nnz.max()) if len(nnz) else 0
            # a factor with fewer non-zeros is padded with explicit zeros at index 0 (harmless in a sum)
            idx = np.zeros((M.shape[0], n), dtype=np.int32)
            val = np.zeros((M.shape[0], n), dtype=np.float32)
            for j, row in enumerate(M):
                nz = np.flatnonzero(row)
                idx[j, : len(nz)], val[j, : len(nz)] = nz, row[nz]
            out[f"{prefix}.{side}_idx"], out[f"{prefix}.{side}_val"] = idx, val
        return out

    @classmethod
    def from_sparse_tensors(cls, t: dict[str, np.ndarray], prefix: str, G: int) -> "OperatorBlock":
        mats = []
        for side in ("read", "write"):
            idx, val = t[f"{prefix}.{side}_idx"].astype(np.int64), t[f"{prefix}.{side}_val"]
            if idx.size and (idx.min() < 0 or idx.max() >= G):
                raise ArtifactError(f"{prefix}.{side}_idx holds gene indices outside the panel (0..{G - 1})")
            M = np.zeros((idx.shape[0], G), dtype=np.float32)
            np.add.at(M, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.ravel()), val.ravel())
            mats.append(M)
        return cls(left=np.ascontiguousarray(mats[0].T), right=mats[1], sparse=True)

    @property
    def rank(self) -> int | None:
        return None if self.dense is not None else int(self.left.shape[1])

    @property
    def n_values(self) -> int:
        if self.dense is not None:
            return int(self.dense.size)
        if self.sparse:
            return int((self.left != 0).sum() + (self.right != 0).sum())
        return int(self.left.size + self.right.size)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.dense if self.dense is not None else (x @ self.left) @ self.right

    def matrix(self) -> np.ndarray:
        return self.dense if self.dense is not None else self.left @ self.right

    def times(self, M: np.ndarray) -> np.ndarray:
        """``A @ M`` in float64 (for folding)."""
        if self.dense is not None:
            return self.dense.astype(np.float64) @ M
        return self.left.astype(np.float64) @ (self.right.astype(np.float64) @ M)

    def truncated(self, rank: int) -> "OperatorBlock":
        if self.dense is None:
            if rank > self.rank:
                raise InputError(f"cannot raise the rank of a rank-{self.rank} operator to {rank}")
            return OperatorBlock(left=self.left[:, :rank].copy(), right=self.right[:rank].copy(), sparse=self.sparse)
        if not 1 <= rank <= self.dense.shape[0]:
            raise InputError(f"rank must be between 1 and {self.dense.shape[0]}, got {rank}")
        U, S, Vt = np.linalg.svd(self.dense.astype(np.float64))
        return OperatorBlock(left=np.ascontiguousarray(U[:, :rank] * S[:rank], dtype=np.float32),
                             right=np.ascontiguousarray(Vt[:rank], dtype=np.float32))

    def sparsified(self, factors: Sequence[int], n_read: int, n_write: int) -> "OperatorBlock":
        """Keep only ``factors`` (rank-1 terms, in the given order) and, in each, the ``n_read`` largest-|loading|
        read genes and ``n_write`` largest write genes; everything else is exactly zero."""
        if self.dense is not None:
            raise InputError("sparsify a factored (low-rank) operator; call low_rank(r) first")
        factors = [int(j) for j in factors]
        if not factors or min(factors) < 0 or max(factors) >= self.rank:
            raise InputError(f"factors must be indices in 0..{self.rank - 1}, got {factors[:10]}")
        G = self.left.shape[0]
        if not (1 <= n_read <= G and 1 <= n_write <= G):
            raise InputError(f"n_read and n_write must be between 1 and {G}, got {n_read}, {n_write}")
        L, R = self.left[:, factors], self.right[factors]
        Ls, Rs = np.zeros_like(L), np.zeros_like(R)
        for j in range(len(factors)):
            keep = np.argsort(-np.abs(L[:, j]), kind="stable")[:n_read]
            Ls[keep, j] = L[keep, j]
            keep = np.argsort(-np.abs(R[j]), kind="stable")[:n_write]
            Rs[j, keep] = R[j, keep]
        return OperatorBlock(left=Ls, right=Rs, sparse=True)


@dataclass
class Operator:
    """Stage 1: the frozen featurisation ``f = [x·A_1, x·A_2, ...]`` over a gene panel."""

    blocks: list[OperatorBlock]
    panel: GenePanel
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        G = len(self.panel)
        for b in self.blocks:
            shape = b.dense.shape if b.dense is not None else (b.left.shape[0], b.right.shape[1])
            if shape != (G, G):
                raise InputError(f"operator blocks must be {G} x {G} (the panel size), got {shape}")

    @property
    def n_features(self) -> int:
        return len(self.blocks) * len(self.panel)

    @property
    def rank(self) -> int | None:
        return self.blocks[0].rank

    @property
    def n_values(self) -> int:
        return sum(b.n_values for b in self.blocks)

    def features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.panel):
            raise InputError(f"cells must be [n, {len(self.panel)}] panel vectors, got shape {x.shape}")
        return np.concatenate([b.apply(x) for b in self.blocks], axis=1)

    def low_rank(self, rank: int) -> "Operator":
        """The truncated-SVD surrogate of every block (rank r factors)."""
        return Operator([b.truncated(rank) for b in self.blocks], self.panel, {**self.source, "rank": int(rank)})

    def sparsified(self, factors: Sequence[int], n_read: int, n_write: int) -> "Operator":
        """The hard-sparse variant of a factored operator (see :meth:`OperatorBlock.sparsified`)."""
        return Operator([b.sparsified(factors, n_read, n_write) for b in self.blocks], self.panel,
                        {**self.source, "sparse": {"factors": [int(j) for j in factors], "n_read": int(n_read),
                                                   "n_write": int(n_write)}})

    def describe(self) -> str:
        s = self.source
        what = {"unit": lambda: f"{s['kind']} L{s['layer']}H{s['head']}",
                "pool": lambda: f"{s['kind']} pool of {len(s['units'])} units",
                "drift": lambda: f"{s['kind']} drift (early-mid, mid-late)",
                "identity": lambda: "identity (the gene panel itself; control)"}.get(s.get("type"), lambda: "custom")()
        form = ", dense" if not self.rank else (f", hard-sparse rank {self.rank}" if self.blocks[0].sparse
                                                else f", rank {self.rank}")
        return what + form + f", G = {len(self.panel)}"


def _pick_bank(banks, kind: str | None) -> OperatorBank:
    if isinstance(banks, OperatorBank):
        if kind and kind != banks.kind:
            raise InputError(f"the bank holds {banks.kind!r} operators, not {kind!r}")
        return banks
    if kind is None:
        if len(banks) != 1:
            raise InputError(f"several operator kinds given ({sorted(banks)}); say which with kind=")
        return next(iter(banks.values()))
    if kind not in banks:
        raise InputError(f"no {kind!r} operator bank; have {sorted(banks)}")
    return banks[kind]


def screen_table(report) -> pd.DataFrame:
    """The ranked hypothesis table of a screen report, its folder or its ``screen_table.csv``."""
    from .screen import ScreenReport

    if isinstance(report, ScreenReport):
        return report.table
    p = Path(report)
    p = p / "screen_table.csv" if p.is_dir() else p
    if not p.is_file():
        raise InputError(f"no screen table at {p}; pass a ScreenReport or the folder `sclens screen` wrote")
    return pd.read_csv(p)


def _top_operator_row(report) -> dict:
    """The best-ranked operator hypothesis (not the raw control) of a screen report, table or folder."""
    table = screen_table(report)
    ops = table[table["featurisation"] != "raw"]
    if ops.empty:
        raise InputError("the screen report holds no operator hypothesis (only the raw control)")
    row = ops.iloc[0].to_dict()
    if not bool(row.get("passes_all", False)):
        warnings.warn(f"the top operator hypothesis ({row['featurisation']} L{row['layer']}H{row['head']}, "
                      f"{row['fitter']}) does not pass the screen's gates; extracting it anyway", stacklevel=3)
    return row


def select_operator(
    banks: OperatorBank | dict[str, OperatorBank], *, unit: tuple[int, int] | None = None,
    pool: Sequence[tuple[int, int]] | None = None, weights: Sequence[float] | None = None, drift: bool = False,
    kind: str | None = None, report=None, rank: int | None = None,
) -> Operator:
    """Stage 1: choose the frozen operator (exactly one of ``unit``, ``pool``, ``drift`` or ``report``)."""
    chosen = [unit is not None, pool is not None, drift, report is not None]
    if sum(chosen) != 1:
        raise InputError("choose exactly one of unit=(layer, head), pool=[units], drift=True or report=")
    screen_row = None
    if report is not None:
        screen_row = _top_operator_row(report)
        feat = str(screen_row["featurisation"])
        kind = feat.split(":")[-1]
        drift = feat.startswith("drift:")
        if not drift:
            unit = (int(screen_row["layer"]), int(screen_row["head"]))
    bank = _pick_bank(banks, kind)
    base = {"kind": bank.kind, "model_sha256": bank.manifest.get("model_sha256"),
            "reference_set_sha256": bank.manifest.get("reference_set_sha256")}
    if screen_row is not None:
        base["screen"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in screen_row.items()
                          if k in ("rank", "featurisation", "layer", "head", "fitter", "ruler_spearman_resid",
                                   "trustworthiness", "perm_p", "q", "passes_all", "passes_published",
                                   "gate_learned", "margin_over_raw", "margin_over_random")}
    if drift:
        if bank.n_layers < 3:
            raise InputError(f"drift needs at least 3 layers; the bank has {bank.n_layers}")
        blocks = [OperatorBlock(dense=np.ascontiguousarray(A, dtype=np.float32)) for A in bank.drift_operators()]
        op = Operator(blocks, bank.panel, {**base, "type": "drift", "layer_blocks": bank.block_bounds(3)})
    elif pool is not None:
        units = [tuple(map(int, u)) for u in pool]
        op = Operator([OperatorBlock(dense=bank.pool(units, weights))], bank.panel,
                      {**base, "type": "pool", "units": units, "weights": None if weights is None else list(weights)})
    else:
        l, h = map(int, unit)
        op = Operator([OperatorBlock(dense=np.ascontiguousarray(bank.unit(l, h), dtype=np.float32))], bank.panel,
                      {**base, "type": "unit", "layer": l, "head": h})
    return op.low_rank(rank) if rank else op


# ==================================================================================== stage 2: adaptor
@dataclass
class Adaptor:
    """``z = ((f − mean) / scale) · weightᵀ + bias``; latent distances are ``beta · arccos(cos)``."""

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # [d, F]
    bias: np.ndarray  # [d]
    beta: float
    info: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.weight.shape[0])

    def transform(self, F: np.ndarray) -> np.ndarray:
        if F.shape[1] != self.weight.shape[1]:
            raise InputError(f"the adaptor expects {self.weight.shape[1]} features, got {F.shape[1]}")
        return (((F - self.mean) / self.scale) @ self.weight.T + self.bias).astype(np.float32)

    def angular_distances(self, Z: np.ndarray) -> np.ndarray:
        zn = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-8)
        return self.beta * np.arccos(np.clip(zn @ zn.T, -1, 1))


def fit_let_adaptor(F_anchors: np.ndarray, ruler: np.ndarray, *, d: int = 10, seed: int = 0, epochs: int = 150) -> Adaptor:
    """The anchor-trained LET of the screen, rewritten as an explicit linear map of the features."""
    from .manifold import fit_manifold

    m = fit_manifold(F_anchors, "let", d=d, ruler=ruler, seed=seed, let_epochs=epochs)
    let = m.model
    weight = (let.W.astype(np.float64) @ let.V).astype(np.float32)  # LET works in the anchors' row space V
    bias = -(let.W.astype(np.float64) @ let.b).astype(np.float32)
    n_trainable = int(let.W.size + let.b.size + 1)
    return Adaptor("let", m.mu.astype(np.float32), m.sd.astype(np.float32), weight, bias, let.beta,
                   {"n_anchors": int(len(F_anchors)), "epochs": epochs, "seed": seed, "alpha": let.alpha,
                    "final_fit_loss": let.final_fit_loss, "n_trainable": n_trainable,
                    "trainable_note": f"W [{let.W.shape[0]} x {let.W.shape[1]}] + b in the anchors' row space + beta"})


def sphere_ruler_targets(ruler: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Unit vectors ``u_s`` in R^k and a scale ``beta`` with ``beta · arccos(u_i · u_j) ≈ ruler_ij`` (least squares).

    The angular ruler fit of the cell adaptor, solved for the stage targets directly: classical MDS of the ruler
    gives the start, L-BFGS refines (a few hundred numbers, deterministic for a given ``seed``). Returns
    ``(U [n, k], beta, mean squared residual)``.
    """
    from scipy.optimize import minimize

    R = np.asarray(ruler, dtype=np.float64)
    n = len(R)
    if n < 2 or k < 1:
        raise InputError(f"the ruler targets need >= 2 stages and k >= 1, got {n} stages and k = {k}")
    J = np.eye(n) - 1.0 / n
    w, V = np.linalg.eigh(-0.5 * J @ (R**2) @ J)
    top = np.argsort(w)[::-1][:k]
    Y = V[:, top] * np.sqrt(np.maximum(w[top], 1e-9))
    rng = np.random.default_rng(seed)
    if Y.shape[1] < k:
        Y = np.hstack([Y, 1e-3 * rng.standard_normal((n, k - Y.shape[1]))])
    Y = Y + 1e-3 * rng.standard_normal(Y.shape)  # no two stages start on the same point
    iu = np.triu_indices(n, 1)

    def loss(p):
        U = p[:-1].reshape(n, k)
        Un = U / np.linalg.norm(U, axis=1, keepdims=True)
        A = np.arccos(np.clip(Un @ Un.T, -1 + 1e-7, 1 - 1e-7))
        return float(((np.exp(p[-1]) * A[iu] - R[iu]) ** 2).mean())

    p0 = np.concatenate([Y.ravel(), [np.log(max(R.max(), 1e-3) / (np.pi / 2))]])
    # finite-difference gradients on purpose: an exact gradient reached a slightly lower residual (0.0063 vs
    # 0.0068 on Kang's 8 stages) in a configuration farther from the MDS start, and the regression then held less
    # (8 Kang splits, identity: held-out ruler Spearman 0.71 vs 0.86, CD14/FCGR3A AUROC 0.923 vs 0.961)
    res = minimize(loss, p0, method="L-BFGS-B", options={"maxiter": 3000})
    U = res.x[:-1].reshape(n, k)
    return U / np.linalg.norm(U, axis=1, keepdims=True), float(np.exp(res.x[-1])), float(res.fun)


def fit_ruler_adaptor(
    F: np.ndarray, stage_idx: np.ndarray, stage_ruler: np.ndarray, *, d: int = 10, n_components: int = 100,
    pc_weight: float = RULER_PC_WEIGHT, max_cells: int = 20_000, seed: int = 0,
) -> Adaptor:
    """The closed-form adaptor (the default): stage targets on the ruler's sphere, regressed from the features.

    1. Centre the features on the training cells and divide by ONE global scale (their RMS norm): no per-feature
       z-scoring, so high-variance directions keep their weight (z-scoring cost CD4/CD8 accuracy, issue 18).
    2. Project on the top ``n_components`` principal components (randomised SVD, seeded).
    3. Place the training stages on a k-sphere so that ``beta · angle`` fits the DAG ruler
       (:func:`sphere_ruler_targets`, k = min(#stages − 1, d)) and regress every cell onto its stage's target
       (ridge, stages weighted equally, penalty by generalised cross-validation); then map that k-dimensional
       subspace affinely so that every stage's centroid lands on its target (the regression shrinks them towards
       their mean). With k = #stages − 1 the fitted directions span the same subspace as linear discriminant
       analysis (optimal scoring), so the stages stay separable, while their geometry follows the ruler, so
       angular distances keep the manifold.
    4. Fill the remaining d − k dimensions with the top principal components of what the regression left,
       scaled to ``pc_weight`` × the ruler block's per-dimension spread (they carry within-stage variation for
       the readouts without swamping the ruler geometry of the angles).

    With more stages than ``d`` + 1 the ruler block takes every dimension (no PCs). Measured on the simulated
    36-stage cohort: stage separability slightly below PCA-10 there (3-fold logistic 0.66 vs 0.69), the ruler kept
    (in-sample centroid Spearman 0.93). The PCs of step 4 carry some stage differences too; taking them
    orthogonal to the stage centroids instead kept the training centroids on the ruler but let each held-out
    donor's shift flatten its angles (Kang split 0: held-out ruler Spearman 0.46 against 0.91), so they stay plain.

    ``stage_idx`` holds each cell's DAG stage index (−1: no stage; such cells count for the centring and the
    PCA only). All cells (up to ``max_cells``, a seeded subsample) are used, not a stage-balanced subset.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.utils.extmath import randomized_svd

    F = np.asarray(F)
    stage_idx = np.asarray(stage_idx)
    if len(F) < 20:
        raise InputError(f"the ruler adaptor needs at least 20 training cells, got {len(F)}")
    if d < 1:
        raise InputError(f"d must be >= 1, got {d}")
    if pc_weight < 0:
        raise InputError(f"pc_weight must be >= 0, got {pc_weight}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(F), size=min(len(F), max_cells), replace=False))
    X = F[idx].astype(np.float64)
    mu = X.mean(0)
    X -= mu
    scale = float(np.sqrt((X**2).sum(1).mean()))
    if not np.isfinite(scale) or scale <= 1e-12:
        raise InputError("the operator features do not vary across the training cells (an all-constant operator?)")
    X /= scale
    m = int(min(n_components, X.shape[0] - 1, X.shape[1]))
    _, _, Vm = randomized_svd(X, m, n_iter=2, random_state=seed)  # a basis of the top subspace, not exact PCs
    P = X @ Vm.T  # [n, m]
    st_all = stage_idx[idx]
    ok = st_all >= 0
    stages, y = np.unique(st_all[ok], return_inverse=True)
    k = int(min(len(stages) - 1, d, m))
    info = {"n_cells": int(len(idx)), "n_components": m, "n_stages": int(len(stages)), "k_ruler": k,
            "pc_weight": pc_weight, "seed": seed, "scaling": "centred, one global scale (RMS norm)"}
    if k >= 1:
        U, beta, sphere_loss = sphere_ruler_targets(np.asarray(stage_ruler)[np.ix_(stages, stages)], k, seed)
        counts = np.bincount(y)
        reg = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(P[ok], U[y], sample_weight=len(y) / (len(counts) * counts[y]))
        coef = np.atleast_2d(reg.coef_)  # [k, m]: the discriminant subspace (stages weighted equally)
        # the regression shrinks the stage centroids towards their mean, so their angles around the origin no
        # longer follow the ruler: an affine map of that subspace puts every stage's centroid back on its target
        Zr = P[ok] @ coef.T
        C = np.stack([Zr[y == j].mean(0) for j in range(len(stages))])
        M = np.linalg.lstsq(np.hstack([C, np.ones((len(C), 1))]), U, rcond=None)[0]  # [k + 1, k]
        coef = M[:k].T @ coef
        rows, bias = [coef], [M[k]]
        ruler_rms = float(np.sqrt(((P[ok] @ coef.T + M[k]) ** 2).mean()))
        info.update({"ridge_alpha": float(reg.alpha_), "sphere_fit_mse": sphere_loss})
    else:  # one stage: nothing to place, the adaptor is PCA
        rows, bias, ruler_rms, beta = [], [], 1.0, 1.0
        coef = np.zeros((0, m))
    if d > k:
        Q = np.linalg.qr(coef.T)[0] if k else np.zeros((m, 0))
        Pres = P - (P @ Q) @ Q.T
        _, _, Vres = np.linalg.svd(Pres - Pres.mean(0), full_matrices=False)
        pcs = Vres[: d - k]
        spread = (Pres @ pcs.T).std(0)
        w_pc = (pc_weight if k else 1.0) * ruler_rms / np.maximum(spread, 1e-12)
        rows.append(pcs * w_pc[:, None])
        bias.append(-(Pres.mean(0) @ pcs.T) * w_pc)
    W = np.vstack(rows) @ Vm  # [d, F] in the scaled feature space
    b = np.concatenate(bias)
    # one common factor so that the latent has unit RMS per dimension: angles do not change, and readouts fitted
    # on z without standardisation (the extracted file's own) see well-scaled inputs
    z_rms = float(np.sqrt(((X @ W.T + b) ** 2).mean()))
    W, b = W / max(z_rms, 1e-12), b / max(z_rms, 1e-12)
    G = F.shape[1]
    info["n_trainable"] = int(W.size + b.size + mu.size + 2)
    info["trainable_note"] = "weight [d x F] + bias [d] + feature mean [F] + global scale + beta (all closed form)"
    return Adaptor("ruler", mu.astype(np.float32), np.full(G, scale, np.float32), W.astype(np.float32),
                   b.astype(np.float32), float(beta), info)


def stage_balanced_indices(stages: np.ndarray, max_per_stage: int, seed: int) -> np.ndarray:
    """Up to ``max_per_stage`` cells of every stage (seeded), sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for s in np.unique(stages):
        idx = np.flatnonzero(stages == s)
        keep.append(rng.choice(idx, size=min(len(idx), max_per_stage), replace=False))
    return np.sort(np.concatenate(keep))


def train_cell_adaptor(
    F: np.ndarray, stage_idx: np.ndarray, stage_ruler: np.ndarray, *, d: int = 10, epochs: int = 120,
    batch_size: int = 896, lr: float = 1e-2, weights: dict | None = None, k_local: int = 15, seed: int = 0,
    progress: bool = False,
) -> Adaptor:
    """Train the cell-level adaptor on (already stage-balanced) cells; see the module docstring for the loss."""
    import torch
    from sklearn.neighbors import NearestNeighbors
    from tqdm.auto import tqdm

    from .manifold import zscore_fit

    w = {**LOSS_WEIGHTS, **(weights or {})}
    n = len(F)
    if n < 20:
        raise InputError(f"the cell adaptor needs at least 20 training cells, got {n}")
    mu, sd = zscore_fit(F.astype(np.float64))
    Xs = ((F - mu) / sd).astype(np.float32)
    stages, stage_local = np.unique(stage_idx, return_inverse=True)
    nbrs = NearestNeighbors(n_neighbors=min(k_local, n - 1) + 1).fit(Xs).kneighbors(Xs, return_distance=False)[:, 1:]
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(Xs)
    R = torch.as_tensor(stage_ruler[np.ix_(stages, stages)], dtype=torch.float32)
    y = torch.from_numpy(stage_local.astype(np.int64))
    # PCA start: the encoder begins on the top-d directions of the standardised features
    _, _, Vt = np.linalg.svd(Xs - Xs.mean(0), full_matrices=False)
    d_eff = min(d, Vt.shape[0])
    W = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(Vt[:d_eff], dtype=np.float32)))
    b = torch.nn.Parameter(torch.zeros(Xs.shape[1]))
    log_beta = torch.nn.Parameter(torch.tensor(float(np.log(max(float(R.max()), 1e-3) / (np.pi / 2)))))
    cls = torch.nn.Linear(d_eff, len(stages))
    with torch.no_grad():
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=g) / np.sqrt(d_eff))
        cls.bias.zero_()
    params = [W, b, log_beta, *cls.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def unit_rows(z):
        return z / z.norm(dim=1, keepdim=True).clamp(min=1e-8)

    def pairwise_angle(z):
        u = unit_rows(z)
        return torch.arccos((u @ u.T).clamp(-1 + 1e-6, 1 - 1e-6))

    def rowwise_angle(za, zb):
        return torch.arccos((unit_rows(za) * unit_rows(zb)).sum(-1).clamp(-1 + 1e-6, 1 - 1e-6))

    history = []
    bs = min(batch_size, n)
    for epoch in tqdm(range(epochs), desc="training adaptor", unit="epoch", disable=not progress):
        order = rng.permutation(n)
        sums = {k: 0.0 for k in ("total", "stage", "local", "recon", "cls")}
        n_batches = 0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            if len(idx) < 4:
                continue
            nb_idx = nbrs[idx, rng.integers(0, nbrs.shape[1], size=len(idx))]
            xb, xn = X[idx], X[nb_idx]
            zb, zn = (xb - b) @ W.T, (xn - b) @ W.T
            beta = log_beta.exp()
            A = beta * pairwise_angle(zb)
            iu = torch.triu_indices(len(idx), len(idx), offset=1)
            Rb = R[y[idx]][:, y[idx]]
            l_stage = ((A[iu[0], iu[1]] - Rb[iu[0], iu[1]]) ** 2).mean()
            d_nb = beta * rowwise_angle(zb, zn)
            l_local = (d_nb**2).mean() / (A[iu[0], iu[1]] ** 2).mean().clamp(min=1e-8)
            l_recon = ((zb @ W + b - xb) ** 2).mean()
            l_cls = torch.nn.functional.cross_entropy(cls(zb), y[idx])
            loss = w["stage"] * l_stage + w["local"] * l_local + w["recon"] * l_recon + w["cls"] * l_cls
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in (("total", loss), ("stage", l_stage), ("local", l_local), ("recon", l_recon), ("cls", l_cls)):
                sums[k] += float(v.detach())
            n_batches += 1
        history.append({k: v / max(n_batches, 1) for k, v in sums.items()})
    Wn, bn = W.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)
    n_trainable = int(W.numel() + b.numel() + 1)
    return Adaptor("cell", mu.astype(np.float32), sd.astype(np.float32), Wn.astype(np.float32),
                   (-(Wn @ bn)).astype(np.float32), float(log_beta.detach().exp()),
                   {"n_cells": int(n), "epochs": epochs, "batch_size": bs, "lr": lr, "loss_weights": w,
                    "k_local": k_local, "seed": seed, "n_trainable": n_trainable,
                    "n_trainable_training_only": int(sum(p.numel() for p in cls.parameters())),
                    "history_first": history[0] if history else None, "history_last": history[-1] if history else None,
                    "loss_history": [round(h["total"], 5) for h in history]})


# ==================================================================================== stage 3: readouts
@dataclass
class Readout:
    """A linear probe on z: classifier (logistic; binary stores one row) or regressor (pseudotime)."""

    name: str
    kind: str  # "classifier" | "regressor"
    coef: np.ndarray  # [C or 1, d]
    intercept: np.ndarray  # [C or 1]
    classes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_trainable(self) -> int:
        return int(self.coef.size + self.intercept.size)

    def logits(self, Z: np.ndarray) -> np.ndarray:
        return Z @ self.coef.T + self.intercept

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        if self.kind == "classifier" and len(self.classes) == 1:
            return np.ones((len(Z), 1), np.float32)  # one class seen in training (e.g. a B-cell-only set)
        s = self.logits(Z).astype(np.float64)
        if s.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-s[:, 0]))
            return np.stack([1 - p1, p1], axis=1).astype(np.float32)
        s = s - s.max(1, keepdims=True)
        e = np.exp(s)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def predict(self, Z: np.ndarray) -> np.ndarray:
        if self.kind == "regressor":
            return self.logits(Z)[:, 0].astype(np.float32)
        return np.asarray(self.classes)[self.predict_proba(Z).argmax(1)]


def fit_classifier(name: str, Z: np.ndarray, labels: np.ndarray, *, seed: int = 0, C: float = 1.0) -> Readout:
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) == 1:  # nothing to separate: a constant readout, stated in its info
        return Readout(name, "classifier", np.zeros((1, Z.shape[1]), np.float32), np.zeros(1, np.float32),
                       [str(classes[0])], {"n_train": int(len(labels)), "C": C, "constant": True})
    # fitted on standardised z (it converges in far fewer iterations, and C means the same whatever the latent's
    # scale), then folded back, so the stored probe reads z itself
    mu, sd = Z.mean(0), Z.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    clf = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit((Z - mu) / sd, labels)
    coef = clf.coef_ / sd
    intercept = clf.intercept_ - coef @ mu
    return Readout(name, "classifier", coef.astype(np.float32), intercept.astype(np.float32),
                   [str(c) for c in clf.classes_], {"n_train": int(len(labels)), "C": C, "standardised": True,
                                                     "n_iter": int(np.max(clf.n_iter_))})


def fit_pseudotime(Z: np.ndarray, depth: np.ndarray) -> Readout:
    from sklearn.linear_model import LinearRegression

    reg = LinearRegression().fit(Z, depth)
    return Readout("pseudotime", "regressor", reg.coef_[None].astype(np.float32),
                   np.atleast_1d(reg.intercept_).astype(np.float32), [],
                   {"n_train": int(len(depth)), "target": "stage depth (hops from the DAG root)"})


def probe_labels(stages: np.ndarray, probe: str) -> np.ndarray:
    """Class of each cell for a binary probe (None where the cell's stage is in neither class)."""
    out = np.full(len(stages), None, dtype=object)
    for cls_name, members in PROBES[probe].items():
        out[np.isin(stages, members)] = cls_name
    return out


# ==================================================================================== the artifact
@dataclass
class ExtractedModel:
    """The standalone algorithm: operator → adaptor → readouts, with its manifest."""

    operator: Operator
    adaptor: Adaptor
    readouts: dict[str, Readout]
    manifest: dict = field(default_factory=dict)
    _folded: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def panel(self) -> GenePanel:
        return self.operator.panel

    @property
    def content_sha256(self) -> str | None:
        return self.manifest.get("content_sha256")

    def n_trainable(self) -> dict[str, int]:
        out = {"adaptor": int(self.adaptor.info.get("n_trainable", self.adaptor.weight.size + self.adaptor.bias.size))}
        out.update({f"readout.{k}": r.n_trainable for k, r in self.readouts.items()})
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ compute
    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(M [G, d], c [d])`` with ``z = x · M + c``: operator, standardisation and encoder in one matrix."""
        if self._folded is None:
            a = self.adaptor
            Ws = a.weight.astype(np.float64) / a.scale.astype(np.float64)[None, :]  # [d, F]
            G = len(self.panel)
            M = sum(blk.times(Ws[:, i * G : (i + 1) * G].T) for i, blk in enumerate(self.operator.blocks))
            c = a.bias.astype(np.float64) - Ws @ a.mean.astype(np.float64)
            self._folded = (np.ascontiguousarray(M, dtype=np.float32), c.astype(np.float32))
        return self._folded

    def latent(self, x: np.ndarray, fold: bool = True) -> np.ndarray:
        """``z`` for panel vectors ``x`` [n, G] (log1p-normalised, panel order)."""
        if not fold:
            return self.adaptor.transform(self.operator.features(x))
        M, c = self.folded()
        return np.asarray(x, dtype=np.float32) @ M + c

    def predict(self, x: np.ndarray, fold: bool = True) -> dict[str, np.ndarray]:
        """Every output for panel vectors ``x``: latent, pseudotime, branch / stage probabilities, probe scores."""
        Z = self.latent(x, fold)
        out = {"latent": Z}
        for name, r in self.readouts.items():
            out[name] = r.predict(Z) if r.kind == "regressor" else r.predict_proba(Z)
        return out

    def output_columns(self) -> list[tuple[str, int]]:
        """Layout of :meth:`predict_packed`: (name, width) in order."""
        cols = [("latent", self.adaptor.d)]
        for name, r in self.readouts.items():
            cols.append((name, 1 if r.kind == "regressor" else len(r.classes)))
        return cols

    def predict_packed(self, x: np.ndarray, fold: bool = True) -> np.ndarray:
        """:meth:`predict` as one float32 block [n, sum of widths] (for Dask and on-disk streaming)."""
        res = self.predict(x, fold)
        return np.concatenate([np.asarray(res[n], dtype=np.float32).reshape(len(x), w) for n, w in self.output_columns()],
                              axis=1)

    def unpack(self, P: np.ndarray) -> dict[str, np.ndarray]:
        out, s = {}, 0
        for name, w in self.output_columns():
            out[name] = P[:, s] if name in self.readouts and self.readouts[name].kind == "regressor" else P[:, s : s + w]
            s += w
        return out

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, np.ndarray]:
        t: dict[str, np.ndarray] = {}
        for i, blk in enumerate(self.operator.blocks):
            if blk.dense is not None:
                t[f"operator.{i}.dense"] = blk.dense
            elif blk.sparse:
                t.update(blk.sparse_tensors(f"operator.{i}"))
            else:
                t[f"operator.{i}.left"], t[f"operator.{i}.right"] = blk.left, blk.right
        a = self.adaptor
        t.update({"adaptor.mean": a.mean, "adaptor.scale": a.scale, "adaptor.weight": a.weight, "adaptor.bias": a.bias,
                  "adaptor.beta": np.array([a.beta], dtype=np.float32)})
        for name, r in self.readouts.items():
            t[f"readout.{name}.coef"], t[f"readout.{name}.intercept"] = r.coef, r.intercept
        return {k: np.ascontiguousarray(v, dtype=np.int32 if k.endswith("_idx") else np.float32) for k, v in t.items()}

    def _structure(self) -> dict:
        return {"operator": {"source": self.operator.source, "n_blocks": len(self.operator.blocks),
                             "rank": self.operator.rank, "sparse": bool(self.operator.blocks[0].sparse),
                             "panel": self.panel.to_dict()},
                "adaptor": {"kind": self.adaptor.kind, "d": self.adaptor.d, "info": self.adaptor.info},
                "readouts": {k: {"kind": r.kind, "classes": r.classes, "info": r.info} for k, r in self.readouts.items()}}

    def save(self, path: str | Path) -> Path:
        """Write the single ``.safetensors`` file atomically; returns its path."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = self.tensors()
        manifest = {k: v for k, v in self.manifest.items() if k not in ("content_sha256", "structure")}
        manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "structure": self._structure(),
                         "n_trainable": self.n_trainable(), "operator_values": self.operator.n_values})
        manifest_json = json.dumps(manifest, sort_keys=True, default=_json_default)
        digest = content_hash(manifest_json, tensors)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "manifest": manifest_json, "content_sha256": digest}
        atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
        self.manifest = {**json.loads(manifest_json), "content_sha256": digest}
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExtractedModel":
        """Read and verify a file written by :meth:`save` (safetensors + JSON only; no code runs)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no such file: {path}")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a readable .safetensors file (corrupt or truncated?): {exc}") from None
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not an sclens extracted algorithm (format {meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            raise ArtifactError(f"{path} has an unreadable format version {meta.get('format_version')!r}") from None
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{path} was written in format version {version} by a newer sclens; this sclens "
                                f"({__version__}) reads format versions up to {FORMAT_VERSION}. Upgrade sclens.")
        if content_hash(meta.get("manifest", ""), tensors) != meta.get("content_sha256"):
            raise ArtifactError(f"{path} failed its content check: the file was changed after it was written "
                                "(or is corrupt); refusing to load it")
        manifest = json.loads(meta["manifest"])
        manifest["content_sha256"] = meta["content_sha256"]
        st = manifest["structure"]
        panel = GenePanel.from_dict(st["operator"]["panel"])
        blocks = []
        for i in range(st["operator"]["n_blocks"]):
            if f"operator.{i}.dense" in tensors:
                blocks.append(OperatorBlock(dense=tensors[f"operator.{i}.dense"]))
            elif f"operator.{i}.read_idx" in tensors:
                blocks.append(OperatorBlock.from_sparse_tensors(tensors, f"operator.{i}", len(panel)))
            else:
                blocks.append(OperatorBlock(left=tensors[f"operator.{i}.left"], right=tensors[f"operator.{i}.right"]))
        op = Operator(blocks, panel, st["operator"]["source"])
        a = st["adaptor"]
        adaptor = Adaptor(a["kind"], tensors["adaptor.mean"], tensors["adaptor.scale"], tensors["adaptor.weight"],
                          tensors["adaptor.bias"], float(tensors["adaptor.beta"][0]), a["info"])
        readouts = {name: Readout(name, r["kind"], tensors[f"readout.{name}.coef"], tensors[f"readout.{name}.intercept"],
                                  r["classes"], r["info"]) for name, r in st["readouts"].items()}
        return cls(op, adaptor, readouts, manifest)

    @property
    def dag(self) -> StageDAG:
        spec = self.manifest.get("dag")
        return StageDAG(spec) if spec else StageDAG.default()

    def summary(self) -> str:
        m = self.manifest
        nt = self.n_trainable()
        lines = [
            f"sclens extracted algorithm (format {m.get('format_version', FORMAT_VERSION)}, sclens {m.get('sclens_version')})",
            f"  content sha256: {self.content_sha256}",
            f"  operator: {self.operator.describe()} ({self.operator.n_values:,} stored values, frozen)",
            f"  panel: {len(self.panel)} genes ({self.panel.flavor}), e.g. {', '.join(self.panel.genes[:6])}; "
            f"input {self.panel.to_dict()['normalization']}",
            f"  adaptor: {self.adaptor.kind}, d = {self.adaptor.d}, {nt['adaptor']:,} trainable parameters",
        ]
        for name, r in self.readouts.items():
            what = f"{len(r.classes)} classes ({', '.join(r.classes[:6])}{', ...' if len(r.classes) > 6 else ''})" \
                if r.kind == "classifier" else r.info.get("target", "regression")
            lines.append(f"  readout {name}: {r.kind}, {r.n_trainable} parameters, {what}")
        lines.append(f"  trainable parameters in total: {nt['total']:,}")
        if m.get("synthetic"):
            lines.append("  trained on SYNTHETIC data")
        for split, vals in (m.get("metrics") or {}).items():
            if isinstance(vals, dict):
                shown = {k: v for k, v in vals.items() if isinstance(v, float) and not k.endswith(("_n", "_sha256"))}
                lines.append(f"  metrics ({split}, {vals.get('n_cells', vals.get('n_anchors', '?'))} "
                             f"{'cells' if 'n_cells' in vals else 'anchors'}): "
                             + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        lines.append(f"  seeds: {m.get('seeds')}; inputs: {m.get('input_hashes')}")
        return "\n".join(lines)


def content_hash(manifest_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load(path: str | Path) -> ExtractedModel:
    """Load an extracted algorithm file (see :meth:`ExtractedModel.load`)."""
    return ExtractedModel.load(path)


# ==================================================================================== panel rows
def _value_kind(X_head) -> str:
    """Counts vs log1p data, decided once from the first cells so every chunking sees the same rule."""
    kind, stats = detect_value_kind(X_head)
    if kind == "scaled":
        raise InputError(f"the expression values contain negatives (min {stats['min']:g}) or NaN: this looks like "
                         "scaled data; sclens needs raw counts or log1p-normalised values (use the counts layer)")
    return kind


def panel_index(panel: GenePanel, var_names: Sequence[str]) -> np.ndarray:
    """Column of each panel gene in the data; Ensembl ids are mapped to symbols, missing genes -> -1."""
    return panel.column_index(gene_symbols(var_names))


def _head_rows(X, n: int = 2000):
    sub = X[: min(n, X.shape[0])]
    return sub.to_memory() if hasattr(sub, "to_memory") else sub


def panel_rows(adata: ad.AnnData, panel: GenePanel, rows: np.ndarray | None = None, *, layer: str | None = None,
               chunk_size: int = 20_000, kind: str | None = None) -> np.ndarray:
    """Panel vectors ``x`` of the given cells (all when ``rows`` is None), streamed over chunks."""
    idx = panel_index(panel, adata.var_names)
    X0 = adata.layers[layer] if layer else adata.X
    kind = kind or _value_kind(_head_rows(X0))
    if rows is None:
        return np.concatenate([panel.transform(X, idx, kind) for _, X in iter_chunks(adata, chunk_size, layer)]) \
            if adata.n_obs else np.zeros((0, len(panel)), np.float32)
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.zeros((len(rows), len(panel)), dtype=np.float32)
    sorted_rows = rows[order]
    for sl, X in iter_chunks(adata, chunk_size, layer):
        lo, hi = np.searchsorted(sorted_rows, [sl.start, sl.stop])
        if hi > lo:
            local = sorted_rows[lo:hi] - sl.start
            out[order[lo:hi]] = panel.transform(X[local], idx, kind)
    return out


# ==================================================================================== extract
def _split_donors(donors: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out cells (whole donors); all False when fewer than 3 donors or frac == 0."""
    uniq = np.unique(donors)
    if frac <= 0 or len(uniq) < 3:
        return np.zeros(len(donors), bool)
    n_hold = int(min(len(uniq) - 2, max(1, round(frac * len(uniq)))))
    held = np.random.default_rng(seed).choice(uniq, size=n_hold, replace=False)
    return np.isin(donors, held)


def extract(
    adata: ad.AnnData, operator: Operator, *, label_key: str, donor_key: str | None = None,
    tissue_key: str | None = None, adaptor: str = "ruler", d: int = 10, dag: StageDAG | None = None,
    holdout_fraction: float = 0.2, seed: int = 0, layer: str | None = None, epochs: int | None = None,
    batch_size: int = 896, max_cells_per_stage: int = 500, loss_weights: dict | None = None,
    readout_max_cells: int = 50_000, eval_max_cells: int = 20_000, min_cells: int = 5, n_perm: int = 2000,
    progress: bool = True, fit_readouts: bool = True,
) -> ExtractedModel:
    """Stages 2 and 3 on labelled cells: train the adaptor and the readouts over a frozen operator.

    Whole donors (``holdout_fraction``, at least one, when there are >= 3 donors) are held out before any
    training; the model is trained on the rest and ``manifest['metrics']['holdout']`` scores it on the held-out
    donors (cell-level probes and pseudotime, plus the anchor-level transfer check of :func:`validate_transfer`).
    With fewer than 3 donors, metrics are in-sample and marked so. The returned model is what was scored.
    ``fit_readouts=False`` stops after the adaptor (no readouts, no scores): for callers that read the latent with
    readouts of their own, like the benchmark's shared readouts.
    """
    t0 = time.perf_counter()
    if adaptor not in ADAPTORS:
        raise InputError(f"adaptor must be one of {list(ADAPTORS)}, got {adaptor!r}")
    if adaptor == "ruler" and epochs is not None:
        raise InputError(f"the ruler adaptor is fitted in closed form: epochs (got {epochs}) apply to the 'cell' and "
                         "'let' adaptors only")
    if epochs is not None and (epochs < 0 or (adaptor == "let" and epochs < 1)):
        raise InputError(f"epochs must be >= 0 (>= 1 for the LET adaptor; 0 keeps the cell adaptor at its PCA "
                         f"start), got {epochs}")
    dag = dag or StageDAG.default()
    require_obs_columns(adata, [label_key, donor_key, tissue_key])
    mapping = dag.map_labels(adata.obs[label_key].astype(str))
    stages = mapping.stage.to_numpy(dtype=object)
    mapped = pd.notna(stages)
    if mapped.sum() < 20:
        raise InputError(f"only {int(mapped.sum())} cells have labels that map to a stage ({mapping.summary()})")
    donors = adata.obs[donor_key].astype(str).to_numpy() if donor_key else np.full(adata.n_obs, "all", dtype=object)
    held = _split_donors(donors[mapped], holdout_fraction, seed)
    mapped_idx = np.flatnonzero(mapped)
    train_idx, hold_idx = mapped_idx[~held], mapped_idx[held]
    rng = np.random.default_rng(seed)
    # readout cells: a seeded subsample of the training donors; adaptor cells: the same for the ruler adaptor
    # (it subsamples to its own max_cells), stage-balanced for the trained cell adaptor
    ro = np.sort(rng.choice(train_idx, size=min(len(train_idx), readout_max_cells), replace=False))
    bal = ro if adaptor == "ruler" else train_idx[stage_balanced_indices(stages[train_idx], max_cells_per_stage, seed)]
    need = np.union1d(bal, ro)
    x_need = panel_rows(adata, operator.panel, need, layer=layer)
    pos = {c: i for i, c in enumerate(need)}
    x_bal, x_ro = x_need[[pos[c] for c in bal]], x_need[[pos[c] for c in ro]]
    if adaptor == "let":
        from .anchors import build_anchors

        sub = adata[train_idx]
        anchors = build_anchors(sub, operator.panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                                dag=dag, min_cells=min_cells, seed=seed, layer=layer)
        ad_model = fit_let_adaptor(operator.features(anchors.X), anchors.ruler, d=d, seed=seed,
                                   epochs=150 if epochs is None else epochs)
    else:
        F_bal = operator.features(x_bal)
        sidx = np.array([dag.index[s] for s in stages[bal]])
        if adaptor == "ruler":
            ad_model = fit_ruler_adaptor(F_bal, sidx, dag.ruler_matrix, d=d, seed=seed)
        else:
            ad_model = train_cell_adaptor(F_bal, sidx, dag.ruler_matrix, d=d,
                                          epochs=120 if epochs is None else epochs, batch_size=batch_size,
                                          weights=loss_weights, seed=seed, progress=progress)
    model = ExtractedModel(operator, ad_model, {})
    if not fit_readouts:  # adaptor only: the caller scores the latent with its own readouts (bench, compress)
        readouts, skipped, eval_idx = {}, list(PROBES), np.empty(0, int)
        metrics = {"skipped": "fit_readouts=False: adaptor only, no readouts of its own, no scores"}
    else:
        Z_ro = model.latent(x_ro)
        st_ro = stages[ro].astype(str)
        readouts = {key: fit_classifier(key, Z_ro, lab, seed=seed)
                    for key, lab in (("branch", np.array([dag.branch[s] for s in st_ro])), ("stage", st_ro))}
        for probe in PROBES:
            lab = probe_labels(st_ro, probe)
            have = pd.notna(lab)
            counts = pd.Series(lab[have]).value_counts()
            if len(counts) == 2 and counts.min() >= 10:
                neg, pos_cls = PROBES[probe]
                r = fit_classifier(probe, Z_ro[have], (lab[have] == pos_cls).astype(int), seed=seed)
                r.classes = [neg, pos_cls]  # score = P(second class)
                readouts[probe] = r
        readouts["pseudotime"] = fit_pseudotime(Z_ro, np.array([dag.depth(s) for s in st_ro], dtype=np.float64))
        model.readouts = readouts
        skipped = [p for p in PROBES if p not in readouts]
        # ---------------------------------------------------------------- honest scores
        eval_idx, split = (hold_idx, "holdout") if len(hold_idx) else (train_idx, "in_sample")
        if len(eval_idx) > eval_max_cells:
            eval_idx = np.sort(rng.choice(eval_idx, size=eval_max_cells, replace=False))
        x_eval = panel_rows(adata, operator.panel, eval_idx, layer=layer)
        metrics = {split: cell_metrics(model, x_eval, stages[eval_idx].astype(str), donors[eval_idx], dag)}
        if len(hold_idx):
            try:
                tr = validate_transfer(model, adata[hold_idx], label_key=label_key, donor_key=donor_key,
                                       tissue_key=tissue_key, min_cells=min_cells, n_perm=n_perm, seed=seed, layer=layer,
                                       cell_level=False)
                metrics["holdout_anchors"] = tr.metrics
            except InputError as exc:
                metrics["holdout_anchors"] = {"skipped": str(exc)}
    synthetic = bool(adata.uns.get("sclens_synthetic", {}).get("synthetic", False)) if hasattr(adata, "uns") else False
    model.manifest = {
        "sclens_version": __version__, "created_unix": int(time.time()), "versions": package_versions(),
        "synthetic": synthetic, "dag": dag.spec, "label_key": label_key, "donor_key": donor_key, "tissue_key": tissue_key,
        "label_vocabularies": {k: r.classes for k, r in readouts.items() if r.kind == "classifier"},
        "probes": {p: {c: list(m) for c, m in PROBES[p].items()} for p in PROBES}, "probes_skipped": skipped,
        "normalization": operator.panel.to_dict()["normalization"], "n_genes": len(operator.panel),
        "seeds": {"seed": seed}, "split": {"held_out_donors": sorted(set(donors[hold_idx])) if len(hold_idx) else [],
                                           "train_donors": sorted(set(donors[train_idx])), "n_train_cells": int(len(train_idx)),
                                           "n_adaptor_cells": int(len(bal)), "n_readout_cells": int(len(ro)),
                                           "n_eval_cells": int(len(eval_idx))},
        "input_hashes": {"adaptor_cells_x": array_sha256(x_bal), "labels": array_sha256(stages[mapped].astype(str)),
                         "obs_names": array_sha256(np.asarray(adata.obs_names.astype(str)))},
        "metrics": metrics, "train_seconds": time.perf_counter() - t0,
    }
    return model


# ==================================================================================== scores
def _per_donor_spearman(pred: np.ndarray, depth: np.ndarray, donors: np.ndarray, absolute: bool = False) -> float:
    from scipy.stats import spearmanr

    vals = []
    for dn in np.unique(donors):
        m = donors == dn
        if m.sum() >= 3 and np.ptp(depth[m]) > 0 and np.ptp(pred[m]) > 0:
            r = spearmanr(pred[m], depth[m]).statistic
            vals.append(abs(r) if absolute else r)
    return float(np.mean(vals)) if vals else float("nan")


def cell_metrics(model: ExtractedModel, x: np.ndarray, stages: np.ndarray, donors: np.ndarray, dag: StageDAG) -> dict:
    """Cell-level scores of the readouts against known stages (cells whose class the readout knows)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    def bal_acc(y, p):
        with warnings.catch_warnings():  # a held-out donor may lack classes the probe predicts
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            return float(balanced_accuracy_score(y, p))

    out = {"n_cells": int(len(x))}
    res = model.predict(x)
    for name, truth in (("branch", np.array([dag.branch[s] for s in stages])), ("stage", stages)):
        r = model.readouts[name]
        known = np.isin(truth, r.classes)
        if known.sum():
            pred = np.asarray(r.classes)[res[name][known].argmax(1)]
            out[f"{name}_balanced_accuracy"] = bal_acc(truth[known], pred)
            out[f"{name}_macro_f1"] = float(f1_score(truth[known], pred, average="macro"))
        out[f"{name}_cells_with_unknown_class"] = int((~known).sum())
    for probe in PROBES:
        if probe not in model.readouts:
            continue
        lab = probe_labels(stages, probe)
        have = pd.notna(lab)
        if have.sum() and len(set(lab[have])) == 2:
            r = model.readouts[probe]
            p = res[probe][have][:, 1]
            y = lab[have] == r.classes[1]
            out[f"{probe}_auroc"] = float(roc_auc_score(y, p))
            out[f"{probe}_balanced_accuracy"] = bal_acc(y, p >= 0.5)
    depth = np.array([dag.depth(s) for s in stages])
    out["pseudotime_depth_spearman"] = _per_donor_spearman(res["pseudotime"], depth, donors)
    out["pseudotime_depth_abs_spearman"] = _per_donor_spearman(res["pseudotime"], depth, donors, absolute=True)
    return out


@dataclass
class TransferReport:
    """Zero-shot transfer of a frozen extracted head to an independent dataset."""

    metrics: dict
    anchors_obs: pd.DataFrame
    latent: np.ndarray

    def summary(self) -> str:
        m = self.metrics
        lines = [f"zero-shot transfer: {m['n_anchors']} anchors ({m['n_donors']} donors, {m['n_stages']} stages) "
                 f"from {m['n_cells_in_anchors']} cells" + (" - SYNTHETIC" if m.get("synthetic") else "")]
        for key in ("trustworthiness", "ruler_spearman", "ruler_spearman_resid", "perm_p", "null_ruler_spearman",
                    "null_ruler_spearman_resid", "null_perm_p"):
            if key in m:
                lines.append(f"  {key:<28} {m[key]:.4g}")
        lines.append(f"  gates: {m['gates']}  -> passes: {m['passes']}")
        for key, v in (m.get("cells") or {}).items():
            if isinstance(v, float):
                lines.append(f"  cells {key:<24} {v:.4g}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "anchors": self.anchors_obs.to_dict(orient="list"),
                "latent": self.latent.tolist()}


def validate_transfer(
    model: ExtractedModel, adata: ad.AnnData, *, label_key: str, donor_key: str | None = None,
    tissue_key: str | None = None, min_cells: int = 5, replicates: int = 1, n_perm: int = 2000, seed: int = 0,
    null_seed: int = 0, layer: str | None = None, gates_path: str | Path | None = None, cell_level: bool = True,
    max_cells: int = 20_000,
) -> TransferReport:
    """Freeze the extracted head, rebuild anchors on new data and score the latent against the ruler and the null.

    Reports trustworthiness (standardised features vs latent, k = 15), Spearman of the latent (angular)
    distances with the ruler over anchor pairs (raw and residualised on donor / tissue), the blocked permutation
    p (stage labels permuted within donors), and the same for the within-branch-shuffled null ruler. Gates
    (from the gate file): trustworthiness, Spearman >= the holdout threshold (the new data is itself the
    holdout), permutation p, and the null failing. ``cell_level`` adds readout scores on the mapped cells.
    """
    from .anchors import build_anchors
    from .manifold import blocked_permutation_p, residualized_spearman, spearman_pairs, trustworthiness
    from .screen import load_gates

    dag = model.dag
    if detect_gene_id_type(adata.var_names) != "symbol":
        adata = harmonize_gene_ids(adata)
    anchors = build_anchors(adata, model.panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                            dag=dag, min_cells=min_cells, seed=seed, layer=layer, replicates=replicates)
    if len(anchors) < 6 or anchors.obs["stage"].nunique() < 3:
        raise InputError(f"the transfer check needs >= 6 anchors over >= 3 stages; got {len(anchors)} anchors on "
                         f"{anchors.obs['stage'].nunique()} stages")
    F = model.operator.features(anchors.X)
    Z = model.adaptor.transform(F)
    D = model.adaptor.angular_distances(Z)
    obs = anchors.obs
    donors, tissues = obs["donor"].to_numpy(), obs["tissue"].to_numpy()
    sidx = anchors.stage_index
    gates, gates_sha = load_gates(gates_path)
    null_stage, _ = dag.null_ruler_matrix(null_seed)
    m: dict = {"n_anchors": len(anchors), "n_donors": anchors.info["n_donors"], "n_stages": anchors.info["n_stages"],
               "n_cells_in_anchors": int(obs["n_cells"].sum()), "synthetic": anchors.info.get("synthetic", False),
               "pseudo_replicates": replicates > 1, "gates_sha256": gates_sha, "artifact_sha256": model.content_sha256,
               "trustworthiness": trustworthiness((F - model.adaptor.mean) / model.adaptor.scale, Z)}
    for prefix, stage_R in (("", dag.ruler_matrix), ("null_", null_stage)):
        R = stage_R[np.ix_(sidx, sidx)]
        m[f"{prefix}ruler_spearman"] = spearman_pairs(D, R)
        m[f"{prefix}ruler_spearman_resid"] = residualized_spearman(D, R, donors, tissues)
        p, n_done = blocked_permutation_p(D, sidx, stage_R, donors, n_perm=n_perm, seed=seed)
        m[f"{prefix}perm_p"], m[f"{prefix}perm_n"] = p, n_done

    def gate(prefix: str) -> dict:
        return {"trustworthiness": bool(m["trustworthiness"] >= gates["trustworthiness_min"]),
                "ruler_spearman": bool(np.isfinite(m[f"{prefix}ruler_spearman"])
                                       and m[f"{prefix}ruler_spearman"] >= gates["holdout_spearman_min"]),
                "permutation": bool(m[f"{prefix}perm_p"] <= gates["permutation_p_max"])}

    g, gn = gate(""), gate("null_")
    m["gates"] = {**g, "null_fails": not all(gn.values())}
    m["passes"] = all(m["gates"].values()) if gates["null_must_fail"] else all(g.values())
    m["permutation_blocks"] = int(len(np.unique(donors)))
    if cell_level:
        stages = dag.map_labels(adata.obs[label_key].astype(str)).stage.to_numpy(dtype=object)
        idx = np.flatnonzero(pd.notna(stages))
        if len(idx) > max_cells:
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_cells, replace=False))
        dn = adata.obs[donor_key].astype(str).to_numpy()[idx] if donor_key else np.full(len(idx), "all", dtype=object)
        m["cells"] = cell_metrics(model, panel_rows(adata, model.panel, idx, layer=layer), stages[idx].astype(str), dn, dag)
    return TransferReport(m, obs.copy(), Z)


# ==================================================================================== apply
def _write_results(adata: ad.AnnData, model: ExtractedModel, res: dict[str, np.ndarray], info: dict) -> None:
    adata.obsm[OBSM_LATENT] = res["latent"]
    adata.obs[OBS_KEYS["pseudotime"]] = res["pseudotime"]
    for name in ("branch", "stage"):
        r = model.readouts[name]
        adata.obs[OBS_KEYS[name]] = pd.Categorical(np.asarray(r.classes)[res[name].argmax(1)], categories=r.classes)
        adata.obsm[f"sclens_{name}_proba"] = res[name]
    for probe in PROBES:
        if probe in model.readouts:
            adata.obs[f"sclens_{probe}_score"] = res[probe][:, 1]
    adata.uns["sclens"] = info


def _apply_info(model: ExtractedModel, coverage: float, kind: str, fold: bool) -> dict:
    info = {"artifact_sha256": model.content_sha256, "sclens_version": __version__, "panel_coverage": coverage,
            "input_kind": kind, "folded": fold, "latent_key": f"obsm/{OBSM_LATENT}", **{f"{k}_key": v for k, v in OBS_KEYS.items()}}
    for name, r in model.readouts.items():
        if r.kind == "classifier":
            info[f"{name}_classes"] = list(r.classes)
    for probe in PROBES:
        if probe in model.readouts:
            info[f"{probe}_score"] = (f"P({model.readouts[probe].classes[1]}) vs {model.readouts[probe].classes[0]}; "
                                      "meaningful only for cells of that lineage")
    return info


def apply(
    adata: ad.AnnData, model: ExtractedModel | str | Path, *, layer: str | None = None, chunk_size: int = 10_000,
    fold: bool = True, copy: bool = False, progress: bool = False,
) -> ad.AnnData | None:
    """Run the extracted algorithm on cells and write its outputs (scanpy style).

    Writes ``obs['sclens_pseudotime']``, ``obs['sclens_branch']``, ``obs['sclens_stage']`` (probabilities in
    ``obsm['sclens_branch_proba']`` / ``obsm['sclens_stage_proba']``, class names in ``uns['sclens']``),
    ``obs['sclens_<probe>_score']`` for each binary probe and ``obsm['X_sclens']``. ``adata.X`` (or ``layer``)
    holds counts or log1p-normalised values over any genes; the panel is gathered by name (missing genes
    zero-filled with a warning, below 50 % coverage an error). Works chunk by chunk on in-memory and backed
    AnnData; a Dask array ``X`` is computed with Dask (on whatever scheduler / cluster is active).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, ExtractedModel):
        model = ExtractedModel.load(model)
    out = adata.copy() if copy else adata
    X0 = out.layers[layer] if layer else out.X
    if _is_dask(X0):
        res, kind = apply_dask(model, X0, out.var_names, fold=fold)
    else:
        idx = panel_index(model.panel, out.var_names)
        kind = _value_kind(_head_rows(X0))
        n = out.n_obs
        P = np.empty((n, sum(w for _, w in model.output_columns())), dtype=np.float32)
        chunks = iter_chunks(out, chunk_size, layer)
        for sl, X in tqdm(chunks, total=-(-n // chunk_size), desc="applying", unit="chunk", disable=not progress):
            P[sl] = model.predict_packed(model.panel.transform(X, idx, kind), fold)
        res = model.unpack(P)
    coverage = model.panel.coverage(gene_symbols(out.var_names))
    _write_results(out, model, res, _apply_info(model, coverage, kind, fold))
    return out if copy else None


def _is_dask(X) -> bool:
    return type(X).__module__.startswith("dask")


def apply_dask(model: ExtractedModel, X, var_names: Sequence[str], *, fold: bool = True, kind: str | None = None):
    """Apply over a Dask array [cells, genes] (chunked by rows; any scheduler, e.g. ``dask.distributed``).

    Returns ``(outputs dict of numpy arrays, input kind)``. Each block runs exactly the in-memory code path.
    """
    import dask.array as da

    idx = panel_index(model.panel, var_names)
    if len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})  # every block needs a cell's whole library to normalise it
    kind = kind or _value_kind(_to_numpy_or_sparse(X[: min(2000, X.shape[0])].compute()))
    width = sum(w for _, w in model.output_columns())
    panel = model.panel
    # every worker gets the compiled model once (folded matrix etc.), not the whole AnnData
    folded = model.folded() if fold else None
    light = ExtractedModel(model.operator, model.adaptor, model.readouts, {}, folded)

    def block(Xb):
        return light.predict_packed(panel.transform(_to_numpy_or_sparse(Xb), idx, kind), fold)

    P = da.map_blocks(block, X, dtype=np.float32, chunks=(X.chunks[0], (width,)), meta=np.empty((0, 0), np.float32))
    return model.unpack(np.asarray(P.compute())), kind


def _to_numpy_or_sparse(X):
    import scipy.sparse as sp

    if sp.issparse(X):
        return X.tocsr()
    return np.asarray(X)


def apply_file(
    model: ExtractedModel | str | Path, in_path: str | Path, out_path: str | Path, *, layer: str | None = None,
    chunk_size: int = 20_000, fold: bool = True, progress: bool = True,
) -> dict:
    """Stream ``in_path`` (.h5ad or .zarr) through the algorithm into ``out_path`` (same format), memory flat.

    The input is opened read-only and copied; results are written into the copy one chunk at a time and the
    copy is renamed onto ``out_path`` only when complete (atomic). Returns a small run record.
    """
    import os
    import shutil
    import tempfile

    from tqdm.auto import tqdm

    from . import _store

    if not isinstance(model, ExtractedModel):
        model = ExtractedModel.load(model)
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise InputError("the output path must differ from the input: sclens never overwrites its input")
    if _store.is_zarr(in_path) != (out_path.suffix == ".zarr"):
        raise InputError(f"output {out_path.name} must have the input's format "
                         f"({'.zarr' if _store.is_zarr(in_path) else '.h5ad'})")
    t0 = time.perf_counter()
    src = _store.open_store(in_path, "r")
    try:
        mat = _store.RowMatrix(src, layer)
        names = gene_symbols(mat.var_names)
        idx, coverage = model.panel.column_index(names), model.panel.coverage(names)
        kind = _value_kind(mat.rows(0, min(2000, mat.n_obs)))
        n = mat.n_obs
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.")) / out_path.name
        try:
            _store.copy_store(in_path, tmp)
            dst = _store.open_store(tmp, "r+")
            try:
                obsm = _store.require_group(dst, "obsm")
                latent = _store.create_array(obsm, OBSM_LATENT, (n, model.adaptor.d), np.float32)
                proba = {name: _store.create_array(obsm, f"sclens_{name}_proba", (n, len(model.readouts[name].classes)),
                                                   np.float32) for name in ("branch", "stage")}
                pt = np.empty(n, np.float32)
                codes = {name: np.empty(n, np.int16) for name in ("branch", "stage")}
                probe_scores = {p: np.empty(n, np.float32) for p in PROBES if p in model.readouts}
                for sl, X in tqdm(mat.iter_chunks(chunk_size), total=-(-n // chunk_size), desc="applying",
                                  unit="chunk", disable=not progress):
                    res = model.unpack(model.predict_packed(model.panel.transform(X, idx, kind), fold))
                    latent[sl] = res["latent"]
                    for name in ("branch", "stage"):
                        proba[name][sl] = res[name]
                        codes[name][sl] = res[name].argmax(1)
                    for p in probe_scores:
                        probe_scores[p][sl] = res[p][:, 1]
                    pt[sl] = res["pseudotime"]
                obs = _store.read_obs(dst)
                obs[OBS_KEYS["pseudotime"]] = pt
                for name in ("branch", "stage"):
                    classes = model.readouts[name].classes
                    obs[OBS_KEYS[name]] = pd.Categorical.from_codes(codes[name], categories=classes)
                for p, v in probe_scores.items():
                    obs[f"sclens_{p}_score"] = v
                _store.replace_elem(dst, "obs", obs)
                uns = _store.require_group(dst, "uns")
                _store.replace_elem(uns, "sclens", _apply_info(model, coverage, kind, fold))
            finally:
                _store.close_store(dst)
            _store.reconsolidate(tmp)
            if out_path.exists():
                shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            os.replace(tmp, out_path)
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    finally:
        _store.close_store(src)
    seconds = time.perf_counter() - t0
    return {"n_cells": n, "seconds": seconds, "cells_per_second": n / seconds if seconds else float("nan"),
            "out": str(out_path), "input_kind": kind, "panel_coverage": coverage}

