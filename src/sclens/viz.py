"""The interactive 3-D manifold viewer: one self-contained HTML file (plotly's JavaScript inlined; opens offline).

What it shows (DESIGN.md "Viewer"), per extracted artifact:

* **anchors** (donor × tissue × cell-type centroids mapped to stages) in the first three latent axes, sized by
  log10 cell count; stem / progenitor anchors drawn as diamonds, all others as circles; coloured by fine stage
  or by branch (a control switches); hover gives stage, branch, donor, tissue and cell count;
* **lens**: the third axis replaced by the latent axis (among axes 3..d, those not already on screen) that
  best separates a chosen contrast (e.g. CD4 vs CD8 T cells) on sampled cells, with that contrast's AUROC in
  the title (every axis's AUROC is kept in ``info['lens']``);
* an optional **density cloud** of up to ``n_cells`` sampled cells;
* several artifacts (variants) in one page, chosen with a selector.

"Latent axes" are the adaptor's latent rotated onto its principal axes over the anchors (a rotation about the
anchor mean: distances and angles between anchors are unchanged), so "the first three" are the three with
the most spread. The page's controls are plain HTML elements driving ``Plotly.restyle`` / ``relayout``; their
ids (``sclens-artifact``, ``sclens-colour``, ``sclens-lens``, ``sclens-cloud``) are stable for tests.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__
from .ontology import parse_label_groups
from .errors import InputError
from .utils import atomic_write

PROGENITOR_BRANCH = "stem_progenitor"
DIV_ID = "sclens-viewer"


@dataclass
class ArtifactView:
    """The coordinates one artifact gives the anchors and the sampled cells."""

    name: str
    anchors: pd.DataFrame  # stage, branch, donor, tissue, n_cells, progenitor, a1, a2, a3, lens
    cells: pd.DataFrame  # a1, a2, a3, lens, label
    lens: dict | None  # {"axis": k (1-based), "auroc": ..., "contrast": "..."}
    explained: list[float] = field(default_factory=list)  # share of anchor latent variance per shown axis
    evidence: str = ""  # the operator's screen evidence (gates, margins over raw and random-weights copies), if any


def screen_evidence(source: dict) -> str:
    """One line on what the screen said of an artifact's operator: gates passed and the learned-gate margins."""
    sc = (source or {}).get("screen")
    if not sc:
        return ""
    def num(k):
        v = sc.get(k)
        return f"{v:+.3f}" if isinstance(v, (int, float)) and np.isfinite(v) else "n/a"
    learned = sc.get("gate_learned")
    learned = "not evaluated" if learned is None or (isinstance(learned, float) and not np.isfinite(learned)) else (
        "passes" if bool(learned) else "fails")
    return (f"screen: {sc.get('featurisation')} {sc.get('fitter')}, gates {'pass' if sc.get('passes_all') else 'fail'}; "
            f"learned {learned} (margin over raw {num('margin_over_raw')}, over random weights {num('margin_over_random')})")


def _contrast_mask(labels: np.ndarray, stages: np.ndarray, group: list[str]) -> np.ndarray:
    """Cells whose label, or whose DAG stage, is in ``group``."""
    return np.isin(labels, group) | np.isin(stages.astype(str), group)


def _view_one(name: str, model, adata: ad.AnnData, *, label_key: str, donor_key: str | None, tissue_key: str | None,
              contrast: str | None, n_cells: int, min_cells: int, seed: int, dag, layer: str | None) -> ArtifactView:
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_auc_score

    from .anchors import build_anchors
    from .extract import panel_rows

    anchors = build_anchors(adata, model.panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                            dag=dag, min_cells=min_cells, seed=seed, layer=layer)
    if len(anchors) < 3:
        raise InputError(f"only {len(anchors)} anchors (groups of >= {min_cells} cells with a mapped stage); the viewer "
                         "needs at least 3")
    Za = model.latent(anchors.X).astype(np.float64)
    k = min(Za.shape[1], len(anchors) - 1)
    pca = PCA(n_components=k, random_state=seed).fit(Za)
    rotate = lambda Z: pca.transform(np.asarray(Z, dtype=np.float64))  # noqa: E731
    Ra = rotate(Za)
    rng = np.random.default_rng(seed)
    labels = adata.obs[label_key].astype(str).to_numpy()
    stages = anchors.dag.map_labels(pd.Series(labels)).stage.fillna("").to_numpy(dtype=object)
    idx = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False)) if n_cells > 0 else np.array([], int)
    Rc = rotate(model.latent(panel_rows(adata, model.panel, idx, layer=layer))) if len(idx) else np.zeros((0, k))
    lens, lens_a, lens_c = None, Ra[:, min(2, k - 1)], Rc[:, min(2, k - 1)] if len(idx) else np.zeros(0)
    if contrast:
        neg, pos = parse_label_groups(contrast)
        is_neg, is_pos = _contrast_mask(labels, stages, neg), _contrast_mask(labels, stages, pos)
        if is_neg.sum() < 5 or is_pos.sum() < 5:
            raise InputError(f"contrast {contrast!r}: {int(is_neg.sum())} vs {int(is_pos.sum())} cells match (labels of "
                             f"{label_key!r} or DAG stages); each side needs at least 5")
        sel = np.flatnonzero(is_neg | is_pos)
        sel = np.sort(rng.choice(sel, size=min(len(sel), 10_000), replace=False))
        Rs = rotate(model.latent(panel_rows(adata, model.panel, sel, layer=layer)))
        y = is_pos[sel].astype(int)
        aucs = np.array([roc_auc_score(y, Rs[:, j]) for j in range(k)])
        # the lens replaces axis 3, so it chooses among the axes not already on screen (3..d)
        first = min(2, k - 1)
        j = first + int(np.argmax(np.abs(aucs[first:] - 0.5)))
        sign = 1.0 if aucs[j] >= 0.5 else -1.0  # orient so the positive group sits high
        lens = {"axis": j + 1, "auroc": float(max(aucs[j], 1 - aucs[j])), "contrast": contrast,
                "all_axes_auroc": [float(max(a, 1 - a)) for a in aucs], "n_cells": int(len(sel))}
        lens_a, lens_c = sign * Ra[:, j], sign * Rc[:, j] if len(idx) else np.zeros(0)
    pad = lambda R, j: R[:, j] if R.shape[1] > j else np.zeros(len(R))  # noqa: E731
    ob = anchors.obs
    a_df = pd.DataFrame({"stage": ob["stage"].astype(str).to_numpy(), "branch": ob["branch"].astype(str).to_numpy(),
                         "donor": ob["donor"].astype(str).to_numpy(), "tissue": ob["tissue"].astype(str).to_numpy(),
                         "label": ob["label"].astype(str).to_numpy(), "n_cells": ob["n_cells"].astype(int).to_numpy(),
                         "a1": pad(Ra, 0), "a2": pad(Ra, 1), "a3": pad(Ra, 2), "lens": lens_a})
    a_df["progenitor"] = a_df["branch"] == PROGENITOR_BRANCH
    c_df = pd.DataFrame({"a1": pad(Rc, 0), "a2": pad(Rc, 1), "a3": pad(Rc, 2), "lens": lens_c, "label": labels[idx]})
    return ArtifactView(name, a_df, c_df, lens, [float(v) for v in pca.explained_variance_ratio_[:3]],
                        screen_evidence(model.operator.source))


@dataclass
class ManifoldView:
    """The views of one or more artifacts; :meth:`save` writes the self-contained HTML page."""

    views: list[ArtifactView]
    info: dict = field(default_factory=dict)

    def figure(self):
        """The plotly figure (every trace; the page's controls set which are visible)."""
        return self._build()[0]

    def _build(self):
        import plotly.graph_objects as go
        from plotly.colors import qualitative

        palette = qualitative.Dark24 + qualitative.Light24
        fig = go.Figure()
        meta = []
        for v_i, v in enumerate(self.views):
            a = v.anchors
            if len(v.cells):
                fig.add_trace(go.Scatter3d(
                    x=v.cells["a1"].round(4), y=v.cells["a2"].round(4), z=v.cells["a3"].round(4), mode="markers",
                    marker=dict(size=1.6, color="rgba(120,120,120,0.25)"), name=f"cells (n = {len(v.cells):,})",
                    hoverinfo="skip", visible=False, showlegend=True))
                meta.append({"artifact": v_i, "role": "cloud", "z": v.cells["a3"].round(4).tolist(),
                             "zlens": v.cells["lens"].round(4).tolist()})
            for colour in ("stage", "branch"):
                cats = list(dict.fromkeys(a.sort_values(["branch", "stage"])[colour]))
                for c_i, cat in enumerate(cats):
                    sub = a[a[colour] == cat]
                    text = [f"<b>{html.escape(r.stage)}</b><br>branch {html.escape(r.branch)}<br>donor {html.escape(r.donor)}"
                            f"<br>tissue {html.escape(r.tissue)}<br>label {html.escape(r.label)}<br>{r.n_cells:,} cells"
                            + (f"<br><i>{html.escape(v.evidence)}</i>" if v.evidence else "")
                            for r in sub.itertuples()]
                    fig.add_trace(go.Scatter3d(
                        x=sub["a1"].round(5), y=sub["a2"].round(5), z=sub["a3"].round(5), mode="markers", name=cat,
                        text=text, hovertemplate="%{text}<extra></extra>", legendgroup=f"{v_i}-{colour}",
                        marker=dict(size=(4 + 3.5 * np.log10(sub["n_cells"].clip(lower=1))).round(2),
                                    symbol=np.where(sub["progenitor"], "diamond", "circle").tolist(),
                                    color=palette[c_i % len(palette)], opacity=0.9,
                                    line=dict(width=1, color="black")),
                        visible=(v_i == 0 and colour == "stage")))
                    meta.append({"artifact": v_i, "role": colour, "z": sub["a3"].round(5).tolist(),
                                 "zlens": sub["lens"].round(5).tolist()})
        fig.update_layout(
            title=self._title(0, False), height=760, margin=dict(l=0, r=0, t=60, b=0),
            legend=dict(itemsizing="constant", font=dict(size=10)),
            scene=dict(xaxis_title="latent axis 1", yaxis_title="latent axis 2", zaxis_title="latent axis 3",
                       aspectmode="cube"))
        return fig, meta

    def _title(self, i: int, lens: bool) -> str:
        v = self.views[i]
        if lens and v.lens:
            return (f"{v.name}: lens — axis 3 = latent axis {v.lens['axis']}, {v.lens['contrast']} "
                    f"(AUROC {v.lens['auroc']:.3f})")
        ev = ", ".join(f"{100 * e:.0f}%" for e in v.explained)
        return f"{v.name}: anchors in latent axes 1-3 ({ev} of anchor variance)"

    def to_dict(self) -> dict:
        return {"info": self.info, "views": [{"name": v.name, "anchors": v.anchors.to_dict("list"),
                                              "cells": v.cells.to_dict("list"), "lens": v.lens,
                                              "explained": v.explained, "evidence": v.evidence} for v in self.views]}

    @classmethod
    def from_json(cls, path: str | Path) -> "ManifoldView":
        """Reload a view saved by :meth:`save` (its ``.json`` twin), e.g. to embed it in a report."""
        d = json.loads(Path(path).read_text())
        views = [ArtifactView(v["name"], pd.DataFrame(v["anchors"]), pd.DataFrame(v["cells"]), v["lens"], v["explained"],
                              v.get("evidence", "")) for v in d["views"]]
        return cls(views, d["info"])

    def fragment(self) -> str:
        """Controls + plot + control script, without plotly's JavaScript (for pages that load it once)."""
        fig, meta = self._build()
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=DIV_ID, config={"displaylogo": False})
        state = {"meta": meta, "titles": [[self._title(i, False), self._title(i, True)] for i in range(len(self.views))],
                 "lens_axis": [v.lens["axis"] if v.lens else None for v in self.views],
                 "has_lens": [bool(v.lens) for v in self.views]}
        options = "".join(f"<option value='{i}'>{html.escape(v.name)}</option>" for i, v in enumerate(self.views))
        any_lens = any(state["has_lens"])
        controls = (
            "<div id='sclens-controls' style='font:14px sans-serif;padding:6px'>"
            f"<label>artifact <select id='sclens-artifact'>{options}</select></label> "
            "<label>colour by <select id='sclens-colour'><option value='stage'>fine stage</option>"
            "<option value='branch'>branch</option></select></label> "
            f"<label><input type='checkbox' id='sclens-lens'{'' if any_lens else ' disabled'}> lens"
            f"{'' if any_lens else ' (no contrast given)'}</label> "
            "<label><input type='checkbox' id='sclens-cloud'> cell cloud</label>"
            " <span style='color:#666'>◆ stem / progenitor anchors; size = log10 cells</span></div>")
        script = _CONTROLS_JS.replace("__STATE__", json.dumps(state)).replace("__DIV__", DIV_ID)
        return controls + div + f"<script>{script}</script>" + self._footer()

    def _footer(self) -> str:
        i = self.info
        info = html.escape(f"{i.get('n_cells_data', 0):,} cells, cloud {i.get('n_cells_cloud', 0):,} sampled (seed "
                           f"{i.get('seed')}); labels {i.get('label_key')}, donors {i.get('donor_key')}, tissue "
                           f"{i.get('tissue_key')}; contrast {i.get('contrast')}; artifacts "
                           + ", ".join(f"{k} ({(h or 'unsaved')[:12]})" for k, h in i.get("artifacts", {}).items()))
        return f"<p style='font:11px sans-serif;color:#777'>sclens {__version__} · {info}</p>"

    def to_html(self) -> str:
        from plotly.offline import get_plotlyjs

        return ("<!doctype html><html><head><meta charset='utf-8'><title>sclens manifold viewer</title>"
                "<script type='text/javascript'>" + get_plotlyjs() + "</script></head><body>"
                + self.fragment() + "</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write the HTML page and, beside it, its data as ``<stem>.json`` (reloadable with :meth:`from_json`)."""
        from .utils import write_json

        path = Path(path)
        page = self.to_html()
        write_json(path.with_suffix(".json"), self.to_dict())
        return atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))


_CONTROLS_JS = """
(function () {
  var S = __STATE__;
  var gd = document.getElementById('__DIV__');
  var sel = document.getElementById('sclens-artifact'), col = document.getElementById('sclens-colour');
  var lens = document.getElementById('sclens-lens'), cloud = document.getElementById('sclens-cloud');
  function update() {
    var a = parseInt(sel.value, 10), useLens = lens.checked && S.has_lens[a];
    var vis = [], z = [];
    for (var i = 0; i < S.meta.length; i++) {
      var m = S.meta[i];
      var on = m.artifact === a && (m.role === col.value || (m.role === 'cloud' && cloud.checked));
      vis.push(on);
      z.push(useLens ? m.zlens : m.z);
    }
    Plotly.restyle(gd, {visible: vis, z: z});
    Plotly.relayout(gd, {'title.text': S.titles[a][useLens ? 1 : 0],
      'scene.zaxis.title.text': useLens ? ('latent axis ' + S.lens_axis[a] + ' (lens)') : 'latent axis 3'});
    gd.setAttribute('data-sclens-state', JSON.stringify({artifact: a, colour: col.value, lens: useLens,
      cloud: cloud.checked, visible: vis.filter(Boolean).length}));
  }
  [sel, col, lens, cloud].forEach(function (el) { el.addEventListener('change', update); });
  update();
})();
"""


def manifold_3d(
    adata: ad.AnnData, models, *, label_key: str, donor_key: str | None = None, tissue_key: str | None = None,
    contrast: str | None = None, n_cells: int = 20_000, min_cells: int = 5, seed: int = 0, dag=None,
    layer: str | None = None,
) -> ManifoldView:
    """Build the viewer for one artifact or several (``{name: model or path}`` or a list of paths).

    ``contrast`` (``"A | B vs C"``, labels of ``label_key`` or DAG stage names) enables the lens; ``n_cells``
    cells are sampled (seeded) for the density cloud (0: none).
    """
    from .extract import ExtractedModel

    if isinstance(models, (str, Path, ExtractedModel)):
        models = [models]
    if not isinstance(models, Mapping):
        models = {Path(m).stem if isinstance(m, (str, Path)) else f"artifact {i + 1}": m for i, m in enumerate(models)}
    if not models:
        raise InputError("give at least one extracted artifact")
    loaded = {name: ExtractedModel.load(m) if isinstance(m, (str, Path)) else m for name, m in models.items()}
    views = [_view_one(name, m, adata, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                       contrast=contrast, n_cells=n_cells, min_cells=min_cells, seed=seed, dag=dag or m.dag, layer=layer)
             for name, m in loaded.items()]
    info = {"n_cells_data": int(adata.n_obs), "n_cells_cloud": int(len(views[0].cells)), "seed": seed,
            "label_key": label_key, "donor_key": donor_key, "tissue_key": tissue_key, "contrast": contrast,
            "artifacts": {name: m.content_sha256 for name, m in loaded.items()},
            "lens": {v.name: v.lens for v in views}}
    return ManifoldView(views, info)
