"""Configuration of an scGPT-architecture model, read from / written to the official ``args.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

_VALUE_STYLES = ("continuous", "category", "scaling")


def read_checkpoint_json(path: str | Path) -> Any:
    """Parse a checkpoint's JSON file, turning a missing or malformed file into a clear CheckpointError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {path.name} at {path}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


@dataclass
class ScGPTConfig:
    """Architecture and tokenisation settings of an scGPT model.

    Field names follow the official ``args.json`` keys (``embsize``, ``nheads``, ``d_hid``, ``nlayers``) so
    that a file written by sclens is read by the official code and vice versa. ``nheads`` cannot be
    inferred from weight shapes; it must be in the file.
    """

    embsize: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    dropout: float = 0.2
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    n_bins: int = 51
    input_emb_style: str = "continuous"
    max_seq_len: int = 1200
    MVC: bool = True
    layer_norm_eps: float = 1e-5
    # keys we do not interpret (lr, epochs, data_source, ...) are carried through unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embsize % self.nheads != 0:
            raise CheckpointError(
                f"embsize={self.embsize} is not divisible by nheads={self.nheads}; each head needs an equal slice"
            )
        if self.input_emb_style not in _VALUE_STYLES:
            raise CheckpointError(
                f"input_emb_style={self.input_emb_style!r} is not one of {_VALUE_STYLES}"
            )

    @property
    def d_model(self) -> int:
        return self.embsize

    @property
    def d_head(self) -> int:
        return self.embsize // self.nheads

    @classmethod
    def from_dict(cls, args: dict[str, Any], source: str = "args.json") -> "ScGPTConfig":
        required = ("embsize", "nheads", "d_hid", "nlayers")
        missing = [k for k in required if k not in args]
        if missing:
            raise CheckpointError(
                f"{source} lacks required key(s) {missing}; an official scGPT args.json has "
                f"'embsize', 'nheads', 'd_hid' and 'nlayers' (n_heads cannot be inferred from the weights)"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {}
        for k in known:
            if k in args:
                kwargs[k] = args[k]
        # the official file spells the value-input style in two keys; input_emb_style is the one the model reads
        try:
            cfg = cls(**kwargs, extra={k: v for k, v in args.items() if k not in known})
            for k in ("embsize", "nheads", "d_hid", "nlayers", "n_bins", "max_seq_len"):
                setattr(cfg, k, int(getattr(cfg, k)))
            cfg.pad_value = float(cfg.pad_value)
            cfg.mask_value = float(cfg.mask_value)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source} has a value of the wrong type: {exc}") from None
        return cfg

    @classmethod
    def from_args_json(cls, path: str | Path) -> "ScGPTConfig":
        args = read_checkpoint_json(path)
        if not isinstance(args, dict):
            raise CheckpointError(f"{path} must hold a JSON object of training arguments")
        return cls.from_dict(args, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.pop("layer_norm_eps")  # not an official key; always 1e-5 for scGPT
        d["input_style"] = "binned"
        d.update(self.extra)
        # official pad/mask values are written as integers
        for k in ("pad_value", "mask_value"):
            if float(d[k]).is_integer():
                d[k] = int(d[k])
        return d
