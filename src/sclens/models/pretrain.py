"""Pretrain an scGPT-architecture model with the masked-expression objective, writing the official layout.

Objective (as official scGPT pretraining): each cell becomes ``<cls>`` + a sample of its genes with
binned values; a fraction ``mask_ratio`` of the gene positions get the mask value (-1) as input, and the
model predicts their bins with the expression decoder (MSE on masked positions). With ``mvc=True`` the
cell-embedding objective (official "MVC"/GEPC) adds an MSE on the same positions, predicted from the
``<cls>`` embedding and each gene's query. Cells show their non-zero genes plus a share of zero genes
drawn from genes the cell's own dataset measured, so that panel-mode inputs (all panel genes, zeros
included) are in distribution.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import restores_torch_threads, write_json
from .config import ScGPTConfig
from .io import save_scgpt
from .scgpt import HookedScGPT
from .tokenize import TokenBatch, bin_values
from .vocab import GeneVocab


@dataclass
class PretrainConfig:
    """Training settings (SAELens-style: one dataclass, serialised next to the checkpoint)."""

    n_layers: int = 6
    n_heads: int = 8
    d_model: int = 128
    d_hid: int = 256
    dropout: float = 0.1
    max_seq_len: int = 1200  # written to args.json: tokens per cell at inference (incl. <cls>)
    train_seq_len: int = 256  # tokens per cell during training (incl. <cls>)
    zero_fraction: float = 0.3  # share of each training sequence given to zero-expression genes
    mask_ratio: float = 0.4
    mask_ratios: list[float] | None = None  # if set, each batch draws its masking ratio from these (e.g. [.25, .5, .75])
    mvc: bool = True
    mvc_scope: str = "masked"  # "masked" (official MVC) or "all": decode every gene of the sequence, zeros included,
    #                            from the cell embedding alone (GEPC over the whole input)
    mlm_weight: float = 1.0
    mvc_weight: float = 1.0
    contrastive_weight: float = 0.0  # InfoNCE between the <cls> embeddings of two random-mask views of each cell
    contrastive_temperature: float = 0.5
    contrastive_views: str = "mask"  # "mask": the second view re-masks the same tokens; "genes": it re-draws the
    #                                  cell's genes (another sample of its expressed and zero genes) and the mask, so
    #                                  the two views share no token list and <cls> cannot match them by gene identity
    source_batches: bool = False  # draw every batch from one training source (data set), so that the contrastive
    #                               negatives share the source and the source (depth, gene set, chemistry) cannot
    #                               tell the views apart: only what differs between the cells of one data set can
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_cells: int = 256
    seed: int = 0
    n_bins: int = 51
    device: str = "cpu"
    threads: int | None = None

    def check(self) -> None:
        if self.mvc_scope not in ("masked", "all"):
            raise InputError(f"mvc_scope must be 'masked' or 'all', got {self.mvc_scope!r}")
        if self.mvc_scope == "all" and not self.mvc:
            raise InputError("mvc_scope='all' decodes from the cell embedding: it needs mvc=True")
        ratios = self.mask_ratios if self.mask_ratios is not None else [self.mask_ratio]
        if not ratios or any(not 0 < r < 1 for r in ratios):
            raise InputError(f"masking ratios must lie in (0, 1), got {ratios}")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise InputError("contrastive_weight must be >= 0 and contrastive_temperature > 0")
        if self.contrastive_views not in ("mask", "genes"):
            raise InputError(f"contrastive_views must be 'mask' or 'genes', got {self.contrastive_views!r}")
        if self.train_seq_len < 8:
            raise InputError("train_seq_len must be at least 8 tokens")

    def model_config(self) -> ScGPTConfig:
        return ScGPTConfig(
            embsize=self.d_model, nheads=self.n_heads, d_hid=self.d_hid, nlayers=self.n_layers,
            dropout=self.dropout, n_bins=self.n_bins, max_seq_len=self.max_seq_len, MVC=self.mvc,
        )


def pretrain_config(family: str = "scgpt", config_file: str | Path | None = None, *, device: str | None = None,
                    **overrides):
    """The pretraining configuration of a model family: ``scgpt`` (:class:`PretrainConfig`) or ``geneformer``
    (:class:`~sclens.models.pretrain_geneformer.GeneformerPretrainConfig`), from a JSON/YAML file of its fields
    and ``overrides`` (``None`` values ignored; ``seq_len`` sets the training tokens per cell of either family).
    ``device`` (auto, cpu, cuda, cuda:N) overrides the file's and is resolved (a missing GPU is an error)."""
    import dataclasses

    import yaml

    from .api import resolve_device
    from .pretrain_geneformer import GeneformerPretrainConfig

    if family not in ("scgpt", "geneformer"):
        raise InputError(f"--family must be 'scgpt' or 'geneformer', got {family!r}")
    cls = PretrainConfig if family == "scgpt" else GeneformerPretrainConfig
    fields = {}
    if config_file:
        try:
            fields = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read the pretraining config {config_file}: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(fields) - known)
        if bad:
            raise InputError(f"unknown {cls.__name__} field(s) {bad} in {config_file}; known: {sorted(known)}")
    if family == "geneformer" and overrides.get("mvc") is not None:
        raise InputError("--mvc is an scGPT objective; Geneformer pretraining is masked-gene modelling")
    seq_len = overrides.pop("seq_len", None)
    overrides["train_seq_len" if family == "scgpt" else "train_len"] = seq_len
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if device is not None or "device" in fields:
        fields["device"] = resolve_device(device if device is not None else fields["device"])
    return cls(**fields)


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then a cosine decay to 5 % of it at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class PretrainResult:
    model: HookedScGPT
    log: dict = field(default_factory=dict)
    out_dir: Path | None = None


class CellSampler:
    """Builds masked training batches from one or more count matrices (each with its own gene set)."""

    def __init__(self, sources: list[tuple[sp.csr_matrix, np.ndarray]], cfg: PretrainConfig, vocab: GeneVocab,
                 rng: np.random.Generator):
        self.sources = sources  # (counts CSR, vocab ids of its columns)
        self.cfg, self.vocab, self.rng = cfg, vocab, rng
        self.sizes = np.array([X.shape[0] for X, _ in sources])
        self.legacy = np.random.RandomState(int(rng.integers(2**31)))  # for the official bin rule

    def cell(self, src: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        X, ids = self.sources[src]
        start, end = X.indptr[row], X.indptr[row + 1]
        cols, vals = X.indices[start:end], X.data[start:end].astype(np.float64)
        keep = vals > 0
        cols, vals = cols[keep], vals[keep]
        bins = bin_values(vals, self.cfg.n_bins, self.legacy).astype(np.float32)  # bins over ALL non-zero genes
        budget = self.cfg.train_seq_len - 1
        n_zero = int(round(budget * self.cfg.zero_fraction))
        n_nz = min(len(cols), budget - n_zero)
        pick = self.rng.choice(len(cols), size=n_nz, replace=False) if len(cols) > n_nz else np.arange(len(cols))
        tok, val = ids[cols[pick]], bins[pick]
        n_zero = min(budget - len(tok), X.shape[1] - len(cols))
        if n_zero > 0:
            nonzero = np.zeros(X.shape[1], dtype=bool)
            nonzero[cols] = True
            zero_cols = np.flatnonzero(~nonzero)
            zc = self.rng.choice(zero_cols, size=min(n_zero, len(zero_cols)), replace=False)
            tok = np.concatenate([tok, ids[zc]])
            val = np.concatenate([val, np.zeros(len(zc), dtype=np.float32)])
        order = self.rng.permutation(len(tok))
        return tok[order], val[order]

    def batch(self, cells: Sequence[tuple[int, int]], ratio: float | None = None
              ) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
        """Tokens, targets and a random mask for ``cells`` (``ratio`` defaults to the config's)."""
        cfg = self.cfg
        S = cfg.train_seq_len
        pad_id, cls_id = self.vocab["<pad>"], self.vocab["<cls>"]
        B = len(cells)
        g = np.full((B, S), pad_id, dtype=np.int64)
        target = np.full((B, S), -2.0, dtype=np.float32)
        for i, (src, row) in enumerate(cells):
            t, v = self.cell(src, row)
            g[i, 0], target[i, 0] = cls_id, -2.0
            g[i, 1 : len(t) + 1] = t
            target[i, 1 : len(v) + 1] = v
        return self.remask(torch.from_numpy(g), torch.from_numpy(target), ratio)

    def remask(self, gene_ids: torch.Tensor, target: torch.Tensor, ratio: float | None = None
               ) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
        """A (new) random mask over the same tokens: a second view of the same cells."""
        g = gene_ids.numpy()
        pad = g == self.vocab["<pad>"]
        maskable = ~pad
        maskable[:, 0] = False
        r = self.cfg.mask_ratio if ratio is None else ratio
        masked = maskable & (self.rng.random(g.shape) < r)
        inp = np.where(masked, -1.0, target.numpy()).astype(np.float32)
        batch = TokenBatch(gene_ids, torch.from_numpy(inp), torch.from_numpy(pad))
        return batch, target, torch.from_numpy(masked)

    def ratio(self) -> float | None:
        """This batch's masking ratio: drawn from ``mask_ratios`` when set (no draw otherwise)."""
        rs = self.cfg.mask_ratios
        return float(self.rng.choice(rs)) if rs else None

    def draw(self, n: int) -> list[tuple[int, int]]:
        p = self.sizes / self.sizes.sum()
        if self.cfg.source_batches:
            s = int(self.rng.choice(len(self.sources), p=p))
            rows = self.rng.choice(self.sizes[s], size=min(n, int(self.sizes[s])), replace=False)
            return [(s, int(r)) for r in rows]
        src = self.rng.choice(len(self.sources), size=n, p=p)
        return [(int(s), int(self.rng.integers(self.sizes[s]))) for s in src]


def _losses(model: HookedScGPT, batch: TokenBatch, target: torch.Tensor, masked: torch.Tensor,
            mvc_scope: str = "masked"):
    """(masked-value MSE, MVC / GEPC MSE, <cls> embeddings [B, D]) of one batch."""
    b = batch.to(model.device)
    target, masked = target.to(model.device), masked.to(model.device)
    x, gene_embs = model.embed(b.gene_ids, b.values)
    pad = b.padding_mask if bool(b.padding_mask.any()) else None
    for block in model.blocks:
        x = block(x, pad)
    n = masked.sum().clamp(min=1)
    pred = model.decoder(x)
    mlm = ((pred - target) ** 2 * masked).sum() / n
    mvc = torch.zeros((), device=x.device)
    if model.mvc_decoder is not None:
        mvc_pred = model.mvc_decoder(x[:, 0], gene_embs)
        where = masked if mvc_scope == "masked" else (target > -2)  # "all": every gene token, zeros included
        mvc = ((mvc_pred - target) ** 2 * where).sum() / where.sum().clamp(min=1)
    return mlm, mvc, x[:, 0]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Symmetric InfoNCE between two views (row i of each is the same cell; other rows are negatives)."""
    z1 = torch.nn.functional.normalize(z1, dim=-1)
    z2 = torch.nn.functional.normalize(z2, dim=-1)
    logits = z1 @ z2.T / temperature
    labels = torch.arange(len(z1), device=z1.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


def _step_losses(model, sampler: "CellSampler", cells, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """Every objective of one step on one draw of cells (two views when the contrastive term is on)."""
    batch, target, masked = sampler.batch(cells, sampler.ratio())
    mlm, mvc, cls = _losses(model, batch, target, masked, cfg.mvc_scope)
    out = {"mlm": mlm, "mvc": mvc, "contrastive": torch.zeros((), device=mlm.device)}
    if cfg.contrastive_weight > 0:
        if cfg.contrastive_views == "genes":
            b2, t2, m2 = sampler.batch(cells, sampler.ratio())
        else:
            b2, t2, m2 = sampler.remask(batch.gene_ids, target, sampler.ratio())
        mlm2, mvc2, cls2 = _losses(model, b2, t2, m2, cfg.mvc_scope)
        out["mlm"], out["mvc"] = 0.5 * (mlm + mlm2), 0.5 * (mvc + mvc2)
        out["contrastive"] = info_nce(cls, cls2, cfg.contrastive_temperature)
    out["loss"] = (cfg.mlm_weight * out["mlm"] + cfg.mvc_weight * out["mvc"]
                   + cfg.contrastive_weight * out["contrastive"])
    return out


@restores_torch_threads
def pretrain_scgpt(
    data: ad.AnnData | Sequence[ad.AnnData],
    config: PretrainConfig | None = None,
    *,
    vocab: GeneVocab | None = None,
    out_dir: str | Path | None = None,
    layer: str | None = None,
    progress: bool = True,
    extra_provenance: dict | None = None,
    probe: tuple[ad.AnnData, str, str | None] | None = None,
) -> PretrainResult:
    """Pretrain an scGPT-architecture model on raw counts; write the official layout to ``out_dir``.

    Parameters
    ----------
    data
        One AnnData or several (e.g. different studies with different gene sets). ``X`` (or ``layer``) must
        hold raw counts; ``var_names`` are HGNC symbols.
    vocab
        Gene vocabulary; default: every gene of ``data`` detected in at least one cell, plus the specials.
    out_dir
        If given, ``args.json``, ``vocab.json``, ``best_model.pt``, ``training_log.json`` and
        ``loss_curve.png`` are written there (atomically).
    probe
        ``(adata, label_key, donor_key)`` of labelled cells (never trained on): at every evaluation the log
        records the kNN-15 and logistic-probe balanced accuracy of the <cls> embeddings of up to 500 of them
        (:mod:`sclens.models.probe`, folds grouped by donor), so a run shows whether the cell representation learns.
    """
    from ..data import validate

    cfg = config or PretrainConfig()
    datasets = [data] if isinstance(data, ad.AnnData) else list(data)
    if not datasets:
        raise InputError("no training data given")
    cfg.check()
    for i, a in enumerate(datasets):
        validate(a, require="counts", layer=layer)
    if vocab is None:
        genes: list[str] = []
        seen = set()
        for a in datasets:
            X = a.layers[layer] if layer else a.X
            detected = np.asarray((X > 0).sum(0)).ravel() > 0
            for g in a.var_names[detected]:
                if g not in seen:
                    seen.add(g)
                    genes.append(str(g))
        vocab = GeneVocab.from_genes(genes)
    sources = []
    for a in datasets:
        ids = vocab.lookup(a.var_names.astype(str))
        keep = np.flatnonzero(ids >= 0)
        if keep.size == 0:
            raise InputError("a training AnnData shares no gene with the vocabulary")
        X = a.layers[layer] if layer else a.X
        X = sp.csr_matrix(X)[:, keep]
        X.sort_indices()
        sources.append((X, ids[keep]))

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = HookedScGPT(cfg.model_config(), vocab).to(cfg.device)
    model.train()
    sampler = CellSampler(sources, cfg, vocab, rng)
    eval_rng = np.random.default_rng(cfg.seed + 1)
    eval_sampler = CellSampler(sources, cfg, vocab, eval_rng)
    eval_batches = [eval_sampler.batch(eval_sampler.draw(min(cfg.batch_size, cfg.eval_cells)))
                    for _ in range(max(1, cfg.eval_cells // cfg.batch_size))]

    # start the expression decoder at the mean target bin: skips the long constant-prediction plateau
    init_targets = torch.cat([t[m] for _, t, m in eval_batches])
    with torch.no_grad():
        model.decoder.fc[-1].bias.fill_(float(init_targets.mean()))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)

    probe_eval = _probe_fn(probe, cfg.seed) if probe is not None else None

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            vals = [_losses(model, b, t, m, cfg.mvc_scope) for b, t, m in eval_batches]
        out = {"mlm": float(np.mean([v[0].item() for v in vals])), "mvc": float(np.mean([v[1].item() for v in vals]))}
        if probe_eval is not None:
            out.update(probe_eval(model))
        model.train()
        return out

    history, evals = [], []
    t0 = time.perf_counter()
    evals.append({"step": 0, **evaluate()})
    bar = tqdm(range(cfg.steps), disable=not progress, desc="pretraining", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        parts = _step_losses(model, sampler, sampler.draw(cfg.batch_size), cfg)
        loss, mlm, mvc = parts["loss"], parts["mlm"], parts["mvc"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}; lower the learning rate (lr={cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history.append({"step": step + 1, "loss": loss.item(), "mlm": mlm.item(), "mvc": mvc.item(),
                        **({"contrastive": parts["contrastive"].item()} if cfg.contrastive_weight > 0 else {})})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evals.append({"step": step + 1, **evaluate()})
            post = {"train": f"{mlm.item():.2f}", "eval_mlm": f"{evals[-1]['mlm']:.2f}"}
            if cfg.contrastive_weight > 0:
                post["nce"] = f"{np.mean([h['contrastive'] for h in history[-cfg.eval_every:]]):.3f}"
            if "probe_knn_balanced_accuracy" in evals[-1]:
                post["probe_knn"] = f"{evals[-1]['probe_knn_balanced_accuracy']:.3f}"
            bar.set_postfix(post)
    train_seconds = time.perf_counter() - t0
    model.eval()

    # a constant predictor (mean bin of masked targets) is the floor the MLM loss must beat
    tgt = torch.cat([t[m] for _, t, m in eval_batches])
    baseline = float(((tgt - tgt.mean()) ** 2).mean())
    log = {
        "config": asdict(cfg), "vocab_size": len(vocab), "n_parameters": model.n_parameters(),
        "n_cells": int(sum(X.shape[0] for X, _ in sources)), "train_seconds": train_seconds,
        "history": history, "eval": evals, "final_eval": evals[-1], "eval_constant_predictor_mse": baseline,
        "torch_version": torch.__version__, "provenance": extra_provenance or {},
    }
    result = PretrainResult(model=model, log=log)
    if out_dir is not None:
        out = Path(out_dir)
        save_scgpt(model, out, extra_args={"training": "sclens.models.pretrain", "lr": cfg.lr, "epochs": None,
                                           "batch_size": cfg.batch_size, "mask_ratio": cfg.mask_ratio,
                                           "seed": cfg.seed})
        write_json(out / "training_log.json", log)
        plot_loss_curve(log, out / "loss_curve.png")
        result.out_dir = out
    return result


def _probe_fn(probe: tuple, seed: int, n_cells: int = 500):
    """A callable model -> {probe_knn_balanced_accuracy, probe_logreg_balanced_accuracy} on a fixed labelled sample."""
    from .api import tokenize_adata
    from .probe import probe_folds, embedding_scores

    adata, label_key, donor_key = (tuple(probe) + (None,))[:3]
    from ..data import require_obs_columns

    require_obs_columns(adata, [label_key, donor_key])
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    sub = adata[idx].copy()
    y = sub.obs[label_key].astype(str).to_numpy()
    groups = sub.obs[donor_key].astype(str).to_numpy() if donor_key else None
    folds, _ = probe_folds(y, groups, seed)
    state: dict = {}

    def run(model) -> dict:
        if "batch" not in state:
            state["batch"] = tokenize_adata(sub, model, seed=seed)
        Z = model.cell_embeddings(state["batch"], mode="cls", batch_size=64)
        sc = embedding_scores(Z, y, folds)
        return {"probe_knn_balanced_accuracy": sc["knn_balanced_accuracy"],
                "probe_logreg_balanced_accuracy": sc["probe_balanced_accuracy"], "probe_effective_rank": sc["effective_rank"]}

    return run


def plot_loss_curve(log: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = log["history"]
    steps = np.array([r["step"] for r in h])
    mlm = np.array([r["mlm"] for r in h])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    w = max(1, len(mlm) // 50)
    smooth = np.convolve(mlm, np.ones(w) / w, mode="valid")
    ax.plot(steps, mlm, color="0.8", lw=0.6, label="train MLM (per step)")
    ax.plot(steps[w - 1 :], smooth, color="C0", label=f"train MLM ({w}-step mean)")
    ev = log["eval"]
    ax.plot([e["step"] for e in ev], [e["mlm"] for e in ev], "o-", color="C1", ms=3, label="held-out MLM")
    ax.axhline(log["eval_constant_predictor_mse"], color="C3", ls="--", lw=1, label="constant predictor")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on masked bins")
    ax.set_title("sclens pretraining (masked expression)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
