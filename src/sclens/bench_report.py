"""Benchmark reports: ``bench_<name>.json`` + a self-contained ``bench_<name>.html`` (plotly, offline)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .htmlkit import ensure_plotly_js, md_to_html
from .utils import atomic_write, write_json


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def summary_markdown(result) -> str:
    """The headline tables as Markdown (endpoint x method: mean [CI]; comparisons with q-values)."""
    info = result.info
    lines = [f"### {info.get('title', result.name)}", ""]
    if "n_cells" in info:
        caveat = _scheme_caveat(info).replace("<b>", "**").replace("</b>", "**")
        lines += [f"{info['n_cells']} cells, {info['n_donors']} donors, panel {info['panel_size']} genes "
                  f"({info['value_kind']}); scheme {info['scheme']}, {info['n_splits']} splits, seed {info['seed']}."
                  + caveat, ""]
    s = result.summary
    for (ep, metric), sub in s.groupby(["endpoint", "metric"], sort=False):
        first = sub.iloc[0]
        if first["kind"] == "diagnostic":
            extra = first["floor_rule"]
        elif first["kind"] == "depth":
            extra = f"ceiling {_fmt(first['ceiling'])}"
        else:
            extra = f"floor {_fmt(first['floor'])} ({first['floor_rule']})"
        sat = " — **saturated**: no win claimed" if first["saturated"] else ""
        lines += [f"**{ep} · {metric}** ({extra}{sat})", "", "| method | mean | 95% CI | splits |", "|---|---|---|---|"]
        for _, r in sub.sort_values("mean", ascending=False).iterrows():
            lines.append(f"| {r['method']} | {_fmt(r['mean'])} | {_fmt(r['ci_low'])} – {_fmt(r['ci_high'])} | {r['n_splits']} |")
        lines.append("")
    c = result.comparisons
    if len(c):
        lines += ["**sclens_extracted vs each method** (paired two-sided Wilcoxon across splits, BH over all rows)", "",
                  "| endpoint | metric | vs | mean diff | W/T/L | p | q | verdict |", "|---|---|---|---|---|---|---|---|"]
        for _, r in c.iterrows():
            lines.append(f"| {r['endpoint']} | {r['metric']} | {r['method']} | {_fmt(r['mean_diff'])} | "
                         f"{r['wins']}/{r['ties']}/{r['losses']} | {_fmt(r['p'], 4)} | {_fmt(r['q'], 4)} | {r['verdict']} |")
        lines.append("")
    a = getattr(result, "ablations", None)
    if a is not None and len(a):
        lines += ["**Controls** — what the model contributes (sclens_extracted − extracted_random: same adaptor and "
                  "readouts on a random-weights copy's operator) and what the adaptor costs (extracted_identity − pca10: "
                  "two 10-d linear maps of the same panel, same readouts); paired two-sided Wilcoxon across splits, BH "
                  "over this table", "",
                  "| question | endpoint | metric | method | baseline | method mean | baseline mean | diff | W/T/L | q | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in a.iterrows():
            lines.append(f"| {r['question']} | {r['endpoint']} | {r['metric']} | {r['method']} | {r['baseline']} | "
                         f"{_fmt(r['mean_method'])} | {_fmt(r['mean_baseline'])} | {_fmt(r['mean_diff'])} | "
                         f"{r['wins']}/{r['ties']}/{r['losses']} | {_fmt(r['q'], 4)} | {r['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def runtime_table(result) -> pd.DataFrame:
    rt = result.runtime[~result.runtime["method"].isin(list(result.skipped))]
    one = rt[rt.split < 0].groupby("method")["seconds"].sum().rename("one_time_s")
    per = rt[rt.split >= 0].groupby(["method", "split"])["seconds"].sum().groupby("method").mean().rename("per_split_s")
    tot = rt.groupby("method")["seconds"].sum().rename("total_s")
    df = pd.concat([one, per, tot], axis=1).fillna(0.0).reset_index()
    df["params_trainable"] = [result.params.get(m, {}).get("total", np.nan) for m in df["method"]]
    return df.sort_values("total_s")


def figures(result, js: str | bool = "directory") -> list[str]:
    """Per-endpoint box plots; ``js`` is how the first figure loads plotly ("directory": the shared
    ``plotly.min.js`` beside the page; False: the page already has it)."""
    import plotly.graph_objects as go

    divs = []
    first = True
    for (ep, metric), sub in result.scores.groupby(["endpoint", "metric"], sort=False):
        fig = go.Figure()
        for mname, g in sub.groupby("method", sort=False):
            fig.add_trace(go.Box(y=g["value"], name=mname, boxpoints="all", jitter=0.4, pointpos=0,
                                 hovertext=[f"split {s}: {t}" for s, t in zip(g["split"], g["test_groups"])]))
        summ = result.summary[(result.summary.endpoint == ep) & (result.summary.metric == metric)]
        if len(summ):
            r = summ.iloc[0]
            for val, label, dash in ((r["floor"], "floor", "dot"), (r["ceiling"], "ceiling", "dash")):
                if val is not None and np.isfinite(val) and (label == "floor" or r["kind"] == "depth"):
                    fig.add_hline(y=val, line_dash=dash, annotation_text=label)
        fig.update_layout(title=f"{ep} · {metric} (one point per split)", height=380, showlegend=False,
                          margin=dict(l=40, r=20, t=50, b=80))
        # one shared plotly.min.js beside the reports (written by write_report), not 4.6 MB inside each page
        divs.append(fig.to_html(full_html=False, include_plotlyjs=js if first else False))
        first = False
    return divs


def _scheme_caveat(info: dict) -> str:
    if info.get("scheme") == "source":
        return (f" <b>Cross-source</b>: trained on the other sources, tested on {html.escape(', '.join(info.get('test_sources') or []))}"
                "; each source is one donor, so source and donor coincide (splits vary the training subsample and the "
                "test fold, not the donor).")
    if info.get("source_equals_donor"):
        return " <b>Source and donor coincide</b> (cell-level splits within one source)."
    return ""


def write_report(result, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{result.name}"
    payload = result.to_dict()
    payload["runtime_table"] = runtime_table(result).to_dict("records")
    paths = {"json": write_json(out_dir / f"{stem}.json", payload)}
    md = summary_markdown(result)
    paths["md"] = atomic_write(out_dir / f"{stem}.md", lambda p: Path(p).write_text(md + "\n"))
    info = result.info
    sections = [f"<h1>{html.escape(info.get('title', result.name))}</h1>",
                f"<p>{info['n_cells']} cells, {info['n_donors']} donors, panel {info['panel_size']} genes "
                f"({html.escape(info['value_kind'])}); scheme <b>{info['scheme']}</b>, {info['n_splits']} splits, seed {info['seed']}."
                + _scheme_caveat(info)
                + "</p>"]
    for note in info.get("notes", []):
        sections.append(f"<p class='note'>{html.escape(note)}</p>")
    if result.skipped:
        sections.append("<h2>Skipped methods</h2><ul>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in result.skipped.items()) + "</ul>")
    sections.append("<h2>Endpoints and comparisons</h2>")
    sections.append(md_to_html(md))
    sections.append("<h2>Runtime (seconds) and trainable parameters</h2>")
    sections.append(runtime_table(result).to_html(index=False, float_format=lambda v: f"{v:.2f}"))
    rr = info.get("runtime_ratio", {})
    if "mlp_probe_over_extracted" in rr:
        sections.append(f"<p>Campaign runtime, frozen model + MLP probe over extracted head: "
                        f"<b>{rr['mlp_probe_over_extracted']:.1f}×</b> (same run).</p>")
    sections.append("<h2>Scores across splits</h2>")
    sections += figures(result)
    sections.append(f"<p><small>root rule: {html.escape(info.get('root_rule', ''))}; versions: "
                    f"{html.escape(str(info.get('versions')))}</small></p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(stem) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:2px 6px} .note{color:#555}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    ensure_plotly_js(out_dir)
    paths["html"] = atomic_write(out_dir / f"{stem}.html", lambda p: Path(p).write_text(page))
    return paths


