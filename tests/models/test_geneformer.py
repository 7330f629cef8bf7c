"""Geneformer conformance: hooked forward vs HF BertForMaskedLM, tokenisation vs the documented steps, embeddings
vs the EmbExtractor rules, dictionary safety and the official folder layout (tiny random checkpoints)."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclens.data import ensembl_to_symbol
from sclens.errors import CheckpointError, InputError
from sclens.models.geneformer import HookedGeneformer, load_geneformer, read_dictionary, save_geneformer

transformers = pytest.importorskip("transformers")

N_GENES = 60
SHARED_DICTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "geneformer_v1_dicts"


def _genes():
    return sorted(ensembl_to_symbol())[:N_GENES]


def build_checkpoint(folder: Path, *, v2: bool = False, seed: int = 0, max_pos: int = 40, genes=None) -> Path:
    """A random HF BertForMaskedLM in the official layout, with dictionaries pickled as the official ones are
    (``genes``: Ensembl ids, default the first 60 of sclens' table)."""
    torch.manual_seed(seed)
    genes = list(genes) if genes is not None else _genes()
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if v2 else [])
    token_dict = {t: np.int64(i) for i, t in enumerate(specials + genes)}  # numpy scalars, as the real pickles
    rng = np.random.default_rng(seed)
    medians = {g: np.float64(rng.uniform(0.2, 5.0)) for g in genes}
    cfg = transformers.BertConfig(vocab_size=len(token_dict), hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64, hidden_act="relu",
                                  max_position_embeddings=max_pos, layer_norm_eps=1e-12, pad_token_id=0,
                                  hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02)
    model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped tensor cannot pass unnoticed
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "token_dictionary_test.pkl").write_bytes(pickle.dumps(token_dict))
    (folder / "gene_median_dictionary_test.pkl").write_bytes(pickle.dumps(medians))
    return folder


def hf_model(folder: Path):
    return transformers.BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    d = build_checkpoint(tmp_path_factory.mktemp("gf_v1"))
    return d, load_geneformer(d), hf_model(d)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    d = build_checkpoint(tmp_path_factory.mktemp("gf_v2"), v2=True, seed=1)
    return d, load_geneformer(d), hf_model(d)


def _counts(n_cells=12, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.uniform(0.2, 6.0, size=N_GENES), size=(n_cells, N_GENES)).astype(np.float64)
    if not ties:
        X = X + rng.uniform(0.01, 0.02, size=X.shape) * (X > 0)  # distinct values: no exact ties in x
    X[:, :3] = 0  # some genes never expressed
    X[1::2] *= rng.random(size=X[1::2].shape) < 0.3  # every other cell expresses few genes: ragged, padded rows
    return X


def _reference_tokens(X, genes, token_dict, medians, n_counts, size, special):
    """The documented tokenizer steps, written independently (dense loop, stable order, no sparse tricks)."""
    out = []
    for i in range(X.shape[0]):
        x = np.array([X[i, j] / n_counts[i] * 10_000 / medians[g] for j, g in enumerate(genes)])
        nz = [j for j in range(len(genes)) if x[j] > 0]
        order = sorted(nz, key=lambda j: -x[j])
        toks = [int(token_dict[genes[j]]) for j in order]
        if special:
            toks = [int(token_dict["<cls>"])] + toks[: size - 2] + [int(token_dict["<eos>"])]
        else:
            toks = toks[:size]
        out.append(toks)
    return out


def _rows(batch):
    return [batch.gene_ids[i][~batch.padding_mask[i]].tolist() for i in range(len(batch))]


def test_forward_matches_hf_at_every_layer(v1):
    _, ours, hf = v1
    batch = ours.tokenize(_counts(), _genes())
    ids, mask = batch.gene_ids, (~batch.padding_mask).long()
    assert batch.padding_mask.any()  # ragged rows: padding is exercised
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        real = ~batch.padding_mask
        for layer in range(ours.n_layers + 1):
            h = ours(ids, batch.values, batch.padding_mask, stop_at_layer=layer if layer < ours.n_layers else None)
            torch.testing.assert_close(h[real], out.hidden_states[layer][real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.mlm_logits(h)[real], out.logits[real], atol=1e-4, rtol=1e-4)


def test_per_head_weights_follow_transformerlens(v1):
    _, ours, hf = v1
    w = ours.head_weights(1, 2)
    att = hf.bert.encoder.layer[1].attention
    dh = 32 // 4
    torch.testing.assert_close(w["W_Q"], att.self.query.weight[2 * dh : 3 * dh].T)
    torch.testing.assert_close(w["W_V"], att.self.value.weight[2 * dh : 3 * dh].T)
    torch.testing.assert_close(w["W_O"], att.output.dense.weight[:, 2 * dh : 3 * dh].T)
    cache = ours.run_with_cache(ours.tokenize(_counts(4), _genes()), ["blocks.0.attn.hook_pattern",
                                                                      "blocks.2.hook_resid_pre"], progress=False)
    assert cache["blocks.0.attn.hook_pattern"].shape[1] == 4


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_tokenisation_matches_the_documented_steps(which, request):
    _, ours, _ = request.getfixturevalue(which)
    genes, X = _genes(), _counts(seed=3)
    n_counts = X.sum(1) * 1.7  # n_counts over ALL genes: larger than the tokenised genes' total
    size = ours.model_input_size
    expect = _reference_tokens(X, genes, ours.token_dict, ours.gene_median, n_counts, size, which == "v2")
    batch = ours.tokenize(sp.csr_matrix(X), genes, n_counts=n_counts)
    assert _rows(batch) == expect
    assert max(len(r) for r in expect) == size  # truncation is exercised (more expressed genes than positions)
    # symbols tokenise like the Ensembl ids they name; Ensembl version suffixes and case do not matter
    table = ensembl_to_symbol()
    assert _rows(ours.tokenize(X, [table[g] for g in genes], n_counts=n_counts)) == expect
    assert _rows(ours.tokenize(X, [g.lower() + ".7" for g in genes], n_counts=n_counts)) == expect


def test_ties_compare_as_sets_and_duplicates_are_summed(v1):
    _, ours, _ = v1
    genes, X = _genes(), _counts(seed=5, ties=True)
    ref = _reference_tokens(X, genes, ours.token_dict, ours.gene_median, X.sum(1), 10_000, False)
    got = _rows(ours.tokenize(X, genes))
    for r, g in zip(ref, got):
        assert set(r[: len(g)]) == set(g)  # same genes kept; the order among exact ties is the sort's
    # a gene split over two columns counts as their sum (the official collapse of duplicate ids)
    Xd = np.concatenate([X, X[:, [10]]], axis=1)
    Xd[:, 10] *= 0.25
    Xd[:, -1] *= 0.75
    dup = ours.tokenize(Xd, genes + [genes[10]], n_counts=X.sum(1))
    assert _rows(dup) == got


def test_embeddings_follow_the_emb_extractor_rules(v1, v2):
    for _, ours, hf in (v1, v2):
        batch = ours.tokenize(_counts(seed=7), _genes())
        with torch.no_grad():
            hs = hf(input_ids=batch.gene_ids, attention_mask=(~batch.padding_mask).long(),
                    output_hidden_states=True).hidden_states
        layer = hs[ours.n_layers - 1]  # emb_layer = -1: the second-to-last layer's output
        if ours.special_token:
            expect = layer[:, 0]
        else:
            keep = (~batch.padding_mask).unsqueeze(-1).float()
            expect = (layer * keep).sum(1) / keep.sum(1)
        got = ours.cell_embeddings(batch)
        np.testing.assert_allclose(got, expect.numpy(), atol=1e-5, rtol=1e-5)
        last = ours.cell_embeddings(batch, emb_layer=0, mode="cell")
        keep = ~batch.padding_mask & (batch.gene_ids != ours.token_dict.get("<cls>", -1)) & (
            batch.gene_ids != ours.token_dict.get("<eos>", -1))
        w = keep.unsqueeze(-1).float()
        np.testing.assert_allclose(last, ((hs[-1] * w).sum(1) / w.sum(1)).numpy(), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="V1 uses 'cell'"):
        v1[1].cell_embeddings(v1[1].tokenize(_counts(2), _genes()), mode="cls")


def test_save_load_round_trip_and_hf_reads_it(v2, tmp_path):
    _, ours, hf = v2
    save_geneformer(ours, tmp_path / "copy")
    again = load_geneformer(tmp_path / "copy")
    batch = ours.tokenize(_counts(seed=9), _genes())
    with torch.no_grad():
        torch.testing.assert_close(again(batch.gene_ids, None, batch.padding_mask),
                                   ours(batch.gene_ids, None, batch.padding_mask))
        hf2 = hf_model(tmp_path / "copy")
        a = hf2(input_ids=batch.gene_ids, attention_mask=(~batch.padding_mask).long()).logits
        b = hf(input_ids=batch.gene_ids, attention_mask=(~batch.padding_mask).long()).logits
        real = ~batch.padding_mask
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_vocab_names_genes_by_symbol(v1):
    _, ours, _ = v1
    table = ensembl_to_symbol()
    assert "<mask>" not in ours.vocab.genes and "<pad>" not in ours.vocab.genes
    assert set(ours.vocab.genes) == {table[g] for g in _genes()}


def test_dictionary_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "token_dictionary_evil.pkl"
    bad.write_bytes(pickle.dumps({"ENSG00000000003": Evil()}))
    with pytest.raises(CheckpointError, match="refused to load builtins.print"):
        read_dictionary(bad)


def test_clear_errors(v1, tmp_path):
    d, ours, _ = v1
    with pytest.raises(CheckpointError, match="no config.json"):
        load_geneformer(tmp_path)
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_geneformer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="token_dictionary"):
        load_geneformer(tmp_path)
    with pytest.raises(InputError, match="none of the 3 genes"):
        ours.tokenize(np.ones((2, 3)), ["A", "B", "C"])
    X = _counts(3)
    X[1] = 0
    with pytest.raises(InputError, match="1 cells have n_counts <= 0"):
        ours.tokenize(X, _genes())
    assert isinstance(ours, HookedGeneformer)


@pytest.mark.skipif(not SHARED_DICTS.is_dir(), reason="../shared/data/geneformer_v1_dicts not present")
def test_the_real_gc30m_dictionaries_load_safely():
    sha = hashlib.sha256((SHARED_DICTS / "token_dictionary_gc30M.pkl").read_bytes()).hexdigest()
    assert sha.startswith("ab9dc40973fa5224")
    tokens = read_dictionary(SHARED_DICTS / "token_dictionary_gc30M.pkl")
    medians = read_dictionary(SHARED_DICTS / "gene_median_dictionary_gc30M.pkl")
    names = read_dictionary(SHARED_DICTS / "gene_name_id_dict_gc30M.pkl")
    assert len(tokens) == 25_426 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    assert len(medians) == 25_424 and all(isinstance(v, float) for v in medians.values())
    assert len(names) == 40_248 and all(isinstance(v, str) for v in names.values())


def test_random_weights_copy_redraws_the_blocks_only(v1):
    from sclens.models.controls import randomize

    _, ours, _ = v1
    rnd = randomize(ours, seed=3)
    assert rnd.random_control["family"] == "geneformer"
    torch.testing.assert_close(rnd.word_embeddings.weight, ours.word_embeddings.weight)
    torch.testing.assert_close(rnd.position_embeddings.weight, ours.position_embeddings.weight)
    w0, w1 = ours.blocks[1].attn.in_proj_weight, rnd.blocks[1].attn.in_proj_weight
    assert not torch.allclose(w0, w1)
    assert float(w1.std()) == pytest.approx(float(w0.std()), rel=0.1)
    full = randomize(ours, seed=3, keep_embeddings=False)
    assert not torch.allclose(full.position_embeddings.weight, ours.position_embeddings.weight)


def _adata(X, genes):
    import anndata as ad

    a = ad.AnnData(np.asarray(X, dtype=np.float32))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


def test_gene_indexed_means_match_a_brute_force_average(v1):
    from sclens.operators import _gene_indexed_means

    _, ours, _ = v1
    X = np.round(_counts(n_cells=9, seed=11)) + (_counts(n_cells=9, seed=11) > 0)
    batch = ours.tokenize(X, _genes())
    panel_ids = ours.vocab.lookup(ours.vocab.genes[5:25])
    R, P, held = _gene_indexed_means(ours, batch, panel_ids, ["blocks.1.hook_resid_pre"],
                                     ["blocks.1.attn.hook_pattern"], batch_size=4, progress=False, stop_at_layer=None)
    full = ours.run_with_cache(batch, ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern"], progress=False)
    act, pat = full["blocks.1.hook_resid_pre"].double(), full["blocks.1.attn.hook_pattern"].double()
    for j, t in enumerate(panel_ids):
        where = [(i, int(p)) for i in range(len(batch)) for p in torch.nonzero(batch.gene_ids[i] == int(t)).ravel()]
        assert held[j] == len(where)
        if where:
            expect = torch.stack([act[i, p] for i, p in where]).mean(0)
            torch.testing.assert_close(R["blocks.1.hook_resid_pre"][j], expect)
    a, b = 2, 7  # one gene pair: the mean pattern over the cells holding both
    ta, tb = int(panel_ids[a]), int(panel_ids[b])
    vals = [pat[i, :, int(torch.nonzero(batch.gene_ids[i] == ta)[0]), int(torch.nonzero(batch.gene_ids[i] == tb)[0])]
            for i in range(len(batch)) if (batch.gene_ids[i] == ta).any() and (batch.gene_ids[i] == tb).any()]
    assert vals
    torch.testing.assert_close(P["blocks.1.attn.hook_pattern"][:, a, b], torch.stack(vals).mean(0))


def test_operators_of_a_geneformer_model(v1):
    from sclens.data import GenePanel, log_normalize
    from sclens.operators import export_operators

    _, ours, _ = v1
    X = np.round(_counts(n_cells=16, seed=13)) + (_counts(n_cells=16, seed=13) > 0)
    genes = [ensembl_to_symbol()[g] for g in _genes()]
    panel = GenePanel(tuple(genes[3:30]))
    banks = export_operators(ours, _adata(X, genes), panel, n_ref_cells=16, progress=False)
    assert banks["ov"].operators.shape == (3, 4, 27, 27)
    assert banks["ov"].manifest["model_family"] == "geneformer"
    held = set(ours.tokenize(X, genes).gene_ids.ravel().tolist())
    absent = [g for g in panel.genes if ours.vocab[g] not in held]  # truncation at 40 positions drops low ranks
    assert banks["ov"].manifest["genes_absent_from_reference"] == absent
    rows = [i for i, g in enumerate(panel.genes) if g not in absent]
    np.testing.assert_allclose(banks["attn"].operators[:, :, rows].sum(-1), 1.0, atol=1e-5)
    # log1p(normalize_total) data give the same ranks, hence the same operators
    logged = _adata(np.asarray(log_normalize(X).todense() if hasattr(log_normalize(X), "todense")
                               else log_normalize(X)), genes)
    again = export_operators(ours, logged, panel, kinds=["ov"], n_ref_cells=16, progress=False)
    np.testing.assert_allclose(again["ov"].operators, banks["ov"].operators, atol=1e-5)
    # a panel gene no reference cell expresses: zero rows and columns, a warning and the manifest say so
    X2 = X.copy()
    X2[:, 3] = 0
    with pytest.warns(UserWarning, match=f"{len(absent) + 1} of 27 panel genes occur in none"):
        b2 = export_operators(ours, _adata(X2, genes), panel, kinds=["ov"], n_ref_cells=16, progress=False)
    assert b2["ov"].manifest["genes_absent_from_reference"][0] == genes[3]
    assert not b2["ov"].operators[:, :, 0].any() and not b2["ov"].operators[:, :, :, 0].any()


def test_pretrain_geneformer_learns_and_writes_the_official_layout(sim_small, tmp_path):
    from sclens.models.pretrain_geneformer import GeneformerPretrainConfig, corpus_dictionaries, pretrain_geneformer

    tokens, medians, unmapped = corpus_dictionaries([sim_small])
    assert unmapped == 0 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    g = sim_small.var_names[5]
    ens = {s: e for e, s in ensembl_to_symbol().items()}[g]
    x = np.asarray(sim_small.X[:, 5].todense()).ravel() if sp.issparse(sim_small.X) else sim_small.X[:, 5]
    n = np.asarray(sim_small.X.sum(1)).ravel()
    assert medians[ens] == pytest.approx(np.median((x / n * 10_000)[x > 0]))
    cfg = GeneformerPretrainConfig(n_layers=2, n_heads=2, d_model=32, d_hid=64, max_len=128, train_len=64, steps=300,
                                   batch_size=16, lr=3e-3, warmup_steps=10, eval_every=40, eval_cells=64)
    model, log = pretrain_geneformer(sim_small, cfg, out_dir=tmp_path / "gf", progress=False)
    first, last = log["eval"][0]["ce"], log["final_eval"]["ce"]
    # it reads the context: below uniform guessing at the start and below the genes' frequencies alone
    assert last < first - 0.25 and last < log["unigram_baseline_ce"] - 0.1
    again = load_geneformer(tmp_path / "gf")
    batch = again.tokenize(sim_small.X[:8], list(sim_small.var_names))
    with torch.no_grad():
        torch.testing.assert_close(again(batch.gene_ids, None, batch.padding_mask),
                                   model(batch.gene_ids, None, batch.padding_mask))
        out = hf_model(tmp_path / "gf")(input_ids=batch.gene_ids, attention_mask=(~batch.padding_mask).long(),
                                        output_hidden_states=True)
        real = ~batch.padding_mask
        torch.testing.assert_close(out.hidden_states[-1][real], again(batch.gene_ids, None, batch.padding_mask)[real],
                                   atol=1e-5, rtol=1e-5)
    assert (tmp_path / "gf" / "training_log.json").is_file() and (tmp_path / "gf" / "loss_curve.png").is_file()
