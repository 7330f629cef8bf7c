"""Anchors: centroids of the panel vector ``x`` over cells sharing (donor, tissue, cell type).

Each anchor is mapped to a stage of the stage DAG, so the ruler between anchors is the hop distance between
their stages. Because ``x · A`` is linear, an anchor's feature under any operator is the centroid of its
cells' features: anchors are built once, in gene space, and featurised per unit.

Fallbacks: without a donor column every cell counts as one donor (``"all"``); without a tissue column every
cell counts as one tissue (``"all"``). Both are recorded in ``Anchors.info`` and make the donor holdout and
the donor-blocked permutation non-evaluable (reported, never faked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import GenePanel, iter_chunks, require_obs_columns
from .errors import InputError
from .ontology import StageDAG


@dataclass
class Anchors:
    """Anchor table (``obs``: donor, tissue, label, stage, branch, depth, n_cells), centroids ``X`` [A, G], ruler [A, A]."""

    obs: pd.DataFrame
    X: np.ndarray
    panel: GenePanel
    dag: StageDAG
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def stage_index(self) -> np.ndarray:
        return np.array([self.dag.index[s] for s in self.obs["stage"]])

    @property
    def ruler(self) -> np.ndarray:
        s = self.stage_index
        return self.dag.ruler_matrix[np.ix_(s, s)]

    def null_ruler(self, seed: int = 0) -> np.ndarray:
        N, _ = self.dag.null_ruler_matrix(seed)
        s = self.stage_index
        return N[np.ix_(s, s)]

    def subset(self, mask) -> "Anchors":
        mask = np.asarray(mask)
        return Anchors(self.obs[mask].reset_index(drop=True), self.X[mask], self.panel, self.dag, dict(self.info))


def build_anchors(
    adata: ad.AnnData, panel: GenePanel, *, label_key: str, donor_key: str | None = None, tissue_key: str | None = None,
    dag: StageDAG | None = None, min_cells: int = 5, max_cells: int | None = None, layer: str | None = None,
    seed: int = 0, chunk_size: int = 20_000, replicates: int = 1,
) -> Anchors:
    """Build anchors from cells; labels that map to no stage are reported in ``info['unmapped']`` and left out.

    ``max_cells`` caps the cells averaged per anchor (a seeded random subset), so one huge group cannot
    dominate the cost; groups with fewer than ``min_cells`` cells are dropped and counted.

    ``replicates > 1`` splits every (donor, tissue, label) group at random (seeded) into that many
    pseudo-replicate anchors (``obs['replicate']``). This gives single-source data enough anchors to fit a
    manifold; the pseudo-replicates are NOT independent donors, so the donor holdout and the donor-blocked
    permutation still see one donor (recorded in ``info``).

    Parameters
    ----------
    adata, panel
        Labelled cells and the operators' gene panel.
    label_key, donor_key, tissue_key
        obs columns: cell-type labels (mapped onto ``dag``'s stages), donors, tissues.
    dag
        The stage DAG (default: the shipped hematopoiesis DAG).

    Returns
    -------
    :class:`Anchors`: mean log1p panel expression per (donor, tissue, stage) group with its stage, ruler and info.
    """
    dag = dag or StageDAG.default()
    require_obs_columns(adata, [label_key, donor_key, tissue_key])
    obs = pd.DataFrame(index=np.arange(adata.n_obs))
    obs["label"] = adata.obs[label_key].astype(str).values
    obs["donor"] = adata.obs[donor_key].astype(str).values if donor_key else "all"
    obs["tissue"] = adata.obs[tissue_key].astype(str).values if tissue_key else "all"
    mapping = dag.map_labels(obs["label"])
    obs["stage"] = mapping.stage.values
    mapped = obs["stage"].notna().to_numpy()
    if not mapped.any():
        raise InputError(f"no label in obs[{label_key!r}] maps to a stage; {mapping.summary()}")
    rng = np.random.default_rng(seed)
    groups = obs[mapped].groupby(["donor", "tissue", "label"], sort=True, observed=True).indices
    rows, members, too_small = [], [], 0
    sel_index = np.flatnonzero(mapped)
    for (donor, tissue, label), local in groups.items():
        cells = sel_index[local]
        if len(cells) < min_cells:
            too_small += 1
            continue
        if max_cells and len(cells) > max_cells * max(1, replicates):
            cells = np.sort(rng.choice(cells, size=max_cells * max(1, replicates), replace=False))
        stage = obs.at[cells[0], "stage"]
        parts = ([np.sort(p) for p in np.array_split(rng.permutation(cells), replicates)]
                 if replicates > 1 else [cells])
        for r, part in enumerate(parts):
            if len(part) < min_cells:
                too_small += 1
                continue
            rows.append({"donor": donor, "tissue": tissue, "label": label, "replicate": r, "stage": stage,
                         "branch": dag.branch[stage], "depth": dag.depth(stage), "n_cells": len(part)})
            members.append(part)
    if not rows:
        raise InputError(f"no (donor, tissue, label) group has at least {min_cells} cells")
    # centroids of x, streamed over chunks so a backed AnnData works too
    owner = np.full(adata.n_obs, -1)
    for a, cells in enumerate(members):
        owner[cells] = a
    idx = panel.column_index(adata.var_names)
    sums = np.zeros((len(rows), len(panel)), dtype=np.float64)
    for sl, X in iter_chunks(adata, chunk_size, layer):
        own = owner[sl]
        keep = own >= 0
        if keep.any():
            x = panel.transform(X[np.flatnonzero(keep)] if keep.sum() < len(own) else X, idx)
            # each anchor's cells added in cell order (a one-hot sparse product: np.add.at is ~10x slower)
            onehot = sp.csr_matrix((np.ones(int(keep.sum())), (own[keep], np.arange(int(keep.sum())))),
                                   shape=(len(rows), len(x)))
            sums += onehot @ x
    table = pd.DataFrame(rows)
    centroids = (sums / table["n_cells"].to_numpy()[:, None]).astype(np.float32)
    info = {"label_key": label_key, "donor_key": donor_key, "tissue_key": tissue_key, "min_cells": min_cells,
            "replicates": replicates, "pseudo_replicates": replicates > 1,
            "max_cells": max_cells, "n_groups_too_small": too_small, "unmapped": mapping.unmapped,
            "n_donors": int(table["donor"].nunique()), "n_tissues": int(table["tissue"].nunique()),
            "n_stages": int(table["stage"].nunique()), "n_branches": int(table["branch"].nunique()),
            "seed": seed, "synthetic": bool(adata.uns.get("sclens_synthetic", {}).get("synthetic", False))
            if hasattr(adata, "uns") else False}
    return Anchors(table, centroids, panel, dag, info)
