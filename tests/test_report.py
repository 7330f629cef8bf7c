"""sclens report: what is found is shown, what is absent is said; errors are specific. (The full report of a
real run is checked, in a browser, by tests/test_demo.py.)"""

import json

import pytest
from typer.testing import CliRunner

from sclens.errors import InputError
from sclens.report import build_report


def test_report_of_an_empty_folder_says_what_is_missing(tmp_path):
    page = build_report(tmp_path)
    index = json.loads(page.with_suffix(".json").read_text())
    assert index["sections"] == [] and len(index["missing"]) == 5
    assert any("viewer" in m for m in index["missing"]) and "Not in this run" in page.read_text()
    with pytest.raises(InputError, match="not a folder"):
        build_report(tmp_path / "nope")


def test_cli_report(tmp_path):
    from sclens.cli import app

    r = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert "not in this run: benchmark" in r.output and (tmp_path / "r.html").is_file()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a folder" in r.output
