import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from sclens.errors import InputError
from sclens.models import GeneVocab, Tokenizer, bin_values


@pytest.fixture()
def vocab():
    return GeneVocab.from_genes([f"G{i}" for i in range(10)])


def test_nonzero_mode_layout(vocab):
    tok = Tokenizer(vocab, ["G0", "G1", "G2", "NOPE", "G3"], mode="nonzero", pad_value=-2)
    X = np.array([[0, 5, 1, 9, 2], [3, 0, 0, 0, 0]], dtype=float)
    b = tok.encode(X)
    assert b.gene_ids.tolist() == [[vocab["<cls>"], 1, 2, 3], [vocab["<cls>"], 0, vocab["<pad>"], vocab["<pad>"]]]
    assert b.values[0, 0] == -2 and b.values[1, 2] == -2
    assert b.padding_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert b.values[0, 1] > b.values[0, 3] > b.values[0, 2] > 0  # bins keep the order 5 > 2 > 1


def test_all_mode_keeps_zeros_and_panel_order(vocab):
    tok = Tokenizer(vocab, ["G3", "G1", "G2"], mode="all")
    b = tok.encode(sp.csr_matrix(np.array([[0.0, 2.0, 1.0]])))
    assert b.gene_ids[0].tolist() == [vocab["<cls>"], 3, 1, 2]
    assert b.values[0, 1] == 0 and b.values[0, 2] > b.values[0, 3] > 0
    assert not b.padding_mask.any()


def test_subsampling_above_max_len_is_seeded(vocab):
    tok = Tokenizer(vocab, [f"G{i}" for i in range(10)], max_len=5)
    X = np.arange(1, 11, dtype=float)[None, :]
    a, b, c = tok.encode(X, rng=1), tok.encode(X, rng=1), tok.encode(X, rng=2)
    assert a.gene_ids.shape == (1, 5)
    assert a.gene_ids.tolist() == b.gene_ids.tolist()
    assert a.gene_ids.tolist() != c.gene_ids.tolist()


def test_no_vocab_gene_is_a_clear_error(vocab):
    with pytest.raises(InputError, match="none of the 2 genes"):
        Tokenizer(vocab, ["ENSG00000000003", "ENSG00000000005"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=80), st.integers(0, 10_000))
def test_bins_are_monotone_in_value(values, seed):
    row = np.array(values, dtype=float)
    bins = bin_values(row, 51, np.random.RandomState(seed))
    assert (bins[row == 0] == 0).all()
    assert ((bins[row > 0] >= 1) & (bins[row > 0] <= 50)).all()
    order = np.argsort(row, kind="stable")
    nz = order[row[order] > 0]
    # strictly larger values never get a smaller bin
    for i, j in zip(nz[:-1], nz[1:]):
        if row[j] > row[i]:
            assert bins[j] >= bins[i]


def test_binning_is_invariant_to_monotone_transforms():
    row = np.array([0, 1, 3, 3, 7, 20, 0, 2], dtype=float)
    a = bin_values(row, 51, np.random.RandomState(4))
    b = bin_values(np.log1p(row * 10), 51, np.random.RandomState(4))
    np.testing.assert_array_equal(a, b)
