"""Attribution on a hand-built circuit with a known path."""

from __future__ import annotations

import pytest
import torch

from sclens.circuits.attribution import (direct_effects, feature_pair_weights, feature_preact, logit_contrast,
                                         ov_pair_weights, replacement_forward, top_deembedding_genes, trace_circuit,
                                         trace_heads)
from tests.planted_circuits import planted_circuit_model

SENTENCE = ["G1", "G3", "G5", "G0"]  # G3 sits at position 2 (after <bos>); <celltype> at position 5


@pytest.fixture(scope="module")
def planted():
    return planted_circuit_model()


def test_planted_model_decides_by_g3(planted):
    model, _, _ = planted
    assert model.predict_cell_types([SENTENCE, ["G1", "G2", "G5"]]) == ["A", "B"]


def test_greedy_subgraph_finds_the_planted_path(planted):
    model, tcs, _ = planted
    g = trace_circuit(model, tcs, SENTENCE, "A")
    edges = {(e["source"], e["target"]): e["weight"] for e in g.edges}
    assert edges[("L2.F0@5", "logit:A")] > 0
    assert edges[("L0.F0@2", "L2.F0@5")] > 0  # through head L1H0 (OV), from G3's position to the last one
    assert edges[("tok@2", "L0.F0@2")] > 0
    # the planted edge is the strongest input of each node on the path
    for tgt, src in (("logit:A", "L2.F0@5"), ("L2.F0@5", "L0.F0@2"), ("L0.F0@2", "tok@2")):
        ins = {s: abs(w) for (s, t), w in edges.items() if t == tgt}
        assert max(ins, key=ins.get) == src
    gene_nodes = [n for n in g.nodes if n["type"] == "embed" and n["influence"] > 0.5]
    assert [n["gene"] for n in gene_nodes] == ["G3"]
    assert g.scores["root_error_share"] < 0.05
    assert g.target["predicted"] == "A"


def test_direct_effects_are_exact_for_the_affine_replacement(planted):
    model, tcs, _ = planted
    ids = model.encode_cells([SENTENCE])[0]
    rep = replacement_forward(model, tcs, ids)
    # the replacement forward reproduces the model's logits
    with torch.no_grad():
        assert torch.allclose(rep.logits.detach(), model(*_one(ids))[0], atol=1e-5)
    pre = feature_preact(rep, tcs, 2, 5, 0)
    eff = direct_effects(rep, pre)
    # with the target's bias removed and all leaves scaled by t, the pre-activation scales by t (affine graph)
    assert sum(eff.values()) == pytest.approx(float(pre.detach()) - float(tcs[2].b_enc[0].detach()) - _constant(model, tcs, ids),
                                              abs=1e-3)
    assert logit_contrast(model, rep, "A").item() > 0


def _one(ids):
    from sclens.circuits.lm import pad_batch

    return pad_batch([ids])


def _constant(model, tcs, ids):
    """L2.F0's pre-activation with every leaf zeroed (what the bias terms alone contribute)."""
    rep = replacement_forward(model, tcs, ids)
    with torch.no_grad():
        for t in [rep.embed, *rep.acts.values(), *rep.errors.values()]:
            t.zero_()
    from sclens.circuits.lm import pad_batch

    ids_t, mask = pad_batch([ids])
    hooks = [("hook_embed", lambda a, h: rep.embed[None])]
    hooks += [(n, lambda a, h: rep.clean[h.name]) for n in rep.clean if n.endswith("hook_scale") or n.endswith("hook_pattern")]
    hooks += [(f"blocks.{l}.hook_mlp_out", lambda a, h, l=l: (tcs[l].decode(rep.acts[l]) + rep.errors[l])[None])
              for l in tcs]
    store = {}
    hooks.append(("blocks.2.ln2.hook_normalized", lambda a, h: store.setdefault("x", a)))
    with torch.no_grad(), model.hooks(hooks):
        model(ids_t, mask)
    return float((store["x"][0, 5] @ tcs[2].W_enc[:, 0]).detach())


def test_heads_carrying_the_feature_are_found(planted):
    model, tcs, _ = planted
    ids = model.encode_cells([SENTENCE])[0]
    t = trace_heads(model, tcs, ids, layer=2, pos=5, feature=0)
    assert t["heads"][0]["head"] == "L1H0"
    assert t["paths"][0]["src_pos"] == 2 and t["paths"][0]["src_token"] == "G3"
    # head contributions + everything else add up to the pre-activation; here the head carries nearly all of it
    rep = replacement_forward(model, tcs, ids)
    assert t["heads"][0]["contribution"] == pytest.approx(float(feature_preact(rep, tcs, 2, 5, 0).detach()), rel=0.02)


def test_weights_only_connections(planted):
    model, tcs, _ = planted
    assert top_deembedding_genes(model, tcs[0], 0, feature=0, n=1) == ["G3"]
    ov = ov_pair_weights(model, tcs[0], 1, 0, tcs[2], 2)
    assert ov.abs().argmax().item() == 0  # L0 F0 -> (L1H0) -> L2 F0 is the strongest virtual weight
    direct = feature_pair_weights(model, tcs[0], tcs[2], 2)
    assert direct[0, 0].abs() < 1e-4  # u and r are orthogonal: no direct residual connection
    with pytest.raises(Exception, match="later layers"):
        ov_pair_weights(model, tcs[0], 2, 0, tcs[2], 2)
