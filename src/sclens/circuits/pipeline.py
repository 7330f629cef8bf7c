"""The circuits run: transcoders on every MLP layer, feature interpretation, traced decisions, one report."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..utils import array_sha256, atomic_write, package_versions, write_json
from .attribution import CircuitGraph, trace_circuit, trace_heads
from .interpret import FeatureActivity, cell_lm_activity, interpret_features, interpretable_fraction
from .lm import cell_sentences, resolve_cell_lm
from .transcoders import TranscoderConfig, TranscoderSet, train_transcoders, transcoder_table


@dataclass
class CircuitsResult:
    transcoders: TranscoderSet
    tables: dict[int, pd.DataFrame]
    sample: dict
    circuits: dict[str, CircuitGraph]
    heads: dict[str, dict]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "sclens-circuits-report", "version": 1,
                "transcoders": {"config": asdict(self.transcoders.config), "table": transcoder_table(self.transcoders),
                                "lm": self.transcoders.metrics.get("lm")},
                "interpretable_sample": {k: v for k, v in self.sample.items() if k != "table"}
                | {"table": self.sample["table"].to_dict(orient="records")},
                "features": {str(l): t.to_dict(orient="records") for l, t in self.tables.items()},
                "circuits": {k: g.to_dict() for k, g in self.circuits.items()}, "heads": self.heads, "info": self.info}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = self.transcoders.save(out_dir)
        for name, g in self.circuits.items():
            for k, p in g.save(out_dir, f"circuit_{_slug(name)}").items():
                paths[f"circuit_{name}_{k}"] = p
        paths["report_json"] = write_json(out_dir / "circuits_report.json", self.to_dict())
        md = circuits_markdown(self)
        paths["report_md"] = atomic_write(out_dir / "circuits_report.md", lambda p: Path(p).write_text(md))
        paths["report_html"] = atomic_write(out_dir / "circuits_report.html",
                                            lambda p: Path(p).write_text(circuits_html(self, out_dir)))
        return paths

    @classmethod
    def load(cls, folder: str | Path) -> "CircuitsResult":
        """Reload a saved run (``circuits_report.json`` + the transcoders) from its folder."""
        import json

        f = Path(folder)
        f = f / "circuits_report.json" if f.is_dir() else f
        if not f.is_file():
            raise InputError(f"{folder} holds no circuits_report.json (run `sclens circuits transcoders`)")
        d = json.loads(f.read_text())
        if d.get("format") != "sclens-circuits-report":
            raise InputError(f"{f} is not an sclens circuits report")
        s = d["interpretable_sample"]
        sample = {k: v for k, v in s.items() if k != "table"} | {"table": pd.DataFrame(s["table"])}
        return cls(TranscoderSet.load(f.parent), {int(l): pd.DataFrame(t) for l, t in d["features"].items()}, sample,
                   {k: CircuitGraph.from_dict(g) for k, g in d["circuits"].items()}, d["heads"], d["info"])


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()


def concat_activity(acts: dict[int, FeatureActivity]) -> tuple[FeatureActivity, list[tuple[int, int]]]:
    """All layers' features side by side (same cells and genes), with the (layer, feature) of each column."""
    layers = sorted(acts)
    a0 = acts[layers[0]]
    keys = [(l, f) for l in layers for f in range(acts[l].n_features)]
    cat = FeatureActivity(a0.genes, np.concatenate([acts[l].gene_sum for l in layers], 1), a0.gene_count,
                          np.concatenate([acts[l].cell_max for l in layers], 1),
                          np.concatenate([acts[l].fire_count for l in layers]), a0.n_tokens, a0.cell_labels,
                          a0.cell_genes)
    return cat, keys


def _decision_cell(model, sentences, labels, target: str) -> int:
    """The held-out cell of type ``target`` that the model calls ``target`` with the largest margin."""
    idx = [i for i, lab in enumerate(labels) if lab == target]
    if not idx:
        raise InputError(f"no evaluation cell of type {target!r}")
    L = model.label_logits([sentences[i] for i in idx])
    j = model.vocab.labels.index(target)
    margin = L[:, j] - np.delete(L, j, axis=1).max(1)
    if margin.max() <= 0:
        raise InputError(f"the model calls no evaluation cell of type {target!r} correctly; nothing to trace")
    return idx[int(margin.argmax())]


def run_circuits(adata, label_key: str, *, model=None, config: TranscoderConfig | None = None,
                 layers: Sequence[int] | None = None, decisions: Sequence[str] | None = None,
                 eval_fraction: float = 0.2, n_sample: int = 20, max_nodes: int = 24, seed: int = 0,
                 known_genes_only: bool = False, var_key: str | None = None, layer: str | None = None,
                 device: str | None = None, progress: bool = True) -> CircuitsResult:
    """Transcoders on the MLP layers of a cell-sentence model, their features interpreted, decisions traced.

    Cells are split (stratified, ``seed``) into transcoder-training and evaluation cells; losses, feature
    statistics and traced cells come from the evaluation cells, features' gene statistics from all cells.
    ``decisions`` defaults to "monocytes" and "nk" where the model has them, else its first label.
    Sentences are built as in training (genes outside the vocabulary become ``<unk>``); with
    ``known_genes_only`` they are built from the vocabulary's genes only, which helps data measured on a
    small gene panel (fewer positions wasted on ``<unk>``) but differs from the training input.

    ``device`` (auto, cpu, cuda, cuda:N) places the model for its forward passes (harvesting MLP inputs and
    outputs, spliced and ablated losses); the transcoders train on the CPU, and the traced decisions (a few
    gradient passes over single sentences) run on the CPU, where the model is moved back at the end.
    """
    from sklearn.model_selection import train_test_split

    t0 = time.perf_counter()
    model = resolve_cell_lm(model, device)
    if model.vocab is None:
        raise InputError("the circuits run needs an sclens gene-level model (official BPE models: use the "
                         "transcoder and attribution functions directly)")
    if label_key not in adata.obs:
        raise InputError(f"obs has no column {label_key!r}; columns: {list(adata.obs.columns)}")
    labels = adata.obs[label_key].astype(str).to_numpy()
    unknown = sorted(set(labels) - set(model.vocab.labels))
    if unknown:
        raise InputError(f"cell types {unknown} are not among the model's labels {model.vocab.labels}")
    if decisions is None:
        decisions = [d for d in ("monocytes", "nk") if d in model.vocab.labels] or model.vocab.labels[:1]
    missing = [d for d in decisions if d not in model.vocab.labels]
    if missing:
        raise InputError(f"decision(s) {missing} are not among the model's labels {model.vocab.labels}")
    names = adata.var[var_key].astype(str).to_numpy() if var_key else np.asarray(adata.var_names, dtype=str)
    known = np.isin(np.char.upper(names.astype(str)), model.vocab.genes)
    if known.sum() < 10:
        raise InputError(f"only {int(known.sum())} of the data's genes are in the model's vocabulary "
                         f"(e.g. {model.vocab.genes[:5]}); are the gene names symbols?")
    sents = cell_sentences(adata[:, known] if known_genes_only else adata, top_k=model.vocab.top_k, seed=seed,
                           layer=layer, var_key=var_key)
    idx = np.arange(adata.n_obs)
    tr, ev = train_test_split(idx, test_size=eval_fraction, random_state=seed, stratify=labels)
    cfg = config or TranscoderConfig(seed=seed)
    ts = train_transcoders(model, [sents[i] for i in tr], labels[tr], cfg, layers=layers,
                           eval_sentences=[sents[i] for i in ev], eval_labels=labels[ev], progress=progress)
    acts = cell_lm_activity(model, ts.transcoders, sents, labels, progress=progress)
    model_device = str(model.device)
    model.to("cpu")  # attribution: gradients through the model and the (CPU) transcoders together
    tables = {l: interpret_features(a) for l, a in acts.items()}
    cat, keys = concat_activity(acts)
    sample = interpretable_fraction(cat, n=n_sample, seed=seed)
    sample["features"] = [f"L{keys[f][0]}.F{keys[f][1]}" for f in sample["features"]]
    sample["table"] = sample["table"].assign(feature=[f"L{keys[f][0]}.F{keys[f][1]}" for f in sample["table"].feature])
    by_feature = {l: t.set_index("feature") for l, t in tables.items()}
    circuits, heads, skipped = {}, {}, {}
    ev_s, ev_l = [sents[i] for i in ev], labels[ev]
    for target in decisions:
        try:
            c = _decision_cell(model, ev_s, ev_l, target)
        except InputError as exc:
            skipped[target] = str(exc)
            continue
        g = trace_circuit(model, ts.transcoders, ev_s[c], target, max_nodes=max_nodes)
        g.target["cell"] = str(adata.obs_names[ev[c]])
        for n in g.nodes:
            if n["type"] == "feature":
                row = by_feature[n["layer"]].loc[n["feature"]]
                n.update(top_genes=list(row["top_genes"][:10]), context_genes=list(row.get("context_genes", [])[:10]),
                         feature_label=row["label"], q=float(row["q"]), top_cell_type=row.get("top_cell_type"))
        circuits[target] = g
        feats = sorted((n for n in g.features() if n["layer"] > 0), key=lambda n: -n["influence"])
        if feats:
            top = feats[0]
            ids = model.encode_cells([ev_s[c]])[0]
            heads[target] = trace_heads(model, ts.transcoders, ids, top["layer"], top["pos"], top["feature"])
    info = {"model": model.source, "label_key": label_key, "n_cells": int(adata.n_obs), "n_train_cells": len(tr),
            "n_eval_cells": len(ev), "decisions": list(decisions), "skipped_decisions": skipped, "seed": seed,
            "genes_in_vocabulary": int(known.sum()), "known_genes_only": known_genes_only, "device": model_device,
            "input_sha256": array_sha256(adata.X)[:16], "seconds": time.perf_counter() - t0,
            "versions": package_versions(("sclens", "torch", "transformers", "numpy", "anndata"))}
    return CircuitsResult(ts, tables, sample, circuits, heads, info)


# -------------------------------------------------------------------------------------------- reporting


def _fmt(v, nd=3):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def circuits_markdown(res: CircuitsResult) -> str:
    lm = res.transcoders.metrics.get("lm", {})
    out = [f"Model `{res.info.get('model')}`; {res.info.get('n_eval_cells')} evaluation cells "
           f"({res.info.get('genes_in_vocabulary')} of the data's genes in its vocabulary), "
           f"transcoders ({res.transcoders.config.kind}, k={res.transcoders.config.k}, "
           f"{res.transcoders.config.expansion}x) trained on {res.info.get('n_train_cells')} cells.", "",
           "### Transcoders per MLP layer", "",
           "| layer | features | L0 | FVU | dead | loss recovered (next gene) | loss recovered (cell type) |",
           "|---|---|---|---|---|---|---|"]
    for r in transcoder_table(res.transcoders):
        out.append(f"| {r['layer']} | {r['d_sae']} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['dead_fraction']:.3f} | "
                   f"{_fmt(r['recovered_gene_ce'])} | {_fmt(r['recovered_celltype_ce'])} |")
    if lm:
        out += ["", "| model | next-gene CE | cell-type CE | cell-type accuracy |", "|---|---|---|---|"]
        for k, name in (("clean", "clean"), ("spliced", "all transcoders spliced in"), ("mlp_ablated", "all MLPs zero-ablated")):
            m = lm[k]
            out.append(f"| {name} | {m['gene_ce']:.3f} | {m['celltype_ce']:.3f} | {m['celltype_accuracy']:.3f} |")
        out += ["", f"Fraction of loss recovered with every transcoder spliced in: next gene "
                    f"{_fmt(lm['recovered_gene_ce'])}, cell type {_fmt(lm['recovered_celltype_ce'])}."]
    s = res.sample
    out += ["", "### Gene-level interpretability", "",
            f"{s['n_interpretable']} of {s['n_sampled']} randomly sampled live features are gene-level interpretable "
            f"(a marker set enriched among their top genes, BH q <= {s['table'].attrs.get('alpha', 0.05)}; the "
            "published study: 7 of 20). Top genes: highest mean activation where the gene is the token; context genes: "
            "most over-represented in the sentences of the feature's top cells.", "",
            "| feature | label | q | top genes | context genes | top cell type |", "|---|---|---|---|---|---|"]
    for r in s["table"].itertuples():
        out.append(f"| {r.feature} | {r.label} | {r.q:.2g} | {', '.join(r.top_genes[:6])} | "
                   f"{', '.join((getattr(r, 'context_genes', None) or [])[:6])} | {getattr(r, 'top_cell_type', '')} |")
    for name, why in res.info.get("skipped_decisions", {}).items():
        out += ["", f"Decision '{name}' not traced: {why}."]
    for name, g in res.circuits.items():
        out += ["", f"### Circuit: '{name}'", "",
                f"Cell `{g.target.get('cell')}` (predicted {g.target['predicted']}); logit contrast "
                f"{g.scores['target_value']:.2f}; {g.scores['nodes']} nodes, {g.scores['edges']} edges; error share "
                f"of the logit's direct inputs {_fmt(g.scores['root_error_share'])}.", "",
                "| node | influence | activation | label | top genes | context genes |", "|---|---|---|---|---|---|"]
        for n in g.nodes:
            if n["type"] == "feature":
                out.append(f"| {n['id']} | {n['influence']:.3f} | {n['activation']:.2f} | {n.get('feature_label')} | "
                           f"{', '.join(n.get('top_genes', [])[:6])} | {', '.join(n.get('context_genes', [])[:6])} |")
            elif n["type"] == "embed":
                out.append(f"| {n['id']} (gene {n.get('gene') or n['token']}) | {n['influence']:.3f} | | | | |")
        if name in res.heads:
            h = res.heads[name]
            out += ["", f"Heads carrying the input of {h['target']['layer']}.F{h['target']['feature']}: " +
                    ", ".join(f"{x['head']} ({x['contribution']:+.2f})" for x in h["heads"][:4])]
    return "\n".join(out) + "\n"


def circuits_fragment(md: str, folder: Path) -> str:
    """The report's Markdown as HTML, each circuit's plot (``circuit_<label>.png`` in ``folder``) inlined."""
    from ..htmlkit import md_to_html

    parts = []
    for chunk in md_to_html(md).split("\n"):
        parts.append(chunk)
        if chunk.startswith("<h3>Circuit: "):
            name = html.unescape(chunk[len("<h3>Circuit: "):-len("</h3>")]).strip("'")
            png = Path(folder) / f"circuit_{_slug(name)}.png"
            if png.is_file():
                b64 = base64.b64encode(png.read_bytes()).decode()
                parts.append(f"<img style='max-width:100%' alt='circuit {html.escape(name)}' "
                             f"src='data:image/png;base64,{b64}'>")
    return "\n".join(parts)


def circuits_html(res: CircuitsResult, out_dir: Path) -> str:
    """A self-contained page (works offline): the Markdown report with the circuit plots inlined."""
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "font-size:13px;margin:1em 0}td,th{border:1px solid #ddd;padding:3px 6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sclens circuits</title><style>{style}</style>"
            f"</head><body><h1>Circuits report</h1>{circuits_fragment(circuits_markdown(res), out_dir)}"
            "</body></html>")
