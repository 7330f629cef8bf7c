"""Hand-built cell-sentence models with known circuits and known sparse features (for the circuits tests)."""

from __future__ import annotations

import numpy as np
import torch

from sclens.circuits.lm import CellLMConfig, CellSentenceVocab, HookedCellLM
from sclens.circuits.transcoders import Transcoder

GENES = [f"G{i}" for i in range(8)]
LABELS = ["A", "B"]


def _zero_mean_orthonormal(d: int, n: int, seed: int) -> torch.Tensor:
    """n orthonormal rows of length d, each orthogonal to the all-ones vector (so LayerNorm only rescales them)."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(d, d))
    M[:, 0] = 1.0
    Q, _ = np.linalg.qr(M)
    return torch.as_tensor(Q[:, 1: n + 1].T.copy(), dtype=torch.float32)


def planted_circuit_model(seed: int = 0):
    """A 3-layer GPT-NeoX whose decision '[A]' runs G3 -> L0 feature 0 -> head L1H0 -> L2 feature 0 -> logit.

    * Token embeddings are 3 x orthonormal zero-mean directions; LayerNorm gains 1, biases 0.
    * Layer 0 MLP = transcoder L0: feature 0 fires (pre-activation 4) on gene G3 and writes 1 x u; features
      1-7 fire on the other genes and write unrelated directions (distractors).
    * Layer 1 attention: Q = K = 0 (uniform attention over the prefix); head 0 reads the u component and writes
      8 x r; head 1 is silent. Layer 1 MLP is zero. Other attention layers are zero.
    * Layer 2 MLP = transcoder L2: feature 0 reads r and writes 4 x the unembedding of [A]; feature 1 fires on the
      ``<celltype>`` token itself and writes 1 x the unembedding of [B] (an inhibitory distractor).
    Returns (model, transcoders {0: ..., 2: ...}, dict of the named directions).
    """
    vocab = CellSentenceVocab(genes=list(GENES), labels=list(LABELS), top_k=8)
    V, D, H = len(vocab), 32, 2
    cfg = CellLMConfig(d_model=D, n_layers=3, n_heads=H, d_mlp=8, top_k=8)
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(cfg.hf_config(V)).eval()
    Q = _zero_mean_orthonormal(D, 31, seed)
    emb_dirs, u, r = Q[:V], Q[V], Q[V + 1]
    spare = Q[V + 2:]
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for l in range(3):
            for ln in (hf.gpt_neox.layers[l].input_layernorm, hf.gpt_neox.layers[l].post_attention_layernorm):
                ln.weight.fill_(1.0)
        hf.gpt_neox.final_layer_norm.weight.fill_(1.0)
        hf.gpt_neox.embed_in.weight.copy_(3 * emb_dirs)
        W_U = hf.get_output_embeddings().weight
        W_U.copy_(emb_dirs)  # logit of token t reads its own embedding direction
        norm = 3 / np.sqrt(D)  # std of a 3 x unit zero-mean vector over D dims; LN divides by it
        gene_dir = lambda g: emb_dirs[vocab.id(g)]  # noqa: E731

        tc0 = Transcoder(D, 8, D, kind="l1")
        tc0.W_enc.zero_(), tc0.b_enc.zero_(), tc0.W_dec.zero_(), tc0.b_dec.zero_()
        tc0.W_enc[:, 0] = gene_dir("G3") * 4 * norm / 3
        tc0.W_dec[0] = u
        for j, g in enumerate([g for g in GENES if g != "G3"], start=1):
            tc0.W_enc[:, j] = gene_dir(g) * 4 * norm / 3
            tc0.W_dec[j] = spare[j % len(spare)]
        attn1 = hf.gpt_neox.layers[1].attention
        dh = D // H
        # query_key_value rows are ordered (head, {q, k, v}, dh): head 0's first value unit reads u
        attn1.query_key_value.weight[0 * 3 * dh + 2 * dh + 0] = u
        attn1.dense.weight[:, 0] = 8 * r
        tc2 = Transcoder(D, 8, D, kind="l1")
        tc2.W_enc.zero_(), tc2.b_enc.zero_(), tc2.W_dec.zero_(), tc2.b_dec.zero_()
        tc2.W_enc[:, 0] = r
        tc2.W_dec[0] = 4 * emb_dirs[vocab.id("[A]")]
        tc2.W_enc[:, 1] = emb_dirs[vocab.id("<celltype>")] * norm
        tc2.W_dec[1] = emb_dirs[vocab.id("[B]")]
        for l, tc in ((0, tc0), (2, tc2)):
            mlp = hf.gpt_neox.layers[l].mlp
            mlp.dense_h_to_4h.weight.copy_(tc.W_enc.T)
            mlp.dense_h_to_4h.bias.copy_(tc.b_enc)
            mlp.dense_4h_to_h.weight.copy_(tc.W_dec.T)
            mlp.dense_4h_to_h.bias.copy_(tc.b_dec)
    model = HookedCellLM(hf, vocab=vocab, source="planted")
    return model, {0: tc0.eval(), 2: tc2.eval()}, {"u": u, "r": r}


def sparse_feature_data(n: int = 20_000, d_in: int = 24, d_out: int = 20, n_features: int = 32, active: int = 3,
                        seed: int = 0):
    """Tokens of a synthetic 'MLP' with known sparse features: x = z E, y = z D, z with ``active`` non-zeros.

    Returns (x, y, D) with D's rows the unit ground-truth output directions.
    """
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n_features, d_in, generator=g)
    E /= E.norm(dim=1, keepdim=True)
    D = torch.randn(n_features, d_out, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    z = torch.zeros(n, n_features)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    z.scatter_(1, idx, 0.5 + 1.5 * torch.rand(n, active, generator=g))
    return z @ E, z @ D, D
