"""The screen finds a planted unit, and finds nothing when every unit is random."""

import numpy as np
import pytest

from sclens.anchors import build_anchors
from sclens.data import GenePanel
from sclens.models import load_scgpt
from sclens.operators import export_operators
from sclens.screen import load_gates, screen
from tests.planted import PLANTED, build_planted_checkpoint, gene_names, planted_cells


@pytest.fixture(scope="module")
def cells():
    return planted_cells()


def _run(tmp_path, cells, planted):
    model = load_scgpt(build_planted_checkpoint(tmp_path / ("planted" if planted else "random"), planted=planted))
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=16, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    rep = screen(banks, anchors, let_epochs=150, progress=False, cache_dir=tmp_path / "cache")
    return rep, anchors, banks


def test_planted_unit_ranks_first_with_gates_and_null_fails(tmp_path, cells):
    rep, anchors, banks = _run(tmp_path, cells, planted=True)
    top = rep.top
    assert (top["featurisation"], int(top["layer"]), int(top["head"])) == ("ov",) + PLANTED
    assert top["passes_gates"] and not top["null_passes"] and top["passes_all"]
    planted_rows = rep.table[(rep.table["featurisation"] == "ov") & (rep.table["layer"] == PLANTED[0])
                             & (rep.table["head"] == PLANTED[1])]
    assert planted_rows["passes_all"].any()
    others = rep.table[~rep.table.index.isin(planted_rows.index) & (rep.table["featurisation"] == "ov")]
    assert not others["passes_all"].any()
    raw = rep.table[rep.table["featurisation"] == "raw"]
    assert not raw["passes_all"].any()  # the nuisance genes hide the ordering from raw expression
    # the report records the gate file's hash and writes its artefacts
    assert rep.gates_sha256 == load_gates()[1]
    out = rep.save(tmp_path / "report", anchors, banks)
    assert {"screen_table.csv", "screen_report.json", "screen_heatmap_ov.png", "screen_top_unit_3d.png"} <= {
        p.name for p in out.iterdir()}


def test_all_random_units_pass_nothing(tmp_path, cells):
    rep, _, _ = _run(tmp_path, cells, planted=False)
    assert not rep.table["passes_all"].any()


def test_screen_resumes_from_its_cache(tmp_path, cells):
    model = load_scgpt(build_planted_checkpoint(tmp_path / "m", planted=True))
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=8, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    kw = dict(fitters=["isomap"], units=[(0, 0), (0, 2)], include_drift=False, include_raw=False, progress=False,
              cache_dir=tmp_path / "cache")
    first = screen(banks, anchors, **kw)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2
    second = screen(banks, anchors, **kw)
    cols = ["featurisation", "layer", "head", "ruler_spearman_resid", "perm_p"]
    assert first.table[cols].equals(second.table[cols])
