"""Build the scGPT conformance fixture with the OFFICIAL package (run once; results are committed).

Writes ``tests/fixtures/scgpt_conformance/``:
  model/args.json, model/vocab.json, model/best_model.pt  - a tiny random checkpoint in the official layout
      (``Wqkv`` key names and a ``flag_encoder`` tensor, as in the released whole-human model)
  cells.h5ad                                             - 12 cells x 30 genes of counts (distinct values per cell)
  expected.safetensors                                   - inputs and the official outputs

Needs: pip install scgpt==0.2.4 --no-deps; pip install datasets ipython (see docs/conformance.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import official_reference as ref  # noqa: E402


def main() -> None:
    out = ref.FIXTURE
    mdir = out / "model"
    mdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(7)
    torch.manual_seed(7)

    genes = [f"GENE{i:02d}" for i in range(36)]
    stoi = {g: i for i, g in enumerate(genes)} | {"<pad>": 36, "<cls>": 37, "<eoc>": 38}
    (mdir / "vocab.json").write_text(json.dumps(stoi))
    args = dict(ref.TINY, dropout=0.2, pad_token="<pad>", input_style="binned", input_emb_style="continuous",
                max_seq_len=64, MVC=True, fast_transformer=True, n_layers_cls=3)
    (mdir / "args.json").write_text(json.dumps(args, indent=2))

    off = ref.import_official()
    vocab = off["GeneVocab"].from_file(mdir / "vocab.json")
    model = off["TransformerModel"](
        ntoken=len(vocab), d_model=32, nhead=4, d_hid=48, nlayers=3, vocab=vocab, dropout=0.2, pad_token="<pad>",
        pad_value=-2, do_mvc=True, input_emb_style="continuous", use_fast_transformer=False, pre_norm=False,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("cls_decoder."):
            continue  # absent from released checkpoints
        state[k.replace("self_attn.in_proj_", "self_attn.Wqkv.")] = v.clone()
    state["flag_encoder.weight"] = torch.randn(2, 32)
    torch.save(state, mdir / "best_model.pt")

    # cells: 12 x 30 genes (GENE00..GENE27 + two genes outside the vocabulary), distinct counts per cell
    import anndata as ad
    import scipy.sparse as sp

    var_genes = genes[:28] + ["NOTINVOCAB1", "NOTINVOCAB2"]
    X = np.zeros((12, 30))
    for i in range(12):
        k = rng.randint(4, 26)
        cols = rng.choice(30, size=k, replace=False)
        X[i, cols] = rng.permutation(np.arange(1, k + 1)) * (1 + (i % 3))
    cells = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    cells.var_names = var_genes
    cells.var["gene_name"] = var_genes
    cells.obs_names = [f"cell{i}" for i in range(12)]
    cells.write_h5ad(out / "cells.h5ad")

    # a hand-made token batch with mixed lengths, a value over the 512 clamp, and pads
    B, S = 5, 20
    gene_ids = np.full((B, S), 36, dtype=np.int64)
    values = np.full((B, S), -2.0, dtype=np.float32)
    for b in range(B):
        n = [19, 12, 5, 16, 9][b]
        gene_ids[b, 0] = 37
        gene_ids[b, 1:n + 1] = rng.choice(36, size=n, replace=False)
        values[b, 1:n + 1] = rng.randint(1, 51, size=n)
    values[0, 3] = 600.0
    pad = gene_ids == 36
    binning_rows = rng.poisson(2.0, size=(6, 40)).astype(np.float64)  # integer counts: ties -> random bins
    inputs = dict(gene_ids=gene_ids, values=values, padding_mask=pad, binning_rows=binning_rows)

    expected = ref.official_outputs(mdir, inputs)
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in {**inputs, **expected}.items()}
    tensors["padding_mask"] = tensors["padding_mask"].astype(np.uint8)
    import scgpt

    save_file(tensors, str(out / "expected.safetensors"),
              metadata={"generator": "scripts/make_conformance_fixture.py", "scgpt_version": scgpt.__version__,
                        "torch_version": torch.__version__})
    print("wrote", out, {k: v.shape for k, v in tensors.items()})


if __name__ == "__main__":
    main()
