"""Stage 1 of extraction: the frozen gene-space operator (one unit, a pool, or the drift pair; optional truncated SVD)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..data import GenePanel
from ..errors import ArtifactError, InputError
from ..operators import OperatorBank


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
    from ..screen import ScreenReport

    if isinstance(report, ScreenReport):
        return report.table
    return ScreenReport.load(report).table


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
    """Stage 1: choose the frozen operator (exactly one of ``unit``, ``pool``, ``drift`` or ``report``).

    Parameters
    ----------
    banks
        ``{kind: OperatorBank}`` (e.g. ``OperatorFolder.load(folder).banks``) or one bank.
    unit, pool, weights, drift, report
        One unit ``(layer, head)``; a weighted pool of units; the drift pair of ``kind``; or the top operator
        hypothesis of a screen report (a :class:`~sclens.screen.ScreenReport` or its folder).
    kind
        The operator kind (``attn``, ``qk``, ``ov``) when ``banks`` holds several.
    rank
        Replace the operator by its truncated SVD of this rank (factors ``U_r S_r`` and ``V_r^T``).

    Returns
    -------
    :class:`Operator`: one or two blocks over the panel, with what was chosen in its ``info``.
    """
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
