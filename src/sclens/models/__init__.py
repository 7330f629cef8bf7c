"""Foundation models: hooked scGPT and Geneformer implementations, their checkpoint I/O, tokenisation, pretraining."""

from .api import embed_cells, load_model, resolve_model, tokenize_adata
from .config import ScGPTConfig
from .encoder import HookedEncoder
from .geneformer import GeneformerConfig, HookedGeneformer, load_geneformer, save_geneformer
from .hooks import ActivationCache, HookPoint
from .io import load_scgpt, official_state_dict, read_state_dict, save_scgpt
from .scgpt import HookedScGPT
from .tokenize import TokenBatch, Tokenizer, bin_values
from .vocab import SPECIAL_TOKENS, GeneVocab

__all__ = [
    "ScGPTConfig", "GeneVocab", "SPECIAL_TOKENS", "HookedScGPT", "HookPoint", "ActivationCache",
    "Tokenizer", "TokenBatch", "bin_values", "load_scgpt", "save_scgpt", "read_state_dict",
    "official_state_dict", "default_model_dir", "load_default_model", "embed_cells", "tokenize_adata",
    "resolve_model", "load_model", "HookedEncoder", "HookedGeneformer", "GeneformerConfig", "load_geneformer",
    "save_geneformer",
]


def default_model_dir():
    """Folder of the embedded default model shipped inside the package."""
    from importlib.resources import files

    return files("sclens") / "_default_model"


def load_default_model(device: str = "cpu") -> HookedScGPT:
    """Load the compact scGPT-architecture model that sclens pretrained on real offline PBMC / marrow data."""
    from ..errors import CheckpointError

    d = default_model_dir()
    if not (d / "best_model.pt").is_file():
        raise CheckpointError(
            f"the embedded default model is missing from {d}; rebuild it with scripts/build_default_model.py"
        )
    return load_scgpt(str(d), device=device)
