"""Transcoders: feature recovery on a planted sparse MLP, metrics on a fixed case, splicing, persistence."""

from __future__ import annotations

import pytest
import torch

from sclens.circuits.transcoders import (Transcoder, TranscoderConfig, TranscoderSet, lm_losses, loss_recovered,
                                         sparsity_metrics, train_transcoder)
from sclens.errors import InputError
from tests.planted_circuits import planted_circuit_model, sparse_feature_data


def test_topk_transcoder_recovers_the_planted_features():
    x, y, D = sparse_feature_data()
    cfg = TranscoderConfig(kind="topk", expansion=2, k=3, epochs=25, batch_size=256, lr=3e-3, seed=0)
    res = train_transcoder(x, y, cfg, progress=False)
    W = res.transcoder.W_dec.detach()
    cos = (D @ (W / W.norm(dim=1, keepdim=True)).T).max(1).values  # best learned match per true feature
    assert (cos > 0.9).float().mean() >= 0.9, cos
    assert res.metrics["fvu"] < 0.1
    assert res.metrics["l0"] == pytest.approx(3.0, abs=0.01)


def test_l1_transcoder_trains_and_is_sparse():
    x, y, _ = sparse_feature_data(n=6000)
    res = train_transcoder(x, y, TranscoderConfig(kind="l1", expansion=2, l1_coeff=3e-3, epochs=15, batch_size=256,
                                                  lr=3e-3), progress=False)
    assert res.metrics["fvu"] < 0.3
    assert res.metrics["l0"] < 32


def test_metrics_on_a_fixed_case():
    acts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.5]])
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    recon = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    m = sparsity_metrics(acts, target, recon)
    assert m["l0"] == 1.5
    # residual SS = 1 + 1 = 2; total SS about the column means (2, 1): 1+1+1+1 = 4
    assert m["fvu"] == pytest.approx(0.5) and m["explained_variance"] == pytest.approx(0.5)
    assert m["dead"] == 0 and m["dead_fraction"] == 0.0
    m = sparsity_metrics(torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), target, target)
    assert m["dead"] == 2 and m["dead_fraction"] == pytest.approx(2 / 3) and m["fvu"] == 0.0
    with pytest.raises(InputError, match="shape"):
        sparsity_metrics(acts, target, recon[:1])
    assert loss_recovered(1.0, 1.5, 3.0) == pytest.approx(0.75)


def test_splicing_exact_transcoders_recovers_the_loss_and_ablation_hurts():
    model, tcs, _ = planted_circuit_model()
    sents = [["G1", "G3", "G0"], ["G2", "G5"], ["G3", "G7", "G4"]]
    labels = ["A", "B", "A"]
    clean = lm_losses(model, sents, labels)
    spliced = lm_losses(model, sents, labels, transcoders=tcs)
    ablated = lm_losses(model, sents, labels, ablate=[0, 2])
    # the planted MLPs are their transcoders up to GELU vs ReLU, so splicing changes almost nothing
    assert spliced["celltype_ce"] == pytest.approx(clean["celltype_ce"], abs=0.05)
    assert ablated["celltype_ce"] > clean["celltype_ce"] + 0.3
    assert clean["celltype_accuracy"] == 1.0 and ablated["celltype_accuracy"] < 1.0
    r = loss_recovered(clean["celltype_ce"], spliced["celltype_ce"], ablated["celltype_ce"])
    assert r > 0.9


def test_transcoder_set_round_trips(tmp_path):
    tc = Transcoder(8, 16, 6, kind="topk", k=4)
    ts = TranscoderSet({1: tc}, TranscoderConfig(k=4), {"L1": {"fvu": 0.1}}, {"model": "x"})
    ts.save(tmp_path)
    back = TranscoderSet.load(tmp_path)
    x = torch.randn(5, 8)
    assert torch.allclose(back.transcoders[1](x), tc(x))
    assert back.config.k == 4 and back.metrics["L1"]["fvu"] == 0.1


def test_config_rejects_unknown_settings(tmp_path):
    from sclens.circuits.transcoders import read_transcoder_config

    p = tmp_path / "t.toml"
    p.write_text("[transcoder]\nk = 8\nexpansoin = 4\n")
    with pytest.raises(InputError, match="expansoin"):
        read_transcoder_config(p)
    p.write_text("[transcoder]\nk = 8\nkind = 'l1'\n")
    assert read_transcoder_config(p).kind == "l1"
    with pytest.raises(InputError, match="kind"):
        TranscoderConfig(kind="jumprelu")
