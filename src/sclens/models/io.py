"""Read and write scGPT checkpoint directories in the official layout.

A directory holds ``args.json`` (training arguments, incl. ``nheads``), ``vocab.json`` (token -> id) and
``best_model.pt`` (a plain ``torch.save`` of the state dict). Attention weights may be named
``self_attn.Wqkv.*`` (flash-attn 1.x, the released models), ``self_attn._impl.Wqkv.*`` (scGPT >= 0.2.5) or
``self_attn.in_proj_*`` (torch path): all three hold the same fused q|k|v tensor. Loading always uses
``torch.load(weights_only=True)``, so a pickle carrying code is refused, and the backbone is loaded strictly:
a missing or mis-shaped tensor is an error, never silently random weights.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, preview
from ..utils import atomic_write, file_sha256
from .config import ScGPTConfig
from .scgpt import HookedScGPT
from .vocab import GeneVocab

FILES = ("args.json", "vocab.json", "best_model.pt")

# official key -> sclens key (per layer); applied after the Wqkv/_impl renames
_LAYER_RENAMES = [
    (r"self_attn\._impl\.Wqkv\.(weight|bias)$", r"attn.in_proj_\1"),
    (r"self_attn\.Wqkv\.(weight|bias)$", r"attn.in_proj_\1"),
    (r"self_attn\.in_proj_(weight|bias)$", r"attn.in_proj_\1"),
    (r"self_attn\._impl\.out_proj\.(weight|bias)$", r"attn.out_proj.\1"),
    (r"self_attn\.out_proj\.(weight|bias)$", r"attn.out_proj.\1"),
    (r"linear1\.(weight|bias)$", r"mlp.linear1.\1"),
    (r"linear2\.(weight|bias)$", r"mlp.linear2.\1"),
    (r"norm1\.(weight|bias)$", r"ln1.\1"),
    (r"norm2\.(weight|bias)$", r"ln2.\1"),
]
# present in released checkpoints, not needed for the encoder: dropped quietly
_KNOWN_EXTRAS = ("flag_encoder.", "cls_decoder.")
# fine-tuning modules that change the forward pass; sclens does not model them
_UNSUPPORTED = ("dsbn.", "bn.", "batch_encoder.", "grad_reverse_discriminator.", "decoder.zero_logit.",
                "mvc_decoder.W_zero_logit", "mvc_decoder.fc1", "mvc_decoder.fc2")


def _official_to_sclens(key: str) -> str | None:
    m = re.match(r"^transformer_encoder\.layers\.(\d+)\.(.+)$", key)
    if not m:
        return key
    layer, rest = m.groups()
    for pat, rep in _LAYER_RENAMES:
        if re.search(pat, rest):
            return f"blocks.{layer}." + re.sub(pat, rep, rest)
    return None  # unknown per-layer tensor


def _sclens_to_official(key: str) -> str:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not m:
        return key
    layer, rest = m.groups()
    rest = (rest.replace("attn.in_proj_", "self_attn.Wqkv.").replace("attn.out_proj.", "self_attn.out_proj.")
            .replace("mlp.linear1.", "linear1.").replace("mlp.linear2.", "linear2.")
            .replace("ln1.", "norm1.").replace("ln2.", "norm2."))
    return f"transformer_encoder.layers.{layer}.{rest}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` with clear errors for truncated, corrupt or code-carrying files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy was probably interrupted")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it contains Python objects other than tensors "
            f"(a pickle that could run code). sclens never unpickles arbitrary code. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} could not be read as a torch checkpoint; it looks truncated or corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_scgpt(model_dir: str | Path, *, allow_unsupported: bool = False, device: str = "cpu") -> HookedScGPT:
    """Load an official scGPT checkpoint directory into a :class:`HookedScGPT` (eval mode).

    Parameters
    ----------
    model_dir
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt``.
    allow_unsupported
        Fine-tuned checkpoints may carry modules that change the forward pass (domain-specific batch norm,
        batch-label encoders, ...). They are refused by default; with True they are ignored with a warning.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    missing = [f for f in FILES if not (model_dir / f).is_file()]
    if missing:
        present = sorted(p.name for p in model_dir.iterdir())
        raise CheckpointError(
            f"{model_dir} is not an scGPT checkpoint directory: missing {missing} "
            f"(found {present}); the official layout is args.json + vocab.json + best_model.pt"
        )
    config = ScGPTConfig.from_args_json(model_dir / "args.json")
    vocab = GeneVocab.from_json(model_dir / "vocab.json")
    raw = read_state_dict(model_dir / "best_model.pt")

    unsupported = sorted(k for k in raw if k.startswith(_UNSUPPORTED))
    if unsupported and not allow_unsupported:
        raise CheckpointError(
            f"{model_dir / 'best_model.pt'} contains fine-tuning modules that change the forward pass and that "
            f"sclens does not model: {preview(unsupported)}. Pass allow_unsupported=True to ignore them "
            "(the encoder then runs without them)."
        )
    if unsupported:
        warnings.warn(f"ignoring unsupported fine-tuning tensors: {preview(unsupported)}", stacklevel=2)

    state, unknown = {}, []
    for k, v in raw.items():
        if k.startswith(_KNOWN_EXTRAS) or k in unsupported:
            continue
        new = _official_to_sclens(k)
        if new is None:
            unknown.append(k)
        else:
            state[new] = v
    if "encoder.embedding.weight" not in state:
        raise CheckpointError(f"{model_dir / 'best_model.pt'} has no 'encoder.embedding.weight': not an scGPT model")
    n_rows, d_model = state["encoder.embedding.weight"].shape
    if d_model != config.embsize:
        raise CheckpointError(
            f"args.json says embsize={config.embsize} but the gene embedding is {d_model}-dimensional"
        )
    if n_rows < vocab.size:
        raise CheckpointError(
            f"vocab.json has ids up to {vocab.size - 1} but the gene embedding has only {n_rows} rows; "
            "the vocabulary does not belong to this checkpoint"
        )
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layer_ids and max(layer_ids) + 1 != config.nlayers:
        raise CheckpointError(
            f"args.json says nlayers={config.nlayers} but the checkpoint has {max(layer_ids) + 1} layers"
        )
    if "value_encoder.embedding.weight" in state and config.input_emb_style != "category":
        config.input_emb_style = "category"
    config.MVC = any(k.startswith("mvc_decoder.") for k in state)

    # embedding rows beyond the vocab (possible in official files) are kept: build with the checkpoint's size
    model = HookedScGPT(config, vocab)
    if model.encoder.embedding.num_embeddings != n_rows:
        model.encoder.embedding = torch.nn.Embedding(n_rows, d_model, padding_idx=vocab["<pad>"])
    expected = model.state_dict()
    missing_keys = [k for k in expected if k not in state]
    backbone_missing = [k for k in missing_keys if not k.startswith(("decoder.", "mvc_decoder."))]
    if backbone_missing:
        raise CheckpointError(
            f"{model_dir / 'best_model.pt'} lacks encoder tensors {preview(backbone_missing)}; "
            "the file is incomplete or args.json does not match it"
        )
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if bad_shapes:
        raise CheckpointError(
            f"tensor shapes do not match args.json (nheads/d_hid/embsize?): {preview(bad_shapes, 4)}"
        )
    extra = sorted(set(state) - set(expected)) + unknown
    if extra:
        warnings.warn(f"ignoring {len(extra)} unrecognised tensors: {preview(extra)}", stacklevel=2)
    if missing_keys:
        warnings.warn(
            f"checkpoint has no {sorted({k.split('.')[0] for k in missing_keys})} weights; those heads stay random "
            "(the encoder and embeddings are unaffected)", stacklevel=2,
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.source = str(model_dir)
    model.checkpoint_sha256 = file_sha256(model_dir / "best_model.pt")
    return model.to(device).eval()


def official_state_dict(model: HookedScGPT) -> dict[str, torch.Tensor]:
    """The model's tensors under official key names (``Wqkv``, as the released checkpoints)."""
    return {_sclens_to_official(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_scgpt(model: HookedScGPT, model_dir: str | Path, *, extra_args: dict | None = None) -> Path:
    """Write ``model`` as an official checkpoint directory (each file written atomically)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    args = model.config.to_dict()
    args.update({"fast_transformer": True, "pre_norm": False, "nlayers_cls": 3, "n_layers_cls": 3})
    args.update(extra_args or {})
    atomic_write(model_dir / "args.json", lambda p: Path(p).write_text(json.dumps(args, indent=2)))
    atomic_write(model_dir / "vocab.json", lambda p: Path(p).write_text(model.vocab.to_json()))
    atomic_write(model_dir / "best_model.pt", lambda p: torch.save(official_state_dict(model), p))
    return model_dir
