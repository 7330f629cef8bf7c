"""Random-weights controls: the same architecture with its learned weights re-drawn.

A head "encodes" something only where it beats copies of the model whose transformer blocks carry no
training (DESIGN section 4). :func:`randomize` builds such a copy for every model family sclens opens
(scGPT-architecture :class:`~sclens.models.HookedScGPT`, Geneformer :class:`~sclens.models.HookedGeneformer` and
the cell-sentence GPT-NeoX :class:`~sclens.circuits.lm.HookedCellLM`): every tensor of every transformer block is replaced by Gaussian
draws with that tensor's own mean and standard deviation, so the scale of every weight matrix (and with it
the size of the residual stream and the sharpness of attention) is kept, while everything the tensor learned
is gone. With ``keep_embeddings=True`` (the default) the gene / token, value (scGPT) and position (Geneformer)
embeddings stay as trained, so
the copy still reads the same genes through the same input map; ``False`` re-draws them too. Output heads
(expression / MVC decoders, the LM's unembedding) are never used by the operators and are left as they are.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from ..errors import InputError


def _redraw_(tensor: torch.Tensor, gen: torch.Generator) -> None:
    """In place: Gaussian draws with the tensor's own mean and (population) standard deviation."""
    if tensor.numel() == 0:
        return
    t = tensor.detach().double()
    mean, std = float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    draw = torch.randn(tensor.shape, generator=gen, dtype=torch.float64) * std + mean
    tensor.copy_(draw.to(tensor.dtype))


def _groups(model) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]], str]:
    """(block parameters, embedding parameters, family) of a model sclens knows."""
    from .geneformer import HookedGeneformer
    from .scgpt import HookedScGPT

    if isinstance(model, HookedGeneformer):
        blocks = [(f"blocks.{n}", p) for n, p in model.blocks.named_parameters()]
        emb = [(n, p) for mod in ("word_embeddings", "position_embeddings", "token_type_embeddings", "embed_ln")
               for n, p in getattr(model, mod).named_parameters(prefix=mod)]
        return blocks, emb, "geneformer"
    if isinstance(model, HookedScGPT):
        blocks = [(f"blocks.{n}", p) for n, p in model.blocks.named_parameters()]
        emb = [(f"encoder.{n}", p) for n, p in model.encoder.named_parameters()]
        emb += [(f"value_encoder.{n}", p) for n, p in model.value_encoder.named_parameters()]
        return blocks, emb, "scgpt"
    hf = getattr(model, "hf", None)
    neox = getattr(hf, "gpt_neox", None)
    if neox is not None:
        blocks = [(f"gpt_neox.layers.{n}", p) for n, p in neox.layers.named_parameters()]
        emb = [(f"gpt_neox.embed_in.{n}", p) for n, p in neox.embed_in.named_parameters()]
        return blocks, emb, "cell_lm"
    raise InputError(f"randomize() knows scGPT, Geneformer and cell-sentence LMs, not {type(model).__name__}")


def randomize(model, seed: int = 0, *, keep_embeddings: bool = True):
    """A random-weights copy of ``model`` (the original is untouched).

    Parameters
    ----------
    model
        A loaded :class:`~sclens.models.HookedScGPT` or :class:`~sclens.circuits.lm.HookedCellLM`.
    seed
        Seed of the draws; tensors are drawn in a fixed order, so the same seed gives the same copy.
    keep_embeddings
        Keep the trained gene / token and value embeddings (default). ``False`` re-draws them as well.

    Returns
    -------
    A deep copy in eval mode whose transformer-block tensors (attention, MLP, LayerNorm weights and biases)
    are re-drawn from N(mean, std) of each tensor. ``copy.source`` says it is a control and
    ``copy.checkpoint_sha256`` is a hash of the original's hash, the seed and the variant, so operator banks
    exported from it never pass for the trained model's. ``copy.random_control`` records the recipe.
    """
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    out = copy.deepcopy(model)
    blocks, emb, family = _groups(out)
    targets = blocks if keep_embeddings else blocks + emb
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in targets:
            _redraw_(p, gen)
    src = getattr(model, "source", None) or "in-memory"
    base_sha = getattr(model, "checkpoint_sha256", None) or "unknown"
    variant = "blocks" if keep_embeddings else "blocks+embeddings"
    out.source = f"{src} [random weights: {variant} re-drawn, seed {seed}]"
    out.checkpoint_sha256 = hashlib.sha256(f"{base_sha}|random|{variant}|{seed}".encode()).hexdigest()
    out.random_control = {"seed": seed, "keep_embeddings": keep_embeddings, "family": family,
                          "redrawn_tensors": [n for n, _ in targets], "of_model_sha256": base_sha,
                          "rule": "each tensor ~ N(its own mean, its own std)"}
    return out.eval()
