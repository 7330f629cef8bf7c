"""`sclens demo --quick` runs every stage end to end and writes what the README promises."""

import json

import pytest
from typer.testing import CliRunner

from tests.browser import open_page


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from sclens.cli import app

    out = tmp_path_factory.mktemp("demo") / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "sclens_report.html" in r.output
    return out


def test_demo_quick_runs_every_stage(demo_dir):
    rep = json.loads((demo_dir / "report.json").read_text())
    assert {"model", "data", "extract", "bench", "compress", "pretrain", "circuits", "sae_atlas"} <= set(rep["stages"])
    for fig in rep["figures"].values():
        assert (demo_dir / fig).is_file(), fig
    bench = rep["stages"]["bench"]
    methods = {row["method"] for row in bench["summary"]}
    assert {"sclens_extracted", "extracted_identity", "extracted_random", "raw_log1p", "pca10", "dpt"} <= methods
    assert not bench["skipped"]
    assert {a["question"] for a in bench["ablations"]} == {"model contribution", "adaptor cost"}
    assert all(c["reference"] == "sclens_extracted" for c in bench["comparisons"])
    comp = rep["stages"]["compress"]
    assert [r["variant"] for r in comp["compaction"]] == ["reference", "single_head", "rank8", "sparse"]
    assert comp["compaction"][-1]["operator_bytes"] < comp["compaction"][1]["operator_bytes"]
    assert comp["top_k_share"] and all(comp["factor_labels"].values())
    circ = rep["stages"]["circuits"]
    assert [r["layer"] for r in circ["transcoders"]] == [1, 3] and circ["interpretable"]["n_sampled"] == 20
    assert circ["lm"]["mlp_ablated"]["gene_ce"] > circ["lm"]["clean"]["gene_ce"]
    assert "monocytes" in circ["circuits"] and circ["circuits"]["monocytes"]["nodes"] > 1
    assert [r["layer"] for r in rep["stages"]["sae_atlas"]["summary"]] == [0, 5]


def test_demo_report_gathers_every_stage_and_renders_in_a_browser(demo_dir, tmp_path):
    index = json.loads((demo_dir / "sclens_report.json").read_text())
    titles = [s["title"] for s in index["sections"]]
    for want in ("Run", "Data", "Unit screen", "3-D manifold viewer", "Benchmark", "Compression", "Circuits",
                 "SAE atlas"):
        assert any(t.startswith(want) for t in titles), (want, titles)
    assert not index["missing"] and all(len(s["sha256"]) == 64 for s in index["sources"])
    assert all((demo_dir / f).is_file() for f in index["figures"]) and len(index["figures"]) >= 3
    page = (demo_dir / "sclens_report.html").read_text()
    assert "<script src=" not in page  # plotly inlined, PNGs embedded: one self-contained file

    def drive(p):
        p.wait_for_selector("#sclens-viewer .main-svg", timeout=30_000)
        n_plots = p.evaluate("document.querySelectorAll('.js-plotly-plot').length")
        h2 = p.evaluate("Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)")
        p.select_option("#sclens-colour", "branch")
        p.check("#sclens-lens")
        state = json.loads(p.get_attribute("#sclens-viewer", "data-sclens-state"))
        p.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        return n_plots, h2, state

    (n_plots, h2, state), errors = open_page((demo_dir / "sclens_report.html").as_uri(), drive)
    assert not errors, errors
    assert n_plots >= 3 and h2 == titles and state["colour"] == "branch" and state["lens"]
    assert (tmp_path / "report.png").stat().st_size > 50_000
