import numpy as np
import pandas as pd

from sclens.datasets import MODULES, STAGE_PROGRAMS, pbmc68k, simulate_hematopoiesis
from sclens.ontology import StageDAG


def test_pbmc68k_counts_are_integers_and_labels_mapped():
    a = pbmc68k()
    assert a.shape == (700, 765)
    X = a.X.toarray()
    assert np.allclose(X, np.rint(X)) and X.min() >= 0
    assert a.obs["stage"].notna().all()
    assert (a.obs.loc[a.obs["cell_type"] == "CD34+", "stage"] == "HSC").all()


def test_simulator_is_deterministic_and_labelled_synthetic():
    a = simulate_hematopoiesis(3, 100, seed=11, n_background_genes=200)
    b = simulate_hematopoiesis(3, 100, seed=11, n_background_genes=200)
    c = simulate_hematopoiesis(3, 100, seed=12, n_background_genes=200)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X[: a.n_obs]).nnz > 0
    assert a.obs["synthetic"].all() and a.uns["sclens_synthetic"]["synthetic"]
    assert a.obs["donor"].nunique() == 3


def test_simulator_covers_the_dag_with_realistic_counts():
    a = simulate_hematopoiesis(6, 600, seed=0, n_background_genes=400)
    dag = StageDAG.default()
    assert set(a.obs["stage"].unique()) == set(dag.stages)
    assert set(STAGE_PROGRAMS) == set(dag.stages)
    lib = np.asarray(a.X.sum(1)).ravel()
    assert 2000 < np.median(lib) < 8000
    X = a.X.toarray()
    assert np.allclose(X, np.rint(X))
    var = X.var(0)
    mean = X.mean(0)
    assert np.median(var[mean > 1] / mean[mean > 1]) > 1.5  # overdispersed (negative binomial)
    assert (a.obs["depth"] == a.obs["stage"].astype(str).map(dag.depths)).all()


def test_markers_are_expressed_where_the_literature_says():
    a = simulate_hematopoiesis(4, 800, seed=1, n_background_genes=200)
    X = a.X.toarray()
    lib = X.sum(1, keepdims=True)
    cpm = X / lib * 1e4
    df = pd.DataFrame(cpm, columns=a.var_names)
    st = a.obs["stage"].astype(str).values
    for gene, high, low in [("HBB", "Erythrocyte", "Naive B"), ("MPO", "GMP", "Naive CD4 T"),
                            ("CD3E", "Naive CD4 T", "Classical monocyte"), ("CD79A", "Naive B", "Neutrophil"),
                            ("CD34", "HSC", "CD56dim NK"), ("NKG7", "CD56dim NK", "Erythrocyte"),
                            ("CD14", "Classical monocyte", "Naive B")]:
        assert df.loc[st == high, gene].mean() > 5 * df.loc[st == low, gene].mean(), gene


def test_modules_only_use_curated_marker_genes():
    from sclens.datasets import marker_sets

    curated = {g for s in marker_sets()["sets"].values() for g in s["genes"]}
    used = {g for gs in MODULES.values() for g in gs}
    assert used <= curated
    for s in marker_sets()["sets"].values():
        assert s["sources"] and all(src in marker_sets()["sources"] for src in s["sources"])
