"""Training a gene-level cell-sentence model from scratch (next gene + the cell type after ``<celltype>``), and the
losses its evaluation and the transcoders' splice tests share."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import file_sha256, package_versions, restores_torch_threads
from .lm import CellLMConfig, CellSentenceVocab, HookedCellLM, cell_sentences, pad_batch, save_cell_lm


@dataclass
class CellLMResult:
    model: HookedCellLM
    log: dict = field(default_factory=dict)
    out_dir: Path | None = None


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, label_pos: torch.Tensor,
             label_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, next-gene CE, cell-type CE); the label token is predicted at ``label_pos`` (<celltype>)."""
    B = ids.shape[0]
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = ids[:, 1:]
    nll = -lp.gather(-1, tgt[..., None])[..., 0]
    valid = mask[:, 1:].bool()
    is_label = torch.zeros_like(valid)
    is_label[torch.arange(B), label_pos] = True
    gene = valid & ~is_label
    gene_ce = nll[gene].mean()
    label_ce = nll[torch.arange(B), label_pos].mean()
    return (nll[gene].sum() + label_weight * nll[is_label].sum()) / (gene.sum() + label_weight * B), gene_ce, label_ce


@torch.no_grad()
def celltype_losses(forward, seqs: Sequence[Sequence[int]], vocab: CellSentenceVocab, *, batch_size: int = 64) -> dict:
    """Next-gene CE, cell-type CE and cell-type accuracy (argmax over the label tokens) of
    ``forward(ids, mask) -> logits`` on labelled sequences ``... <celltype> LABEL <eos>``; per-batch means are
    weighted by the batch's number of cells. The losses are computed on the device of the logits."""
    lab_ids = torch.as_tensor(vocab.label_ids)
    tot = {"gene_ce": 0.0, "celltype_ce": 0.0, "correct": 0}
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i: i + batch_size])
        logits = forward(ids, mask)
        ids, mask, lab_ids = ids.to(logits.device), mask.to(logits.device), lab_ids.to(logits.device)
        pos = mask.sum(1) - 3  # the <celltype> position, which predicts LABEL
        _, g, c = _lm_loss(logits, ids, mask, pos, 1.0)
        B = len(ids)
        tot["gene_ce"] += g.item() * B
        tot["celltype_ce"] += c.item() * B
        pred = logits[torch.arange(B), pos][:, lab_ids].argmax(1) + vocab.label_offset
        tot["correct"] += int((pred == ids[torch.arange(B), pos + 1]).sum())
    n = max(1, len(seqs))
    return {"gene_ce": tot["gene_ce"] / n, "celltype_ce": tot["celltype_ce"] / n, "celltype_accuracy": tot["correct"] / n}


@restores_torch_threads
def train_cell_lm(adata, label_key: str, config: CellLMConfig | None = None, *, out_dir: str | Path | None = None,
                  var_key: str | None = None, layer: str | None = None, progress: bool = True) -> CellLMResult:
    """Train a gene-level cell-sentence GPT-NeoX from scratch on ``adata`` (cells with a cell-type column).

    A stratified ``val_fraction`` of cells is held out; its cell-type accuracy and losses are logged every
    ``eval_every`` steps, and the weights with the best validation cell-type loss are kept. Training runs on
    ``config.device``; the returned (and saved) model is on the CPU.
    """
    from ..models.api import resolve_device

    from sklearn.model_selection import train_test_split
    from transformers import GPTNeoXForCausalLM

    cfg = config or CellLMConfig()
    device = resolve_device(cfg.device)
    if label_key not in adata.obs:
        raise InputError(f"obs has no column {label_key!r}; columns: {list(adata.obs.columns)}")
    labels = adata.obs[label_key].astype(str).to_numpy()
    if len(set(labels)) < 2:
        raise InputError(f"column {label_key!r} has fewer than two cell types")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sents = cell_sentences(adata, top_k=cfg.top_k, seed=cfg.seed, layer=layer, var_key=var_key)
    idx = np.arange(adata.n_obs)
    tr, va = train_test_split(idx, test_size=cfg.val_fraction, random_state=cfg.seed, stratify=labels)
    vocab = CellSentenceVocab.build([sents[i] for i in tr], labels, top_k=cfg.top_k, min_cells=cfg.min_cells)
    hf = GPTNeoXForCausalLM(cfg.hf_config(len(vocab)))
    model = HookedCellLM(hf, vocab=vocab)
    seqs = model.encode_cells(sents, labels)
    hf.to(device)
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))

    def batch(rows):
        ids, mask = pad_batch([seqs[i] for i in rows])
        label_pos = mask.sum(1) - 3  # index (in the shifted targets) of the label token: ... <celltype> LABEL <eos>
        return ids.to(device), mask.to(device), label_pos.to(device)

    val_seqs = [seqs[i] for i in va]

    def evaluate():
        hf.eval()
        m = celltype_losses(lambda ids, mask: hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits,
                            val_seqs, vocab, batch_size=256)
        hf.train()
        return {"val_gene_ce": m["gene_ce"], "val_label_ce": m["celltype_ce"], "val_accuracy": m["celltype_accuracy"]}

    history, best, best_state = [], math.inf, None
    t0 = time.perf_counter()
    hf.train()
    bar = tqdm(range(cfg.steps), desc="cell LM", unit="step", disable=not progress)
    for step in bar:
        rows = rng.choice(tr, size=cfg.batch_size, replace=len(tr) < cfg.batch_size)
        ids, mask, pos = batch(rows)
        loss, g, c = _lm_loss(hf(input_ids=ids, attention_mask=mask).logits, ids, mask, pos, cfg.label_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ev = evaluate()
            history.append({"step": step + 1, "train_loss": loss.item(), "train_gene_ce": g.item(),
                            "train_label_ce": c.item(), **ev, "seconds": time.perf_counter() - t0})
            bar.set_postfix(acc=f"{ev['val_accuracy']:.3f}", gene_ce=f"{ev['val_gene_ce']:.2f}")
            if ev["val_label_ce"] < best:
                best = ev["val_label_ce"]
                best_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if best_state is not None:
        hf.load_state_dict(best_state)
    hf.eval()
    final = evaluate()
    hf.to("cpu")
    n_params = sum(p.numel() for p in hf.parameters())
    log = {"config": asdict(cfg), "label_key": label_key, "n_cells": int(adata.n_obs), "n_train": int(len(tr)),
           "n_val": int(len(va)), "val_cells": [str(adata.obs_names[i]) for i in va],
           "vocab_size": len(vocab), "n_genes": len(vocab.genes), "labels": vocab.labels, "n_params": n_params,
           "history": history, "final": final, "seconds": time.perf_counter() - t0, "device": device,
           "versions": package_versions(("sclens", "torch", "transformers", "numpy", "anndata"))}
    model = HookedCellLM(hf, vocab=vocab)
    if out_dir is not None:
        save_cell_lm(model, out_dir, extra={"training_log.json": log})
        log["checkpoint_sha256"] = file_sha256(Path(out_dir) / "model.safetensors")
    return CellLMResult(model=model, log=log, out_dir=Path(out_dir) if out_dir else None)
