"""Cell-sentence LM: sentences, vocabulary, the hooked forward against HF, training, official C2S loading."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclens.circuits.lm import (CellLMConfig, CellSentenceVocab, HookedCellLM, cell_sentences, load_cell_lm, pad_batch, save_cell_lm)
from sclens.circuits.lm_training import train_cell_lm
from sclens.errors import CheckpointError, InputError


def marker_cells(n_per_type: int = 60, seed: int = 0) -> ad.AnnData:
    """Three cell types, each with five planted marker genes far above a shared Poisson background."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(60)]
    X, labels = [], []
    for t, name in enumerate(["alpha", "beta", "gamma"]):
        block = rng.poisson(1.0, size=(n_per_type, len(genes))).astype(float)
        block[:, 5 * t: 5 * t + 5] += rng.poisson(20, size=(n_per_type, 5))
        X.append(block)
        labels += [name] * n_per_type
    a = ad.AnnData(sp.csr_matrix(np.vstack(X)))
    a.var_names = genes
    a.obs["cell_type"] = labels
    return a


def test_cell_sentences_rank_by_expression_and_break_ties_by_seed():
    X = sp.csr_matrix(np.array([[0, 5, 1, 3, 3, 0], [2, 0, 0, 0, 0, 7]], dtype=float))
    a = ad.AnnData(X)
    a.var_names = ["a", "b", "c", "d", "e", "f"]
    s = cell_sentences(a, top_k=3, seed=0)
    assert s[0][0] == "B" and set(s[0][1:]) == {"D", "E"}
    assert s[1] == ["F", "A"]  # shorter sentence: only two genes expressed
    ties = {tuple(cell_sentences(a, top_k=3, seed=k)[0]) for k in range(20)}
    assert ties == {("B", "D", "E"), ("B", "E", "D")}  # ties broken both ways across seeds
    assert cell_sentences(a, top_k=3, seed=4) == cell_sentences(a, top_k=3, seed=4)
    a.X = sp.csr_matrix(-X)
    with pytest.raises(InputError, match="negative"):
        cell_sentences(a)


def test_vocab_encodes_sentences_and_round_trips():
    v = CellSentenceVocab(genes=["CD3E", "LYZ"], labels=["T", "mono"], top_k=2)
    ids = v.encode(["LYZ", "XIST", "CD3E"], "mono")
    assert [v.tokens[i] for i in ids] == ["<bos>", "LYZ", "<unk>", "<celltype>", "[mono]", "<eos>"]
    assert v.token_gene(v.id("LYZ")) == "LYZ" and v.token_gene(v.id("[T]")) is None
    assert CellSentenceVocab.from_dict(v.to_dict()).tokens == v.tokens


def test_hooked_forward_matches_hf_logits_with_padding():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(CellLMConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, top_k=16).hf_config(50))
    model = HookedCellLM(hf)
    ids, mask = pad_batch([[1, 5, 6, 7, 8, 9, 4], [1, 10, 11, 4]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, mask)
    assert torch.allclose(ref[mask.bool()], ours[mask.bool()], atol=1e-5)
    _, cache = model.run_with_cache(ids, mask, names=lambda n: n.startswith("blocks.1."))
    # parallel residual: resid_post = resid_pre + attn_out + mlp_out, and the MLP reads ln2(resid_pre)
    b = "blocks.1."
    assert torch.allclose(cache[b + "hook_resid_post"],
                          cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"] + cache[b + "hook_mlp_out"], atol=1e-5)
    assert torch.allclose(cache[b + "hook_mlp_out"], hf.gpt_neox.layers[1].mlp(cache[b + "ln2.hook_normalized"]), atol=1e-6)
    assert torch.allclose(cache[b + "attn.hook_pattern"].sum(-1), torch.ones(2, 4, 7))


def test_train_learns_the_planted_cell_types_and_reloads(tmp_path):
    a = marker_cells()
    cfg = CellLMConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, top_k=12, steps=150, batch_size=32,
                       lr=3e-3, eval_every=50, min_cells=1, seed=0)
    res = train_cell_lm(a, "cell_type", cfg, out_dir=tmp_path / "m", progress=False)
    assert res.log["final"]["val_accuracy"] >= 0.9
    m2 = load_cell_lm(tmp_path / "m")
    sents = cell_sentences(a[:10], top_k=12)
    assert m2.predict_cell_types(sents) == res.model.predict_cell_types(sents)
    assert (tmp_path / "m" / "training_log.json").is_file()
    with pytest.raises(InputError, match="no column"):
        train_cell_lm(a, "nope", cfg, progress=False)


def _official_layout(tmp_path, words):
    """A tiny random GPT-NeoX saved as HF does, with a word-level fast tokenizer: the C2S model folder layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>"] + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(1)
    hf = GPTNeoXForCausalLM(CellLMConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, top_k=200).hf_config(len(vocab)))
    hf.save_pretrained(tmp_path / "c2s")
    fast.save_pretrained(tmp_path / "c2s")
    return hf


def test_loads_an_official_c2s_folder_and_scores_candidates(tmp_path):
    from sclens.circuits.lm import C2S_PROMPT

    words = set(C2S_PROMPT.replace("{", " ").replace("}", " ").replace(".", " . ").replace(":", " : ").split())
    words |= {"CD3E", "LYZ", "MS4A1", "T", "B", "cell", "monocyte", "Homo", "sapiens", "3", "num_genes",
              "organism", "cell_sentence"}
    hf = _official_layout(tmp_path, words)
    m = load_cell_lm(tmp_path / "c2s")
    assert m.vocab is None and m.tokenizer is not None
    cands = ["T cell", "B cell", "monocyte"]
    scores = m.score_prompt_candidates([["CD3E", "LYZ", "MS4A1"]], cands)
    # reference: HF logits summed over the answer tokens
    tok = m.tokenizer
    p = tok(C2S_PROMPT.format(num_genes=3, organism="Homo sapiens", cell_sentence="CD3E LYZ MS4A1"))["input_ids"]
    c = tok(" B cell.")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([p + c])).logits[0], -1)
    ref = sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(c))
    assert scores[0, 1] == pytest.approx(ref, abs=1e-4)
    assert m.predict_cell_types([["CD3E", "LYZ", "MS4A1"]], cands)[0] in cands
    with pytest.raises(InputError, match="candidate"):
        m.predict_cell_types([["CD3E"]])


def test_load_errors_are_specific(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_cell_lm(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="gpt_neox"):
        load_cell_lm(tmp_path)


def test_default_model_is_shipped_and_predicts_sorted_populations():
    from sclens.circuits.lm import load_default_cell_lm

    m = load_default_cell_lm()
    assert "monocytes" in m.vocab.labels and "nk" in m.vocab.labels
    assert m.predict_cell_types([["LYZ", "S100A9", "S100A8", "CST3", "FCN1"]])[0] == "monocytes"
    assert m.predict_cell_types([["NKG7", "GNLY", "GZMB", "PRF1", "KLRD1"]])[0] == "nk"


def test_save_is_atomic_and_replaces(tmp_path):
    from transformers import GPTNeoXForCausalLM

    v = CellSentenceVocab(genes=["A1", "B1"], labels=["x", "y"], top_k=4)
    hf = GPTNeoXForCausalLM(CellLMConfig(d_model=16, n_layers=1, n_heads=2, d_mlp=32, top_k=4).hf_config(len(v)))
    m = HookedCellLM(hf, vocab=v)
    save_cell_lm(m, tmp_path / "m")
    save_cell_lm(m, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_cell_lm(tmp_path / "m").vocab.tokens == v.tokens
