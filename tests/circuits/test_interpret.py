"""Feature interpretation on planted activity statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sclens.circuits.interpret import feature_activity, interpret_features, interpretable_fraction
from sclens.datasets import marker_set_table


def planted_activity(seed: int = 0):
    """Feature 0 fires on NK markers, feature 1 on random background genes, feature 2 never fires."""
    rng = np.random.default_rng(seed)
    nk = marker_set_table()["nk"]["genes"]
    background = [f"BG{i}" for i in range(300)]
    genes = nk + background
    G = len(genes)
    T = 6000
    token_gene = torch.as_tensor(rng.integers(0, G, size=T))
    cell = torch.as_tensor(np.sort(rng.integers(0, 60, size=T)))
    labels = np.array(["NK"] * 30 + ["T"] * 30)
    X = torch.zeros(T, 3)
    is_nk = token_gene < len(nk)
    X[is_nk & (cell < 30), 0] = 2.0  # NK markers in NK cells
    chosen = torch.as_tensor(rng.choice(np.arange(len(nk), G), 12, replace=False))
    X[torch.isin(token_gene, chosen), 1] = 1.0
    return feature_activity(lambda x: x, X, token_gene, cell, 60, genes, cell_labels=labels), nk


def test_marker_feature_is_interpretable_and_random_one_is_not():
    act, nk = planted_activity()
    assert list(act.live_features()) == [0, 1]
    tab = interpret_features(act).set_index("feature")
    assert bool(tab.loc[0, "interpretable"]) and tab.loc[0, "label"] == "NK"
    assert set(tab.loc[0, "top_genes"]) <= set(nk)
    assert tab.loc[0, "top_cell_type"] == "NK" and tab.loc[0, "specificity"] == pytest.approx(1.0)
    assert not bool(tab.loc[1, "interpretable"]) and tab.loc[1, "label"] == "unresolved"
    assert tab.loc[0, "q"] < 1e-6


def test_activity_statistics_are_exact():
    X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    act = feature_activity(lambda x: x, X, torch.tensor([0, 0, 1, -1]), torch.tensor([0, 0, 1, 1]), 2, ["A", "B"])
    assert act.gene_sum[:, 0].tolist() == [4.0, 0.0] and act.gene_count.tolist() == [2, 1]
    assert act.cell_max.tolist() == [[3.0, 0.0], [5.0, 2.0]]  # the -1 (non-gene) position counts for the cell
    assert act.fire_count.tolist() == [3, 1] and act.n_tokens == 4


def test_interpretable_fraction_is_seeded():
    act, _ = planted_activity()
    a = interpretable_fraction(act, n=2, seed=3)
    assert a["n_sampled"] == 2 and a["n_interpretable"] == 1 and a["fraction"] == 0.5
    assert interpretable_fraction(act, n=1, seed=5)["features"] == interpretable_fraction(act, n=1, seed=5)["features"]


def test_summary_position_feature_is_labelled_from_its_cells_genes():
    """A feature that fires only at a non-gene position (like <celltype>) in cells whose sentences hold B-cell
    markers gets its label from the context genes."""
    rng = np.random.default_rng(1)
    b = marker_set_table()["b_plasma"]["genes"]
    genes = b + [f"BG{i}" for i in range(200)]
    ids, cells, X = [], [], []
    for c in range(80):
        pool = np.arange(len(b)) if c < 20 else np.arange(len(b), len(genes))
        g = rng.choice(pool, 10, replace=False) if c < 20 else rng.choice(pool, 10, replace=False)
        g = np.concatenate([g, rng.choice(np.arange(len(b), len(genes)), 10, replace=False)])
        ids += list(g) + [-1]
        cells += [c] * (len(g) + 1)
        X += [0.0] * len(g) + [3.0 if c < 20 else 0.0]
    act = feature_activity(lambda x: x, torch.tensor(X)[:, None], torch.tensor(ids), torch.tensor(cells), 80, genes,
                           cell_labels=np.array(["B"] * 20 + ["T"] * 60))
    row = interpret_features(act, min_count=3).iloc[0]
    assert row["top_genes"] == []  # it never fires on a gene token
    assert set(row["context_genes"][:10]) <= set(b)
    assert bool(row["interpretable"]) and row["label"] == "B / plasma" and row["label_from"] == "context"
