"""Geneformer (a BERT masked-language model over rank-value encoded cells) in the hooked interface of sclens.

An official Geneformer folder holds ``config.json`` (HF ``BertForMaskedLM``) and ``model.safetensors`` or
``pytorch_model.bin``; its tokenizer needs two dictionaries (pickles in the official package, JSON also accepted):
``token_dictionary`` (Ensembl id -> token id, with ``<pad>``, ``<mask>`` and for V2 ``<cls>``, ``<eos>``) and
``gene_median_dictionary`` (Ensembl id -> the gene's non-zero median of normalised expression in the pretraining
corpus). The gc30M (V1) dictionaries are byte-identical to the official files in ``geneformer_v1_dicts``.

Tokenisation follows the official ``TranscriptomeTokenizer``: raw counts of every gene, ``n_counts`` = the cell's
total over all genes, duplicate Ensembl ids summed, ``x = counts / n_counts * 10,000 / median``, the non-zero genes
ordered by descending ``x`` (``np.argsort(-x)`` over the row's non-zeros in column order, as the official code, so
exact ties fall the same way), truncated to the model's input size (V1: 2,048, no special tokens; V2: ``<cls>`` +
4,094 genes + ``<eos>``). Cell embeddings follow ``EmbExtractor``: hidden states of the second-to-last layer by
default (``emb_layer=-1``), the mean over gene tokens (V1) or the ``<cls>`` state (V2), not normalised.

The layers are the same post-LN blocks as scGPT's (q|k|v fused head-major; LayerNorm eps 1e-12), so every hook
name, ``run_with_cache`` and the per-head weights are shared. Rank-value inputs carry no expression values: the
``values`` of a token batch hold each gene's normalised expression in rank order (the official ``keep_counts``),
for reading only; the forward pass sees the gene ids and their positions.

Hook points besides the blocks': ``hook_tok_embed`` and ``hook_pos_embed`` [B, S, D] (token / position
embedding), ``hook_embed`` [B, S, D] (their sum + token type 0 after LayerNorm: the input of layer 0).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..errors import CheckpointError, InputError, preview
from ..utils import atomic_write, file_sha256, write_json
from .config import ScGPTConfig, read_checkpoint_json
from .encoder import HookedEncoder
from .hooks import HookPoint
from .scgpt import ScGPTBlock
from .tokenize import TokenBatch
from .vocab import GeneVocab

TARGET_SUM = 10_000
ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ config
@dataclass
class GeneformerConfig:
    """The fields of an HF BERT ``config.json`` that the forward pass reads (the rest is carried in ``extra``)."""

    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    max_position_embeddings: int = 2048
    vocab_size: int = 25_426
    layer_norm_eps: float = 1e-12
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    pad_token_id: int = 0
    type_vocab_size: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size={self.hidden_size} is not divisible by "
                                  f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "relu":
            raise CheckpointError(f"hidden_act={self.hidden_act!r}: sclens models Geneformer's ReLU BERT only "
                                  "(every released Geneformer uses 'relu')")

    @property
    def d_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def block_config(self) -> ScGPTConfig:
        """The shared post-LN block's settings (the same layer as scGPT's, with BERT's eps)."""
        return ScGPTConfig(embsize=self.hidden_size, nheads=self.num_attention_heads, d_hid=self.intermediate_size,
                           nlayers=self.num_hidden_layers, dropout=self.hidden_dropout_prob,
                           layer_norm_eps=self.layer_norm_eps)

    @classmethod
    def from_json(cls, path: str | Path) -> "GeneformerConfig":
        raw = read_checkpoint_json(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object (an HF BERT config)")
        if raw.get("model_type", "bert") != "bert":
            raise CheckpointError(f"{path} says model_type={raw.get('model_type')!r}; a Geneformer config is 'bert'")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not "
                                  "modelled (Geneformer uses 'absolute')")
        required = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
        missing = [k for k in required if k not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks {missing}: not an HF BERT config")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(**{k: raw[k] for k in known if k in raw}, extra={k: v for k, v in raw.items() if k not in known})
        except TypeError as exc:
            raise CheckpointError(f"{path} has a value of the wrong type: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "position_embedding_type": "absolute"}
        d.update({k: v for k, v in dataclasses.asdict(self).items() if k != "extra"})
        d.update(self.extra)
        return d


# ------------------------------------------------------------------------------------------ dictionaries
class _DictUnpickler(pickle.Unpickler):
    """Unpickles a plain dict of str -> int / float / str (numpy scalars allowed); refuses every other object."""

    def find_class(self, module: str, name: str):
        if name == "dtype" and module == "numpy":
            return np.dtype
        if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                from numpy._core.multiarray import scalar
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import scalar
            return scalar
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a dictionary file holds only plain values")


def read_dictionary(path: str | Path) -> dict[str, Any]:
    """A tokenizer dictionary (``.pkl`` as shipped by Geneformer, read without running code; or ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no dictionary file at {path}")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = _DictUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a plain dictionary file: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CheckpointError(f"{path} must hold a dict keyed by gene ids")
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in raw.items()}


def _find_file(folder: Path, stem: str) -> Path | None:
    hits = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in (".pkl", ".json"))
    return hits[0] if hits else None


# ------------------------------------------------------------------------------------------ model
class HookedGeneformer(HookedEncoder):
    """Geneformer's BERT encoder (+ its MLM head) with TransformerLens-style hook points.

    Build one with :func:`load_geneformer`. ``vocab`` names gene tokens by HGNC symbol where sclens' Ensembl ->
    symbol table (itself the gc30M dictionary) has one, else by Ensembl id, so panels chosen on harmonised data
    match; ``token_dict`` keeps the official Ensembl ids for tokenisation.
    """

    family = "geneformer"

    def __init__(self, config: GeneformerConfig, token_dict: Mapping[str, int], gene_median: Mapping[str, float],
                 gene_name_id: Mapping[str, str] | None = None):
        super().__init__()
        self.config = config
        self.token_dict = dict(token_dict)
        self.gene_median = {k: float(v) for k, v in gene_median.items()}
        self.gene_name_id = dict(gene_name_id or {})
        bad = [k for k, v in self.token_dict.items() if not isinstance(v, int) or not 0 <= v < config.vocab_size]
        if bad:
            raise CheckpointError(f"{len(bad)} token ids lie outside 0..{config.vocab_size - 1} (vocab_size of "
                                  f"config.json), e.g. {preview(bad)}: the dictionary does not belong to this model")
        self.special_token = "<cls>" in self.token_dict and "<eos>" in self.token_dict
        self.model_input_size = int(config.max_position_embeddings)
        self.vocab = GeneVocab(_symbol_names(self.token_dict))
        self._ensembl_by_id = {v: k for k, v in self.token_dict.items()}
        H, eps = config.hidden_size, config.layer_norm_eps
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.embed_ln = nn.LayerNorm(H, eps=eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.hook_tok_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_embed = HookPoint()
        block_cfg = config.block_config()
        self.blocks = nn.ModuleList([ScGPTBlock(block_cfg) for _ in range(config.num_hidden_layers)])
        # MLM head (BertOnlyMLMHead): dense -> ReLU -> LayerNorm -> decoder tied to the token embedding (+ bias)
        self.mlm_dense = nn.Linear(H, H)
        self.mlm_ln = nn.LayerNorm(H, eps=eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.setup_hooks()

    # ------------------------------------------------------------------ forward
    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, *, stop_at_layer: int | None = None) -> torch.Tensor:
        """Hidden states [B, S, D] after the last layer, or the input of layer ``stop_at_layer``
        (= HF ``hidden_states[stop_at_layer]``). ``values`` are ignored (rank-value inputs). Pad rows are undefined."""
        S = gene_ids.shape[1]
        if S > self.config.max_position_embeddings:
            raise InputError(f"{S} tokens exceed the model's {self.config.max_position_embeddings} positions")
        pos = torch.arange(S, device=gene_ids.device)
        x = (self.hook_tok_embed(self.word_embeddings(gene_ids)) + self.hook_pos_embed(self.position_embeddings(pos))
             + self.token_type_embeddings.weight[0])
        x = self.hook_embed(self.embed_dropout(self.embed_ln(x)))
        return self.run_blocks(x, padding_mask, stop_at_layer)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-gene logits [B, S, vocab_size] from the last hidden states (HF ``BertOnlyMLMHead``)."""
        h = self.mlm_ln(torch.relu(self.mlm_dense(hidden)))
        return h @ self.word_embeddings.weight.T + self.mlm_bias

    def pooling_mask(self, batch: TokenBatch) -> torch.Tensor:
        """Pads and the special tokens (``<cls>``, ``<eos>``): EmbExtractor's mean is over gene tokens only."""
        mask = batch.padding_mask.clone()
        for t in ("<cls>", "<eos>"):
            if t in self.token_dict:
                mask |= batch.gene_ids == self.token_dict[t]
        return mask

    def cell_embeddings(self, batch: TokenBatch, *, mode: Literal["auto", "cell", "cls"] = "auto", emb_layer: int = -1,
                        normalize: bool = False, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Cell embeddings [N, D] by the official ``EmbExtractor`` rules.

        ``emb_layer`` -1 (default) = the second-to-last layer's output, 0 = the last layer's. ``mode`` "auto" is
        "cls" for models with ``<cls>`` (V2) and "cell" (mean over gene tokens, specials excluded) otherwise.
        """
        if not -self.n_layers <= emb_layer <= 0:
            raise InputError(f"emb_layer must lie in {-self.n_layers}..0, got {emb_layer}")
        mode = ("cls" if self.special_token else "cell") if mode == "auto" else mode
        if mode not in ("cell", "cls"):
            raise InputError(f"mode must be 'auto', 'cell' or 'cls', got {mode!r}")
        if mode == "cls" and not self.special_token:
            raise InputError("mode='cls' needs a model whose dictionary has <cls> (Geneformer V2); V1 uses 'cell'")
        stop = self.n_layers + emb_layer
        return super().cell_embeddings(batch, mode="cls" if mode == "cls" else "avg", normalize=normalize,
                                       batch_size=batch_size, progress=progress,
                                       stop_at_layer=stop if stop < self.n_layers else None)

    def n_parameters(self, backbone_only: bool = False) -> int:
        mods = ([self.word_embeddings, self.position_embeddings, self.token_type_embeddings, self.embed_ln, self.blocks]
                if backbone_only else [self])
        return sum(p.numel() for m in mods for p in m.parameters())

    # ------------------------------------------------------------------ tokenisation
    def tokenize(self, X, genes, n_counts: np.ndarray | None = None) -> TokenBatch:
        """Rank-value encode raw counts ``X`` (cells x ``genes``; Ensembl ids or HGNC symbols) as the official tokenizer.

        ``n_counts`` is each cell's total count over ALL its genes (the official ``obs['n_counts']``); when None it
        is the row sums of ``X``, which is right only when ``X`` holds every measured gene.
        """
        cols, ens = self._columns(genes)
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
        n = X.shape[0]
        if n_counts is None:
            n_counts = np.asarray(X.sum(1)).ravel()
        n_counts = np.asarray(n_counts, dtype=np.float64).ravel()
        if len(n_counts) != n:
            raise InputError(f"n_counts has {len(n_counts)} values for {n} cells")
        if (n_counts <= 0).any():
            raise InputError(f"{int((n_counts <= 0).sum())} cells have n_counts <= 0; remove empty cells first "
                             "(e.g. scanpy.pp.filter_cells(adata, min_counts=1))")
        # duplicate Ensembl ids are summed (the official collapse), in order of first appearance
        uniq, first, inverse = np.unique(ens, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank_of = np.empty_like(order)
        rank_of[order] = np.arange(len(order))
        agg = sp.csr_matrix((np.ones(len(cols)), (np.arange(len(cols)), rank_of[inverse])), shape=(len(cols), len(uniq)))
        Xg = (X[:, cols] @ agg).tocsr() if len(uniq) < len(cols) else X[:, cols].tocsr()
        ens_u = uniq[order]
        tokens = np.array([self.token_dict[e] for e in ens_u], dtype=np.int64)
        medians = np.array([self.gene_median[e] for e in ens_u], dtype=np.float64)
        # x / n_counts * 10,000 / median, in the official order of operations (so exact ties stay exact)
        Xn = sp.csr_matrix(Xg, dtype=np.float64, copy=True)
        rows = np.repeat(np.arange(n), np.diff(Xn.indptr))
        Xn.data = Xn.data / n_counts[rows] * TARGET_SUM / medians[Xn.indices]
        Xn.eliminate_zeros()
        limit = self.model_input_size - (2 if self.special_token else 0)
        seqs, vals, empty = [], [], 0
        for i in range(n):
            lo, hi = Xn.indptr[i], Xn.indptr[i + 1]
            data, idx = Xn.data[lo:hi], Xn.indices[lo:hi]
            if len(data) == 0:
                empty += 1
            rank = np.argsort(-data)[:limit]
            t, v = tokens[idx[rank]], data[rank]
            if self.special_token:
                t = np.concatenate([[self.token_dict["<cls>"]], t, [self.token_dict["<eos>"]]])
                v = np.concatenate([[0.0], v, [0.0]])
            seqs.append(t)
            vals.append(v)
        if empty:
            raise InputError(f"{empty} cells express none of the model's {len(ens_u)} genes present in the data; "
                             "remove them first (the official tokenizer drops them)")
        S = max(len(t) for t in seqs)
        pad_id = self.config.pad_token_id
        ids = np.full((n, S), pad_id, dtype=np.int64)
        values = np.zeros((n, S), dtype=np.float32)
        mask = np.ones((n, S), dtype=bool)
        for i, (t, v) in enumerate(zip(seqs, vals)):
            ids[i, : len(t)], values[i, : len(t)], mask[i, : len(t)] = t, v, False
        return TokenBatch(torch.from_numpy(ids), torch.from_numpy(values), torch.from_numpy(mask))

    def _columns(self, genes) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the columns the tokenizer keeps and their Ensembl ids (upper case, version dropped)."""
        genes = [str(g) for g in genes]
        n_ens = sum(bool(ENSEMBL_RE.match(g)) for g in genes)
        if n_ens >= 0.95 * len(genes):
            ens = [g.upper().split(".")[0] for g in genes]
        else:
            by_symbol = {name: self._ensembl_of(name) for name in set(genes)}
            ens = [by_symbol[g] or "" for g in genes]
        keep = [i for i, e in enumerate(ens) if e in self.gene_median and e in self.token_dict]
        if not keep:
            raise InputError(f"none of the {len(genes)} genes is a token of this Geneformer model (first genes: "
                             f"{genes[:5]}); it needs Ensembl ids or HGNC symbols")
        return np.asarray(keep), np.asarray([ens[i] for i in keep])

    def _ensembl_of(self, name: str) -> str | None:
        if name in self.gene_name_id:
            return self.gene_name_id[name]
        tid = self.vocab.stoi.get(name)
        return self._ensembl_by_id.get(tid) if tid is not None else None


def _symbol_names(token_dict: Mapping[str, int]) -> dict[str, int]:
    """Token name -> id with gene tokens named by HGNC symbol (sclens' table) where one exists and is not taken."""
    from ..data import ensembl_to_symbol

    table = ensembl_to_symbol()
    out: dict[str, int] = {}
    for ens, tid in sorted(token_dict.items(), key=lambda kv: kv[1]):
        sym = table.get(ens)
        out[sym if sym and sym not in out and sym not in token_dict else ens] = tid
    return out


# ------------------------------------------------------------------------------------------ I/O
_SKIP = ("bert.embeddings.position_ids", "bert.pooler.", "cls.seq_relationship.")


def _key_map(n_layers: int) -> dict[str, str]:
    """HF ``BertForMaskedLM`` key -> this module's key, for every tensor but q / k / v (fused here)."""
    m = {
        "bert.embeddings.word_embeddings.weight": "word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight": "position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
        "bert.embeddings.LayerNorm.weight": "embed_ln.weight", "bert.embeddings.LayerNorm.bias": "embed_ln.bias",
        "cls.predictions.transform.dense.weight": "mlm_dense.weight",
        "cls.predictions.transform.dense.bias": "mlm_dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "mlm_ln.weight",
        "cls.predictions.transform.LayerNorm.bias": "mlm_ln.bias", "cls.predictions.bias": "mlm_bias",
    }
    for l in range(n_layers):
        for hf, ours in (("attention.output.dense", "attn.out_proj"), ("attention.output.LayerNorm", "ln1"),
                         ("intermediate.dense", "mlp.linear1"), ("output.dense", "mlp.linear2"),
                         ("output.LayerNorm", "ln2")):
            for t in ("weight", "bias"):
                m[f"bert.encoder.layer.{l}.{hf}.{t}"] = f"blocks.{l}.{ours}.{t}"
    return m


def _hf_to_sclens(state: dict[str, torch.Tensor], n_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF ``BertForMaskedLM`` keys -> this module's (q, k, v fused head-major); returns the mapped dict and unknowns."""
    state = {(k if k.startswith(("bert.", "cls.")) else f"bert.{k}"): v for k, v in state.items()}
    out, used = {}, set()
    for l in range(n_layers):
        p = f"bert.encoder.layer.{l}."
        for t in ("weight", "bias"):
            parts = [f"{p}attention.self.{n}.{t}" for n in ("query", "key", "value")]
            if all(k in state for k in parts):
                out[f"blocks.{l}.attn.in_proj_{t}"] = torch.cat([state[k] for k in parts])
                used.update(parts)
    simple = _key_map(n_layers)
    for hf, ours in simple.items():
        if hf in state:
            out[ours] = state[hf]
            used.add(hf)
    # the decoder is tied to the token embedding; its bias is cls.predictions.bias again
    for k in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        used.add(k)
    unknown = [k for k in state if k not in used and not k.startswith(_SKIP)]
    return out, unknown


def load_geneformer(model_dir: str | Path, *, token_dictionary: str | Path | None = None,
                    gene_median: str | Path | None = None, gene_name_id: str | Path | None = None,
                    device: str = "cpu") -> HookedGeneformer:
    """Load an official Geneformer folder into a :class:`HookedGeneformer` (eval mode).

    Parameters
    ----------
    model_dir
        Folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
    token_dictionary, gene_median, gene_name_id
        The tokenizer's dictionaries (``.pkl`` as shipped, read without running code, or ``.json``); by default
        the first ``token_dictionary*``, ``gene_median_dictionary*`` and ``gene_name_id_dict*`` file in
        ``model_dir``. ``gene_name_id`` (symbol -> Ensembl) is optional: it lets data indexed by symbols be tokenised
        as the official tokenizer would after mapping.
    """
    from .io import read_state_dict

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a Geneformer (HF BERT) folder")
    config = GeneformerConfig.from_json(model_dir / "config.json")
    weights = next((model_dir / f for f in ("model.safetensors", "pytorch_model.bin") if (model_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin "
                              f"(found {sorted(p.name for p in model_dir.iterdir())})")
    dicts = {}
    for key, given, stem in (("token", token_dictionary, "token_dictionary"),
                             ("median", gene_median, "gene_median_dictionary"),
                             ("name", gene_name_id, "gene_name_id_dict")):
        path = Path(given) if given is not None else _find_file(model_dir, stem)
        if path is None and key != "name":
            raise CheckpointError(f"Geneformer needs its {stem} file: pass {stem.split('_dict')[0]}=PATH or put "
                                  f"{stem}*.pkl in {model_dir} (the official files ship in the geneformer package)")
        dicts[key] = read_dictionary(path) if path is not None else None
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{weights} could not be read as safetensors ({exc})") from None
    else:
        raw = read_state_dict(weights)
    state, unknown = _hf_to_sclens(raw, config.num_hidden_layers)
    model = HookedGeneformer(config, dicts["token"], dicts["median"], dicts["name"])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(("mlm_",))]
    if missing:
        raise CheckpointError(f"{weights} lacks encoder tensors {preview(missing)}; the file is incomplete or "
                              "config.json does not match it")
    bad = [f"{k}: file {tuple(v.shape)} vs config {tuple(expected[k].shape)}" for k, v in state.items()
           if k in expected and v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"tensor shapes do not match config.json: {preview(bad, 4)}")
    if unknown:
        warnings.warn(f"ignoring {len(unknown)} unrecognised tensors: {preview(unknown)}", stacklevel=2)
    if any(k.startswith("mlm_") and k not in state for k in expected):
        warnings.warn("the checkpoint has no MLM head; it stays random (the encoder is unaffected)", stacklevel=2)
    model.load_state_dict(state, strict=False)
    model.source = str(model_dir)
    model.checkpoint_sha256 = file_sha256(weights)
    return model.to(device).eval()


def save_geneformer(model: HookedGeneformer, model_dir: str | Path) -> Path:
    """Write ``model`` as an HF ``BertForMaskedLM`` folder: ``config.json``, ``model.safetensors`` and the two
    dictionaries as JSON (``token_dictionary.json``, ``gene_median_dictionary.json``); each file atomically."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    ours = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf: dict[str, torch.Tensor] = {}
    for l in range(model.n_layers):
        p = f"bert.encoder.layer.{l}."
        for t in ("weight", "bias"):
            q, k, v = ours.pop(f"blocks.{l}.attn.in_proj_{t}").chunk(3)
            hf.update({f"{p}attention.self.query.{t}": q.contiguous(), f"{p}attention.self.key.{t}": k.contiguous(),
                       f"{p}attention.self.value.{t}": v.contiguous()})
    inverse = {ours_key: hf_key for hf_key, ours_key in _key_map(model.n_layers).items()}
    for k, v in ours.items():
        hf[inverse[k]] = v
    hf["cls.predictions.decoder.bias"] = hf["cls.predictions.bias"].clone()
    atomic_write(model_dir / "model.safetensors", lambda p: save_file(hf, p, metadata={"format": "pt"}))
    write_json(model_dir / "config.json", model.config.to_dict())
    write_json(model_dir / "token_dictionary.json", model.token_dict)
    write_json(model_dir / "gene_median_dictionary.json", model.gene_median)
    return model_dir
