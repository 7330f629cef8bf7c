"""Random-weights copies: every block tensor re-drawn with its own mean and standard deviation."""

import numpy as np
import pytest
import torch

from sclens.errors import InputError
from sclens.models import load_default_model
from sclens.models.controls import randomize


@pytest.fixture(scope="module")
def model():
    return load_default_model()


def _stats(t):
    t = t.detach().double()
    return float(t.mean()), float(t.std(unbiased=False))


def test_blocks_redrawn_with_their_own_mean_and_std_embeddings_kept(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = randomize(model, seed=0)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    sd, rsd = model.state_dict(), rnd.state_dict()
    for k in sd:
        if k.startswith("blocks.") and sd[k].numel() > 1000:
            m0, s0 = _stats(sd[k])
            m1, s1 = _stats(rsd[k])
            assert not torch.equal(sd[k], rsd[k]), k
            assert s1 == pytest.approx(s0, rel=0.1) and abs(m1 - m0) < 0.1 * s0 + 1e-6, k
            assert float(rsd[k].norm()) == pytest.approx(float(sd[k].norm()), rel=0.1), k
        elif k.startswith(("encoder.", "value_encoder.", "decoder.", "mvc_decoder.")):
            assert torch.equal(sd[k], rsd[k]), k
    # a LayerNorm weight that is constant stays constant (std 0); the copy is a working model
    assert rnd.checkpoint_sha256 != model.checkpoint_sha256 and "random weights" in rnd.source
    assert rnd.random_control["keep_embeddings"] and rnd.random_control["family"] == "scgpt"
    ids = torch.tensor([[model.vocab["<cls>"]] + list(range(10, 20))])
    out = rnd(ids, torch.zeros(1, 11))
    assert torch.isfinite(out).all()


def test_seeded_and_embeddings_variant(model):
    a, b, c = randomize(model, 1), randomize(model, 1), randomize(model, 2)
    k = "blocks.0.attn.in_proj_weight"
    assert torch.equal(a.state_dict()[k], b.state_dict()[k]) and not torch.equal(a.state_dict()[k], c.state_dict()[k])
    full = randomize(model, 1, keep_embeddings=False)
    e = "encoder.embedding.weight"
    assert not torch.equal(full.state_dict()[e], model.state_dict()[e])
    assert full.checkpoint_sha256 != a.checkpoint_sha256


def test_cell_lm_family_and_errors():
    from sclens.circuits.lm import load_default_cell_lm

    lm = load_default_cell_lm()
    rnd = randomize(lm, 0)
    w0, w1 = lm.layer(0).attention.query_key_value.weight, rnd.layer(0).attention.query_key_value.weight
    assert not torch.equal(w0, w1) and float(w1.detach().std()) == pytest.approx(float(w0.detach().std()), rel=0.1)
    assert torch.equal(lm.W_E, rnd.W_E) and rnd.random_control["family"] == "cell_lm"
    with pytest.raises(InputError, match="knows"):
        randomize(torch.nn.Linear(2, 2), 0)
    with pytest.raises(InputError, match="seed"):
        randomize(lm, -1)


def test_random_control_banks_share_the_panel_and_reference_cells(model):
    from sclens.datasets import simulate_hematopoiesis
    from sclens.data import select_panel
    from sclens.operators import export_operators, export_random_controls

    a = simulate_hematopoiesis(n_donors=2, cells_per_donor=40, seed=0)
    panel = select_panel(a, model.vocab.genes, n_genes=60)
    own = export_operators(model, a, panel, kinds=["ov"], n_ref_cells=8, progress=False)["ov"]
    ctrl = export_random_controls(model, a, panel, kinds=["ov"], n_copies=2, n_ref_cells=8, progress=False)
    assert len(ctrl) == 2 and all(c["ov"].panel.genes == panel.genes for c in ctrl)
    assert ctrl[0]["ov"].manifest["reference_set_sha256"] == own.manifest["reference_set_sha256"]
    assert ctrl[0]["ov"].manifest["random_control"]["seed"] == 0 and ctrl[1]["ov"].manifest["random_control"]["seed"] == 1
    assert not np.allclose(ctrl[0]["ov"].operators, own.operators)
    assert not np.allclose(ctrl[0]["ov"].operators, ctrl[1]["ov"].operators)
