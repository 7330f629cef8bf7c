"""Circuits: a cell-sentence LM, transcoders on its MLPs, attribution graphs, feature interpretation, SAE atlases."""

from .lm import (CellLMConfig, CellSentenceVocab, HookedCellLM, cell_sentences, load_cell_lm,
                 load_default_cell_lm, save_cell_lm)
from .lm_training import train_cell_lm

__all__ = ["CellLMConfig", "CellSentenceVocab", "HookedCellLM", "cell_sentences", "load_cell_lm",
           "load_default_cell_lm", "save_cell_lm", "train_cell_lm"]
