"""Frozen gene-space operators, one per attention unit (layer, head), and featurisation ``x · A``.

Three kinds (DESIGN "Operators"); G = panel size, tokens = ``<cls>`` + every panel gene (zeros included):

* ``attn`` — the head's attention probabilities among the panel gene tokens, averaged over a reference
  set of cells; the ``<cls>`` column is dropped and each row renormalised, so row i is the distribution
  of what gene i attends to among the panel genes.
* ``qk``  — context-free: ``softmax((R_l W_Q + b_Q)(R_l W_K + b_K)^T / sqrt(d_h))`` where ``R_l`` [G, D] is
  each panel gene's mean residual vector at the input of layer l over the reference set (for l = 0 this
  is the gene + value embedding).
* ``ov``  — the value-output circuit read in gene space: ``R_l W_V W_O R_l^T``, scaled to unit spectral norm.

A cell's feature for unit (l, h) is ``x · A_lh`` (G-dim) with ``x`` the panel log1p vector. Derived
featurisations: block means over early / middle / late thirds of the layers, ``drift = [x(A_early − A_mid);
x(A_mid − A_late)]`` and weighted pools of top units. Operators are computed once and frozen; using them
needs no foundation model.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import anndata as ad
import numpy as np

from . import __version__
from .data import GenePanel, iter_chunks
from .errors import InputError
from .utils import array_sha256, atomic_write, write_json

KINDS = ("attn", "qk", "ov")
Kind = Literal["attn", "qk", "ov"]
FORMAT_VERSION = 1


@dataclass
class OperatorBank:
    """Operators of every unit of one kind: ``operators[l, h]`` is the G x G matrix of unit (l, h)."""

    kind: str
    operators: np.ndarray  # [L, H, G, G] float32
    panel: GenePanel
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"operator kind must be one of {KINDS}, got {self.kind!r}")
        if self.operators.ndim != 4 or self.operators.shape[2:] != (len(self.panel), len(self.panel)):
            raise InputError(f"operators must be [layers, heads, G, G] with G = {len(self.panel)}, got {self.operators.shape}")

    @property
    def n_layers(self) -> int:
        return self.operators.shape[0]

    @property
    def n_heads(self) -> int:
        return self.operators.shape[1]

    @property
    def units(self) -> list[tuple[int, int]]:
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def unit(self, layer: int, head: int) -> np.ndarray:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise InputError(f"unit ({layer}, {head}) outside {self.n_layers} layers x {self.n_heads} heads")
        return self.operators[layer, head]

    def block_bounds(self, n_blocks: int = 3) -> list[tuple[int, int]]:
        """Layer ranges [start, end) of the early / middle / late thirds (remainder goes to the early blocks)."""
        if self.n_layers < n_blocks:
            raise InputError(f"{self.n_layers} layers cannot be split into {n_blocks} blocks")
        edges = np.linspace(0, self.n_layers, n_blocks + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def block_means(self, n_blocks: int = 3) -> list[np.ndarray]:
        """Mean operator (over all heads) of each layer block."""
        return [self.operators[a:b].mean(axis=(0, 1)) for a, b in self.block_bounds(n_blocks)]

    def drift_operators(self) -> tuple[np.ndarray, np.ndarray]:
        early, mid, late = self.block_means(3)
        return early - mid, mid - late

    def pool(self, units: Sequence[tuple[int, int]], weights: Sequence[float] | None = None) -> np.ndarray:
        """Weighted mean of unit operators (weights default to equal; normalised to sum to 1)."""
        if not units:
            raise InputError("a pool needs at least one unit")
        w = np.ones(len(units)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(units) or (w < 0).any() or w.sum() <= 0:
            raise InputError("pool weights must be non-negative, one per unit, not all zero")
        w = w / w.sum()
        return sum(float(wi) * self.unit(l, h) for wi, (l, h) in zip(w, units)).astype(np.float32)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) and ``path.json`` (manifest); both atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        manifest = dict(self.manifest)
        manifest.update({"format": "sclens.OperatorBank", "format_version": FORMAT_VERSION, "kind": self.kind,
                         "shape": list(self.operators.shape), "panel": self.panel.to_dict()})
        atomic_write(path, lambda p: save_file({"operators": np.ascontiguousarray(self.operators, dtype=np.float32)}, p,
                                               metadata={"kind": self.kind, "format_version": str(FORMAT_VERSION)}))
        manifest["operators_sha256"] = array_sha256(self.operators)
        write_json(path.with_suffix(path.suffix + ".json"), manifest)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OperatorBank":
        from safetensors.numpy import load_file

        path = Path(path)
        mpath = path.with_suffix(path.suffix + ".json")
        if not path.is_file() or not mpath.is_file():
            raise InputError(f"an OperatorBank needs {path.name} and {mpath.name}; missing in {path.parent}")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"{path} was written by a newer sclens (format {manifest['format_version']}); upgrade sclens")
        ops = load_file(str(path))["operators"]
        if manifest.get("operators_sha256") and array_sha256(ops) != manifest["operators_sha256"]:
            raise InputError(f"{path} does not match the hash in its manifest: the file was changed or is corrupt")
        return cls(kind=manifest["kind"], operators=ops, panel=GenePanel.from_dict(manifest["panel"]), manifest=manifest)


PANEL_FILE = "panel.json"


def bank_file(kind: str) -> str:
    """File name of a kind's bank inside an operator folder."""
    return f"operators_{kind}.safetensors"


@dataclass
class OperatorFolder:
    """What ``sclens export-operators`` writes: the gene panel (``panel.json``) and one bank per operator kind
    (``operators_{kind}.safetensors`` + its ``.json`` manifest)."""

    panel: GenePanel
    banks: dict[str, OperatorBank]

    @staticmethod
    def kinds_in(folder: str | Path) -> list[str]:
        """The operator kinds saved in ``folder`` (sorted)."""
        return sorted(p.name[len("operators_"):-len(".safetensors")] for p in Path(folder).glob(bank_file("*")))

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.panel.save(out / PANEL_FILE)
        for kind, bank in self.banks.items():
            bank.save(out / bank_file(kind))
        return out

    @classmethod
    def load(cls, folder: str | Path, kinds: Sequence[str] | None = None) -> "OperatorFolder":
        """Reload the banks of ``kinds`` (default: every kind present); the panel comes from ``panel.json`` or,
        in folders without one, from the first bank."""
        folder = Path(folder)
        present = cls.kinds_in(folder)
        if not present:
            raise InputError(f"no {bank_file('<kind>')} in {folder}; run `sclens export-operators` first")
        missing = [k for k in (kinds or present) if k not in present]
        if missing:
            raise InputError(f"{folder / bank_file(missing[0])} not found; run `sclens export-operators` first "
                             f"(kinds present: {present})")
        banks = {k: OperatorBank.load(folder / bank_file(k)) for k in (kinds or present)}
        pf = folder / PANEL_FILE
        panel = GenePanel.load(pf) if pf.is_file() else next(iter(banks.values())).panel
        return cls(panel, banks)


def source_model(banks: dict, model: str | Path | None = None):
    """The checkpoint the operator banks were exported from (for their random-weights copies): ``model`` when given,
    else the one recorded in the banks' manifest; checked against the manifest's hash. Returns (model, manifest)."""
    from .models import default_model_dir, load_default_model, load_model

    manifest = next(iter(banks.values())).manifest
    recorded = manifest.get("model")
    if model is not None:
        m = load_model(model)
    elif recorded and Path(recorded).is_dir():
        m = load_model(recorded)
    elif recorded == str(default_model_dir()):
        m = load_default_model()
    else:
        raise InputError(f"the operators were exported from {recorded!r}, which is not a checkpoint folder here; pass "
                          "--model PATH for the random-weights controls, or --random-control 0 to skip them")
    want = manifest.get("model_sha256")
    if want and getattr(m, "checkpoint_sha256", None) != want:
        raise InputError(f"--model {getattr(m, 'source', model)} is not the checkpoint the operators were exported from "
                          f"(sha256 {str(getattr(m, 'checkpoint_sha256', None))[:12]}... vs {want[:12]}... in the manifest)")
    return m, manifest


# ------------------------------------------------------------------------------------------ export
def attention_entropy(model, cells: ad.AnnData, panel: GenePanel, *, seed: int = 0, batch_size: int = 8,
                      n_top: int = 8) -> dict:
    """Per head, how focused its mean attention among the panel genes is (scGPT panel mode over ``cells``).

    Returns ``entropy`` [layers, heads] (mean row entropy of the mean pattern among panel genes, ``<cls>`` dropped
    and rows renormalised, divided by log G: 1 = uniform), ``top_received_genes`` {"L{l}H{h}": the ``n_top``
    genes receiving the most attention on average}, the ``hooks`` cached and ``n_cells``."""
    from .models.api import tokenize_adata

    batch = tokenize_adata(cells, model, panel=panel, mode="all", seed=seed)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
    cache = model.run_with_cache(batch, names, batch_size=batch_size, reduce="sum")
    entropy = np.zeros((model.n_layers, model.n_heads))
    top_genes: dict[str, list[str]] = {}
    genes = np.array(panel.genes)
    for l in range(model.n_layers):
        A = (cache[names[l]] / len(batch)).numpy()[:, 1:, 1:]  # mean pattern among panel genes (drop <cls>)
        A = A / A.sum(-1, keepdims=True)
        entropy[l] = -(A * np.log(A + 1e-12)).sum(-1).mean(-1) / np.log(A.shape[-1])
        for h in range(model.n_heads):
            received = A[h].mean(0)  # how much attention each gene receives on average
            top_genes[f"L{l}H{h}"] = list(genes[np.argsort(-received)[:n_top]])
    return {"entropy": entropy, "top_received_genes": top_genes, "hooks": names, "n_cells": len(batch)}


def _reference_batch(model, adata: ad.AnnData, panel: GenePanel, n_ref_cells: int, seed: int, layer: str | None):
    """scGPT: every panel gene at a fixed position (panel mode). Rank-value models (Geneformer): each cell's own
    sentence over all its genes, so the panel genes sit where the cell's ranking puts them (or are absent)."""
    from .models.api import tokenize_adata

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, size=min(n_ref_cells, adata.n_obs), replace=False))
    ref = adata[idx]
    if getattr(ref, "isbacked", False):
        ref = ref.to_memory()
    if _rank_value(model):
        return tokenize_adata(ref, model, layer=layer, seed=seed), ref
    return tokenize_adata(ref, model, panel=panel, mode="all", layer=layer, seed=seed), ref


def _rank_value(model) -> bool:
    return getattr(model, "family", "scgpt") == "geneformer"


def _gene_indexed_means(model, batch, token_ids: np.ndarray, resid: list[str], patterns: list[str], *,
                        batch_size: int, progress: bool, stop_at_layer: int | None):
    """Per panel gene, the mean of each ``resid`` activation over the tokens of that gene (cells where it is absent
    do not count), and per gene pair the mean of each attention ``pattern`` over the cells holding both: one
    :meth:`run_with_cache` pass whose reduction scatters every mini-batch onto the panel genes.

    Returns ``(R, P, counts)``: ``R[name]`` [G, D], ``P[name]`` [H, G, G] (NaN-free: pairs never seen are 0) and
    the number of reference cells holding each gene [G]."""
    import torch

    G = len(token_ids)
    lookup = torch.full((int(max(token_ids.max(), batch.gene_ids.max())) + 1,), -1, dtype=torch.long)
    lookup[torch.as_tensor(token_ids)] = torch.arange(G)

    def panel_positions(b):
        gi = lookup[b.gene_ids.cpu()]
        return gi, (gi >= 0) & ~b.padding_mask.cpu()

    def scatter(name, act, b):
        gi, valid = panel_positions(b)
        a = act.cpu().double()
        if name in resid:  # [B, S, D] -> [G, D]
            return torch.zeros(G, a.shape[-1], dtype=torch.float64).index_add_(0, gi[valid], a[valid])
        out = torch.zeros(a.shape[1], G, G, dtype=torch.float64)  # [B, H, S, S] -> [H, G, G]
        for i in range(len(a)):
            pos = torch.nonzero(valid[i]).ravel()
            g = gi[i, pos]
            out[:, g[:, None], g[None, :]] += a[i][:, pos][:, :, pos]
        return out

    cache = model.run_with_cache(batch, resid + patterns, batch_size=batch_size, progress=progress, reduce=scatter,
                                 stop_at_layer=stop_at_layer)
    gi, valid = panel_positions(batch)  # the counts follow from the tokens alone
    counts = torch.zeros(G, dtype=torch.float64).index_add_(0, gi[valid], torch.ones(int(valid.sum()),
                                                                                      dtype=torch.float64))
    R = {n: cache[n] / counts.clamp(min=1)[:, None] for n in resid}
    P = {}
    if patterns:
        pair = torch.zeros(G, G, dtype=torch.float64)
        for i in range(len(batch)):
            g = gi[i][valid[i]]
            pair[g[:, None], g[None, :]] += 1
        P = {n: cache[n] / pair.clamp(min=1) for n in patterns}
    return R, P, counts


def low_rank_spectral_norm(left, right):
    """``‖left @ right‖₂`` through the small factors: with ``left = Q_a R_a`` and ``rightᵀ = Q_b R_b`` (thin QR),
    ``left @ right = Q_a (R_a R_bᵀ) Q_bᵀ``, so its largest singular value is that of the d_head x d_head core
    (exact; a G x G SVD per head was ~40 % of the export time of a whole-human-sized model)."""
    import torch

    ra = torch.linalg.qr(left, mode="r")[1]
    rb = torch.linalg.qr(right.T, mode="r")[1]
    return torch.linalg.matrix_norm(ra @ rb.T, ord=2)


def export_operators(
    model, adata: ad.AnnData, panel: GenePanel, kinds: Iterable[Kind] = KINDS, *, n_ref_cells: int = 256,
    seed: int = 0, batch_size: int = 8, layer: str | None = None, progress: bool = True,
) -> dict[str, OperatorBank]:
    """Compute the frozen G x G operator of every unit for each requested kind.

    One pass over ``n_ref_cells`` reference cells (sampled with ``seed``) in panel mode collects the mean
    attention patterns (for ``attn``) and each gene token's mean residual at every layer input (for ``qk``
    and ``ov``).

    Parameters
    ----------
    model
        A loaded model of either family (:func:`sclens.load_model`).
    adata, panel
        Reference cells (labels are not used) and the gene panel (:func:`sclens.select_panel`).
    kinds
        Any of ``attn``, ``qk``, ``ov``.
    n_ref_cells, seed, batch_size, layer
        Reference cells sampled (seeded), forward-pass batch, the layer of ``adata`` to read.

    Returns
    -------
    ``{kind: OperatorBank}``: per kind an array [layers, heads, G, G] with its panel and manifest (save them
    together with :class:`OperatorFolder`).

    Rank-value models (Geneformer) have no panel positions: each reference cell is read as its own sentence (all
    its genes, ranked), a panel gene's residual is averaged over the cells whose sentence holds it, and ``attn`` is
    the mean pattern among panel genes over the cells holding both (rows renormalised over the panel). Genes held
    by no reference cell get zero rows and columns, a warning and a list in the manifest
    (``genes_absent_from_reference``, with ``reference_cells_per_gene``). The data may be raw counts,
    ``normalize_total`` output or its ``log1p``: the ranks, and so the operators, are the same.
    """
    import torch  # only export needs it: featurising and applying frozen operators must not load torch

    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InputError(f"unknown operator kind(s) {bad}; choose from {KINDS}")
    missing = [g for g in panel.genes if g not in model.vocab]
    if missing:
        raise InputError(f"{len(missing)} panel genes are not model tokens (e.g. {missing[:5]}); choose the panel "
                         "with the model vocabulary (sclens.data.select_panel(adata, model.vocab.genes))")
    t0 = time.perf_counter()
    batch, ref = _reference_batch(model, adata, panel, n_ref_cells, seed, layer)
    L, H, G = model.n_layers, model.n_heads, len(panel)
    # qk / ov need only each layer's input; the last one is the output of the block before it (post-LN blocks),
    # so the last block runs only when its attention pattern is wanted
    early_stop = "attn" not in kinds and L >= 2
    resid = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    if early_stop:
        resid[-1] = f"blocks.{L - 2}.hook_normalized_resid_post"
    names = resid + ([f"blocks.{l}.attn.hook_pattern" for l in range(L)] if "attn" in kinds else [])
    n = len(batch)
    base_manifest = {
        "model": getattr(model, "source", "in-memory"), "model_sha256": getattr(model, "checkpoint_sha256", None),
        "model_family": getattr(model, "family", "scgpt"),
        "n_layers": L, "n_heads": H, "n_reference_cells": n, "seed": seed,
        "reference_set_sha256": array_sha256(batch.gene_ids.numpy(), batch.values.numpy()),
        "reference_cells": list(map(str, ref.obs_names[:10000])), "sclens_version": __version__,
    }
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in range(L)] if "attn" in kinds else []
    if _rank_value(model):
        # rank-value sentences: average each panel gene over the reference cells whose sentence holds it
        Rm, Pm, held = _gene_indexed_means(model, batch, model.vocab.lookup(panel.genes), resid, patterns,
                                           batch_size=batch_size, progress=progress,
                                           stop_at_layer=L - 1 if early_stop else None)
        R = [Rm[name] for name in resid]
        pattern_of = {l: Pm[f"blocks.{l}.attn.hook_pattern"] for l in range(L)} if patterns else {}
        absent = [g for g, c in zip(panel.genes, held.tolist()) if c == 0]
        base_manifest.update({"reference_cells_per_gene": [int(c) for c in held.tolist()],
                              "genes_absent_from_reference": absent})
        if absent:
            warnings.warn(f"{len(absent)} of {G} panel genes occur in none of the {n} reference cells' sentences "
                          f"({absent[:5]}...): their operator rows and columns are 0; use more reference cells or a "
                          "panel of expressed genes", UserWarning, stacklevel=2)
    else:
        cache = model.run_with_cache(batch, names, batch_size=batch_size, reduce="sum", progress=progress,
                                     stop_at_layer=L - 1 if early_stop else None)
        R = [cache[name][1:].double() / n for name in resid]  # [G, D] per layer
        # [H, G, G] per layer, <cls> dropped
        pattern_of = {l: cache[f"blocks.{l}.attn.hook_pattern"].double()[:, 1:, 1:] / n for l in range(L)} \
            if patterns else {}
    banks: dict[str, OperatorBank] = {}
    for kind in kinds:
        ops = np.empty((L, H, G, G), dtype=np.float32)
        for l in range(L):
            if kind == "attn":
                P = pattern_of[l]
                ops[l] = (P / P.sum(-1, keepdim=True).clamp(min=1e-30)).numpy()
                continue
            for h in range(H):
                w = {k: v.detach().cpu().double() for k, v in model.head_weights(l, h).items()}
                if kind == "qk":
                    q = R[l] @ w["W_Q"] + w["b_Q"]
                    k = R[l] @ w["W_K"] + w["b_K"]
                    ops[l, h] = torch.softmax(q @ k.T / math.sqrt(q.shape[1]), dim=-1).numpy()
                else:
                    left, right = R[l] @ w["W_V"], w["W_O"] @ R[l].T  # [G, d_head], [d_head, G]
                    ops[l, h] = (left @ right / low_rank_spectral_norm(left, right).clamp(min=1e-30)).numpy()
        banks[kind] = OperatorBank(kind, ops, panel, {**base_manifest, "kind": kind,
                                                     "export_seconds": time.perf_counter() - t0})
    return banks


def export_random_controls(
    model, adata: ad.AnnData, panel: GenePanel, kinds: Iterable[Kind] = KINDS, *, n_copies: int = 3,
    first_seed: int = 0, keep_embeddings: bool = True, n_ref_cells: int = 256, seed: int = 0, batch_size: int = 8,
    layer: str | None = None, progress: bool = True,
) -> list[dict[str, OperatorBank]]:
    """Operator banks of ``n_copies`` random-weights copies of ``model`` (:func:`sclens.models.controls.randomize`,
    seeds ``first_seed``, ``first_seed + 1``, ...), exported exactly as :func:`export_operators` exports the model's
    own (same panel, same reference cells for the same ``seed`` and ``n_ref_cells``). Each bank's manifest records
    the copy's recipe under ``random_control``."""
    from tqdm.auto import tqdm

    from .models.controls import randomize

    if n_copies < 0:
        raise InputError(f"the number of random-weights copies must be >= 0, got {n_copies}")
    out = []
    for i in tqdm(range(n_copies), desc="random-weights controls", unit="copy", disable=not progress or n_copies == 0):
        rnd = randomize(model, first_seed + i, keep_embeddings=keep_embeddings)
        banks = export_operators(rnd, adata, panel, kinds, n_ref_cells=n_ref_cells, seed=seed, batch_size=batch_size,
                                 layer=layer, progress=False)
        recipe = {k: v for k, v in rnd.random_control.items() if k != "redrawn_tensors"}
        for b in banks.values():
            b.manifest["random_control"] = recipe
        out.append(banks)
    return out


# ------------------------------------------------------------------------------------------ featurise
def featurize(x: np.ndarray, A: np.ndarray, chunk_size: int = 50_000) -> np.ndarray:
    """``x · A`` for a matrix of cells [n, G] (chunked so memory stays bounded)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] != A.shape[0]:
        raise InputError(f"cells have {x.shape[1]} panel genes but the operator is {A.shape[0]} x {A.shape[1]}")
    return np.concatenate([x[s : s + chunk_size] @ A for s in range(0, len(x), chunk_size)]) if len(x) else x @ A


def featurize_drift(x: np.ndarray, bank: OperatorBank) -> np.ndarray:
    d1, d2 = bank.drift_operators()
    return np.concatenate([featurize(x, d1), featurize(x, d2)], axis=1)


def featurize_adata(adata: ad.AnnData, panel: GenePanel, A: np.ndarray, *, layer: str | None = None,
                    chunk_size: int = 10_000) -> np.ndarray:
    """Stream an (optionally backed) AnnData through panel normalisation and ``x · A`` chunk by chunk."""
    idx = panel.column_index(adata.var_names)
    return np.concatenate([featurize(panel.transform(X, idx), A) for _, X in iter_chunks(adata, chunk_size, layer)])
