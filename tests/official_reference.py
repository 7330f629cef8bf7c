"""Run the OFFICIAL scGPT package (scgpt==0.2.4) on the conformance fixture.

Used twice: by ``scripts/make_conformance_fixture.py`` to store expected outputs (so the default test suite
checks conformance without the official package), and by the optional live test in
``tests/models/test_official_conformance.py``. The official package needs a stand-in for ``torchtext.vocab``
(``tests/official_stub``), because torchtext 0.18 does not load with torch >= 2.4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "scgpt_conformance"
STUB = HERE / "official_stub"

TINY = dict(embsize=32, nheads=4, d_hid=48, nlayers=3, n_bins=51, pad_value=-2, mask_value=-1)


def import_official():
    """Import scgpt with the torchtext stand-in; raises ImportError when scgpt is not installed."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import scgpt  # noqa: F401
        from scgpt.model import TransformerModel
        from scgpt.preprocess import binning
        from scgpt.tasks import embed_data
        from scgpt.tokenizer.gene_tokenizer import GeneVocab
        from scgpt.utils import load_pretrained
    return dict(TransformerModel=TransformerModel, binning=binning, embed_data=embed_data,
                GeneVocab=GeneVocab, load_pretrained=load_pretrained)


def official_model(model_dir: Path):
    """Build and load the official TransformerModel exactly as ``embed_data`` does (torch path, eval)."""
    import torch

    off = import_official()
    args = json.loads((model_dir / "args.json").read_text())
    vocab = off["GeneVocab"].from_file(model_dir / "vocab.json")
    for s in ["<pad>", "<cls>", "<eoc>"]:
        if s not in vocab:
            vocab.append_token(s)
    model = off["TransformerModel"](
        ntoken=len(vocab), d_model=args["embsize"], nhead=args["nheads"], d_hid=args["d_hid"],
        nlayers=args["nlayers"], nlayers_cls=args.get("n_layers_cls", 3), n_cls=1, vocab=vocab,
        dropout=args["dropout"], pad_token=args["pad_token"], pad_value=args["pad_value"], do_mvc=True,
        do_dab=False, use_batch_labels=False, domain_spec_batchnorm=False, explicit_zero_prob=False,
        use_fast_transformer=False, fast_transformer_backend="flash", pre_norm=False,
    )
    off["load_pretrained"](model, torch.load(model_dir / "best_model.pt", map_location="cpu", weights_only=True),
                           verbose=False)
    return model.eval(), vocab


def official_outputs(model_dir: Path, inputs: dict) -> dict[str, np.ndarray]:
    """Official encoder output, decoder output, embed_data embeddings and binning on the fixture inputs."""
    import anndata as ad
    import torch

    off = import_official()
    model, _ = official_model(model_dir)
    g = torch.as_tensor(inputs["gene_ids"])
    v = torch.as_tensor(inputs["values"])
    pad = torch.as_tensor(inputs["padding_mask"])
    torch.backends.mha.set_fastpath_enabled(False)  # keep pad rows real numbers (we compare non-pad only)
    with torch.no_grad():
        enc = model._encode(g, v, src_key_padding_mask=pad)
        dec = model.decoder(enc)["pred"]
    torch.backends.mha.set_fastpath_enabled(True)

    adata = ad.read_h5ad(model_dir.parent / "cells.h5ad")
    emb = off["embed_data"](adata, model_dir, gene_col="gene_name", max_length=64, batch_size=4, device="cpu",
                            use_fast_transformer=False, return_new_adata=True).X

    bins = []
    for i, row in enumerate(inputs["binning_rows"]):
        np.random.seed(1000 + i)
        bins.append(off["binning"](row.astype(np.float64), n_bins=51))
    return {
        "encode_out": enc.numpy().astype(np.float32),
        "decoder_pred": dec.numpy().astype(np.float32),
        "embed_data": np.asarray(emb, dtype=np.float32),
        "binning_out": np.stack(bins).astype(np.int64),
    }
