"""Official scGPT tokenisation: gene tokens + 51 value bins, ``<cls>`` first, right padding.

Two modes:

* ``"nonzero"`` (the official ``embed_data`` path): per cell, the non-zero genes in column order, binned on
  the non-zero values; when a cell has more than ``max_len - 1`` genes, ``max_len - 1`` of them are drawn
  at random (which also permutes their order, as the official collator does).
* ``"all"`` (the panel mode used for gene-space operators): every panel gene is a token, zeros included
  (bin 0), in panel order, so that position ``i + 1`` is always panel gene ``i``.

Binning follows ``scgpt.preprocess.binning`` exactly: edges are the ``n_bins - 1`` quantiles of the cell's
non-zero values; a value tied with several edges gets a uniformly random bin among them. Pass an ``rng``
(``numpy.random.RandomState``) to make it reproducible; ``RandomState(s)`` reproduces the official code run
after ``np.random.seed(s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError
from .vocab import GeneVocab


def bin_values(row: np.ndarray, n_bins: int = 51, rng: np.random.RandomState | None = None) -> np.ndarray:
    """Bin one cell's values into ``0..n_bins-1`` (0 = zero expression), as the official rule does."""
    rng = rng if rng is not None else np.random.mtrand._rand
    row = np.asarray(row)
    out = np.zeros(row.shape, dtype=np.int64)
    if row.size == 0 or row.max() == 0:
        return out
    nz = np.flatnonzero(row > 0) if row.min() <= 0 else np.arange(row.size)
    vals = row[nz]
    edges = np.quantile(vals, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(vals, edges)
    right = np.digitize(vals, edges, right=True)
    # one uniform draw per value, even where left == right, so the RNG stream matches the official code
    draws = rng.rand(len(vals))
    out[nz] = left + np.ceil(draws * (right - left)).astype(np.int64)
    return out


@dataclass
class TokenBatch:
    """A padded batch: ``gene_ids`` [B, S] int64, ``values`` [B, S] float32, ``padding_mask`` [B, S] bool (True = pad)."""

    gene_ids: torch.Tensor
    values: torch.Tensor
    padding_mask: torch.Tensor

    def __len__(self) -> int:
        return self.gene_ids.shape[0]

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.gene_ids.to(device), self.values.to(device), self.padding_mask.to(device))

    def __getitem__(self, idx) -> "TokenBatch":
        return TokenBatch(self.gene_ids[idx], self.values[idx], self.padding_mask[idx])


class Tokenizer:
    """Turns expression rows into scGPT token batches for one fixed list of genes.

    Parameters
    ----------
    vocab
        The model's gene vocabulary.
    genes
        Column names of the expression matrix to be tokenised, in column order. Genes missing from the
        vocabulary are dropped (as the official code does); at least one must be present.
    mode
        ``"nonzero"`` or ``"all"`` (see the module docstring).
    max_len
        Maximum tokens per cell including ``<cls>`` (``"nonzero"`` mode only).
    n_bins, pad_value, cls_value
        From the model config; ``cls_value`` defaults to ``pad_value`` as in official pretraining and ``embed_data``.
    binning
        If False, raw values are passed through (for ``input_emb_style="scaling"`` models).
    """

    def __init__(
        self,
        vocab: GeneVocab,
        genes,
        *,
        mode: Literal["nonzero", "all"] = "nonzero",
        max_len: int = 1200,
        n_bins: int = 51,
        pad_value: float = -2.0,
        cls_value: float | None = None,
        binning: bool = True,
    ):
        if mode not in ("nonzero", "all"):
            raise InputError(f"mode must be 'nonzero' or 'all', got {mode!r}")
        genes = [str(g) for g in genes]
        ids = vocab.lookup(genes)
        self.columns = np.flatnonzero(ids >= 0)
        if self.columns.size == 0:
            raise InputError(
                f"none of the {len(genes)} genes is in the model vocabulary (first genes: {genes[:5]}); "
                "scGPT vocabularies use HGNC symbols - convert Ensembl ids with sclens.data.harmonize_gene_ids"
            )
        self.token_ids = ids[self.columns]
        self.genes = [genes[i] for i in self.columns]
        self.mode = mode
        self.max_len = int(max_len)
        self.n_bins = int(n_bins)
        self.pad_value = float(pad_value)
        self.cls_value = float(pad_value if cls_value is None else cls_value)
        self.binning = binning
        self.pad_id = vocab["<pad>"]
        self.cls_id = vocab["<cls>"]

    @classmethod
    def for_model(cls, model, genes, **kwargs) -> "Tokenizer":
        cfg = model.config
        kwargs.setdefault("max_len", cfg.max_seq_len)
        return cls(
            model.vocab, genes, n_bins=cfg.n_bins, pad_value=cfg.pad_value,
            binning=cfg.input_emb_style != "scaling", **kwargs,
        )

    def _dense_rows(self, X) -> np.ndarray:
        if sp.issparse(X):
            X = X[:, self.columns].toarray()
        else:
            X = np.asarray(X)[:, self.columns]
        return np.asarray(X, dtype=np.float64)

    def encode(self, X, rng: np.random.RandomState | int | None = 0) -> TokenBatch:
        """Tokenise rows of ``X`` (cells x genes, dense or sparse, columns as given at construction)."""
        if isinstance(rng, (int, np.integer)) or rng is None:
            rng = np.random.RandomState(0 if rng is None else int(rng))
        rows = self._dense_rows(X)
        n = rows.shape[0]
        if self.mode == "all":
            S = len(self.token_ids) + 1
            gene_ids = np.empty((n, S), dtype=np.int64)
            gene_ids[:, 0] = self.cls_id
            gene_ids[:, 1:] = self.token_ids
            values = np.empty((n, S), dtype=np.float32)
            values[:, 0] = self.cls_value
            for i in range(n):
                values[i, 1:] = bin_values(rows[i], self.n_bins, rng) if self.binning else rows[i]
            pad = np.zeros((n, S), dtype=bool)
        else:
            toks, vals = [], []
            for i in range(n):
                nz = np.flatnonzero(rows[i] != 0)
                v = rows[i, nz]
                # official collator: bin over all non-zero genes first, then subsample to max_len
                v = bin_values(v, self.n_bins, rng).astype(np.float32) if self.binning else v.astype(np.float32)
                t = self.token_ids[nz]
                if len(t) > self.max_len - 1:
                    keep = torch.randperm(len(t), generator=torch.Generator().manual_seed(int(rng.randint(2**31))))
                    keep = keep[: self.max_len - 1].numpy()
                    t, v = t[keep], v[keep]
                toks.append(np.concatenate([[self.cls_id], t]))
                vals.append(np.concatenate([[self.cls_value], v]).astype(np.float32))
            S = max(len(t) for t in toks) if toks else 1
            gene_ids = np.full((n, S), self.pad_id, dtype=np.int64)
            values = np.full((n, S), self.pad_value, dtype=np.float32)
            for i, (t, v) in enumerate(zip(toks, vals)):
                gene_ids[i, : len(t)] = t
                values[i, : len(v)] = v
            pad = gene_ids == self.pad_id
        return TokenBatch(torch.from_numpy(gene_ids), torch.from_numpy(values), torch.from_numpy(pad))
