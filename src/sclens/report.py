"""One HTML page that gathers whatever stages of a run exist in a folder (plus the JSON index it was built from).

``build_report(run_dir)`` looks for, and shows when present:

* ``report.json`` (written by ``sclens demo``): run settings, data summaries, timings;
* screen folders (``screen_table.csv`` + ``screen_report.json``): the layers × heads heatmaps per operator kind
  and the top hypotheses with their gates;
* ``viewer.json`` (written with ``viewer.html`` by :meth:`sclens.viz.ManifoldView.save`): the 3-D viewer, live;
* ``bench*/bench_<name>.json``: the benchmark tables, comparisons with q-values, runtimes and per-split plots;
* ``compress*/compress_<name>.json``: the compaction table, factor-impact curve and factor cards.

Everything is in one self-contained file (plotly's JavaScript inlined once, PNG heatmaps embedded). Static
matplotlib versions of the plots go to ``report_figures/*.png`` for papers. A section whose inputs are absent
says so; nothing is invented.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .errors import InputError, SclensError
from .utils import atomic_write, write_json

SCREEN_COLUMNS = ["featurisation", "layer", "head", "fitter", "trustworthiness", "ruler_spearman_resid",
                  "holdout_random", "holdout_donor", "holdout_branch", "perm_p", "q", "passes_gates", "null_passes",
                  "passes_published", "margin_over_raw", "margin_over_random", "gate_learned", "passes_all", "stopped_at",
                  "failure"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}' style='max-width:100%'>"


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    fmt = {c: (lambda v, d=digits: "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}g}"
               if isinstance(v, float) and abs(v) < 1e-3 and v != 0 else f"{v:.{d}f}")
           for c in df.columns if df[c].dtype.kind == "f"}
    return df.to_html(index=False, formatters=fmt, border=0, classes="t", escape=True)


def _find(run_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in run_dir.rglob(pattern) if "artifacts" not in p.parts and "cache" not in p.parts)


# ---------------------------------------------------------------------------- sections
def _run_section(run: dict) -> str:
    rows = [("sclens", run.get("sclens_version")), ("seed", run.get("seed")), ("quick", run.get("quick")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items()))]
    t = run.get("timings_s") or {}
    out = "<table class='t'>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                        for k, v in rows) + "</table>"
    if t:
        out += "<h3>Wall time per stage (s)</h3>" + _table(pd.DataFrame([{k: float(v) for k, v in t.items()}]), 1)
    return out


def _data_section(run: dict) -> str | None:
    data = (run.get("stages") or {}).get("data")
    if not data:
        return None
    rows = []
    for name, d in data.items():
        v = d.get("validation", {})
        rows.append({"data set": name + (" (SYNTHETIC)" if d.get("synthetic") else ""), "cells": v.get("n_cells"),
                     "genes": v.get("n_genes"), "values": v.get("kind"), "gene ids": v.get("gene_id_type"),
                     "median library": v.get("median_library_size"), "panel genes": d.get("panel_size"),
                     "donors": d.get("n_donors"), "stage mapping": d.get("stage_mapping"),
                     "input sha256": str(d.get("input_sha256", ""))[:16]})
    return _table(pd.DataFrame(rows), 0)


def _screen_section(folder: Path) -> tuple[str, list[Path]]:
    from .screen import ScreenReport

    sr = ScreenReport.load(folder)
    table, info = sr.table, sr.info
    used = [f for f in (folder / "screen_table.csv", folder / "screen_report.json") if f.is_file()]
    lg = info.get("learned_gate") or {}
    if lg.get("evaluated"):
        learned = (f" The <b>learned</b> gate (beat the raw panel and the {lg.get('random_quantile', 0.95):.0%} quantile "
                   f"of {lg.get('n_random_copies')} random-weights copies of the model, same kind and fitter) passes "
                   f"{lg.get('n_passing_learned')}; {lg.get('n_passing_published')} pass the published gates alone.")
    elif lg:
        learned = f" The learned gate was {html.escape(lg.get('note', 'not evaluated'))}."
    else:
        learned = ""
    n_failed = info.get("n_failed") or 0
    parts = [f"<p>{len(table)} hypotheses; {int(table['passes_all'].sum())} pass every gate with the paired null "
             f"failing.{learned}" + (f" {n_failed} could not be evaluated (reason in 'failure')." if n_failed else "")
             + f" Gate file sha256 {html.escape(str(sr.gates_sha256 or '–')[:16])}.</p>"]
    cols = [c for c in SCREEN_COLUMNS if c in table.columns]
    parts.append("<h3>Top hypotheses</h3>" + _table(table[cols].head(10)))
    for png in sorted(folder.glob("screen_heatmap_*.png")) + sorted(folder.glob("screen_top_unit_3d.png")):
        parts.append(f"<figure>{_img(png, png.stem)}<figcaption>{html.escape(png.stem)}</figcaption></figure>")
        used.append(png)
    return "".join(parts), used


def _bench_section(path: Path, figdir: Path) -> tuple[str, list[Path]]:
    from .bench import BenchResult
    from .bench_report import figures, runtime_table, summary_markdown
    from .htmlkit import md_to_html

    res = BenchResult.load(path)
    parts = [md_to_html(summary_markdown(res))]
    if res.skipped:
        parts.append("<p>Skipped: " + "; ".join(f"<b>{html.escape(k)}</b> ({html.escape(v)})"
                                                for k, v in res.skipped.items()) + "</p>")
    parts.append("<h3>Runtime and parameters</h3>" + _table(runtime_table(res), 1))
    parts += figures(res, js=False)
    png = figdir / f"{path.stem}.png"
    _bench_png(res, png)
    return "".join(parts), [path, png]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, png: Path) -> None:
    atomic_write(png, lambda p: fig.savefig(p, dpi=130, format="png"))
    _pyplot().close(fig)


def _bench_png(res, png: Path) -> None:
    plt = _pyplot()

    groups = list(res.scores.groupby(["endpoint", "metric"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), squeeze=False)
    for ax, ((ep, metric), sub) in zip(axes[0], groups):
        methods = list(dict.fromkeys(sub["method"]))
        ax.boxplot([sub[sub.method == m]["value"].dropna().to_numpy() for m in methods])
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{ep}\n{metric}", fontsize=8)
    fig.suptitle(f"{res.info.get('title', res.name)} (one value per split)", fontsize=9)
    fig.tight_layout()
    _save_png(fig, png)


def _compress_section(path: Path, figdir: Path) -> tuple[str, list[Path]]:
    import plotly.graph_objects as go

    from .compress import CompressResult, summary_markdown
    from .htmlkit import md_to_html

    res = CompressResult.load(path)
    rk = res.ranking
    fig = go.Figure(go.Scatter(x=rk["rank_by_impact"], y=rk["cumulative_share"], mode="lines+markers"))
    fig.update_layout(title="Factor impact curve (cumulative share of the pooled drop)", height=340,
                      xaxis_title="top-k factors", yaxis_title="share")
    png = figdir / f"{path.stem}.png"
    _compress_png(res, png)
    return md_to_html(summary_markdown(res)) + fig.to_html(full_html=False, include_plotlyjs=False), [path, png]


def _circuits_section(path: Path) -> tuple[str, list[Path]]:
    from .circuits.pipeline import CircuitsResult, circuits_fragment, circuits_markdown

    try:
        res = CircuitsResult.load(path.parent)
    except SclensError as exc:
        return f"<p>{html.escape(str(exc))}</p>", [path]
    return (circuits_fragment(circuits_markdown(res), path.parent),
            [path, path.with_name("transcoders.json"), *sorted(path.parent.glob("circuit_*.png"))])


def _sae_section(path: Path, page_dir: Path) -> tuple[str, list[Path]]:
    from .circuits.sae import SAEAtlas

    try:
        atlas = SAEAtlas.load(path.parent)
    except SclensError as exc:
        return f"<p>{html.escape(str(exc))}</p>", [path]
    parts = [_table(atlas.summary())]
    for layer, table in atlas.tables.items():
        feats = table.to_dict(orient="records")
        good = sorted((f for f in feats if f.get("interpretable")), key=lambda f: f["q"])[:5]
        if good:
            parts.append(f"<p><b>Layer {html.escape(str(layer))}</b>, most significant features: " + "; ".join(
                f"F{f['feature']} {html.escape(str(f['label']))} (q={f['q']:.2g}: "
                f"{html.escape(', '.join(f['top_genes'][:6]))})" for f in good) + "</p>")
    page = path.with_suffix(".html")
    if page.is_file():
        rel = os.path.relpath(page, page_dir)
        parts.append(f"<p>Every feature of every layer, filterable: <a href='{html.escape(rel)}'>{html.escape(rel)}</a></p>")
    return "".join(parts), [path, path.with_suffix(".safetensors")]


def _compress_png(res, png: Path) -> None:
    plt = _pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    rk = res.ranking
    a.plot(rk["rank_by_impact"], rk["cumulative_share"], marker=".")
    a.set_xlabel("top-k factors")
    a.set_ylabel("share of total impact")
    a.set_title("factor impact curve", fontsize=9)
    v = res.variants
    b.bar(v["variant"], v["file_bytes"])
    b.set_yscale("log")
    b.set_ylabel("file bytes")
    b.tick_params(axis="x", rotation=45)
    b.set_title("artifact size", fontsize=9)
    fig.tight_layout()
    _save_png(fig, png)


def _viewer_png(view, png: Path) -> None:
    plt = _pyplot()

    v = view.views[0]
    a = v.anchors
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    for i, (br, sub) in enumerate(a.groupby("branch")):
        ax.scatter(sub["a1"], sub["a2"], sub["a3"], s=12 + 10 * np.log10(sub["n_cells"]), label=br,
                   marker="D" if br == "stem_progenitor" else "o", color=plt.cm.tab10(i % 10), edgecolor="k", lw=0.3)
    ax.set_xlabel("latent 1")
    ax.set_ylabel("latent 2")
    ax.set_zlabel("latent 3")
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title(f"{v.name}: anchors by branch", fontsize=9)
    _save_png(fig, png)


# ---------------------------------------------------------------------------- the page
def build_report(run_dir: str | Path, out: str | Path | None = None, *, title: str | None = None) -> Path:
    """Gather every stage found under ``run_dir`` into ``out`` (default ``run_dir/sclens_report.html``), with
    ``<out stem>.json`` (what was found, from which files, with their sha256) and ``report_figures/*.png``."""
    from plotly.offline import get_plotlyjs

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder of sclens outputs")
    out = Path(out) if out else run_dir / "sclens_report.html"
    figdir = out.parent / "report_figures"
    figdir.mkdir(parents=True, exist_ok=True)
    run = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").is_file() else {}
    sections: list[tuple[str, str, str]] = []  # (anchor id, title, html)
    sources: list[Path] = [run_dir / "report.json"] if run else []
    missing: list[str] = []
    if run:
        sections.append(("run", "Run", _run_section(run)))
    data = _data_section(run) if run else None
    sections.append(("data", "Data", data)) if data else missing.append("data summary (no report.json)")
    screens = [p.parent for p in _find(run_dir, "screen_table.csv")]
    for i, folder in enumerate(screens):
        body, used = _screen_section(folder)
        sections.append((f"screen{i}", f"Unit screen — {folder.relative_to(run_dir) if folder != run_dir else '.'}", body))
        sources += used
    if not screens:
        missing.append("unit screen (no screen_table.csv)")
    viewers = _find(run_dir, "viewer*.json")
    for i, vj in enumerate(viewers):
        from .viz import ManifoldView

        view = ManifoldView.from_json(vj)
        png = figdir / f"{vj.stem}.png"
        _viewer_png(view, png)
        sections.append((f"viewer{i}", f"3-D manifold viewer — {vj.stem}", view.fragment()))
        sources += [vj, png]
        if i == 0:
            break  # one live viewer per page: its controls have fixed ids
    if not viewers:
        missing.append("3-D viewer (no viewer.json; write one with `sclens view`)")
    for path in _find(run_dir, "circuits_report.json"):
        body, used = _circuits_section(path)
        sections.append((f"circuits{len(sections)}", f"Circuits — {path.parent.relative_to(run_dir)}", body))
        sources += used
    for path in _find(run_dir, "sae_atlas.json"):
        body, used = _sae_section(path, out.parent)
        sections.append((f"sae{len(sections)}", f"SAE atlas — {path.parent.relative_to(run_dir)}", body))
        sources += used
    for stem, label, section in (("bench", "Benchmark", _bench_section), ("compress", "Compression", _compress_section)):
        found = _find(run_dir, f"{stem}_*.json")
        for i, path in enumerate(found):
            body, used = section(path, figdir)
            sections.append((f"{stem}{i}", f"{label} — {path.stem.removeprefix(stem + '_')}", body))
            sources += used
        if not found:
            missing.append(f"{label.lower()} (no {stem}_*.json)")
    title = title or f"sclens report — {run_dir.resolve().name}"
    nav = " · ".join(f"<a href='#{sid}'>{html.escape(t)}</a>" for sid, t, _ in sections)
    body = "".join(f"<section id='{sid}'><h2>{html.escape(t)}</h2>{h}</section>" for sid, t, h in sections)
    if missing:
        body += "<section id='missing'><h2>Not in this run</h2><ul>" + "".join(
            f"<li>{html.escape(m)}</li>" for m in missing) + "</ul></section>"
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<script type='text/javascript'>" + get_plotlyjs() + "</script><style>"
            "body{font-family:sans-serif;max-width:1250px;margin:auto;padding:0 12px}"
            "table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 6px}"
            "section{border-top:2px solid #ddd;margin-top:18px}figure{display:inline-block;max-width:48%;margin:4px}"
            "nav{position:sticky;top:0;background:#fff;padding:6px 0;font-size:13px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>{body}"
            f"<p style='font-size:11px;color:#777'>sclens {__version__}; built {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"from {len(sources)} files listed with their sha256 in {html.escape(out.with_suffix('.json').name)}.</p>"
            "</body></html>")
    index = {"sclens_version": __version__, "run_dir": str(run_dir), "title": title,
             "sections": [{"id": sid, "title": t} for sid, t, _ in sections], "missing": missing,
             "sources": [{"path": str(p.relative_to(run_dir) if p.is_relative_to(run_dir) else p), "sha256": _sha(p)}
                         for p in sources if p.is_file()],
             "figures": sorted(str(p.relative_to(out.parent)) for p in figdir.glob("*.png"))}
    write_json(out.with_suffix(".json"), index)
    return atomic_write(out, lambda p: Path(p).write_text(page, encoding="utf-8"))
