"""What every hooked encoder of sclens shares (scGPT, Geneformer): batching, caching, pooling, per-head weights.

A subclass provides ``blocks`` (a ``ModuleList`` of :class:`~sclens.models.scgpt.ScGPTBlock`-style post-LN layers
with ``attn.in_proj_weight`` fused head-major and ``attn.out_proj``), a ``vocab`` and
``forward(gene_ids, values, padding_mask, *, stop_at_layer=None)`` returning hidden states [B, S, D].
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .hooks import ActivationCache, HookedRootModule, NamesFilter
from .tokenize import TokenBatch


class HookedEncoder(HookedRootModule):
    """Base class of the hooked foundation models (TransformerLens-style hook names, ``run_with_cache``)."""

    def run_blocks(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
                   stop_at_layer: int | None = None) -> torch.Tensor:
        """The layers on the embedded input ``x`` (pads masked as keys), up to the input of ``stop_at_layer``."""
        pad = padding_mask if padding_mask is not None and bool(padding_mask.any()) else None
        for i, block in enumerate(self.blocks):
            if stop_at_layer is not None and i >= stop_at_layer:
                break
            x = block(x, pad)
        return x

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward_batch(self, batch: TokenBatch, **kw) -> torch.Tensor:
        b = batch.to(self.device)
        return self(b.gene_ids, b.values, b.padding_mask, **kw)

    def pooling_mask(self, batch: TokenBatch) -> torch.Tensor:
        """Positions ``avg`` pooling leaves out (True): the pads."""
        return batch.padding_mask

    @staticmethod
    def pool(hidden: torch.Tensor, padding_mask: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """Cell embedding from hidden states: ``cls`` (official default) or ``avg`` (masked mean, pads excluded)."""
        if mode == "cls":
            emb = hidden[:, 0]
        elif mode == "avg":
            keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:
            raise ValueError(f"pooling mode must be 'cls' or 'avg', got {mode!r}")
        return emb

    @torch.no_grad()
    def cell_embeddings(
        self, batch: TokenBatch, *, mode: str | tuple[str, ...] = "cls", normalize: bool = True, batch_size: int = 64,
        progress: bool = False, stop_at_layer: int | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Cell embeddings [N, D]; CLS + L2 normalisation reproduces the official ``embed_data``.

        ``mode`` may be a tuple such as ``("cls", "avg")``: one forward pass, a dict of embeddings back. ``avg``
        averages the tokens :meth:`pooling_mask` keeps; ``stop_at_layer`` pools the input of that layer instead of
        the last layer's output.
        """
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        was_training = self.training
        self.eval()
        out: dict[str, list] = {m: [] for m in modes}
        for start in tqdm(range(0, len(batch), batch_size), disable=not progress, desc="embedding cells", unit="batch"):
            b = batch[start : start + batch_size].to(self.device)
            hidden = self(b.gene_ids, b.values, b.padding_mask, stop_at_layer=stop_at_layer)
            for m in modes:
                emb = self.pool(hidden, self.pooling_mask(b), m)
                if normalize:
                    emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                out[m].append(emb.float().cpu())
        self.train(was_training)
        res = {m: torch.cat(v).numpy() for m, v in out.items()}
        return res[mode] if isinstance(mode, str) else res

    # ------------------------------------------------------------------ caching
    @torch.no_grad()
    def run_with_cache(
        self, batch: TokenBatch, names: NamesFilter = None, *, batch_size: int = 32, progress: bool = True,
        reduce: str | Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        stop_at_layer: int | None = None,
    ) -> ActivationCache:
        """Run the model over ``batch`` in mini-batches and return only the activations asked for.

        Parameters
        ----------
        names
            Hook names, a single name, or a predicate ``name -> bool``; None caches every hook (large).
        reduce
            None keeps every cell (stacked on dim 0). ``"sum"`` keeps a running sum over cells (for averages over
            a reference set without holding every cell); a callable ``(name, act, minibatch) -> tensor`` (the
            mini-batch's :class:`TokenBatch`, so its gene ids and padding mask) is applied to each mini-batch and
            its outputs are summed.
        """
        wanted = self.resolve_names(names)
        was_training = self.training
        self.eval()
        store: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        current: list[TokenBatch] = []
        # summed attention patterns: the attention modules that can keep the running sum themselves do (the batched
        # pattern is then never formed); the others go through their hook
        summing = {}
        if reduce == "sum":
            runs = {id(block.attn) for block in list(self.blocks)[:stop_at_layer]}  # a layer not run leaves no entry
            for name in (n for n in wanted if n.endswith(".hook_pattern")):
                owner = self.get_submodule(name.rsplit(".", 1)[0])
                if hasattr(owner, "pattern_sum") and id(owner) in runs:
                    summing[name] = owner

        def make_hook(name: str):
            def hook(act, hp):
                a = act.detach()
                if reduce is None:
                    store.setdefault(name, []).append(a.cpu())
                else:
                    r = a.sum(0) if reduce == "sum" else reduce(name, a, current[0])
                    if name in store:
                        store[name].add_(r.cpu())  # the running sum is ours (cloned below): add in place
                    else:
                        store[name] = r.cpu().clone()
            return hook

        S = batch.gene_ids.shape[1]
        for attn in summing.values():
            attn.pattern_sum = torch.zeros(attn.H, S, S, device=self.device)
        try:
            with self.hooks([(n, make_hook(n)) for n in wanted if n not in summing]):
                for start in tqdm(range(0, len(batch), batch_size), disable=not progress,
                                  desc="running model", unit="batch"):
                    b = batch[start : start + batch_size].to(self.device)
                    current[:] = [b]
                    self(b.gene_ids, b.values, b.padding_mask, stop_at_layer=stop_at_layer)
            for name, attn in summing.items():
                store[name] = attn.pattern_sum.cpu()
        finally:
            for attn in summing.values():
                attn.pattern_sum = None
            self.train(was_training)
        return ActivationCache({k: (torch.cat(v) if isinstance(v, list) else v) for k, v in store.items()})

    def run_with_hooks(self, batch: TokenBatch, fwd_hooks: Iterable = ()) -> torch.Tensor:
        """One forward pass with temporary hooks ``[(name, fn(act, hook) -> act | None)]``; returns the output."""
        with self.hooks(fwd_hooks):
            return self.forward_batch(batch)

    # ------------------------------------------------------------------ weights
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].attn.H

    def head_weights(self, layer: int, head: int) -> dict[str, torch.Tensor]:
        """Per-head weights in TransformerLens convention: W_Q/W_K/W_V [D, dh], b_Q/b_K/b_V [dh], W_O [dh, D], b_O [D]."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise IndexError(f"unit ({layer}, {head}) outside {self.n_layers} layers x {self.n_heads} heads")
        attn = self.blocks[layer].attn
        E, dh = attn.in_proj_weight.shape[1], attn.dh
        W, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
        rows = slice(head * dh, (head + 1) * dh)
        out = {}
        for i, n in enumerate("QKV"):
            out[f"W_{n}"] = W[i * E : (i + 1) * E][rows].T.clone()
            out[f"b_{n}"] = b[i * E : (i + 1) * E][rows].clone()
        out["W_O"] = attn.out_proj.weight.detach()[:, rows].T.clone()
        out["b_O"] = attn.out_proj.bias.detach().clone()
        return out

    def all_head_weights(self) -> dict[str, torch.Tensor]:
        """Stacked per-head weights: W_Q/W_K/W_V [L, H, D, dh], W_O [L, H, dh, D], b_O [L, D]."""
        per = [[self.head_weights(l, h) for h in range(self.n_heads)] for l in range(self.n_layers)]
        out = {k: torch.stack([torch.stack([p[k] for p in row]) for row in per]) for k in
               ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")}
        out["b_O"] = torch.stack([row[0]["b_O"] for row in per])
        return out
