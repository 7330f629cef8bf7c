import json

import numpy as np
import pytest
import torch

from sclens.errors import InputError
from sclens.models import load_scgpt
from sclens.models.pretrain import PretrainConfig, pretrain_scgpt

CFG = dict(n_layers=2, n_heads=2, d_model=32, d_hid=64, train_seq_len=48, batch_size=16, warmup_steps=10,
           eval_every=30, eval_cells=48, lr=2e-3, dropout=0.0)


@pytest.fixture(scope="module")
def trained(sim_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "model"
    res = pretrain_scgpt(sim_small, PretrainConfig(steps=120, seed=5, **CFG), out_dir=out, progress=False)
    return res, out


def test_loss_falls_below_the_constant_predictor(trained):
    res, _ = trained
    first, last = res.log["eval"][0]["mlm"], res.log["final_eval"]["mlm"]
    assert last < first
    assert last < res.log["eval_constant_predictor_mse"]


def test_output_is_the_official_layout_and_loads_back(trained):
    res, out = trained
    assert {p.name for p in out.iterdir()} >= {"args.json", "vocab.json", "best_model.pt", "training_log.json",
                                               "loss_curve.png"}
    sd = torch.load(out / "best_model.pt", weights_only=True)
    assert all(k.startswith(("encoder.", "value_encoder.", "transformer_encoder.layers.", "decoder.", "mvc_decoder."))
               for k in sd)
    assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" in sd
    vocab = json.loads((out / "vocab.json").read_text())
    assert {"<pad>", "<cls>", "<eoc>"} <= set(vocab)
    back = load_scgpt(out)
    for a, b in zip(res.model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_pretraining_is_deterministic(sim_small):
    a = pretrain_scgpt(sim_small, PretrainConfig(steps=8, seed=1, **CFG), progress=False)
    b = pretrain_scgpt(sim_small, PretrainConfig(steps=8, seed=1, **CFG), progress=False)
    c = pretrain_scgpt(sim_small, PretrainConfig(steps=8, seed=2, **CFG), progress=False)
    wa, wb, wc = (m.model.blocks[0].attn.in_proj_weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_log_data_is_refused(sim_small):
    import anndata as ad

    from sclens.data import log_normalize

    logged = ad.AnnData(log_normalize(sim_small.X), var=sim_small.var)
    with pytest.raises(InputError, match="raw integer counts are needed"):
        pretrain_scgpt(logged, PretrainConfig(steps=2, **CFG), progress=False)


def test_several_datasets_with_different_genes(sim_small):
    a = sim_small[:, :200].copy()
    b = sim_small[:, 100:].copy()
    res = pretrain_scgpt([a, b], PretrainConfig(steps=3, **CFG), progress=False)
    assert len(res.model.vocab.genes) == len(set(a.var_names) | set(b.var_names))
    assert np.isfinite(res.log["final_eval"]["mlm"])
