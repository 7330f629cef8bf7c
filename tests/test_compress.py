"""sclens.compress: SVD surrogates, hard-sparse storage, the factor audit's exact algebra, enrichment, the run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sclens.evaluation import BenchConfig, Endpoint
from sclens.compress import CompressConfig, CompressResult, compaction_table, compress, factor_contributions
from sclens.data import GenePanel
from sclens.errors import InputError
from sclens.extract import Adaptor, ExtractedModel, Operator, OperatorBlock


def _panel(G):
    return GenePanel([f"G{i}" for i in range(G)])


def _model(op: Operator, d=4, seed=0):
    rng = np.random.default_rng(seed)
    F = op.n_features
    ad_ = Adaptor("cell", rng.normal(size=F).astype(np.float32), (1 + rng.random(F)).astype(np.float32),
                  rng.normal(size=(d, F)).astype(np.float32), rng.normal(size=d).astype(np.float32), 1.0)
    return ExtractedModel(op, ad_, {})


def test_full_rank_svd_reproduces_the_dense_operator_and_its_latent():
    rng = np.random.default_rng(1)
    G = 40
    A = rng.normal(size=(G, G)).astype(np.float32)
    dense = Operator([OperatorBlock(dense=A)], _panel(G))
    full = dense.low_rank(G)
    assert np.allclose(full.blocks[0].matrix(), A, atol=1e-4)
    x = rng.random((25, G)).astype(np.float32)
    m_dense, m_full = _model(dense), _model(full)
    assert np.allclose(m_dense.latent(x, fold=False), m_full.latent(x, fold=False), atol=1e-3)
    # truncation keeps the leading singular directions: the rank-5 error is the tail of the spectrum
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    err = np.linalg.norm(dense.low_rank(5).blocks[0].matrix() - A)
    assert math.isclose(err, np.sqrt((s[5:] ** 2).sum()), rel_tol=1e-4)


def test_factor_ablation_is_exact_and_zeroing_every_factor_removes_the_operator():
    rng = np.random.default_rng(2)
    G, r = 30, 6
    op = Operator([OperatorBlock(dense=rng.normal(size=(G, G)).astype(np.float32))], _panel(G)).low_rank(r)
    m = _model(op)
    x = rng.random((20, G)).astype(np.float32)
    z, u, v = factor_contributions(m, x)
    for j in (0, 3, 5):
        L = op.blocks[0].left.copy()
        L[:, j] = 0
        zeroed = _model(Operator([OperatorBlock(left=L, right=op.blocks[0].right)], op.panel))
        zeroed.adaptor = m.adaptor
        assert np.allclose(z - np.outer(u[:, j], v[j]), zeroed.latent(x, fold=False), atol=1e-4)
    # all factors zeroed: the latent no longer depends on the cell (operator contribution gone)
    z0 = z - u @ v
    assert np.allclose(z0, m.adaptor.transform(np.zeros((1, G), np.float32))[0], atol=1e-4)
    assert np.ptp(z0, axis=0).max() < 1e-4


def test_hard_sparse_factors_are_stored_as_indices_and_values(tmp_path):
    rng = np.random.default_rng(3)
    G = 50
    op = Operator([OperatorBlock(dense=rng.normal(size=(G, G)).astype(np.float32))], _panel(G)).low_rank(10)
    sp_op = op.sparsified([0, 1, 2], n_read=7, n_write=5)
    blk = sp_op.blocks[0]
    assert ((blk.left != 0).sum(0) == 7).all() and ((blk.right != 0).sum(1) == 5).all() and sp_op.n_values == 36
    # the kept loadings are the largest |loadings| of each factor
    j0 = np.argsort(-np.abs(op.blocks[0].left[:, 0]))[:7]
    assert set(np.flatnonzero(blk.left[:, 0])) == set(j0)
    x = rng.random((8, G)).astype(np.float32)
    dense_m, sparse_m = _model(op.low_rank(3)), _model(sp_op)
    p_dense, p_sparse = dense_m.save(tmp_path / "r3.safetensors"), sparse_m.save(tmp_path / "sp.safetensors")
    back = ExtractedModel.load(p_sparse)
    assert back.operator.blocks[0].sparse and np.array_equal(back.operator.blocks[0].matrix(), blk.matrix())
    assert np.allclose(back.latent(x), sparse_m.latent(x), atol=1e-5)
    assert p_sparse.stat().st_size < p_dense.stat().st_size
    with pytest.raises(InputError, match="low_rank"):
        Operator([OperatorBlock(dense=np.eye(G, dtype=np.float32))], _panel(G)).sparsified([0], 3, 3)
    with pytest.raises(InputError, match="factors must be indices"):
        op.sparsified([10], 3, 3)


def _sim_config(**kw):
    eps = [Endpoint("branch", "multiclass", "branch"), Endpoint("depth", "depth", "depth"),
           Endpoint("cd4_vs_cd8", "binary", "cell_type", negative=["Naive CD4 T", "Memory CD4 T"],
                    positive=["Naive CD8 T", "Memory CD8 T"])]
    return BenchConfig(endpoints=eps, donor_key="donor", label_key="cell_type", scheme="loo", adaptor_epochs=3,
                       n_ref_cells=8, n_genes=200, **kw)


@pytest.fixture(scope="module")
def sim():
    from sclens.datasets import simulate_hematopoiesis

    return simulate_hematopoiesis(n_donors=3, cells_per_donor=120, seed=4)


def test_compress_runs_the_ladder_audit_and_programs(sim, tmp_path):
    cc = CompressConfig(single_head="L0H2", ranks=(8, 4), audit_rank=8, sparse_factors=3, sparse_genes=12,
                        core_size=2, n_cards=4)
    cfg = _sim_config()
    cfg.scheme, cfg.n_splits = "shuffle", 2
    res = compress(sim, cfg, cc, name="t", artifact_dir=tmp_path / "art", progress=False)
    v = res.variants.set_index("variant")
    assert list(v.index) == ["reference", "single_head", "rank8", "rank4", "sparse"]
    b = v["operator_bytes"]
    assert b["reference"] > b["single_head"] > b["rank8"] > b["rank4"] > b["sparse"] > 0
    assert all((tmp_path / "art" / f).is_file() for f in v["file"])
    assert v.loc["sparse", "operator_values"] == 3 * 24
    # every variant scored on every split and endpoint; comparisons have q-values
    assert set(res.scores["variant"]) == set(v.index) and res.scores["split"].nunique() == 2
    assert res.comparisons["q"].notna().any() and {"previous", "reference"} <= set(res.comparisons["step"])
    # audit: 8 factors x 2 splits, ranking sorted, shares monotone and ending at 1
    assert res.audit["factor"].nunique() == 8 and res.ranking["pooled_drop"].is_monotonic_decreasing
    sh = [res.shares[k] for k in sorted(res.shares)]
    assert all(a <= b + 1e-12 for a, b in zip(sh, sh[1:])) and 0 < sh[0] <= 1
    # core chosen on the other splits; 2^2 - 1 core subsets + all + none
    assert len(res.core["subset"].unique()) == 5 and set(res.info["core_by_split"]) == {0, 1}
    assert len(res.cards) == 4 and all(c["label"] for c in res.cards)
    assert {"read+", "read−", "write+", "write−"} == set(res.cards[0]["top_genes"])
    table = compaction_table(res)
    assert "significant losses vs previous" in table.columns and table["file_bytes"].iloc[0] > 0
    paths = res.save(tmp_path / "rep")
    rep = json.loads(paths["json"].read_text())
    assert rep["top_k_share"] and rep["factor_cards"] and paths["html"].stat().st_size > 1000
    assert (tmp_path / "rep" / "plotly.min.js").is_file()
    back = CompressResult.load(tmp_path / "rep")
    assert back.name == res.name and back.shares == res.shares and back.cards == json.loads(json.dumps(res.cards))
    pd.testing.assert_frame_equal(back.summary.reset_index(drop=True), res.summary.reset_index(drop=True),
                                  check_dtype=False)


def test_compress_errors_are_specific(sim):
    with pytest.raises(InputError, match="choose the single head"):
        compress(sim, _sim_config(), CompressConfig(), progress=False)
    with pytest.raises(InputError, match="audit_rank 5 must be one of the ranks"):
        compress(sim, _sim_config(), CompressConfig(single_head="L0H0", ranks=(8, 4), audit_rank=5), progress=False)
    with pytest.raises(InputError, match="L<layer>H<head>"):
        compress(sim, _sim_config(), CompressConfig(single_head="head three"), progress=False)


def test_cli_compress_end_to_end(sim, tmp_path):
    from sclens.cli import app

    sim.write_h5ad(tmp_path / "sim.h5ad")
    (tmp_path / "ep.toml").write_text(
        'donor_key = "donor"\nlabel_key = "cell_type"\nscheme = "shuffle"\nn_splits = 2\nadaptor_epochs = 2\n'
        'n_ref_cells = 4\nn_genes = 100\n[[endpoint]]\nname = "branch"\nkind = "multiclass"\ncolumn = "branch"\n')
    r = CliRunner().invoke(app, ["compress", str(tmp_path / "sim.h5ad"), "--endpoints", str(tmp_path / "ep.toml"),
                                 "-o", str(tmp_path / "out"), "--unit", "L1H0", "--ranks", "4,2", "--audit-rank", "4", "--unit-kind", "ov",
                                 "--sparse-factors", "2", "--sparse-genes", "5", "--name", "cli"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "compress_cli.html").is_file() and "share" in r.output
    assert (tmp_path / "out" / "artifacts" / "cli_sparse.safetensors").is_file()
    r = CliRunner().invoke(app, ["compress", str(tmp_path / "sim.h5ad"), "--endpoints", str(tmp_path / "ep.toml"),
                                 "-o", str(tmp_path / "out2"), "--unit", "L1H0", "--ranks", "four"])
    assert r.exit_code == 2 and "--ranks must be integers" in r.output


def test_compaction_table_counts_the_single_heads_one_test_against_both_columns():
    """The single head's previous step is the reference: its one comparison must show in both loss columns."""
    from types import SimpleNamespace

    variants = pd.DataFrame({"variant": ["reference", "single_head", "rank8"], "operator": ["a", "b", "c"],
                             "file_bytes": [30, 20, 10], "operator_bytes": [3, 2, 1], "operator_values": [9, 4, 1]})
    summary = pd.DataFrame({"variant": ["reference", "single_head", "rank8"], "endpoint": "e", "metric": "auroc",
                            "mean": [0.9, 0.8, 0.7]})
    comparisons = pd.DataFrame({
        "variant": ["single_head", "rank8", "rank8"], "against": ["reference", "single_head", "reference"],
        "step": ["previous", "previous", "reference"], "endpoint": "e", "metric": "auroc",
        "mean_diff": [-0.1, -0.1, -0.2], "q": [0.01, 0.2, 0.01], "significant_loss": [True, False, True]})
    t = compaction_table(SimpleNamespace(summary=summary, variants=variants, comparisons=comparisons)).set_index("variant")
    assert t.loc["single_head", "significant losses vs previous"] == "e · auroc (-0.100, q=0.01)"
    assert t.loc["single_head", "significant losses vs reference"] == "e · auroc (-0.100, q=0.01)"
    assert t.loc["rank8", "significant losses vs previous"] == "none"
    assert t.loc["rank8", "significant losses vs reference"] == "e · auroc (-0.200, q=0.01)"
    assert t.loc["reference", "significant losses vs reference"] == "none"
