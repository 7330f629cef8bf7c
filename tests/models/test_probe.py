"""Learning probes: known answers for the baselines and the statistics, the model's MSE as pretraining computes
it, and the probe end to end (library and CLI) on a tiny checkpoint."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from sclens.cli import app
from sclens.errors import InputError
from sclens.models import load_default_model
from sclens.models.probe import effective_rank, embedding_scores, masked_value_probe, probe_model


def test_effective_rank_known_answers():
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=200), rng.normal(size=8))
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    Q = np.linalg.qr(rng.normal(size=(200, 4)))[0] * 10  # four equal singular values
    assert effective_rank(Q) == pytest.approx(4.0, rel=0.05)


def test_embedding_scores_separable_vs_noise():
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b", "c"], 60)
    donors = np.tile(["d1", "d2", "d3"], 60)
    centres = {"a": [5, 0], "b": [0, 5], "c": [-5, -5]}
    Z = np.array([centres[v] for v in y]) + rng.normal(0, 0.5, (180, 2))
    from sclens.models.probe import probe_folds

    folds, cv = probe_folds(y, donors, 0)
    assert "GroupKFold" in cv and all(not set(donors[tr]) & set(donors[te]) for tr, te in folds)
    good = embedding_scores(Z, y, folds)
    assert good["knn_balanced_accuracy"] == pytest.approx(1.0) and good["probe_balanced_accuracy"] == pytest.approx(1.0)
    bad = embedding_scores(rng.normal(size=(180, 2)), y, folds)
    assert bad["knn_balanced_accuracy"] < 0.55


def test_baselines_are_exact_on_identical_cells_and_model_mse_matches_pretraining():
    """Identical cells with distinct values have identical bins: the per-gene mean and kNN imputation then
    predict every masked bin exactly. The model's MSE equals the pretraining loss on the same masked batch."""
    from sclens.models.pretrain import PretrainConfig, CellSampler, _losses

    model = load_default_model()
    genes = [g for g in model.vocab.genes if g.isalpha() and g.isupper()][:120]
    ids = model.vocab.lookup(genes)
    row = np.zeros(120, np.float32)
    row[:80] = np.arange(1, 81)  # 80 distinct non-zero values, 40 zeros
    X = sp.csr_matrix(np.tile(row, (60, 1)))
    X.sort_indices()
    fit, ev = np.arange(20, 60), np.arange(20)
    res = masked_value_probe(model, X, ids, fit, ev, seq_len=64, seed=3, batch_size=32, n_components=5)
    for part in ("nonzero", "zero", "all"):
        assert res[part]["per_gene_mean"] == pytest.approx(0.0, abs=1e-9)
        assert res[part]["knn_impute"] == pytest.approx(0.0, abs=1e-9)
    assert res["nonzero"]["n"] > 0 and res["zero"]["n"] > 0
    # the model's number is the pretraining MSE on the very same positions (one batch of 20 cells)
    res1 = masked_value_probe(model, X, ids, fit, ev, seq_len=64, seed=3, batch_size=32, n_components=5)
    cfg = PretrainConfig(train_seq_len=64, zero_fraction=0.3, mask_ratio=0.4, n_bins=model.config.n_bins, batch_size=32)
    sampler = CellSampler([(X[ev], ids)], cfg, model.vocab, np.random.default_rng(4))
    b, t, m = sampler.batch([(0, i) for i in range(20)])
    with torch.no_grad():
        mlm, _, _ = _losses(model.eval(), b, t, m)
    assert res1["all"]["model"] == pytest.approx(float(mlm), rel=1e-5)


@pytest.fixture(scope="module")
def labelled(sim_small):
    return sim_small


def test_probe_end_to_end_and_cli(labelled, tmp_path):
    a = labelled
    res = probe_model(None, a, label_key="cell_type", donor_key="donor", n_cells=150, n_masked_cells=24,
                      n_fit_cells=60, progress=False)
    g = res.goals()
    assert set(g["knn_balanced_accuracy"]) == {"model", "pca50", "random_weights"}
    assert all(0 <= v <= 1 for v in g["knn_balanced_accuracy"].values())
    assert set(res.embeddings.source) == {"model", "random_weights", "pca50"}
    assert len(res.embeddings) == 4 + 4 + 1  # {last, penultimate} x {cls, avg} per network, + PCA-50
    assert res.masked["nonzero"]["n"] + res.masked["zero"]["n"] == res.masked["all"]["n"] > 0
    paths = res.save(tmp_path / "p")
    again = type(res).load(paths["json"])
    assert again.goals()["masked_mse"] == g["masked_mse"] and len(again.embeddings) == len(res.embeddings)
    assert paths["png"].stat().st_size > 1000
    a.write_h5ad(tmp_path / "cells.h5ad")
    r = CliRunner().invoke(app, ["model", "probe", "default", str(tmp_path / "cells.h5ad"), "--label-key", "cell_type",
                                 "--donor-key", "donor", "--n-cells", "120", "--no-random-weights", "-o",
                                 str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "cli" / "probe_cells.json").read_text())
    assert "random_weights" not in {e["source"] for e in rep["embeddings"]} and "kNN-15" in r.output
    r = CliRunner().invoke(app, ["model", "probe", "default", str(tmp_path / "cells.h5ad")])
    assert r.exit_code == 2 and "--label-key" in r.output
    with pytest.raises(InputError, match="2 classes"):
        one = a.copy()
        one.obs["one"] = "x"
        probe_model(None, one, label_key="one", n_cells=50, progress=False)


def test_one_pass_embeddings_equal_the_model_forward(sim_small):
    from sclens.models.api import tokenize_adata
    from sclens.models.probe import _embeddings

    model = load_default_model()
    sub = sim_small[:20].copy()
    E = _embeddings(model, sub, seed=0, batch_size=8, progress=False)
    batch = tokenize_adata(sub, model, seed=0)
    with torch.no_grad():
        last = model(batch.gene_ids, batch.values, batch.padding_mask)
        pen = model(batch.gene_ids, batch.values, batch.padding_mask, stop_at_layer=model.n_layers - 1)
    assert np.allclose(E[("last", "cls")], last[:, 0].numpy(), atol=1e-5)
    assert np.allclose(E[("penultimate", "avg")], model.pool(pen, batch.padding_mask, "avg").numpy(), atol=1e-5)
