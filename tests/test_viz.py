"""The 3-D manifold viewer: structure, CLI, and a real headless browser (Debian's chromium via Playwright)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sclens.errors import InputError
from sclens.viz import manifold_3d
from tests.browser import browser, open_page

CONTRAST = "Naive CD4 T | Memory CD4 T vs Naive CD8 T | Memory CD8 T"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sclens.data import select_panel
    from sclens.datasets import simulate_hematopoiesis
    from sclens.extract import extract, select_operator
    from sclens.models import load_default_model
    from sclens.operators import export_operators

    tmp = tmp_path_factory.mktemp("viz")
    model = load_default_model()
    sim = simulate_hematopoiesis(n_donors=3, cells_per_donor=150, seed=2)
    panel = select_panel(sim, model.vocab.genes, n_genes=120)
    banks = export_operators(model, sim, panel, kinds=["ov"], n_ref_cells=8, progress=False)
    op = select_operator(banks, unit=(0, 1))
    paths = []
    for name, o in (("head", op), ("rank4", op.low_rank(4))):
        m = extract(sim, o, label_key="cell_type", donor_key="donor", progress=False, n_perm=0,
                    holdout_fraction=0)
        paths.append(m.save(tmp / f"{name}.safetensors"))
    sim.write_h5ad(tmp / "sim.h5ad")
    return sim, paths, tmp


def test_viewer_structure_and_self_contained_html(setup):
    sim, paths, tmp = setup
    view = manifold_3d(sim, paths, label_key="cell_type", donor_key="donor", tissue_key="tissue", contrast=CONTRAST,
                       n_cells=200)
    assert [v.name for v in view.views] == ["head", "rank4"]
    for v in view.views:
        a = v.anchors
        assert len(a) >= 10 and (a["n_cells"] >= 5).all() and a["progenitor"].any() and (~a["progenitor"]).any()
        assert set(a.loc[a["progenitor"], "branch"]) == {"stem_progenitor"}
        assert len(v.cells) == 200 and 0.5 <= v.lens["auroc"] <= 1.0 and v.lens["axis"] >= 3
        assert v.lens["auroc"] == max(v.lens["all_axes_auroc"][2:])
        # axes are a rotation of the latent: anchor distances are kept on all axes together
        assert np.isfinite(a[["a1", "a2", "a3", "lens"]].to_numpy()).all()
    fig = view.figure()
    n_stage = sum(v.anchors["stage"].nunique() for v in view.views)
    n_branch = sum(v.anchors["branch"].nunique() for v in view.views)
    assert len(fig.data) == n_stage + n_branch + 2  # + one cell cloud per artifact
    path = view.save(tmp / "viewer.html")
    page = path.read_text()
    assert "<script src=" not in page and "cdn.plot.ly" not in page.split("</script>", 1)[1]  # JS inlined
    assert "Plotly.restyle" in page and 'id="sclens-viewer"' in page
    assert path.stat().st_size < 10e6


def test_viewer_errors_are_specific(setup):
    sim, paths, _ = setup
    with pytest.raises(InputError, match="'A | B vs C'"):
        manifold_3d(sim, paths[:1], label_key="cell_type", contrast="CD4 and CD8")
    with pytest.raises(InputError, match="each side needs at least 5"):
        manifold_3d(sim, paths[:1], label_key="cell_type", contrast="Naive CD4 T vs Martian cells", n_cells=0)
    with pytest.raises(InputError, match="at least one"):
        manifold_3d(sim, {}, label_key="cell_type")


def test_cli_view(setup):
    from sclens.cli import app

    _, paths, tmp = setup
    r = CliRunner().invoke(app, ["view", *map(str, paths), "--data", str(tmp / "sim.h5ad"), "--label-key", "cell_type",
                                 "--donor-key", "donor", "--contrast", CONTRAST, "--cells", "100", "-o",
                                 str(tmp / "cli_viewer.html")])
    assert r.exit_code == 0, r.output
    assert "lens axis" in r.output and (tmp / "cli_viewer.html").is_file()
    r = CliRunner().invoke(app, ["view", str(tmp / "nope.safetensors"), "--data", str(tmp / "sim.h5ad"),
                                 "--label-key", "cell_type"])
    assert r.exit_code == 2 and "not found" in r.output


def test_viewer_in_a_real_browser(setup, tmp_path):
    browser()
    sim, paths, tmp = setup
    view = manifold_3d(sim, paths, label_key="cell_type", donor_key="donor", tissue_key="tissue", contrast=CONTRAST,
                       n_cells=200)
    html_path = view.save(tmp_path / "viewer.html")
    expected_traces = len(view.figure().data)

    def drive(page):
        page.wait_for_selector("#sclens-viewer .main-svg", timeout=30_000)
        state = lambda: json.loads(page.get_attribute("#sclens-viewer", "data-sclens-state"))  # noqa: E731
        out = {"n_traces": page.evaluate("document.getElementById('sclens-viewer').data.length"), "start": state()}
        page.screenshot(path=str(tmp_path / "viewer_stage.png"))
        page.select_option("#sclens-colour", "branch")
        out["branch"] = state()
        page.check("#sclens-lens")
        out["lens"] = state()
        out["lens_title"] = page.evaluate("document.getElementById('sclens-viewer').layout.title.text")
        page.check("#sclens-cloud")
        out["cloud"] = state()
        page.select_option("#sclens-artifact", "1")
        out["second"] = state()
        out["second_title"] = page.evaluate("document.getElementById('sclens-viewer').layout.title.text")
        page.screenshot(path=str(tmp_path / "viewer_lens.png"))
        return out

    out, errors = open_page(html_path.as_uri(), drive)
    assert not errors, errors
    assert out["n_traces"] == expected_traces
    v0, v1 = view.views
    assert out["start"] == {"artifact": 0, "colour": "stage", "lens": False, "cloud": False,
                            "visible": v0.anchors["stage"].nunique()}
    assert out["branch"]["visible"] == v0.anchors["branch"].nunique()
    assert out["lens"]["lens"] and f"AUROC {v0.lens['auroc']:.3f}" in out["lens_title"]
    assert out["cloud"]["visible"] == v0.anchors["branch"].nunique() + 1
    assert out["second"]["artifact"] == 1 and out["second_title"].startswith("rank4")
    for png in ("viewer_stage.png", "viewer_lens.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_screen_evidence_line_for_the_viewer_hover():
    from sclens.viz import screen_evidence

    src = {"screen": {"featurisation": "ov", "fitter": "isomap", "passes_all": True, "gate_learned": True,
                      "margin_over_raw": 0.2, "margin_over_random": 0.1234}}
    line = screen_evidence(src)
    assert "gates pass" in line and "learned passes" in line and "+0.200" in line and "+0.123" in line
    src["screen"].update(gate_learned=float("nan"), margin_over_random=float("nan"), passes_all=False)
    line = screen_evidence(src)
    assert "learned not evaluated" in line and "n/a" in line and "gates fail" in line
    assert screen_evidence({"type": "drift"}) == ""
