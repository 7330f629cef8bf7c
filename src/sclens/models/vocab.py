"""The gene vocabulary of an scGPT model (``vocab.json``: token -> integer id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..errors import CheckpointError

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


def is_special(token: str) -> bool:
    """``<pad>``, ``<cls>``, ``<eoc>`` (scGPT), ``<mask>``, ``<eos>`` (Geneformer): no gene is written in angle brackets."""
    return token in SPECIAL_TOKENS or (token.startswith("<") and token.endswith(">"))


class GeneVocab:
    """Token <-> id mapping. Gene tokens are HGNC symbols, matched exactly (case-sensitive)."""

    def __init__(self, stoi: Mapping[str, int]):
        self.stoi: dict[str, int] = dict(stoi)
        ids = list(self.stoi.values())
        if len(set(ids)) != len(ids):
            raise CheckpointError("vocab.json maps several tokens to the same id")
        self.itos = {i: t for t, i in self.stoi.items()}

    @classmethod
    def from_genes(cls, genes: Iterable[str], specials: Iterable[str] = SPECIAL_TOKENS) -> "GeneVocab":
        """Genes get ids 0..n-1 in the given order, then the specials are appended (as official pretraining does)."""
        stoi: dict[str, int] = {}
        for g in genes:
            if g not in stoi:
                stoi[g] = len(stoi)
        for s in specials:
            if s not in stoi:
                stoi[s] = len(stoi)
        return cls(stoi)

    @classmethod
    def from_json(cls, path: str | Path) -> "GeneVocab":
        from .config import read_checkpoint_json

        raw = read_checkpoint_json(path)
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise CheckpointError(f"{path} must be a JSON object mapping token -> integer id")
        vocab = cls(raw)
        # the official loader appends missing specials; do the same so <pad>/<cls> always resolve
        for s in SPECIAL_TOKENS:
            if s not in vocab.stoi:
                vocab.stoi[s] = max(vocab.stoi.values(), default=-1) + 1
                vocab.itos[vocab.stoi[s]] = s
        return vocab

    def to_json(self) -> str:
        return json.dumps(self.stoi)

    def __len__(self) -> int:
        return len(self.stoi)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        return self.stoi[token]

    @property
    def genes(self) -> list[str]:
        """Gene tokens (every token that is not a special such as ``<pad>`` or ``<mask>``), in id order."""
        return [t for _, t in sorted(self.itos.items()) if not is_special(t)]

    @property
    def size(self) -> int:
        """Number of embedding rows needed: max id + 1."""
        return max(self.stoi.values()) + 1

    def lookup(self, genes: Iterable[str]) -> np.ndarray:
        """Ids of ``genes``; -1 where a gene is not in the vocabulary."""
        return np.array([self.stoi.get(g, -1) for g in genes], dtype=np.int64)
