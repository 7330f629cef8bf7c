"""Pretrain a Geneformer-architecture model (BERT masked-gene modelling on rank-value sentences), official layout.

The recipe follows Geneformer's: the gene-median dictionary is each gene's median of normalised expression
(``counts / n_counts x 10,000``) over the training cells that express it, the token dictionary holds ``<pad>`` = 0,
``<mask>`` = 1 (and ``<cls>``, ``<eos>`` for ``v2``) then the genes' Ensembl ids, cells are tokenised exactly as
:meth:`HookedGeneformer.tokenize` (the official tokenizer) does, and training is BERT's masked-token objective: 15 %
of each sentence's gene positions are chosen, 80 % of those shown as ``<mask>``, 10 % as a random gene, 10 %
unchanged, and the model predicts the original gene (cross-entropy). On a CPU budget a cell's sentence is cut to its
``train_len`` top-ranked genes; the written model takes ``max_len`` tokens at inference.

The result loads with :func:`~sclens.models.load_geneformer` and with HF ``BertForMaskedLM.from_pretrained``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import atomic_write, restores_torch_threads, write_json
from .geneformer import ENSEMBL_RE, TARGET_SUM, GeneformerConfig, HookedGeneformer, save_geneformer
from .pretrain import warmup_cosine_lr


@dataclass
class GeneformerPretrainConfig:
    """Training settings of a Geneformer-architecture model (serialised next to the checkpoint)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_hid: int = 256
    dropout: float = 0.02
    max_len: int = 2048  # model input size (max_position_embeddings), as Geneformer V1
    train_len: int = 256  # tokens per cell during training: its top-ranked genes
    v2: bool = False  # <cls> ... <eos> sentences (Geneformer V2 style)
    mask_ratio: float = 0.15
    batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_cells: int = 256
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def check(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise InputError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.d_model % self.n_heads:
            raise InputError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 8 <= self.train_len <= self.max_len:
            raise InputError(f"train_len must lie in 8..max_len ({self.max_len}), got {self.train_len}")


def corpus_dictionaries(datasets: Sequence[ad.AnnData], *, layer: str | None = None, v2: bool = False):
    """Token and gene-median dictionaries of a training corpus (Ensembl ids; symbols mapped with sclens' table).

    Returns ``(token_dict, gene_median, n_unmapped)``: genes with no Ensembl id are left out and counted."""
    from ..data import ensembl_to_symbol

    to_ens = {s: e for e, s in ensembl_to_symbol().items()}
    values: dict[str, list[np.ndarray]] = {}
    unmapped = set()
    for a in datasets:
        X = a.layers[layer] if layer else a.X
        X = sp.csr_matrix(X, dtype=np.float64)
        n = np.asarray(X.sum(1)).ravel()
        Xn = sp.csc_matrix(X.multiply(TARGET_SUM / np.maximum(n, 1e-12)[:, None]))
        for j, g in enumerate(map(str, a.var_names)):
            ens = g.upper().split(".")[0] if ENSEMBL_RE.match(g) else to_ens.get(g)
            if ens is None:
                unmapped.add(g)
                continue
            col = Xn.data[Xn.indptr[j] : Xn.indptr[j + 1]]
            col = col[col > 0]
            if col.size:
                values.setdefault(ens, []).append(col)
    genes = sorted(values)
    if not genes:
        raise InputError("no training gene could be named by an Ensembl id (HGNC symbols or Ensembl ids expected)")
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if v2 else [])
    token_dict = {t: i for i, t in enumerate(specials + genes)}
    gene_median = {g: float(np.median(np.concatenate(values[g]))) for g in genes}
    return token_dict, gene_median, len(unmapped)


def _mask(ids: torch.Tensor, pad: torch.Tensor, special: torch.Tensor, cfg, vocab_genes: torch.Tensor,
          gen: torch.Generator, mask_id: int):
    """BERT masking: choose ``mask_ratio`` of the gene positions; 80 % -> <mask>, 10 % -> a random gene, 10 % kept."""
    candidates = ~pad & ~special
    chosen = (torch.rand(ids.shape, generator=gen) < cfg.mask_ratio) & candidates
    none = chosen.sum(1) == 0  # every sentence gets at least one target
    if none.any():
        first = candidates.float().argmax(1)
        chosen[none, first[none]] = candidates[none, first[none]]
    r = torch.rand(ids.shape, generator=gen)
    inp = ids.clone()
    inp[chosen & (r < 0.8)] = mask_id
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inp[swap] = vocab_genes[torch.randint(len(vocab_genes), (int(swap.sum()),), generator=gen)]
    return inp, chosen


@restores_torch_threads
def pretrain_geneformer(data: ad.AnnData | Sequence[ad.AnnData], config: GeneformerPretrainConfig | None = None, *,
                        layer: str | None = None, out_dir: str | Path | None = None, progress: bool = True,
                        extra_provenance: dict | None = None) -> tuple[HookedGeneformer, dict]:
    """Pretrain a Geneformer-architecture model on raw counts (one AnnData or several).

    Returns ``(model, log)``; with ``out_dir`` the folder gets ``config.json``, ``model.safetensors``,
    ``token_dictionary.json``, ``gene_median_dictionary.json``, ``training_log.json`` and ``loss_curve.png``.
    The log's ``unigram_baseline_ce`` is the held-out cross-entropy of predicting every masked gene from the
    genes' frequencies alone: the floor a model that reads its context must beat.
    """
    from ..data import validate

    cfg = config or GeneformerPretrainConfig()
    cfg.check()
    datasets = [data] if isinstance(data, ad.AnnData) else list(data)
    if not datasets:
        raise InputError("no training data given")
    for a in datasets:
        validate(a, require="counts", layer=layer)
    token_dict, gene_median, n_unmapped = corpus_dictionaries(datasets, layer=layer, v2=cfg.v2)
    if n_unmapped:
        warnings.warn(f"{n_unmapped} genes have no Ensembl id in sclens' table and are not tokens", UserWarning,
                      stacklevel=2)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gcfg = GeneformerConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_hid,
                            num_hidden_layers=cfg.n_layers, max_position_embeddings=cfg.max_len,
                            vocab_size=len(token_dict), hidden_dropout_prob=cfg.dropout,
                            attention_probs_dropout_prob=cfg.dropout)
    model = HookedGeneformer(gcfg, token_dict, gene_median)
    with torch.no_grad():  # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    sentences = []
    for a in datasets:
        X = a.layers[layer] if layer else a.X
        b = model.tokenize(X, list(map(str, a.var_names)))
        for i in range(len(b)):
            t = b.gene_ids[i][~b.padding_mask[i]]
            if cfg.v2:  # keep <cls> ... <eos> around the top train_len - 2 genes
                t = torch.cat([t[: cfg.train_len - 1], t[-1:]]) if len(t) > cfg.train_len else t
            sentences.append(t[: cfg.train_len])
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(sentences))
    n_eval = min(cfg.eval_cells, max(1, len(sentences) // 10))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    if len(train_idx) < cfg.batch_size:
        raise InputError(f"{len(train_idx)} training cells after holding out {n_eval}: fewer than one batch")
    special_ids = torch.tensor([token_dict[t] for t in token_dict if t.startswith("<")])
    gene_ids = torch.tensor([i for t, i in token_dict.items() if not t.startswith("<")])
    mask_id = token_dict["<mask>"]

    def collate(idx):
        seqs = [sentences[i] for i in idx]
        S = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), S, dtype=torch.long)
        pad = torch.ones(len(seqs), S, dtype=torch.bool)
        for k, s in enumerate(seqs):
            ids[k, : len(s)], pad[k, : len(s)] = s, False
        return ids, pad

    def loss_on(ids, pad, gen):
        inp, chosen = _mask(ids, pad, torch.isin(ids, special_ids), cfg, gene_ids, gen, mask_id)
        h = model(inp.to(cfg.device), None, pad.to(cfg.device))
        logits = model.mlm_logits(h[chosen.to(cfg.device)])
        target = ids[chosen].to(cfg.device)
        return torch.nn.functional.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()

    eval_sets = [collate(eval_idx[s : s + cfg.batch_size]) for s in range(0, n_eval, cfg.batch_size)]
    eval_seeds = [cfg.seed + 1 + k for k in range(len(eval_sets))]  # the same masks at every evaluation
    # unigram floor: predict each masked gene by the training genes' frequencies
    freq = torch.bincount(torch.cat([sentences[i] for i in train_idx]), minlength=len(token_dict)).double() + 1.0
    freq[special_ids] = 0
    logp = torch.log(freq / freq.sum())
    targets = [ids[_mask(ids, pad, torch.isin(ids, special_ids), cfg, gene_ids, torch.Generator().manual_seed(k),
                         mask_id)[1]] for (ids, pad), k in zip(eval_sets, eval_seeds)]
    unigram = float(-logp[torch.cat(targets)].mean())

    def evaluate() -> dict:
        model.eval()
        ce, acc, n = 0.0, 0.0, 0
        with torch.no_grad():
            for (ids, pad), k in zip(eval_sets, eval_seeds):
                l, a = loss_on(ids, pad, torch.Generator().manual_seed(k))
                ce, acc, n = ce + l.item() * len(ids), acc + a.item() * len(ids), n + len(ids)
        model.train()
        return {"ce": ce / n, "accuracy": acc / n}

    model.to(cfg.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    history, evals = [], [{"step": 0, **evaluate()}]
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="pretraining geneformer", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        ids, pad = collate(rng.choice(train_idx, size=cfg.batch_size, replace=False))
        loss, acc = loss_on(ids, pad, gen)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}; lower the learning rate (lr={cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history.append({"step": step + 1, "ce": loss.item(), "accuracy": acc.item()})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evals.append({"step": step + 1, **evaluate()})
            bar.set_postfix({"train_ce": f"{loss.item():.2f}", "eval_ce": f"{evals[-1]['ce']:.2f}"})
    model.eval()
    log = {"config": asdict(cfg), "family": "geneformer", "vocab_size": len(token_dict),
           "n_parameters": model.n_parameters(), "n_cells": len(sentences), "n_eval_cells": int(n_eval),
           "train_seconds": time.perf_counter() - t0, "history": history, "eval": evals, "final_eval": evals[-1],
           "unigram_baseline_ce": unigram, "n_genes_without_ensembl_id": n_unmapped,
           "torch_version": torch.__version__, "provenance": extra_provenance or {}}
    if out_dir is not None:
        out = Path(out_dir)
        save_geneformer(model, out)
        write_json(out / "training_log.json", log)
        _plot(log, out / "loss_curve.png")
        model.source = str(out)
    return model, log


def _plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = log["history"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in h], [r["ce"] for r in h], color="0.75", lw=0.6, label="train (per step)")
    ax.plot([e["step"] for e in log["eval"]], [e["ce"] for e in log["eval"]], "o-", color="C1", ms=3,
            label="held-out")
    ax.axhline(log["unigram_baseline_ce"], color="C3", ls="--", lw=1, label="gene frequencies only")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-gene cross-entropy")
    ax.set_title("sclens pretraining (Geneformer, masked genes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
