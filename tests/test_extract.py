"""Extraction: operator selection, adaptors, readouts, the artifact file, apply at every scale, transfer check."""

import json
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sclens import extract as ex
from sclens.data import ensembl_to_symbol, select_panel
from sclens.datasets import simulate_hematopoiesis
from sclens.errors import ArtifactError, InputError
from sclens.operators import export_operators
from sclens.utils import file_sha256


@pytest.fixture(scope="module")
def cohort():
    return simulate_hematopoiesis(n_donors=5, cells_per_donor=160, seed=11, n_background_genes=300)


@pytest.fixture(scope="module")
def heldout_cohort():
    """New donors from the same simulated biology (same genes and programmes)."""
    return simulate_hematopoiesis(n_donors=3, cells_per_donor=160, seed=11, n_background_genes=300, donor_seed=5)


@pytest.fixture(scope="module")
def banks(cohort):
    from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig
    import torch

    torch.manual_seed(1)
    vocab = GeneVocab.from_genes(list(cohort.var_names))
    model = HookedScGPT(ScGPTConfig(embsize=32, nheads=2, d_hid=64, nlayers=3, dropout=0.0, max_seq_len=256), vocab).eval()
    panel = select_panel(cohort, vocab.genes, n_genes=120)
    return export_operators(model, cohort, panel, kinds=["ov", "attn"], n_ref_cells=24, progress=False)


@pytest.fixture(scope="module")
def extracted(cohort, banks):
    op = ex.select_operator(banks, unit=(1, 0), kind="ov")
    return ex.extract(cohort, op, label_key="cell_type", donor_key="donor", tissue_key="tissue",
                      n_perm=200, progress=False)


@pytest.fixture(scope="module")
def saved(extracted, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "head.safetensors"
    extracted.save(path)
    return path


# ------------------------------------------------------------------------------------------ stage 1
def test_select_operator_variants(banks):
    ov = banks["ov"]
    unit = ex.select_operator(banks, unit=(2, 1), kind="ov")
    assert np.array_equal(unit.blocks[0].dense, ov.unit(2, 1)) and unit.source["type"] == "unit"
    pool = ex.select_operator(banks, pool=[(0, 0), (2, 1)], kind="ov")
    assert np.allclose(pool.blocks[0].dense, (ov.unit(0, 0) + ov.unit(2, 1)) / 2, atol=1e-6)
    drift = ex.select_operator(banks, drift=True, kind="attn")
    assert len(drift.blocks) == 2 and drift.n_features == 2 * len(ov.panel)
    with pytest.raises(InputError, match="exactly one"):
        ex.select_operator(banks, unit=(0, 0), drift=True, kind="ov")
    with pytest.raises(InputError, match="several operator kinds"):
        ex.select_operator(banks, unit=(0, 0))


def test_low_rank_is_the_truncated_svd(banks):
    op = ex.select_operator(banks, unit=(1, 1), kind="ov")
    A = op.blocks[0].dense.astype(np.float64)
    S = np.linalg.svd(A, compute_uv=False)
    r = ex.select_operator(banks, unit=(1, 1), kind="ov", rank=8)
    err = np.linalg.norm(A - r.blocks[0].matrix(), ord=2)
    assert r.rank == 8 and err == pytest.approx(S[8], rel=1e-3)  # Eckart-Young: the 9th singular value
    assert r.n_values == 2 * 8 * len(op.panel)
    assert r.low_rank(4).rank == 4
    with pytest.raises(InputError, match="raise the rank"):
        r.low_rank(16)


def test_operator_from_screen_report(banks, tmp_path):
    table = pd.DataFrame([
        {"rank": 1, "featurisation": "raw", "layer": -1, "head": -1, "fitter": "isomap", "passes_all": True},
        {"rank": 2, "featurisation": "attn", "layer": 2, "head": 1, "fitter": "gmds", "passes_all": True},
    ])
    table.to_csv(tmp_path / "screen_table.csv", index=False)
    op = ex.select_operator(banks, report=tmp_path)
    assert op.source["kind"] == "attn" and (op.source["layer"], op.source["head"]) == (2, 1)
    assert np.array_equal(op.blocks[0].dense, banks["attn"].unit(2, 1))
    table.loc[1, "passes_all"] = False
    table.to_csv(tmp_path / "screen_table.csv", index=False)
    with pytest.warns(UserWarning, match="does not pass"):
        ex.select_operator(banks, report=tmp_path / "screen_table.csv")


# ------------------------------------------------------------------------------------------ stages 2-3
def test_extract_reports_parameters_and_honest_holdout(extracted, cohort):
    m = extracted.manifest
    F = extracted.operator.n_features
    assert extracted.adaptor.d == 10
    nt = extracted.n_trainable()
    assert extracted.adaptor.kind == "ruler"  # the default: closed form
    assert nt["adaptor"] == 10 * F + 10 + F + 2  # W, bias, feature mean, global scale, beta
    assert nt["readout.pseudotime"] == 11 and nt["readout.branch"] == 11 * len(extracted.readouts["branch"].classes)
    held, train = m["split"]["held_out_donors"], m["split"]["train_donors"]
    assert held and not set(held) & set(train)
    assert "holdout" in m["metrics"] and m["metrics"]["holdout"]["n_cells"] > 0
    assert "cd4_cd8" in extracted.readouts  # the simulated cohort has plenty of CD4 and CD8 T cells
    assert set(extracted.readouts) | set(m["probes_skipped"]) >= set(ex.PROBES)  # a probe is fitted or reported skipped
    assert extracted.readouts["cd4_cd8"].classes == ["CD4", "CD8"]
    anchors = m["metrics"]["holdout_anchors"]
    assert {"trustworthiness", "ruler_spearman", "perm_p", "null_ruler_spearman", "passes"} <= set(anchors)


def test_adaptor_learns_the_ruler_better_than_its_pca_start(cohort, banks):
    """The cell-trained adaptor's stage term must fall well below where it starts."""
    op = ex.select_operator(banks, unit=(1, 0), kind="ov")
    m = ex.extract(cohort, op, label_key="cell_type", donor_key="donor", adaptor="cell", epochs=40, holdout_fraction=0,
                   progress=False, n_perm=100)
    hist = m.adaptor.info
    assert hist["history_last"]["stage"] < 0.5 * hist["history_first"]["stage"]
    assert m.manifest["metrics"].keys() == {"in_sample"}


def test_zero_epochs_keep_the_pca_start_and_negative_epochs_are_refused(cohort, banks):
    """epochs=0 is honoured (it used to fall back to 120): the adaptor is the top-d PCs of the z-scored features."""
    op = ex.select_operator(banks, unit=(1, 0), kind="ov")
    kw = dict(label_key="cell_type", donor_key="donor", holdout_fraction=0, progress=False, n_perm=0)
    m = ex.extract(cohort, op, adaptor="cell", epochs=0, **kw)
    assert m.adaptor.info["epochs"] == 0 and m.adaptor.info["loss_history"] == []
    W = m.adaptor.weight.astype(np.float64)
    assert np.allclose(W @ W.T, np.eye(W.shape[0]), atol=1e-5)  # orthonormal rows: untouched principal axes
    for bad, adaptor in ((-1, "cell"), (0, "let"), (10, "ruler")):
        with pytest.raises(InputError, match="epochs"):
            ex.extract(cohort, op, epochs=bad, adaptor=adaptor, **kw)


def test_sphere_targets_fit_the_ruler():
    """The stages' sphere points reproduce the DAG ruler: unit norm, beta·angle close to the hop distances."""
    from scipy.stats import spearmanr

    from sclens.ontology import StageDAG

    R = StageDAG.default().ruler_matrix[:12, :12]
    U, beta, mse = ex.sphere_ruler_targets(R, 9, seed=0)
    assert U.shape == (12, 9) and np.allclose(np.linalg.norm(U, axis=1), 1)
    A = beta * np.arccos(np.clip(U @ U.T, -1, 1))
    iu = np.triu_indices(12, 1)
    assert spearmanr(A[iu], R[iu]).statistic > 0.9 and mse < 0.5
    U2, beta2, _ = ex.sphere_ruler_targets(R, 9, seed=0)
    assert np.array_equal(U, U2) and beta == beta2  # seeded: same input, same targets
    with pytest.raises(InputError, match="2 stages"):
        ex.sphere_ruler_targets(R[:1, :1], 3)


def test_ruler_adaptor_keeps_the_stages_and_the_ruler(cohort, banks):
    """Closed form on the identity: deterministic, one global scale (no z-scoring), stage centroids' angles follow
    the ruler, and a linear probe separates the stages at least as well as on PCA-d of the same cells."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sclens.ontology import StageDAG

    dag = StageDAG.default()
    panel = ex.select_operator(banks, unit=(1, 0), kind="ov").panel
    x = ex.panel_rows(cohort, panel, np.arange(cohort.n_obs))
    stages = dag.map_labels(cohort.obs["cell_type"].astype(str)).stage.to_numpy(dtype=object)
    sidx = np.array([dag.index[s] if isinstance(s, str) else -1 for s in stages])
    # the regime of the real campaigns: a handful of stages (Kang: 8), so k = #stages - 1 < d and PCs fill the rest
    common = pd.Series(sidx[sidx >= 0]).value_counts().index[:8]
    keep = np.isin(sidx, common)
    x, sidx = x[keep], sidx[keep]
    a = ex.fit_ruler_adaptor(x, sidx, dag.ruler_matrix, d=10, seed=3)
    b = ex.fit_ruler_adaptor(x, sidx, dag.ruler_matrix, d=10, seed=3)
    assert a.kind == "ruler" and np.array_equal(a.weight, b.weight) and a.beta == b.beta
    assert np.unique(a.scale).size == 1  # one global scale: no per-gene z-scoring
    k = a.info["k_ruler"]
    assert k == a.info["n_stages"] - 1 == 7
    Z = a.transform(x)
    ok = sidx >= 0
    st = np.unique(sidx[ok])
    C = np.stack([Z[sidx == s].mean(0) for s in st])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    D = a.beta * np.arccos(np.clip(C @ C.T, -1, 1))
    R = dag.ruler_matrix[np.ix_(st, st)]
    iu = np.triu_indices(len(st), 1)
    pz = PCA(10, random_state=0).fit_transform(x)
    Cp = np.stack([pz[sidx == s].mean(0) for s in st])
    Cp /= np.linalg.norm(Cp, axis=1, keepdims=True)
    rho_pca = spearmanr(np.arccos(np.clip(Cp @ Cp.T, -1, 1))[iu], R[iu]).statistic
    # the ruler block alone (pc_weight 0) puts the stages on the ruler, far closer than PCA does; the default PC
    # block bends it (on this cohort; on Kang's held-out donors it kept 0.85, docs/extract.md)
    a0 = ex.fit_ruler_adaptor(x, sidx, dag.ruler_matrix, d=10, seed=3, pc_weight=0.0)
    Z0 = a0.transform(x)
    C0 = np.stack([Z0[sidx == s].mean(0) for s in st])
    C0 /= np.linalg.norm(C0, axis=1, keepdims=True)
    rho0 = spearmanr(np.arccos(np.clip(C0 @ C0.T, -1, 1))[iu], R[iu]).statistic
    assert rho0 > 0.9 and rho0 > rho_pca + 0.15  # (measured: 0.98 against 0.72)
    assert spearmanr(D[iu], R[iu]).statistic > 0.5
    assert np.sqrt((Z**2).mean()) == pytest.approx(1, rel=0.05)  # unit RMS latent (angles are scale-free)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))  # the bench's shared readouts
    acc_ruler = cross_val_score(clf, Z[ok], sidx[ok], cv=3).mean()
    acc_pca = cross_val_score(clf, PCA(10, random_state=0).fit_transform(x)[ok], sidx[ok], cv=3).mean()
    assert acc_ruler >= acc_pca - 0.02
    one = ex.fit_ruler_adaptor(x, np.where(ok, st[0], -1), dag.ruler_matrix, d=4, seed=0)  # one stage: PCA
    assert one.info["k_ruler"] == 0 and one.weight.shape == (4, x.shape[1])
    with pytest.raises(InputError, match="pc_weight"):
        ex.fit_ruler_adaptor(x, sidx, dag.ruler_matrix, pc_weight=-1)


def test_let_adaptor_is_the_screen_let_as_a_linear_map(cohort, banks):
    from sclens.anchors import build_anchors
    from sclens.manifold import fit_manifold

    op = ex.select_operator(banks, unit=(0, 1), kind="ov")
    anchors = build_anchors(cohort, op.panel, label_key="cell_type", donor_key="donor", tissue_key="tissue")
    F = op.features(anchors.X)
    a = ex.fit_let_adaptor(F, anchors.ruler, d=6, seed=2, epochs=40)
    fm = fit_manifold(F, "let", d=6, ruler=anchors.ruler, seed=2, let_epochs=40)
    assert np.allclose(a.transform(F), fm.Z, atol=1e-3 * np.abs(fm.Z).max())
    m = ex.extract(cohort, op, label_key="cell_type", donor_key="donor", tissue_key="tissue", adaptor="let", epochs=40,
                   progress=False, n_perm=100)
    assert m.adaptor.kind == "let" and m.adaptor.info["n_anchors"] > 10


def test_folded_and_explicit_chains_agree(extracted, cohort):
    x = ex.panel_rows(cohort, extracted.panel, np.arange(200))
    a, b = extracted.latent(x, fold=True), extracted.latent(x, fold=False)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    r = ex.ExtractedModel(extracted.operator.low_rank(16), extracted.adaptor, extracted.readouts)
    assert np.abs(r.latent(x) - r.latent(x, fold=False)).max() <= 1e-4 * np.abs(b).max()


# ------------------------------------------------------------------------------------------ artifact
def test_round_trip_in_a_fresh_process_is_bit_identical(extracted, saved, cohort, tmp_path):
    path_in = tmp_path / "cells.h5ad"
    cohort.write_h5ad(path_in)
    a = cohort.copy()
    ex.apply(a, extracted)
    code = (
        "import sys, numpy as np, anndata as ad; from sclens import extract as ex;"
        "a = ad.read_h5ad(sys.argv[2]); ex.apply(a, ex.load(sys.argv[1]));"
        "np.save(sys.argv[3], np.column_stack([a.obsm['X_sclens'], a.obs['sclens_pseudotime'], a.obsm['sclens_stage_proba']]));"
        "assert 'torch' not in sys.modules, 'applying a file must not need the foundation-model stack'"
    )
    out = tmp_path / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(saved), str(path_in), str(out)], check=True)
    ref = np.column_stack([a.obsm["X_sclens"], a.obs["sclens_pseudotime"], a.obsm["sclens_stage_proba"]])
    assert np.array_equal(np.load(out), ref)
    loaded = ex.load(saved)
    assert loaded.content_sha256 == extracted.manifest["content_sha256"]
    assert loaded.manifest["structure"]["operator"]["panel"]["genes"] == list(extracted.panel.genes)


def _flip_byte(src, dst, offset):
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))


def test_tampered_files_are_refused(saved, tmp_path):
    size = saved.stat().st_size
    header_len = int.from_bytes(saved.read_bytes()[:8], "little")
    bad = tmp_path / "bad.safetensors"
    _flip_byte(saved, bad, 8 + header_len + (size - 8 - header_len) // 2)  # inside the tensor data
    with pytest.raises(ArtifactError, match="content check"):
        ex.load(bad)
    text = saved.read_bytes()[8 : 8 + header_len].decode()
    pos = text.index('"n_genes')  # a character of the manifest JSON inside the header
    _flip_byte(saved, bad, 8 + pos + 3)
    with pytest.raises(ArtifactError):
        ex.load(bad)
    bad.write_bytes(saved.read_bytes()[: size // 2])
    with pytest.raises(ArtifactError, match="not a readable"):
        ex.load(bad)


def test_newer_format_version_gets_a_clear_message(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(saved), framework="numpy") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    meta["format_version"] = str(ex.FORMAT_VERSION + 1)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata=meta)
    with pytest.raises(ArtifactError, match="newer sclens"):
        ex.load(newer)
    meta["format"] = "something.else"
    save_file(tensors, str(newer), metadata=meta)
    with pytest.raises(ArtifactError, match="not an sclens extracted"):
        ex.load(newer)


# ------------------------------------------------------------------------------------------ apply
def test_apply_outputs_and_gene_handling(extracted, cohort):
    a = cohort.copy()
    ex.apply(a, extracted, chunk_size=97)
    assert a.obsm["X_sclens"].shape == (a.n_obs, 10)
    assert set(a.obs["sclens_branch"].cat.categories) == set(extracted.readouts["branch"].classes)
    assert np.allclose(a.obsm["sclens_stage_proba"].sum(1), 1, atol=1e-5)
    assert a.uns["sclens"]["artifact_sha256"] == extracted.manifest.get("content_sha256")
    # chunking does not change results
    b = ex.apply(cohort, extracted, chunk_size=10_000, copy=True)
    assert np.allclose(a.obsm["X_sclens"], b.obsm["X_sclens"], atol=1e-5)
    # a few panel genes missing: zero-filled with a warning; too many: a clear error
    panel = list(extracted.panel.genes)
    few = cohort[:, ~cohort.var_names.isin(panel[:5])].copy()
    with pytest.warns(UserWarning, match="5 of .* panel genes are missing"):
        ex.apply(few, extracted)
    many = cohort[:, ~cohort.var_names.isin(panel[: len(panel) * 2 // 3])].copy()
    with pytest.raises(InputError, match="panel genes are present"):
        ex.apply(many, extracted)


def test_apply_maps_ensembl_ids(extracted, cohort):
    sym2ens = {s: e for e, s in ensembl_to_symbol().items()}
    keep = [g for g in cohort.var_names if g in sym2ens]
    sub = cohort[:, keep].copy()
    ref = ex.apply(sub, extracted, copy=True)
    ens = sub.copy()
    ens.var_names = [sym2ens[g] for g in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ex.apply(ens, extracted, copy=True)
    assert np.array_equal(out.obsm["X_sclens"], ref.obsm["X_sclens"])
    mixed = sub.copy()
    mixed.var_names = [sym2ens[g] if i % 2 else g for i, g in enumerate(keep)]
    with pytest.raises(InputError, match="mixed"):
        ex.apply(mixed, extracted)


def test_apply_file_streams_h5ad_and_zarr_without_touching_the_input(extracted, cohort, tmp_path):
    ref = ex.apply(cohort, extracted, copy=True, chunk_size=100)
    src = tmp_path / "in.h5ad"
    cohort.write_h5ad(src)
    before = file_sha256(src)
    rec = ex.apply_file(extracted, src, tmp_path / "out.h5ad", chunk_size=100, progress=False)
    assert file_sha256(src) == before and rec["n_cells"] == cohort.n_obs
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert np.array_equal(out.obsm["X_sclens"], ref.obsm["X_sclens"])
    assert (out.obs["sclens_stage"] == ref.obs["sclens_stage"]).all()
    assert np.array_equal(out.obs["sclens_pseudotime"].to_numpy(), ref.obs["sclens_pseudotime"].to_numpy())
    assert np.array_equal(out.X.toarray(), cohort.X.toarray()) and out.obs["donor"].equals(cohort.obs["donor"])
    cohort.write_zarr(tmp_path / "in.zarr")
    ex.apply_file(extracted, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_size=100, progress=False)
    z = ad.read_zarr(tmp_path / "out.zarr")
    assert np.array_equal(z.obsm["X_sclens"], ref.obsm["X_sclens"])
    assert (z.obs["sclens_branch"] == ref.obs["sclens_branch"]).all()
    with pytest.raises(InputError, match="never overwrites"):
        ex.apply_file(extracted, src, src, progress=False)
    with pytest.raises(InputError, match="format"):
        ex.apply_file(extracted, src, tmp_path / "out.zarr", progress=False)
    # backed AnnData through the in-memory API gives the same numbers
    backed = ad.read_h5ad(src, backed="r")
    ex.apply(backed, extracted, chunk_size=100)
    assert np.array_equal(backed.obsm["X_sclens"], ref.obsm["X_sclens"])


def test_dask_distributed_matches_in_memory(extracted, cohort):
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    ref = ex.apply(cohort, extracted, copy=True, chunk_size=200)
    lazy = cohort.copy()
    lazy.X = da.from_array(sp.csr_matrix(cohort.X), chunks=(200, -1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        ex.apply(lazy, extracted)
    assert isinstance(lazy.X, da.Array)  # the input stays lazy
    assert np.array_equal(lazy.obsm["X_sclens"], ref.obsm["X_sclens"])
    assert np.array_equal(lazy.obsm["sclens_stage_proba"], ref.obsm["sclens_stage_proba"])
    assert (lazy.obs["sclens_stage"] == ref.obs["sclens_stage"]).all()


# ------------------------------------------------------------------------------------------ transfer
def test_validate_transfer_on_held_out_donors(extracted, heldout_cohort):
    rep = ex.validate_transfer(extracted, heldout_cohort, label_key="cell_type", donor_key="donor",
                               tissue_key="tissue", n_perm=200)
    m = rep.metrics
    assert m["n_donors"] == 3 and m["synthetic"] and rep.latent.shape == (m["n_anchors"], 10)
    for key in ("trustworthiness", "ruler_spearman", "ruler_spearman_resid", "perm_p", "null_ruler_spearman",
                "null_perm_p"):
        assert np.isfinite(m[key])
    assert m["passes"] == (all(m["gates"].values()))
    assert "branch_balanced_accuracy" in m["cells"]
    assert "zero-shot transfer" in rep.summary()
    json.dumps(rep.to_dict(), default=float)


def test_adaptor_only_extraction_for_callers_with_their_own_readouts(cohort, banks):
    """fit_readouts=False stops after the adaptor: same adaptor as the full extraction, no readouts, no scores."""
    op = ex.select_operator(banks, unit=(1, 0), kind="ov")
    kw = dict(label_key="cell_type", donor_key="donor", holdout_fraction=0, progress=False, n_perm=0, seed=4)
    lean = ex.extract(cohort, op, fit_readouts=False, **kw)
    full = ex.extract(cohort, op, **kw)
    assert lean.readouts == {} and "skipped" in lean.manifest["metrics"]
    assert np.array_equal(lean.adaptor.weight, full.adaptor.weight) and full.readouts
    x = ex.panel_rows(cohort, op.panel, np.arange(50))
    assert np.allclose(lean.latent(x), full.latent(x))
