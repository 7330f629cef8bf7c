"""Hook-point invariants of HookedScGPT (post-LN scGPT)."""

import numpy as np
import pytest
import torch

from sclens.models import Tokenizer


@pytest.fixture(scope="module")
def batch(tiny_model, sim_small):
    tok = Tokenizer.for_model(tiny_model, sim_small.var_names, max_len=600)
    b = tok.encode(sim_small.X[:10], rng=1)
    assert b.padding_mask.any()  # mixed lengths -> pads
    return b


def test_expected_hook_names_exist(tiny_model):
    names = set(tiny_model.hook_dict)
    for l in range(tiny_model.n_layers):
        for n in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
                  "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid",
                  "ln1.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
                  "hook_normalized_resid_post"):
            assert f"blocks.{l}.{n}" in names
    assert {"hook_embed", "hook_gene_embed", "hook_value_embed"} <= names


def test_run_with_cache_returns_only_what_was_asked(tiny_model, batch):
    cache = tiny_model.run_with_cache(batch, ["blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post"],
                                      batch_size=3, progress=False)
    assert set(cache) == {"blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post"}
    B, S = batch.gene_ids.shape
    assert cache["blocks.0.attn.hook_pattern"].shape == (B, 4, S, S)
    assert cache["blocks.1.mlp.hook_post"].shape == (B, S, 64)
    with pytest.raises(KeyError, match="not cached"):
        cache["blocks.0.hook_resid_pre"]


def test_unknown_hook_name_is_a_clear_error(tiny_model, batch):
    with pytest.raises(KeyError, match="closest"):
        tiny_model.run_with_cache(batch, ["blocks.0.attn.hook_patern"], progress=False)


def test_result_sums_to_attn_out_and_patterns_are_distributions(tiny_model, batch):
    names = lambda n: n.startswith("blocks.0.") and n.split(".")[-1] in ("hook_result", "hook_attn_out", "hook_pattern")
    c = tiny_model.run_with_cache(batch, names, progress=False)
    b_O = tiny_model.blocks[0].attn.out_proj.bias.detach()
    torch.testing.assert_close(c["blocks.0.attn.hook_result"].sum(2) + b_O, c["blocks.0.hook_attn_out"],
                               atol=1e-5, rtol=1e-5)
    P = c["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)), atol=1e-5, rtol=0)
    pad = batch.padding_mask[:, None, None, :].expand_as(P)
    assert float(P[pad].abs().max()) == 0.0  # no attention to pad keys


def test_post_ln_chaining(tiny_model, batch):
    c = tiny_model.run_with_cache(batch, ["blocks.0.hook_normalized_resid_post", "blocks.1.hook_resid_pre",
                                          "blocks.0.ln2.hook_normalized"], progress=False)
    torch.testing.assert_close(c["blocks.0.hook_normalized_resid_post"], c["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(c["blocks.0.ln2.hook_normalized"], c["blocks.1.hook_resid_pre"])


def test_exported_head_weights_reproduce_q_z_and_result(tiny_model, batch):
    c = tiny_model.run_with_cache(batch, lambda n: n.startswith("blocks.1.") and n.endswith(
        ("hook_resid_pre", "hook_q", "hook_v", "hook_pattern", "hook_z", "hook_result")), progress=False)
    x = c["blocks.1.hook_resid_pre"]
    for h in range(tiny_model.n_heads):
        w = tiny_model.head_weights(1, h)
        torch.testing.assert_close(x @ w["W_Q"] + w["b_Q"], c["blocks.1.attn.hook_q"][:, :, h], atol=1e-5, rtol=1e-5)
        v = x @ w["W_V"] + w["b_V"]
        z = torch.einsum("bij,bjd->bid", c["blocks.1.attn.hook_pattern"][:, h], v)
        torch.testing.assert_close(z, c["blocks.1.attn.hook_z"][:, :, h], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z @ w["W_O"], c["blocks.1.attn.hook_result"][:, :, h], atol=1e-5, rtol=1e-5)
    stacked = tiny_model.all_head_weights()
    assert stacked["W_Q"].shape == (2, 4, 32, 8) and stacked["W_O"].shape == (2, 4, 8, 32)


def test_batched_equals_single_cell_runs(tiny_model, batch):
    with torch.no_grad():
        full = tiny_model.forward_batch(batch)
        for i in range(len(batch)):
            n = int((~batch.padding_mask[i]).sum())
            single = tiny_model(batch.gene_ids[i : i + 1, :n], batch.values[i : i + 1, :n])
            torch.testing.assert_close(full[i, :n], single[0], atol=1e-5, rtol=1e-5)


def test_fused_and_hooked_attention_agree(tiny_model, batch):
    with torch.no_grad():
        fused = tiny_model.forward_batch(batch)
    hooked = tiny_model.run_with_hooks(batch, [("blocks.0.attn.hook_pattern", lambda a, h: None),
                                               ("blocks.1.attn.hook_pattern", lambda a, h: None)])
    keep = ~batch.padding_mask
    torch.testing.assert_close(fused[keep], hooked.detach()[keep], atol=1e-5, rtol=1e-5)


def test_intervention_changes_output_and_hooks_are_removed(tiny_model, batch):
    with torch.no_grad():
        clean = tiny_model.forward_batch(batch)
        ablated = tiny_model.run_with_hooks(batch, [("blocks.1.attn.hook_z", lambda z, h: torch.zeros_like(z))])
        again = tiny_model.forward_batch(batch)
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(clean, again)
    assert not any(hp.active for hp in tiny_model.hook_dict.values())


def test_reduce_sum_equals_sum_of_cached(tiny_model, batch):
    """reduce="sum" on the patterns goes through the attention's running sum (the batched pattern is never formed):
    the same sums, and the same forward pass (the next layer's input), pads included."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(tiny_model.n_layers)] + ["blocks.1.hook_resid_pre"]
    full = tiny_model.run_with_cache(batch, names, batch_size=4, progress=False)
    summed = tiny_model.run_with_cache(batch, names, batch_size=4, progress=False, reduce="sum")
    for name in names:
        torch.testing.assert_close(full[name].sum(0), summed[name], atol=1e-5, rtol=1e-5)
    assert all(block.attn.pattern_sum is None for block in tiny_model.blocks)
    cut = tiny_model.run_with_cache(batch, names[:2], batch_size=4, progress=False, reduce="sum", stop_at_layer=1)
    assert list(cut) == names[:1]  # a layer that does not run leaves no entry, as with hooks
    # beside another hook of the same attention (the batched path runs), the running sum is still kept
    both = tiny_model.run_with_cache(batch, [names[0], "blocks.0.attn.hook_q"], batch_size=4, progress=False,
                                     reduce="sum")
    torch.testing.assert_close(both[names[0]], summed[names[0]], atol=1e-5, rtol=1e-5)


def test_cell_embeddings_are_unit_norm(tiny_model, batch):
    E = tiny_model.cell_embeddings(batch)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    A = tiny_model.cell_embeddings(batch, mode="avg", normalize=False)
    assert A.shape == E.shape and not np.allclose(A, E)
