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


def test_info_nce_known_answer():
    from sclens.models.pretrain import info_nce

    z = torch.eye(4)
    assert float(info_nce(z, z, 0.5)) == pytest.approx(float(np.log(1 + 3 * np.exp(-2.0))), rel=1e-6)
    # views that do not match their own cell cost more than matching ones
    assert float(info_nce(z, z.roll(1, 0), 0.5)) > float(info_nce(z, z, 0.5))


def test_cell_representation_objectives_run_and_are_logged(sim_small):
    """Whole-input decoding from the cell embedding, two-view InfoNCE, drawn masking ratios and the learning
    probe at every evaluation; the result still loads as an official checkpoint."""
    cfg = PretrainConfig(steps=6, seed=0, mvc_scope="all", contrastive_weight=1.0, mask_ratios=[0.25, 0.5, 0.75],
                         **{**CFG, "eval_every": 3})
    res = pretrain_scgpt(sim_small, cfg, progress=False, probe=(sim_small, "cell_type", "donor"))
    h = res.log["history"]
    assert all("contrastive" in r and np.isfinite(r["contrastive"]) for r in h)
    assert len(res.log["eval"]) == 3 and all(0 <= e["probe_knn_balanced_accuracy"] <= 1 for e in res.log["eval"])
    assert {"probe_logreg_balanced_accuracy", "probe_effective_rank"} <= set(res.log["final_eval"])
    # GEPC over every token differs from MVC over the masked ones on the same batch
    from sclens.models.pretrain import CellSampler, _losses

    X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(sim_small.X)
    ids = res.model.vocab.lookup(sim_small.var_names.astype(str))
    keep = ids >= 0
    smp = CellSampler([(X[:, keep], ids[keep])], cfg, res.model.vocab, np.random.default_rng(0))
    b, t, m = smp.batch([(0, i) for i in range(8)])
    with torch.no_grad():
        _, masked_only, _ = _losses(res.model, b, t, m, "masked")
        _, every, _ = _losses(res.model, b, t, m, "all")
    assert float(masked_only) != float(every)


def test_gene_resampled_views_share_cells_not_tokens(sim_small):
    """contrastive_views='genes': the second view is another draw of the same cells' genes (not a re-mask)."""
    from sclens.models.pretrain import CellSampler, _step_losses

    cfg = PretrainConfig(steps=1, seed=0, contrastive_weight=1.0, contrastive_views="genes", **{**CFG, "train_seq_len": 16})
    X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(sim_small.X)
    model = pretrain_scgpt(sim_small, cfg, progress=False).model
    ids = model.vocab.lookup(sim_small.var_names.astype(str))
    keep = ids >= 0
    seen = []
    smp = CellSampler([(X[:, keep], ids[keep])], cfg, model.vocab, np.random.default_rng(0))
    original = smp.batch
    smp.batch = lambda cells, ratio=None: seen.append(original(cells, ratio)) or seen[-1]
    parts = _step_losses(model, smp, [(0, i) for i in range(6)], cfg)
    assert len(seen) == 2 and np.isfinite(float(parts["contrastive"]))
    (b1, _, _), (b2, _, _) = seen
    assert not torch.equal(b1.gene_ids, b2.gene_ids)  # different gene samples of the same six cells


def test_objective_settings_are_checked(sim_small):
    for bad in (dict(mvc_scope="everything"), dict(mvc=False, mvc_scope="all"), dict(mask_ratios=[0.5, 1.2]),
                dict(contrastive_temperature=0.0), dict(contrastive_views="cells")):
        with pytest.raises(InputError):
            pretrain_scgpt(sim_small, PretrainConfig(steps=1, **{**CFG, **bad}), progress=False)


def test_source_batches_draw_every_batch_from_one_source(sim_small):
    """source_batches=True: the cells of a batch (and so the contrastive negatives) come from one data set."""
    import scipy.sparse as sp

    from sclens.models.pretrain import CellSampler

    X = sp.csr_matrix(sim_small.X)
    ids = np.arange(X.shape[1])
    halves = [(X[:60], ids), (X[60:], ids)]
    for flag, expect_mixed in ((True, False), (False, True)):
        cfg = PretrainConfig(source_batches=flag, **CFG)
        smp = CellSampler(halves, cfg, None, np.random.default_rng(0))
        draws = [smp.draw(16) for _ in range(20)]
        mixed = [len({s for s, _ in d}) > 1 for d in draws]
        assert any(mixed) == expect_mixed
        if flag:
            assert {d[0][0] for d in draws} == {0, 1}  # both sources still get batches
            assert all(len({r for _, r in d}) == len(d) for d in draws)  # no cell twice in a batch


def test_the_callers_torch_thread_count_is_restored(sim_small):
    import torch

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    pretrain_scgpt(sim_small, PretrainConfig(steps=2, seed=1, threads=want, **CFG), progress=False)
    assert torch.get_num_threads() == before
    from sclens.utils import restores_torch_threads

    @restores_torch_threads
    def sets_then_fails():
        torch.set_num_threads(want)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):  # also when the call fails
        sets_then_fails()
    assert torch.get_num_threads() == before
