"""SAE feature atlas of an scGPT-architecture model: a TopK SAE on the residual stream of every layer.

The residual stream after layer l of the post-LN scGPT encoder is ``blocks.l.hook_normalized_resid_post``
(the input of layer l + 1). Vectors are taken at gene positions (not ``<cls>``, not padding) of cells
tokenised as the official ``embed_data`` does (non-zero genes, binned values), mean-centred per layer as
bio-sae does, and each layer gets its own SAE (:class:`~sclens.circuits.transcoders.Transcoder` with the input
as target). The atlas lists every live feature per layer with its top genes, cell-type specificity and
marker-set label (see :mod:`sclens.circuits.interpret`); the HTML page is browsable offline.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import array_sha256, atomic_write, package_versions, restores_torch_threads, write_json
from .interpret import feature_activity, interpret_features
from .transcoders import Transcoder, TranscoderConfig, check_layers, train_transcoder


@dataclass
class SAEAtlas:
    saes: dict[int, Transcoder]
    means: dict[int, torch.Tensor]
    config: TranscoderConfig
    metrics: dict  # per layer
    tables: dict[int, pd.DataFrame]  # per layer feature table
    info: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        rows = []
        for l in sorted(self.saes):
            m, t = self.metrics[f"L{l}"], self.tables[l]
            rows.append({"layer": l, "d_sae": self.saes[l].d_sae, "l0": m["l0"], "fvu": m["fvu"],
                         "dead_fraction": m["dead_fraction"], "live_features": len(t),
                         "interpretable": int(t["interpretable"].sum()) if len(t) else 0,
                         "interpretable_fraction": float(t["interpretable"].mean()) if len(t) else float("nan"),
                         # which gene list made the call: the feature's own top genes (it reads a gene) or the
                         # genes its top cells share (it fires in one kind of cell)
                         **{f"by_{src}": int((t["interpretable"] & (t["label_from"] == src)).sum())
                            if len(t) and "label_from" in t else 0 for src in ("tokens", "context")}})
        return pd.DataFrame(rows)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tensors = {}
        for l, sae in self.saes.items():
            tensors.update(sae.state(f"blocks.{l}."))
            tensors[f"blocks.{l}.input_mean"] = self.means[l].contiguous()
        paths = {"safetensors": atomic_write(out_dir / "sae_atlas.safetensors", lambda p: save_file(tensors, p))}
        tables = {str(l): t.to_dict(orient="records") for l, t in self.tables.items()}
        paths["json"] = write_json(out_dir / "sae_atlas.json", {
            "format": "sclens-sae-atlas", "version": 1, "config": asdict(self.config),
            "layers": {str(l): s.spec() for l, s in self.saes.items()}, "metrics": self.metrics,
            "summary": self.summary().to_dict(orient="records"), "features": tables, "info": self.info})
        paths["html"] = atomic_write(out_dir / "sae_atlas.html", lambda p: Path(p).write_text(atlas_html(self)))
        return paths

    @classmethod
    def load(cls, folder: str | Path) -> "SAEAtlas":
        """Reload a saved atlas (``sae_atlas.json`` + ``sae_atlas.safetensors``) from its folder."""
        import json

        from safetensors.torch import load_file

        f = Path(folder)
        f = f / "sae_atlas.json" if f.is_dir() else f
        if not f.is_file() or not f.with_suffix(".safetensors").is_file():
            raise InputError(f"{folder} holds no sae_atlas.json + sae_atlas.safetensors (run `sclens circuits sae`)")
        d = json.loads(f.read_text())
        if d.get("format") != "sclens-sae-atlas":
            raise InputError(f"{f} is not an sclens SAE atlas")
        st = load_file(str(f.with_suffix(".safetensors")))
        saes, means = {}, {}
        for l, spec in d["layers"].items():
            sae = Transcoder(spec["d_in"], spec["d_sae"], spec["d_out"], kind=spec["kind"], k=spec["k"])
            sae.load_state_dict({k: st[f"blocks.{l}.{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
            saes[int(l)], means[int(l)] = sae.eval(), st[f"blocks.{l}.input_mean"]
        return cls(saes, means, TranscoderConfig(**d["config"]), d["metrics"],
                   {int(l): pd.DataFrame(t) for l, t in d["features"].items()}, d.get("info", {}))


def harvest_residuals(model, adata, *, layers: Sequence[int] | None = None, max_len: int = 256, seed: int = 0,
                      batch_size: int = 32, var_key: str | None = None, layer: str | None = None,
                      progress: bool = True):
    """Residual vectors at gene positions for every layer: ({layer: [T, D]}, gene token ids [T], cell index [T])."""
    from ..models.api import tokenize_adata

    layers = list(range(model.n_layers)) if layers is None else list(layers)
    batch = tokenize_adata(adata, model, var_key=var_key, layer=layer, seed=seed, max_len=max_len)
    names = [f"blocks.{l}.hook_normalized_resid_post" for l in layers]
    xs = {l: [] for l in layers}
    ids, cells = [], []
    for s in tqdm(range(0, len(batch), batch_size), desc="harvest residuals", unit="batch", disable=not progress,
                  leave=False):
        b = batch[s: s + batch_size]
        cache = model.run_with_cache(b, names=names, batch_size=batch_size, progress=False)
        keep = ~b.padding_mask
        keep[:, 0] = False  # <cls>
        for l in layers:
            xs[l].append(cache[f"blocks.{l}.hook_normalized_resid_post"][keep])
        ids.append(b.gene_ids[keep])
        cells.append((torch.arange(len(b)) + s)[:, None].expand_as(b.gene_ids)[keep])
    return {l: torch.cat(v) for l, v in xs.items()}, torch.cat(ids), torch.cat(cells)


@restores_torch_threads
def train_sae_atlas(adata, label_key: str | None = None, *, model=None, config: TranscoderConfig | None = None,
                    layers: Sequence[int] | None = None, max_len: int = 256, n_genes: int = 25, min_count: int = 5,
                    alpha: float = 0.05, var_key: str | None = None, layer: str | None = None,
                    progress: bool = True) -> SAEAtlas:
    """Train one TopK SAE per residual layer of an scGPT-architecture model and build the feature atlas."""
    from ..models.api import resolve_model

    cfg = config or TranscoderConfig(kind="topk", expansion=4, k=16, epochs=4, max_tokens=100_000)
    if label_key is not None and label_key not in adata.obs:
        raise InputError(f"obs has no column {label_key!r}; columns: {list(adata.obs.columns)}")
    model = resolve_model(model)
    layers = check_layers(layers, model.n_layers)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    X, ids, cells = harvest_residuals(model, adata, layers=layers, max_len=max_len, seed=cfg.seed, var_key=var_key,
                                      layer=layer, progress=progress)
    itos = model.vocab.itos
    uniq = torch.unique(ids)
    genes = [itos[int(i)] for i in uniq]
    token_gene = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    token_gene[uniq] = torch.arange(len(uniq))
    labels = adata.obs[label_key].astype(str).to_numpy() if label_key else None
    gen = torch.Generator().manual_seed(cfg.seed)
    saes, means, metrics, tables = {}, {}, {}, {}
    for l in layers:
        x = X[l]
        mu = x.mean(0)
        train_rows = torch.randperm(len(x), generator=gen)[: cfg.max_tokens]
        res = train_transcoder(x[train_rows] - mu, None, cfg, desc=f"SAE L{l}", progress=progress)
        saes[l], means[l] = res.transcoder, mu
        metrics[f"L{l}"] = {**res.metrics, "history": res.history}
        act = feature_activity(lambda v, s=res.transcoder, m=mu: s.encode(v - m), x, token_gene[ids], cells,
                               adata.n_obs, genes, cell_labels=labels)
        # dead = never active over ALL harvested positions (the metric above uses the held-out share only)
        metrics[f"L{l}"]["dead_all_tokens"] = int((act.fire_count == 0).sum())
        tables[l] = interpret_features(act, n_genes=n_genes, min_count=min_count, alpha=alpha)
    info = {"model": getattr(model, "source", None), "layers": layers, "n_cells": int(adata.n_obs),
            "tokens_per_layer": int(len(ids)), "max_len": max_len, "label_key": label_key,
            "input_sha256": array_sha256(adata.X)[:16], "seconds": time.perf_counter() - t0,
            "versions": package_versions()}
    return SAEAtlas(saes, means, cfg, metrics, tables, info)


def atlas_html(atlas: SAEAtlas) -> str:
    """A self-contained page: per-layer metrics, then one filterable feature table per layer."""
    summ = atlas.summary()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sclens SAE atlas</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top}"
             "tr.yes td{background:#eef8ee}input{font-size:14px;padding:4px;width:24em}",
             "</style></head><body><h1>SAE feature atlas</h1>",
             f"<p>Model: {html.escape(str(atlas.info.get('model')))}; {atlas.info.get('n_cells')} cells, "
             f"{atlas.info.get('tokens_per_layer')} gene positions per layer; TopK k={atlas.config.k}, "
             f"{atlas.config.expansion}x expansion. Interpretable = a marker set enriched among the top genes "
             f"(hypergeometric, BH q &le; {atlas.tables[min(atlas.tables)].attrs.get('alpha', 0.05) if atlas.tables else 0.05}).</p>",
             "<h2>Layers</h2>", summ.to_html(index=False, float_format=lambda v: f"{v:.3f}"),
             "<h2>Features</h2><p><input id='q' placeholder='filter: gene, cell type or label' "
             "oninput='filt()'> <label><input type='checkbox' id='only' onchange='filt()'> interpretable only"
             "</label></p>"]
    for l in sorted(atlas.tables):
        t = atlas.tables[l]
        parts.append(f"<h3>Layer {l}</h3><table class='atlas'><tr><th>feature</th><th>density</th><th>label</th>"
                     "<th>q</th><th>top genes</th><th>context genes</th><th>top cell type</th><th>specificity</th><th>top cells</th></tr>")
        for r in t.sort_values(["interpretable", "q"], ascending=[False, True]).itertuples():
            comp = ", ".join(f"{k} {v}" for k, v in (getattr(r, "top_cell_types", None) or {}).items())
            spec = getattr(r, "specificity", float("nan"))
            parts.append(
                f"<tr class='{'yes' if r.interpretable else 'no'}'><td>{r.feature}</td><td>{r.density:.4f}</td>"
                f"<td>{html.escape(str(r.label))}</td><td>{r.q:.2g}</td>"
                f"<td>{html.escape(', '.join(r.top_genes[:12]))}</td>"
                f"<td>{html.escape(', '.join((getattr(r, 'context_genes', None) or [])[:12]))}</td>"
                f"<td>{html.escape(str(getattr(r, 'top_cell_type', '')))}</td><td>{spec:.2f}</td>"
                f"<td>{html.escape(comp)}</td></tr>")
        parts.append("</table>")
    parts.append("<script>function filt(){const q=document.getElementById('q').value.toLowerCase();"
                 "const only=document.getElementById('only').checked;"
                 "document.querySelectorAll('table.atlas tr').forEach((tr,i)=>{if(!tr.querySelector('td'))return;"
                 "const ok=tr.textContent.toLowerCase().includes(q)&&(!only||tr.classList.contains('yes'));"
                 "tr.style.display=ok?'':'none';});}</script></body></html>")
    return "".join(parts)

