"""A checkpoint in the official scGPT layout with ONE planted unit, and cells along a known tree.

Construction (d_model 64, 4 heads of 16 dims, 3 layers; value embeddings switched off):

* 16 "program" genes get gene embeddings ``[q_i, -q_i, 0]`` (q_i orthonormal in 16 dims): zero-mean, so
  the embedding LayerNorm only rescales them; ``noise`` genes get zero-mean random vectors in the other 32 dims.
* the planted head (layer 0, head 2) has ``W_V = U`` and ``W_O = Uᵀ`` with U an orthonormal basis of the
  program-gene subspace, so its gene-space OV operator ``R W_V W_O Rᵀ`` is the projector onto the program
  genes; every other head is random.
* cells: one anchor per (donor, stage) for EVERY stage of the default DAG. Program genes carry the stage's
  coordinates from classical MDS of the stage-DAG ruler (a known branching ordering) plus a (donor, stage)
  jitter of half a hop; noise genes carry large (donor, stage)-specific offsets, so neither raw expression
  nor a random projection recovers the ordering.

Why every stage and why the jitter: the null ruler shuffles stage labels within each branch over all DAG
stages, and same-stage anchors keep ruler 0 under any shuffle. With only two observed stages per branch the
null ranks a held-out branch exactly like the true ruler, and with tight stage clusters the null earns
most of the Spearman from "same stage = close" alone; both made the planted unit's pass/fail hinge on
floating-point noise (seen across CPUs). Full branches and half-hop jitter leave the ORDERING as the
signal, which is what the null breaks.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch

from sclens.models import GeneVocab, HookedScGPT, ScGPTConfig, save_scgpt
from sclens.ontology import StageDAG

STAGES = list(StageDAG.default().stages)
N_PROGRAM, N_NOISE = 16, 48
PLANTED = (0, 2)


def gene_names(n_identity: int = 0):
    return ([f"PROG{i:02d}" for i in range(N_PROGRAM)] + [f"NOISE{i:02d}" for i in range(N_NOISE)]
            + [f"STAGE{i:02d}" for i in range(n_identity)])


def build_planted_checkpoint(out_dir, *, planted: bool = True, seed: int = 0, n_identity: int = 0,
                             matched_norms: bool = False, uniform_attention: bool = False):
    """``n_identity`` adds stage-identity genes (embedded in the noise subspace, which the planted head never
    reads); ``matched_norms`` scales the planted head's W_V / W_O blocks to the mean Frobenius norm of the random
    heads' blocks, so it stands out by direction only; ``uniform_attention`` zeroes every W_Q / W_K (each head
    then attends uniformly: a degenerate checkpoint)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    genes = gene_names(n_identity)
    vocab = GeneVocab.from_genes(genes)
    cfg = ScGPTConfig(embsize=64, nheads=4, d_hid=64, nlayers=3, dropout=0.0, MVC=False)
    model = HookedScGPT(cfg, vocab).eval()
    D, dh = 64, 16
    with torch.no_grad():
        emb = torch.zeros(vocab.size, D)
        q = torch.linalg.qr(torch.randn(dh, dh, generator=torch.Generator().manual_seed(seed)))[0]
        for i in range(N_PROGRAM):
            emb[i, :16], emb[i, 16:32] = q[i], -q[i]
        w = torch.as_tensor(rng.normal(size=(N_NOISE, 16)), dtype=torch.float32)
        emb[N_PROGRAM : N_PROGRAM + N_NOISE, 32:48] = w
        emb[N_PROGRAM : N_PROGRAM + N_NOISE, 48:64] = -w
        n0 = N_PROGRAM + N_NOISE + n_identity
        if n_identity:
            wi = torch.as_tensor(np.random.default_rng(seed + 7).normal(size=(n_identity, 16)), dtype=torch.float32)
            emb[N_PROGRAM + N_NOISE : n0, 32:48] = wi
            emb[N_PROGRAM + N_NOISE : n0, 48:64] = -wi
        emb[n0:] = torch.randn(vocab.size - n0, D)
        model.encoder.embedding.weight.copy_(emb)
        model.encoder.enc_norm.weight.fill_(1.0)
        model.encoder.enc_norm.bias.zero_()
        # value embedding off: X0 = gene embedding exactly
        model.value_encoder.norm.weight.zero_()
        model.value_encoder.norm.bias.zero_()
        for block in model.blocks:
            block.attn.in_proj_weight.normal_(0, 0.3)
            block.attn.out_proj.weight.normal_(0, 0.3)
        if planted:
            U = torch.zeros(D, dh)
            for j in range(dh):
                U[j, j], U[16 + j, j] = 2**-0.5, -(2**-0.5)
            l, h = PLANTED
            attn = model.blocks[l].attn
            if matched_norms:  # the OV operator is scale-free (unit spectral norm): only the direction is planted
                others = [hh for hh in range(cfg.nheads) if hh != h]
                v_norm = np.mean([float(attn.in_proj_weight[2 * D + o * dh : 2 * D + (o + 1) * dh].norm()) for o in others])
                o_norm = np.mean([float(attn.out_proj.weight[:, o * dh : (o + 1) * dh].norm()) for o in others])
                U_v, U_o = U * (v_norm / float(U.norm())), U * (o_norm / float(U.norm()))
            else:
                U_v = U_o = U
            attn.in_proj_weight[2 * D + h * dh : 2 * D + (h + 1) * dh] = U_v.T  # W_V[h] = U  (rows of the v block)
            attn.in_proj_bias[2 * D + h * dh : 2 * D + (h + 1) * dh] = 0
            attn.out_proj.weight[:, h * dh : (h + 1) * dh] = U_o  # W_O[h] = Uᵀ  (columns of out_proj)
        if uniform_attention:
            for block in model.blocks:
                block.attn.in_proj_weight[: 2 * D] = 0
                block.attn.in_proj_bias[: 2 * D] = 0
    save_scgpt(model, out_dir)
    return out_dir


def planted_cells(n_donors: int = 6, cells_per_anchor: int = 8, seed: int = 1, n_identity: int = 0) -> ad.AnnData:
    """``n_identity`` > 0 adds stage-identity genes: a random code per stage, the same in every donor, that
    tells stages apart but carries no ordering (so raw expression separates stages without encoding the ruler)."""
    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(seed + 101).normal(0, 2.0, (len(STAGES), n_identity))
    dag = StageDAG.default()
    idx = [dag.index[s] for s in STAGES]
    R = dag.ruler_matrix[np.ix_(idx, idx)]
    n = len(STAGES)
    J = np.eye(n) - 1 / n
    vals, vecs = np.linalg.eigh(-0.5 * J @ R**2 @ J)
    order = np.argsort(vals)[::-1][:N_PROGRAM]
    coords = vecs[:, order] * np.sqrt(np.maximum(vals[order], 0))  # stage coordinates, distances ~ hop distance
    rows, X = [], []
    for d in range(n_donors):
        for si, s in enumerate(STAGES):
            offset = rng.normal(0, 3.0, N_NOISE)  # (donor, stage) nuisance on noise genes
            jitter = rng.normal(0, 0.5, N_PROGRAM)  # (donor, stage) jitter of the program, half a hop
            for _ in range(cells_per_anchor):
                prog = 3.0 + 1.0 * coords[si] + jitter + rng.normal(0, 0.3, N_PROGRAM)
                noise = 8.0 + offset + rng.normal(0, 0.5, N_NOISE)
                ident = 6.0 + codes[si] + rng.normal(0, 0.3, n_identity) if n_identity else np.empty(0)
                X.append(np.clip(np.concatenate([prog, noise, ident]), 0, None))
                rows.append({"donor": f"d{d}", "cell_type": s})
    a = ad.AnnData(np.asarray(X, dtype=np.float32), obs=pd.DataFrame(rows))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = gene_names(n_identity)
    a.uns["sclens_synthetic"] = {"synthetic": True, "generator": "tests/planted.py"}
    return a
