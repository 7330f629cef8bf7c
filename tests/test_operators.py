import numpy as np
import pytest
import torch

from sclens.data import GenePanel
from sclens.errors import InputError
from sclens.models import load_scgpt
from sclens.operators import OperatorBank, export_operators, featurize, featurize_adata, featurize_drift
from tests.planted import PLANTED, build_planted_checkpoint, gene_names, planted_cells


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("op")
    model = load_scgpt(build_planted_checkpoint(d / "m"))
    cells = planted_cells(n_donors=2, cells_per_anchor=3)
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, n_ref_cells=12, progress=False)
    return model, cells, panel, banks


def test_shapes_and_kinds(setup):
    model, _, panel, banks = setup
    G = len(panel)
    for kind in ("attn", "qk", "ov"):
        assert banks[kind].operators.shape == (3, 4, G, G)
    np.testing.assert_allclose(banks["attn"].operators.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(banks["qk"].operators.sum(-1), 1.0, atol=1e-5)
    for l in range(2):
        for h in range(4):
            assert np.linalg.norm(banks["ov"].unit(l, h), 2) == pytest.approx(1.0, abs=1e-4)


def test_planted_ov_operator_is_the_program_projector(setup):
    _, _, _, banks = setup
    A = banks["ov"].unit(*PLANTED)
    n = 16
    np.testing.assert_allclose(A[:n, :n], np.eye(n), atol=1e-4)
    assert np.abs(A[n:]).max() < 1e-4 and np.abs(A[:, n:]).max() < 1e-4


def test_attn_operator_equals_mean_pattern_from_hooks(setup):
    model, cells, panel, banks = setup
    from sclens.models.api import tokenize_adata

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(cells.n_obs, size=12, replace=False))
    batch = tokenize_adata(cells[idx], model, panel=panel, mode="all", seed=0)
    P = model.run_with_cache(batch, ["blocks.1.attn.hook_pattern"], progress=False)["blocks.1.attn.hook_pattern"]
    M = P.mean(0)[:, 1:, 1:]
    M = M / M.sum(-1, keepdim=True)
    np.testing.assert_allclose(banks["attn"].operators[1], M.numpy(), atol=1e-5)


def test_qk_at_layer0_uses_the_embedding(setup):
    model, _, panel, banks = setup
    ids = torch.tensor(model.vocab.lookup(panel.genes))
    with torch.no_grad():
        R = model.encoder(ids).double()  # value embedding is switched off in the planted model
    w = {k: v.double() for k, v in model.head_weights(0, 1).items()}
    S = ((R @ w["W_Q"] + w["b_Q"]) @ (R @ w["W_K"] + w["b_K"]).T) / 4.0
    np.testing.assert_allclose(banks["qk"].unit(0, 1), torch.softmax(S, -1).numpy(), atol=1e-5)


def test_featurize_blocks_drift_and_pools(setup):
    _, cells, panel, banks = setup
    bank = banks["ov"]
    x = panel.matrix(cells)
    np.testing.assert_allclose(featurize(x, bank.unit(0, 1)), x @ bank.unit(0, 1), rtol=1e-5)
    np.testing.assert_allclose(featurize_adata(cells, panel, bank.unit(0, 1), chunk_size=7), x @ bank.unit(0, 1),
                               rtol=1e-5, atol=1e-5)
    assert featurize_drift(x, bank).shape == (cells.n_obs, 2 * len(panel))
    assert bank.block_bounds(3) == [(0, 1), (1, 2), (2, 3)]
    np.testing.assert_allclose(bank.pool([(0, 0), (1, 1)], [1, 3]), 0.25 * bank.unit(0, 0) + 0.75 * bank.unit(1, 1),
                               atol=1e-6)
    with pytest.raises(InputError):
        bank.pool([(0, 0)], [-1])


def test_save_load_and_tamper(setup, tmp_path):
    _, _, _, banks = setup
    p = banks["ov"].save(tmp_path / "ov.safetensors")
    back = OperatorBank.load(p)
    assert np.array_equal(back.operators, banks["ov"].operators) and back.panel.genes == banks["ov"].panel.genes
    assert back.manifest["reference_set_sha256"] == banks["ov"].manifest["reference_set_sha256"]
    import json

    m = json.loads((tmp_path / "ov.safetensors.json").read_text())
    m["operators_sha256"] = "0" * 64
    (tmp_path / "ov.safetensors.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="does not match the hash"):
        OperatorBank.load(p)


def test_operator_folder_round_trip(setup, tmp_path):
    from sclens.operators import OperatorFolder

    _, _, panel, banks = setup
    OperatorFolder(panel, banks).save(tmp_path / "ops")
    assert OperatorFolder.kinds_in(tmp_path / "ops") == sorted(banks)
    back = OperatorFolder.load(tmp_path / "ops", ["ov"])
    assert list(back.banks) == ["ov"] and back.panel.genes == panel.genes
    assert np.array_equal(back.banks["ov"].operators, banks["ov"].operators)
    with pytest.raises(InputError, match="operators_nope.safetensors not found"):
        OperatorFolder.load(tmp_path / "ops", ["nope"])
    with pytest.raises(InputError, match="run `sclens export-operators` first"):
        OperatorFolder.load(tmp_path)


def test_panel_gene_outside_vocab(setup):
    model, cells, _, _ = setup
    with pytest.raises(InputError, match="not model tokens"):
        export_operators(model, cells, GenePanel(("PROG00", "CD3E")), progress=False)


def test_low_rank_spectral_norm_equals_the_full_one():
    """The ov normalisation through the d_head x d_head core is the G x G matrix's spectral norm (exact)."""
    from sclens.operators import low_rank_spectral_norm

    g = torch.Generator().manual_seed(0)
    for G, dh in ((50, 8), (300, 64), (5, 8)):
        left = torch.randn(G, dh, generator=g, dtype=torch.float64)
        right = torch.randn(dh, G, generator=g, dtype=torch.float64)
        full = torch.linalg.matrix_norm(left @ right, ord=2)
        assert torch.allclose(low_rank_spectral_norm(left, right), full, rtol=1e-10)


def test_ov_only_export_skips_the_last_block_and_matches_the_full_export(setup):
    model, cells, panel, banks = setup
    ran = []
    hook = model.blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    try:
        ov = export_operators(model, cells, panel, kinds=["ov", "qk"], n_ref_cells=12, progress=False)
    finally:
        hook.remove()
    assert not ran  # every qk / ov operator needs layer inputs only
    for kind in ("ov", "qk"):
        # float32 rounding only: the full export computes attention explicitly (its pattern is cached), this one fused
        np.testing.assert_allclose(ov[kind].operators, banks[kind].operators, rtol=1e-4, atol=1e-6)
