import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sclens.data import (GenePanel, detect_gene_id_type, detect_value_kind, harmonize_gene_ids, log_normalize,
                         normalize, read_h5ad, select_panel, validate)
from sclens.errors import InputError


def _adata(X, genes=None, obs=None):
    a = ad.AnnData(sp.csr_matrix(np.asarray(X, dtype=np.float32)))
    a.var_names = genes or [f"G{i}" for i in range(a.n_vars)]
    if obs is not None:
        a.obs = obs
    return a


def test_counts_and_log_are_detected(sim_small):
    assert validate(sim_small).kind == "counts"
    logged = _adata(log_normalize(sim_small.X).toarray(), list(sim_small.var_names))
    assert validate(logged).kind == "log1p_normalized"


def test_log_data_where_counts_are_needed(sim_small):
    logged = _adata(log_normalize(sim_small.X).toarray(), list(sim_small.var_names))
    with pytest.raises(InputError, match="raw integer counts are needed.*log1p normalized"):
        validate(logged, require="counts")


def test_nan_is_reported_with_location():
    X = np.ones((4, 3))
    X[2, 1] = np.nan
    with pytest.raises(InputError, match=r"1 NaN/inf values.*cell '2'.*gene 'G1'"):
        validate(_adata(X))


def test_negative_values_look_scaled():
    with pytest.raises(InputError, match="negative values.*scaled"):
        validate(_adata([[1.0, -0.5], [0.2, 1.3]]))


def test_missing_obs_column_lists_available(sim_small):
    with pytest.raises(InputError, match=r"\['celltype'\] not found; available obs columns: \['donor'"):
        validate(sim_small, obs_keys=["celltype"])


def test_duplicated_genes():
    with pytest.raises(InputError, match="duplicated.*'A'"):
        a = ad.AnnData(np.ones((2, 3), dtype=np.float32))
        a.var_names = ["A", "A", "B"]
        validate(a)


def test_gene_id_types():
    assert detect_gene_id_type(["CD3E", "MS4A1"]) == "symbol"
    assert detect_gene_id_type(["ENSG00000198851", "ENSG00000156738.17"]) == "ensembl"
    assert detect_gene_id_type(["ENSG00000198851", "CD3E"]) == "mixed"


def test_mixed_ids_are_a_clear_error():
    a = _adata(np.ones((2, 4)), ["ENSG00000198851", "ENSG00000156738", "CD3E", "MS4A1"])
    with pytest.raises(InputError, match="gene ids are mixed"):
        validate(a)


def test_ensembl_ids_are_mapped_to_symbols():
    a = _adata(np.ones((2, 3)), ["ENSG00000198851", "ENSG00000156738.17", "ENSG00000105369"])
    out = harmonize_gene_ids(a)
    assert list(out.var_names) == ["CD3E", "MS4A1", "CD79A"]
    assert list(a.var_names)[0] == "ENSG00000198851"  # caller's object untouched
    assert out.var["sclens_original_id"].iloc[1] == "ENSG00000156738.17"


def test_unmapped_ensembl_ids():
    a = _adata(np.ones((2, 3)), ["ENSG99999999991", "ENSG99999999992", "ENSG00000105369"])
    with pytest.raises(InputError, match="only 1 of 3 Ensembl ids map"):
        harmonize_gene_ids(a)


def test_genes_outside_the_vocabulary():
    a = _adata(np.ones((2, 3)), ["Cd3e", "Ms4a1", "Cd79a"])
    with pytest.raises(InputError, match="0% of the 3 genes are in the model vocabulary.*mouse"):
        harmonize_gene_ids(a, vocabulary=["CD3E", "MS4A1", "CD79A"])


def test_small_vocabulary_covered_by_the_data():
    """A small vocabulary (e.g. highly variable genes) that the data covers passes even though most of the
    data's genes are outside it; one the data barely covers still fails."""
    genes = [f"G{i}" for i in range(100)]
    a = _adata(np.ones((2, 100)), genes)
    out = harmonize_gene_ids(a, vocabulary=["<pad>", "<cls>", *genes[:10], "OTHER"])  # 10 of 11 vocab genes
    assert out.n_vars == 100
    with pytest.raises(InputError, match="10% of the 100 genes.*9% of the vocabulary's 110 genes"):
        harmonize_gene_ids(a, vocabulary=genes[:10] + [f"X{i}" for i in range(100)])
    # a preprocessed subset of genes against a larger vocabulary: many genes shared, both shares low -> a warning
    big = _adata(np.ones((2, 1000)), [f"G{i}" for i in range(1000)])
    with pytest.warns(UserWarning, match="the model sees 300 of the data's genes"):
        out = harmonize_gene_ids(big, vocabulary=[f"G{i}" for i in range(300)] + [f"X{i}" for i in range(700)])
    assert out.n_vars == 1000


def test_var_key_choice():
    a = _adata(np.ones((2, 2)), ["x1", "x2"])
    a.var["gene_ids"] = ["ENSG00000198851", "ENSG00000156738"]
    assert list(harmonize_gene_ids(a, var_key="gene_ids").var_names) == ["CD3E", "MS4A1"]
    with pytest.raises(InputError, match="var column 'ids' not found"):
        harmonize_gene_ids(a, var_key="ids")


def test_normalize_does_not_touch_the_input(sim_small):
    before = sim_small.X.copy()
    out = normalize(sim_small)
    assert (sim_small.X != before).nnz == 0
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(1), 1e4, rtol=1e-4)
    assert (out.layers["counts"] != before).nnz == 0


def test_empty_cells_cannot_be_normalised():
    with pytest.raises(InputError, match="zero total counts"):
        log_normalize(sp.csr_matrix(np.array([[0, 0], [1, 2]], dtype=np.float32)))


def test_value_kinds():
    assert detect_value_kind(np.array([[1.0, 2.0]]))[0] == "counts"
    assert detect_value_kind(np.array([[-1.0, 2.0]]))[0] == "scaled"
    assert detect_value_kind(np.array([[1.5, 200.5]]))[0] == "normalized_unlogged"


def test_panel_is_variable_vocab_genes(sim_small):
    vocab = list(sim_small.var_names[::2])
    panel = select_panel(sim_small, vocab, n_genes=100)
    assert len(panel) == 100 and set(panel.genes) <= set(vocab)
    assert panel.flavor == "seurat_v3"
    assert select_panel(sim_small, vocab, n_genes=100).genes == panel.genes  # deterministic
    markers = {"CD34", "HBB", "MPO", "CD14", "CD3E", "MS4A1", "NKG7"} & set(vocab)
    assert len(markers & set(panel.genes)) >= len(markers) - 1


def test_panel_on_log_data_uses_cell_ranger(sim_small):
    logged = _adata(log_normalize(sim_small.X).toarray(), list(sim_small.var_names))
    panel = select_panel(logged, None, n_genes=50)
    assert panel.flavor == "cell_ranger" and len(panel) == 50


def test_panel_matrix_zero_fills_and_errors_below_half(sim_small):
    panel = GenePanel(tuple(sim_small.var_names[:10]))
    x = panel.matrix(sim_small)
    assert x.shape == (sim_small.n_obs, 10)
    partial = sim_small[:, 3:].copy()
    with pytest.warns(UserWarning, match="3 of 10 panel genes are missing"):
        y = panel.matrix(partial)
    assert (y[:, :3] == 0).all()
    counts = partial.X.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, :7]  # library = every gene the data has
    np.testing.assert_allclose(y[:, 3:], expected, rtol=1e-5)
    with pytest.raises(InputError, match="only 30% of the 10 panel genes"):
        panel.matrix(sim_small[:, 7:].copy())


def test_read_h5ad_backed_and_missing(tmp_path, sim_small):
    p = tmp_path / "a.h5ad"
    sim_small.write_h5ad(p)
    a = read_h5ad(p, backed=True)
    assert a.isbacked and validate(a).kind == "counts"
    with pytest.raises(InputError, match="no such file"):
        read_h5ad(tmp_path / "missing.h5ad")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="could not be read"):
        read_h5ad(tmp_path / "bad.h5ad")


def test_onek1k_style_ensembl_ids_with_unmapped_ones_are_dropped_and_harmonising_is_idempotent():
    from sclens.data import ensembl_to_symbol

    mapped = sorted(ensembl_to_symbol())[:948]
    ids = mapped + [f"ENSG9999999{i:04d}" for i in range(52)]  # 52 of 1,000 without a symbol (5.2 %: "mixed" once kept)
    rng = np.random.default_rng(0)
    a = _adata(rng.poisson(1.0, size=(5, 1000)).astype(np.float32), ids)
    with pytest.warns(UserWarning, match="52 of 1000 Ensembl ids have no HGNC symbol"):
        once = harmonize_gene_ids(a)
    assert once.n_vars == 948 and detect_gene_id_type(once.var_names) == "symbol"
    assert list(once.var["sclens_original_id"]) == mapped
    twice = harmonize_gene_ids(once)
    assert list(twice.var_names) == list(once.var_names)
    dense = lambda m: m.toarray() if hasattr(m, "toarray") else np.asarray(m)  # noqa: E731
    np.testing.assert_array_equal(dense(twice.X), dense(once.X))
    assert list(twice.var["sclens_original_id"]) == mapped
