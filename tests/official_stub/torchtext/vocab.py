"""Minimal ``torchtext.vocab`` surface used by scgpt 0.2.4 (GeneVocab, embed_data)."""

from __future__ import annotations

from collections import OrderedDict


class _Inner:
    def __init__(self, tokens):
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.default_index = None

    def __getitem__(self, token):
        if token in self.stoi:
            return self.stoi[token]
        if self.default_index is None:
            raise RuntimeError(f"token {token!r} not found and no default index is set")
        return self.default_index

    def insert_token(self, token, index):
        if token in self.stoi:
            raise RuntimeError(f"token {token!r} already exists")
        self.itos.insert(index, token)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def append_token(self, token):
        self.insert_token(token, len(self.itos))


class Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return len(self.vocab.itos)

    def __contains__(self, token):
        return token in self.vocab.stoi

    def __getitem__(self, token):
        return self.vocab[token]

    def __call__(self, tokens):
        return self.lookup_indices(tokens)

    def lookup_indices(self, tokens):
        return [self.vocab[t] for t in tokens]

    def lookup_token(self, index):
        return self.vocab.itos[index]

    def insert_token(self, token, index):
        self.vocab.insert_token(token, index)

    def append_token(self, token):
        self.vocab.append_token(token)

    def set_default_index(self, index):
        self.vocab.default_index = index

    def get_default_index(self):
        return self.vocab.default_index

    def get_stoi(self):
        return dict(self.vocab.stoi)

    def get_itos(self):
        return list(self.vocab.itos)


def vocab(ordered_dict, min_freq: int = 1, specials=None, special_first: bool = True):
    tokens = [t for t, c in OrderedDict(ordered_dict).items() if c >= min_freq]
    specials = list(specials or [])
    tokens = [t for t in tokens if t not in specials]
    tokens = specials + tokens if special_first else tokens + specials
    return Vocab(_Inner(tokens))
