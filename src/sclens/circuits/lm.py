"""Cell-sentence language models (cell2sentence style) as hooked HF GPT-NeoX models.

A cell becomes the upper-cased symbols of its top-k expressed genes, in descending order of expression
(ties broken at random with a seed, as ``cell2sentence.utils.generate_sentences`` does). sclens' own models
use a gene-level vocabulary: one token per gene, and one per cell type, so a training sequence is
``<bos> g1 ... gk <celltype> LABEL <eos>`` and the task "predict the cell type after the sentence" is the
next-token prediction at the ``<celltype>`` position. The network is an ``transformers.GPTNeoXForCausalLM``
(Pythia-style: parallel residual, partial rotary), saved with ``save_pretrained`` (``config.json`` +
``model.safetensors``) plus ``sclens_vocab.json``.

:class:`HookedCellLM` runs the same weights through an explicit forward pass with TransformerLens hook
points (checked against the HF logits in the tests), which the transcoders and attribution use:

``hook_embed``                       [B, S, D]       token embedding
``blocks.l.hook_resid_pre``          [B, S, D]       input of layer l (read by both attention and MLP)
``blocks.l.ln1.hook_scale``          [B, S, 1]       sqrt(var + eps) of input_layernorm
``blocks.l.ln1.hook_normalized``     [B, S, D]       input_layernorm output (affine applied) = attention input
``blocks.l.attn.hook_q/k/v``         [B, S, H, dh]   after rotary (q, k)
``blocks.l.attn.hook_pattern``       [B, H, S, S]    softmax over keys (causal, padding masked)
``blocks.l.attn.hook_z``             [B, S, H, dh]   pattern @ V
``blocks.l.attn.hook_result``        [B, S, H, D]    per-head output z_h W_O[h] (only when hooked)
``blocks.l.hook_attn_out``           [B, S, D]       sum of results + dense bias
``blocks.l.ln2.hook_scale``          [B, S, 1]       sqrt(var + eps) of post_attention_layernorm
``blocks.l.ln2.hook_normalized``     [B, S, D]       post_attention_layernorm output = the MLP input
``blocks.l.mlp.hook_pre/hook_post``  [B, S, d_mlp]   dense_h_to_4h output / GELU output
``blocks.l.hook_mlp_out``            [B, S, D]       MLP output
``blocks.l.hook_resid_post``         [B, S, D]       resid_pre + attn_out + mlp_out (parallel residual)
``ln_final.hook_scale``              [B, S, 1]
``ln_final.hook_normalized``         [B, S, D]       final_layer_norm output (logits = this @ W_U^T)

``ln*.hook_normalized`` include the LayerNorm's affine part (TransformerLens' value with ``fold_ln``). GPT-NeoX
has no ``hook_resid_mid``: attention and MLP both read ``resid_pre``.

An official cell2sentence model directory (``config.json``, weights, a BPE tokenizer) loads through
:func:`load_cell_lm` as well; it is then prompted with the C2S cell-type template and the cell type is
read by scoring each candidate label's tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..models.hooks import ActivationCache, HookedRootModule, HookPoint, NamesFilter
from ..utils import write_json

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<celltype>")
VOCAB_FILE = "sclens_vocab.json"
C2S_PROMPT = ("The following is a list of {num_genes} gene names ordered by descending expression level in a "
              "{organism} cell. Your task is to give the cell type which this cell belongs to based on its gene "
              "expression.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these genes is:")


# ----------------------------------------------------------------------------------------------- sentences


def cell_sentences(adata, *, top_k: int = 64, seed: int = 0, layer: str | None = None,
                   var_key: str | None = None) -> list[list[str]]:
    """Each cell's top-``top_k`` expressed genes (upper-cased symbols), highest expression first.

    Ranking only needs each cell's ordering, so counts, normalised or log data give the same sentence. Ties
    are broken at random (one ``numpy`` generator seeded with ``seed``, cells in order), as cell2sentence
    does; cells with fewer expressed genes give shorter sentences.
    """
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    X = adata.layers[layer] if layer else adata.X
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = sp.csr_matrix(X)
    if X.nnz and np.nanmin(X.data) < 0:
        raise InputError("cell sentences rank expression values; negative values found (pass counts or log data)")
    names = adata.var[var_key].astype(str).to_numpy() if var_key else np.asarray(adata.var_names, dtype=str)
    names = np.char.upper(names.astype(str))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        cols, vals = X.indices[lo:hi], X.data[lo:hi]
        keep = vals > 0
        cols, vals = cols[keep], vals[keep]
        perm = rng.permutation(len(cols))
        cols, vals = cols[perm], vals[perm]
        order = np.argsort(-vals, kind="stable")[:top_k]
        out.append(names[cols[order]].tolist())
    return out


# ------------------------------------------------------------------------------------------------ vocabulary


@dataclass
class CellSentenceVocab:
    """Gene-level vocabulary of sclens cell-sentence models: specials, genes, then cell-type labels."""

    genes: list[str]
    labels: list[str]
    top_k: int = 64

    def __post_init__(self):
        self.tokens = list(SPECIAL_TOKENS) + list(self.genes) + [f"[{lab}]" for lab in self.labels]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise InputError("gene and label names must be unique")
        self.gene_offset = len(SPECIAL_TOKENS)
        self.label_offset = self.gene_offset + len(self.genes)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return 0

    def id(self, token: str) -> int:
        return self.index[token]

    @property
    def label_ids(self) -> list[int]:
        return list(range(self.label_offset, self.label_offset + len(self.labels)))

    def encode(self, sentence: Sequence[str], label: str | None = None) -> list[int]:
        """``<bos> genes... <celltype>`` (+ ``LABEL <eos>`` when a label is given); unknown genes -> ``<unk>``."""
        unk = self.index["<unk>"]
        ids = [self.index["<bos>"]] + [self.index.get(g, unk) for g in sentence[: self.top_k]]
        ids.append(self.index["<celltype>"])
        if label is not None:
            ids += [self.index[f"[{label}]"], self.index["<eos>"]]
        return ids

    def token_gene(self, token_id: int) -> str | None:
        """The gene a token id stands for (None for specials and labels)."""
        return self.genes[token_id - self.gene_offset] if self.gene_offset <= token_id < self.label_offset else None

    def to_dict(self) -> dict:
        return {"format": "sclens-cell-sentence-vocab", "version": 1, "top_k": self.top_k,
                "specials": list(SPECIAL_TOKENS), "genes": self.genes, "labels": self.labels}

    @classmethod
    def from_dict(cls, d: dict) -> "CellSentenceVocab":
        if d.get("format") != "sclens-cell-sentence-vocab":
            raise CheckpointError("not an sclens cell-sentence vocabulary file")
        if list(d.get("specials", [])) != list(SPECIAL_TOKENS):
            raise CheckpointError(f"unexpected special tokens {d.get('specials')}; expected {list(SPECIAL_TOKENS)}")
        return cls(genes=list(d["genes"]), labels=list(d["labels"]), top_k=int(d["top_k"]))

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], labels: Sequence[str], *, top_k: int,
              min_cells: int = 3) -> "CellSentenceVocab":
        """Genes that appear in at least ``min_cells`` sentences (sorted), and the sorted label set."""
        counts: dict[str, int] = {}
        for s in sentences:
            for g in set(s[:top_k]):
                counts[g] = counts.get(g, 0) + 1
        genes = sorted(g for g, c in counts.items() if c >= min_cells)
        if not genes:
            raise InputError(f"no gene appears in {min_cells} or more cell sentences; lower min_cells")
        return cls(genes=genes, labels=sorted({str(x) for x in labels}), top_k=top_k)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and attention mask (1 = token)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class CellLMConfig:
    """Architecture and training settings of an sclens cell-sentence model (one dataclass, saved with it)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    rotary_pct: float = 0.25
    top_k: int = 100
    min_cells: int = 3
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_weight: float = 4.0  # weight of the cell-type token in the loss (next-gene tokens weigh 1)
    val_fraction: float = 0.2
    eval_every: int = 250
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"  # where training runs (auto, cpu, cuda, cuda:N); the model is returned and saved on the CPU

    def hf_config(self, vocab_size: int):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, intermediate_size=self.d_mlp, rotary_pct=self.rotary_pct,
            max_position_embeddings=self.top_k + 4, use_parallel_residual=True, hidden_act="gelu",
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            attention_dropout=0.0, hidden_dropout=0.0,
        )


class _HookedLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())
        return self.hook_normalized(x / scale * ln.weight + ln.bias)


class _HookedAttn(nn.Module):
    def __init__(self):
        super().__init__()
        for n in ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, n, HookPoint())


class _HookedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()


class _HookedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = _HookedLN(), _HookedLN()
        self.attn, self.mlp = _HookedAttn(), _HookedMLP()
        for n in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"):
            setattr(self, n, HookPoint())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HookedCellLM(HookedRootModule):
    """A GPT-NeoX causal LM (HF weights) with an explicit, hooked forward pass.

    ``vocab`` is set for sclens' gene-level models; ``tokenizer`` (an HF tokenizer) for official C2S models.
    """

    def __init__(self, hf_model, vocab: CellSentenceVocab | None = None, tokenizer=None, source: str | None = None):
        super().__init__()
        self.hf = hf_model.eval()
        self.vocab, self.tokenizer, self.source = vocab, tokenizer, source
        c = hf_model.config
        self.cfg = c
        self.n_layers, self.n_heads, self.d_model = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
        self.d_head = self.d_model // self.n_heads
        rope = getattr(c, "rope_parameters", None) or {}
        pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
        self.rot_dims = int(self.d_head * pct)
        base = rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000.0))
        if rope.get("rope_type", "default") not in ("default", None):
            raise CheckpointError(f"rope type {rope.get('rope_type')!r} is not supported by the hooked forward "
                                  "(only the default rotary embedding)")
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, self.rot_dims, 2).float() / self.rot_dims)),
                             persistent=False)
        if not c.use_parallel_residual:
            raise CheckpointError("only parallel-residual GPT-NeoX models (Pythia / cell2sentence) are supported")
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([_HookedBlock() for _ in range(self.n_layers)])
        self.ln_final = _HookedLN()
        self.setup_hooks()

    # weights as views into the HF modules (no copies: edits to hf show up here)
    def layer(self, l: int):
        return self.hf.gpt_neox.layers[l]

    @property
    def W_E(self) -> torch.Tensor:
        return self.hf.gpt_neox.embed_in.weight

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def W_U(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    def W_O(self, l: int) -> torch.Tensor:
        """[H, dh, D]: head h's output map."""
        W = self.layer(l).attention.dense.weight  # [D, H*dh]
        return W.T.reshape(self.n_heads, self.d_head, self.d_model)

    def W_V(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([H, D, dh], [H, dh]): value weights and bias per head (rows of query_key_value are (head, qkv, dh))."""
        qkv = self.layer(l).attention.query_key_value
        W = qkv.weight.reshape(self.n_heads, 3, self.d_head, self.d_model)[:, 2]  # [H, dh, D]
        b = qkv.bias.reshape(self.n_heads, 3, self.d_head)[:, 2]
        return W.transpose(1, 2), b

    def _rotary(self, x: torch.Tensor, S: int) -> torch.Tensor:
        if self.rot_dims == 0:
            return x
        pos = torch.arange(S, dtype=self.inv_freq.dtype, device=x.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        r, p = x[..., : self.rot_dims], x[..., self.rot_dims:]
        return torch.cat((r * cos + _rotate_half(r) * sin, p), dim=-1)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] for right-padded ``ids`` (positions 0..S-1), on the model's device (inputs are moved there)."""
        ids = ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        B, S = ids.shape
        H, dh = self.n_heads, self.d_head
        x = self.hook_embed(self.W_E[ids])
        allowed = torch.tril(torch.ones(S, S, dtype=torch.bool, device=ids.device))[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        neg = torch.finfo(x.dtype).min
        for l, blk in enumerate(self.blocks):
            layer = self.layer(l)
            x = blk.hook_resid_pre(x)
            a_in = blk.ln1(x, layer.input_layernorm)
            qkv = layer.attention.query_key_value(a_in).view(B, S, H, 3 * dh)
            q, k, v = qkv[..., :dh], qkv[..., dh: 2 * dh], qkv[..., 2 * dh:]
            q, k = blk.attn.hook_q(self._rotary(q, S)), blk.attn.hook_k(self._rotary(k, S))
            v = blk.attn.hook_v(v)
            scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dh)
            scores = scores.masked_fill(~allowed, neg)
            pattern = blk.attn.hook_pattern(torch.softmax(scores, dim=-1))
            z = blk.attn.hook_z(torch.einsum("bhij,bjhd->bihd", pattern, v))
            dense = layer.attention.dense
            if blk.attn.hook_result.active:
                result = blk.attn.hook_result(torch.einsum("bihd,hdD->bihD", z, self.W_O(l)))
                attn_out = result.sum(2) + dense.bias
            else:
                attn_out = dense(z.reshape(B, S, H * dh))
            attn_out = blk.hook_attn_out(attn_out)
            m_in = blk.ln2(x, layer.post_attention_layernorm)
            pre = blk.mlp.hook_pre(layer.mlp.dense_h_to_4h(m_in))
            post = blk.mlp.hook_post(layer.mlp.act(pre))
            mlp_out = blk.hook_mlp_out(layer.mlp.dense_4h_to_h(post))
            x = blk.hook_resid_post(x + attn_out + mlp_out)
        x = self.ln_final(x, self.hf.gpt_neox.final_layer_norm)
        return x @ self.W_U.T

    def run_with_cache(self, ids, attention_mask=None, names: NamesFilter = None,
                       ) -> tuple[torch.Tensor, ActivationCache]:
        """Logits and the named activations, both on the CPU whatever the model's device."""
        store: dict[str, torch.Tensor] = {}

        def save(act, hook):
            store[hook.name] = act.detach().cpu()

        with torch.no_grad(), self.hooks([(n, save) for n in self.resolve_names(names)]):
            logits = self(ids, attention_mask)
        return logits.cpu(), ActivationCache(store)

    # -------------------------------------------------------------------------------------- cell-type task

    def encode_cells(self, sentences: Sequence[Sequence[str]], labels: Sequence[str] | None = None) -> list[list[int]]:
        if self.vocab is None:
            raise InputError("encode_cells needs an sclens gene-level model; official models are prompted "
                             "through predict_cell_types")
        labels = labels if labels is not None else [None] * len(sentences)
        return [self.vocab.encode(s, lab) for s, lab in zip(sentences, labels)]

    @torch.no_grad()
    def label_logits(self, sentences: Sequence[Sequence[str]], batch_size: int = 128) -> np.ndarray:
        """[n_cells, n_labels] logits of the cell-type tokens at the ``<celltype>`` position."""
        seqs = self.encode_cells(sentences)
        out = []
        lab = torch.as_tensor(self.vocab.label_ids)
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[i: i + batch_size])
            logits = self.hf(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            last = mask.sum(1) - 1
            out.append(logits[torch.arange(len(ids)), last.to(self.device)][:, lab.to(self.device)].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(lab)), np.float32)

    def predict_cell_types(self, sentences: Sequence[Sequence[str]], candidates: Sequence[str] | None = None,
                           *, organism: str = "Homo sapiens", batch_size: int = 64) -> list[str]:
        """The most likely cell type per cell.

        sclens models: argmax over the label tokens after ``<celltype>``. Official C2S models: the C2S
        cell-type prompt (template 0), each candidate scored by the summed log-probability of
        ``" {candidate}."``; ``candidates`` is required there.
        """
        if self.vocab is not None:
            L = self.label_logits(sentences, batch_size=batch_size)
            labels = self.vocab.labels
            if candidates is not None:
                keep = [labels.index(c) for c in candidates]
                return [candidates[j] for j in L[:, keep].argmax(1)]
            return [labels[j] for j in L.argmax(1)]
        if not candidates:
            raise InputError("an official cell2sentence model needs the candidate cell types (candidates=[...])")
        return [candidates[j] for j in self.score_prompt_candidates(sentences, candidates, organism=organism).argmax(1)]

    @torch.no_grad()
    def score_prompt_candidates(self, sentences, candidates, *, organism: str = "Homo sapiens") -> np.ndarray:
        """[n_cells, n_candidates] summed log-probabilities of each candidate answer after the C2S prompt."""
        tok = self.tokenizer
        scores = np.zeros((len(sentences), len(candidates)))
        for i, s in enumerate(sentences):
            prompt = C2S_PROMPT.format(num_genes=len(s), organism=organism, cell_sentence=" ".join(s))
            p_ids = tok(prompt)["input_ids"]
            for j, c in enumerate(candidates):
                c_ids = tok(" " + c + ".")["input_ids"]
                ids = torch.as_tensor([p_ids + c_ids], device=self.device)
                logp = torch.log_softmax(self.hf(input_ids=ids).logits[0, :-1].float(), -1)
                tgt = ids[0, 1:]
                scores[i, j] = logp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:].sum().item()
        return scores


# ------------------------------------------------------------------------------------------ load and save


def load_cell_lm(path: str | Path) -> HookedCellLM:
    """Load an sclens cell-sentence model or an official cell2sentence (HF GPT-NeoX) model directory.

    Local files only (``local_files_only``): nothing is downloaded.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model directory: config.json is missing")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    if cfg.get("model_type") != "gpt_neox":
        raise CheckpointError(f"{path} holds a {cfg.get('model_type')!r} model; cell-sentence models are gpt_neox")
    weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (path / p).is_file()]
    if not weights and not list(path.glob("model-*.safetensors")):
        raise CheckpointError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    vocab = tokenizer = None
    if (path / VOCAB_FILE).is_file():
        vocab = CellSentenceVocab.from_dict(json.loads((path / VOCAB_FILE).read_text()))
        if len(vocab) != hf.config.vocab_size:
            raise CheckpointError(f"{VOCAB_FILE} has {len(vocab)} tokens but the model {hf.config.vocab_size}")
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: no {VOCAB_FILE} and no usable tokenizer files ({exc})") from None
    return HookedCellLM(hf, vocab=vocab, tokenizer=tokenizer, source=str(path))


def save_cell_lm(model: HookedCellLM, out_dir: str | Path, extra: dict | None = None) -> Path:
    """``save_pretrained`` (config.json + model.safetensors) + the vocabulary, written into a temp dir then renamed."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the model folder is ordinary shared data
    try:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        if model.vocab is not None:
            write_json(tmp / VOCAB_FILE, model.vocab.to_dict())
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers create 0600 files
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def default_cell_lm_dir():
    from importlib.resources import files

    return files("sclens") / "_default_c2s"


def load_default_cell_lm() -> HookedCellLM:
    """The small cell-sentence model sclens trained on the FACS-sorted PBMC populations (shipped in the package)."""
    d = default_cell_lm_dir()
    if not (d / "config.json").is_file():
        raise CheckpointError(f"the embedded cell-sentence model is missing from {d}; rebuild it with "
                              "scripts/build_default_c2s.py")
    return load_cell_lm(str(d))


def resolve_cell_lm(model, device: str | None = None) -> HookedCellLM:
    """A loaded cell-sentence model, a model directory, or None (the embedded one); with ``device`` (auto, cpu,
    cuda, cuda:N; see :func:`sclens.models.api.resolve_device`) the model is placed there."""
    m = load_default_cell_lm() if model is None else model if isinstance(model, HookedCellLM) else load_cell_lm(model)
    if device is not None:
        from ..models.api import resolve_device

        m.to(resolve_device(device))
    return m
