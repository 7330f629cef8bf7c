"""`sclens demo --quick` runs every stage end to end and writes what the README promises."""

import json

from typer.testing import CliRunner


def test_demo_quick_runs_every_stage(tmp_path):
    from sclens.cli import app

    r = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert {"model", "data", "extract", "bench", "compress", "pretrain"} <= set(rep["stages"])
    for fig in rep["figures"].values():
        assert (tmp_path / "demo" / fig).is_file(), fig
    bench = rep["stages"]["bench"]
    methods = {row["method"] for row in bench["summary"]}
    assert {"sclens_extracted", "raw_log1p", "pca10", "dpt"} <= methods and not bench["skipped"]
    assert all(c["reference"] == "sclens_extracted" for c in bench["comparisons"])
    comp = rep["stages"]["compress"]
    assert [r["variant"] for r in comp["compaction"]] == ["reference", "single_head", "rank8", "sparse"]
    assert comp["compaction"][-1]["operator_bytes"] < comp["compaction"][1]["operator_bytes"]
    assert comp["top_k_share"] and all(comp["factor_labels"].values())
