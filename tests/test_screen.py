"""The screen finds a planted unit, and finds nothing when every unit is random."""

import numpy as np
import pandas as pd
import pytest

from sclens.anchors import build_anchors
from sclens.data import GenePanel
from sclens.errors import InputError
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
    from sclens.screen import ScreenReport

    back = ScreenReport.load(out)
    pd.testing.assert_frame_equal(back.table, rep.table.reset_index(drop=True), check_dtype=False)
    assert back.gates == rep.gates and back.gates_sha256 == rep.gates_sha256 and back.figures == rep.figures
    assert back.figures["top_unit_3d"] == "screen_top_unit_3d.png"
    with pytest.raises(InputError, match="not a screen folder"):
        ScreenReport.load(tmp_path)


def test_all_random_units_pass_nothing(tmp_path, cells):
    from sclens.screen import METRICS

    rep, _, _ = _run(tmp_path, cells, planted=False)
    assert not rep.table["passes_all"].any()
    # every metric of both rulers is a column even where the staged engine computed it for no hypothesis
    assert {p + m for p in ("", "null_") for m in METRICS} <= set(rep.table.columns)


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


# ------------------------------------------------------------------ controls: the learned gate
NI = 16  # stage-identity genes: raw expression tells stages apart but carries no ordering


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """The planted fixture with stage-identity genes and norm-matched heads, screened with 3 random-weights copies."""
    from sclens.operators import export_random_controls

    tmp = tmp_path_factory.mktemp("controlled")
    cells = planted_cells(n_identity=NI)
    model = load_scgpt(build_planted_checkpoint(tmp / "m", planted=True, n_identity=NI, matched_norms=True))
    panel = GenePanel(tuple(gene_names(NI)))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=16, progress=False)
    controls = export_random_controls(model, cells, panel, kinds=["ov"], n_copies=3, n_ref_cells=16, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    rep = screen(banks, anchors, progress=False, controls=controls, n_jobs=2)
    return rep, anchors, banks, controls, model


def test_planted_fixture_norms_are_matched_and_raw_carries_stage_identity(controlled, tmp_path):
    rep, anchors, banks, _, model = controlled
    from tests.planted import PLANTED

    attn = model.blocks[PLANTED[0]].attn
    D, dh = 64, 16
    v = [float(attn.in_proj_weight.detach()[2 * D + h * dh : 2 * D + (h + 1) * dh].norm()) for h in range(4)]
    others = [x for i, x in enumerate(v) if i != PLANTED[1]]
    assert v[PLANTED[1]] == pytest.approx(np.mean(others), rel=1e-4)
    # same-stage anchors of different donors are closer in the identity genes than different-stage anchors
    X = anchors.X[:, -NI:]
    st = anchors.obs["stage"].to_numpy()
    D2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    same, diff = st[:, None] == st[None], st[:, None] != st[None]
    np.fill_diagonal(same, False)
    assert D2[same].mean() < 0.2 * D2[diff].mean()


def test_learned_gate_passes_only_the_planted_unit_and_what_contains_it(controlled):
    rep, *_ = controlled
    t = rep.table
    assert rep.info["learned_gate"]["evaluated"] and rep.info["learned_gate"]["n_random_copies"] == 3
    assert {"margin_over_raw", "margin_over_random", "random_quantile_value", "gate_learned", "passes_published"} <= set(t)
    planted = (t["featurisation"] == "ov") & (t["layer"] == PLANTED[0]) & (t["head"] == PLANTED[1])
    contains = planted | t["featurisation"].str.startswith("drift:")
    assert t.loc[t["passes_all"], :].shape[0] >= 1
    assert (planted | ~t["passes_all"]).all() or (contains | ~t["passes_all"]).all()
    assert not t.loc[~contains, "passes_all"].any()
    assert t.loc[planted, "gate_learned"].any() and t.loc[planted & t["passes_all"]].shape[0] >= 1
    # raw never passes the learned gate (it is the control); random units never pass every gate
    assert not t.loc[t["featurisation"] == "raw", "gate_learned"].any()
    assert not t.loc[t["featurisation"] == "raw", "passes_all"].any()
    rnd = (t["featurisation"] == "ov") & ~planted
    assert not t.loc[rnd, "passes_all"].any()
    # the planted unit's margins are positive where it passes; the ranking puts it first
    top = rep.top
    assert (top["featurisation"], int(top["layer"]), int(top["head"])) == ("ov",) + PLANTED
    assert top["margin_over_raw"] > 0 and top["margin_over_random"] > 0
    # every control copy x unit x fitter was evaluated, and none failed
    assert len(rep.controls) == 3 * (12 + 1) * 3 and (rep.controls["failure"] == "").all()


def test_learned_gate_and_controls_in_the_saved_report(controlled, tmp_path):
    import json

    rep, anchors, banks, *_ = controlled
    out = rep.save(tmp_path / "r", anchors, banks)
    assert {"screen_controls.csv", "screen_heatmap_ov.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "screen_report.json").read_text())
    assert "learned" in saved["gates"] and saved["info"]["learned_gate"]["evaluated"]
    assert saved["gates_sha256"] == load_gates()[1]


def test_without_controls_the_learned_gate_is_not_evaluated(tmp_path, cells):
    model = load_scgpt(build_planted_checkpoint(tmp_path / "m", planted=True))
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=8, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    rep = screen(banks, anchors, fitters=["isomap"], units=[(0, 2)], include_drift=False, progress=False)
    assert not rep.info["learned_gate"]["evaluated"] and "not evaluated" in rep.info["learned_gate"]["note"]
    assert rep.table["gate_learned"].isna().all()
    assert (rep.table["passes_all"] == rep.table["passes_published"]).all()


def test_all_random_checkpoint_with_controls_passes_nothing(tmp_path):
    from sclens.operators import export_random_controls

    cells = planted_cells(n_identity=NI)
    model = load_scgpt(build_planted_checkpoint(tmp_path / "r", planted=False, n_identity=NI))
    panel = GenePanel(tuple(gene_names(NI)))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=8, progress=False)
    controls = export_random_controls(model, cells, panel, kinds=["ov"], n_copies=1, n_ref_cells=8, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    rep = screen(banks, anchors, fitters=["isomap"], progress=False, controls=controls, n_jobs=2)
    assert not rep.table["passes_all"].any()


def test_uniform_attention_checkpoint_is_reported_not_crashed(tmp_path, cells):
    """Heads that attend uniformly make every attn / qk operator identical: their drift is all-zero. The
    screen records those rows as failed with the reason and finishes (it used to raise from scikit-learn)."""
    model = load_scgpt(build_planted_checkpoint(tmp_path / "u", planted=False, uniform_attention=True))
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, n_ref_cells=8, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    rep = screen(banks, anchors, units=[(1, 1)], let_epochs=30, progress=False, n_jobs=2)
    t = rep.table
    failed = t[t["failure"] != ""]
    assert set(failed["featurisation"]) >= {"drift:attn", "drift:qk"}
    assert failed["failure"].str.contains("all-zero").all()
    assert not failed[[c for c in t.columns if c.startswith("gate_") and c != "gate_learned"]].any(axis=None)
    assert not t["passes_all"].any()
    assert rep.info["n_failed"] == len(failed)
    rep.save(tmp_path / "rep", anchors, banks)


@pytest.mark.parametrize("bad, reason", [
    (np.zeros((12, 5)), "all-zero"),
    (np.ones((12, 5)), "constant"),
    (np.r_[np.full((11, 5), 1.0), [[np.nan] * 5]], "non-finite"),
    (np.r_[np.ones((6, 5)), np.full((6, 5), 2.0)], "distinct"),
    (np.zeros((12, 0)), "no features"),
])
def test_degenerate_featurisations_are_named(bad, reason):
    from sclens.manifold import degenerate_reason

    assert reason in degenerate_reason(bad, 6)
    assert degenerate_reason(np.random.default_rng(0).normal(size=(12, 5)), 6) is None


def _same_gates_and_ranking(fast, exact):
    """Every gate the fast path evaluated agrees with --exact; the ones it skipped follow a gate of the same ruler that
    failed on both paths; pass/fail, the permutation p-values (BH's input) and the passing ranking are the same."""
    key = ["featurisation", "layer", "head", "fitter"]
    f, e = fast.table.set_index(key).sort_index(), exact.table.set_index(key).sort_index()
    assert f.index.equals(e.index)
    for c in ["passes_gates", "passes_published", "passes_all", "gate_bh", "gate_learned"]:
        assert (f[c].astype("boolean").fillna(False) == e[c].astype("boolean").fillna(False)).all(), c
    null_done = f["null_passes"].notna()  # NA: the null was not evaluated (its true ruler failed)
    assert (f.loc[null_done, "null_passes"].astype(bool) == e.loc[null_done, "null_passes"]).all()
    for prefix in ("", "null_"):
        gates = [c for c in e.columns if c.startswith(prefix + "gate_") and c != "gate_bh" and c != "gate_learned"]
        skipped = f[gates].isna()
        evaluated = ~skipped
        for c in gates:
            assert (f.loc[evaluated[c], c].astype(bool) == e.loc[evaluated[c], c].astype(bool)).all(), c
        stopped = skipped.any(axis=1)
        if prefix == "null_":  # a null not evaluated at all: its true ruler failed (on both paths)
            absent = f["null_stopped_at"] == "not evaluated"
            assert skipped[absent].all(axis=None) and not e.loc[absent, "passes_gates"].any()
            stopped &= ~absent
        # a row with skipped gates failed an evaluated one on both paths
        assert not (f.loc[stopped, gates].astype("boolean").fillna(True).all(axis=1)).any()
        assert not (e.loc[stopped, gates].astype(bool).all(axis=1)).any()
    pd.testing.assert_series_equal(f["perm_p"], e["perm_p"])
    done = f["null_perm_p"].notna()
    pd.testing.assert_series_equal(f.loc[done, "null_perm_p"], e.loc[done, "null_perm_p"])
    free = f.index.get_level_values("fitter") != "let"  # LET's fused gradient rounds differently
    pd.testing.assert_series_equal(f.loc[free, "ruler_spearman_resid"], e.loc[free, "ruler_spearman_resid"])
    np.testing.assert_allclose(f["ruler_spearman_resid"], e["ruler_spearman_resid"], atol=0.02)
    passing = lambda r: list(r.table.loc[r.table["passes_all"], key].itertuples(index=False))  # noqa: E731
    assert passing(fast) == passing(exact)
    return f


def test_fast_path_gives_the_exact_paths_gates_and_ranking_on_the_planted_fixture(tmp_path, cells):
    """The default evaluation (the staged engine) against --exact."""
    model = load_scgpt(build_planted_checkpoint(tmp_path / "m", planted=True))
    panel = GenePanel(tuple(gene_names()))
    banks = export_operators(model, cells, panel, kinds=["ov"], n_ref_cells=16, progress=False)
    anchors = build_anchors(cells, panel, label_key="cell_type", donor_key="donor")
    units = [PLANTED, (0, 0), (1, 1)]  # the planted unit and two others (+ drift and raw)
    fast, exact = (screen(banks, anchors, units=units, let_epochs=50, progress=False, exact=x) for x in (False, True))
    assert fast.table["passes_all"].any()  # the comparison covers a passing hypothesis
    f = _same_gates_and_ranking(fast, exact)
    # ... and both kinds of row: evaluated in full (null too) and stopped early
    assert (f["stopped_at"] == "").any() and (f["stopped_at"] != "").any()
    assert (f["null_stopped_at"] != "not evaluated").any()


def test_fast_path_gives_the_exact_paths_gates_and_ranking_on_the_default_model(tmp_path):
    from sclens.data import select_panel
    from sclens.datasets import simulate_hematopoiesis
    from sclens.models import load_default_model

    model = load_default_model()
    sim = simulate_hematopoiesis(n_donors=4, cells_per_donor=150, seed=0, vocabulary=model.vocab.genes)
    panel = select_panel(sim, model.vocab.genes, n_genes=120)
    banks = export_operators(model, sim, panel, kinds=["ov"], n_ref_cells=16, progress=False)
    anchors = build_anchors(sim, panel, label_key="cell_type", donor_key="donor", tissue_key="tissue")
    units = [(0, 0), (2, 3), (5, 7)]
    fast, exact = (screen(banks, anchors, units=units, let_epochs=40, progress=False, exact=x) for x in (False, True))
    _same_gates_and_ranking(fast, exact)
