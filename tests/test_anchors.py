import numpy as np
import pandas as pd
import pytest

from sclens.anchors import build_anchors
from sclens.data import select_panel
from sclens.errors import InputError


def test_centroids_and_ruler(sim_small):
    panel = select_panel(sim_small, None, n_genes=80)
    a = build_anchors(sim_small, panel, label_key="cell_type", donor_key="donor", tissue_key="tissue", min_cells=5)
    x = panel.matrix(sim_small)
    row = a.obs.iloc[0]
    sel = ((sim_small.obs["donor"] == row["donor"]) & (sim_small.obs["cell_type"] == row["label"])).to_numpy()
    np.testing.assert_allclose(a.X[0], x[sel].mean(0), rtol=1e-5, atol=1e-6)
    assert (a.obs["n_cells"] >= 5).all()
    R = a.ruler
    assert R.shape == (len(a), len(a)) and np.allclose(R, R.T)
    assert a.info["n_donors"] == 3 and a.info["unmapped"] == {}


def test_fallback_without_donor_or_tissue_and_cap(sim_small):
    panel = select_panel(sim_small, None, n_genes=40)
    a = build_anchors(sim_small, panel, label_key="cell_type", max_cells=6, min_cells=3)
    assert set(a.obs["donor"]) == {"all"} and set(a.obs["tissue"]) == {"all"}
    assert a.obs["n_cells"].max() <= 6


def test_unmapped_labels_are_reported(sim_small):
    s = sim_small.copy()
    s.obs["cell_type"] = s.obs["cell_type"].astype(str)
    s.obs.iloc[:50, s.obs.columns.get_loc("cell_type")] = "doublets"
    panel = select_panel(s, None, n_genes=40)
    a = build_anchors(s, panel, label_key="cell_type", donor_key="donor")
    assert a.info["unmapped"] == {"doublets": 50}
    assert "doublets" not in set(a.obs["label"])


def test_errors(sim_small):
    panel = select_panel(sim_small, None, n_genes=40)
    with pytest.raises(InputError, match="available obs columns"):
        build_anchors(sim_small, panel, label_key="celltype")
    s = sim_small.copy()
    s.obs["junk"] = "x"
    with pytest.raises(InputError, match="no label"):
        build_anchors(s, panel, label_key="junk")


def test_pseudo_replicates_split_groups(sim_small):
    panel = select_panel(sim_small, None, n_genes=40)
    one = build_anchors(sim_small, panel, label_key="cell_type", min_cells=2)
    three = build_anchors(sim_small, panel, label_key="cell_type", min_cells=2, replicates=3)
    assert len(three) > len(one) and three.info["pseudo_replicates"]
    g = three.obs.groupby("label")["n_cells"].sum().reindex(one.obs["label"]).fillna(0).to_numpy()
    assert (g <= one.obs["n_cells"].to_numpy()).all()  # parts never hold more cells than the group
    assert set(three.obs["donor"]) == {"all"}
