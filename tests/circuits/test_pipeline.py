"""The circuits run end to end on a small model, its report, the SAE atlas and the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sclens.circuits.lm import CellLMConfig
from sclens.circuits.lm_training import train_cell_lm
from sclens.circuits.pipeline import run_circuits
from sclens.circuits.transcoders import TranscoderConfig
from sclens.cli import app
from sclens.errors import InputError
from tests.circuits.test_lm import marker_cells


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    a = marker_cells(n_per_type=40)
    cfg = CellLMConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, top_k=12, steps=120, lr=3e-3, eval_every=60,
                       min_cells=1)
    out = tmp_path_factory.mktemp("lm") / "m"
    train_cell_lm(a, "cell_type", cfg, out_dir=out, progress=False)
    return a, out


def test_run_circuits_writes_every_part(small_lm, tmp_path):
    a, model_dir = small_lm
    cfg = TranscoderConfig(expansion=4, k=4, epochs=3, batch_size=256)
    res = run_circuits(a, "cell_type", model=str(model_dir), config=cfg, decisions=["alpha"], n_sample=5,
                       max_nodes=6, device="cpu", progress=False)
    assert res.info["device"] == "cpu"
    lm = res.transcoders.metrics["lm"]
    assert set(lm) >= {"clean", "spliced", "mlp_ablated", "recovered_celltype_ce", "per_layer"}
    assert lm["mlp_ablated"]["gene_ce"] > lm["clean"]["gene_ce"]
    assert res.sample["n_sampled"] == 5 and all(f.startswith("L") for f in res.sample["features"])
    g = res.circuits["alpha"]
    assert g.target["predicted"] == "alpha" and g.nodes[0]["type"] == "logit"
    paths = res.save(tmp_path)
    from sclens.circuits.pipeline import CircuitsResult, circuits_markdown

    back = CircuitsResult.load(tmp_path)
    assert circuits_markdown(back) == paths["report_md"].read_text()
    assert back.circuits["alpha"].to_dict() == json.loads(json.dumps(g.to_dict()))
    for k in ("report_json", "report_md", "report_html", "safetensors", "circuit_alpha_png"):
        assert paths[k].is_file()
    rep = json.loads(paths["report_json"].read_text())
    assert rep["format"] == "sclens-circuits-report" and rep["circuits"]["alpha"]["edges"]
    assert "data:image/png;base64" in paths["report_html"].read_text()
    from sclens.report import build_report

    page = build_report(tmp_path).read_text()
    assert "Circuits" in page and "Transcoders per MLP layer" in page
    with pytest.raises(InputError, match="not among the model's labels"):
        run_circuits(a, "cell_type", model=str(model_dir), decisions=["delta"], progress=False)


def test_cli_transcoders_and_trace(small_lm, tmp_path):
    a, model_dir = small_lm
    data = tmp_path / "cells.h5ad"
    a.write_h5ad(data)
    cfg = tmp_path / "tc.toml"
    cfg.write_text("[transcoder]\nexpansion = 4\nk = 4\nepochs = 2\nbatch_size = 256\n")
    r = CliRunner().invoke(app, ["circuits", "transcoders", str(data), "--label-key", "cell_type", "-o",
                                 str(tmp_path / "c"), "--model", str(model_dir), "--config", str(cfg),
                                 "--decisions", "beta", "--n-sample", "4"])
    assert r.exit_code == 0, r.output
    assert "interpretable:" in r.output and (tmp_path / "c" / "circuit_beta.json").is_file()
    r = CliRunner().invoke(app, ["circuits", "trace", "GENE5,GENE6,GENE7", "--label", "beta", "--transcoders",
                                 str(tmp_path / "c"), "--model", str(model_dir), "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    assert "predicted beta" in r.output
    r = CliRunner().invoke(app, ["circuits", "transcoders", str(data), "--label-key", "nope", "-o",
                                 str(tmp_path / "x"), "--model", str(model_dir)])
    assert r.exit_code == 2 and "no column 'nope'" in r.output


def test_sae_atlas_on_the_default_scgpt_model(tmp_path):
    from sclens.circuits.sae import train_sae_atlas
    from sclens.datasets import pbmc68k

    a = pbmc68k()[:120].copy()
    atlas = train_sae_atlas(a, "cell_type", layers=[0], max_len=64, progress=False,
                            config=TranscoderConfig(expansion=2, k=8, epochs=1, max_tokens=5000))
    s = atlas.summary()
    assert list(s.layer) == [0] and s.loc[0, "l0"] == pytest.approx(8.0, abs=0.01)
    assert 0 < s.loc[0, "live_features"] <= 256
    t = atlas.tables[0]
    assert s.loc[0, "by_tokens"] == int((t.interpretable & (t.label_from == "tokens")).sum())
    assert s.loc[0, "by_tokens"] + s.loc[0, "by_context"] == s.loc[0, "interpretable"]
    paths = atlas.save(tmp_path)
    page = paths["html"].read_text()
    assert "filter" in page and "Layer 0" in page
    assert json.loads(paths["json"].read_text())["format"] == "sclens-sae-atlas"
    from sclens.circuits.sae import SAEAtlas

    back = SAEAtlas.load(tmp_path)
    pd.testing.assert_frame_equal(back.summary(), s, check_dtype=False)
    assert torch.equal(back.saes[0].W_enc, atlas.saes[0].W_enc) and torch.equal(back.means[0], atlas.means[0])
    with pytest.raises(InputError, match="out of range"):
        train_sae_atlas(a, None, layers=[99], progress=False)


def test_default_decision_and_known_gene_sentences(small_lm):
    a, model_dir = small_lm
    b = a.copy()
    b.var_names = [f"X{i}" if i % 2 else g for i, g in enumerate(a.var_names)]  # half the genes unknown
    res = run_circuits(b, "cell_type", model=str(model_dir), config=TranscoderConfig(expansion=2, k=4, epochs=1),
                       layers=[1], n_sample=3, max_nodes=3, known_genes_only=True, progress=False)
    assert res.info["decisions"] == ["alpha"]  # no monocytes / nk in this model: its first label
    assert res.info["known_genes_only"] and res.info["genes_in_vocabulary"] < a.n_vars
    assert all(g.startswith("GENE") for n in res.circuits["alpha"].nodes if n["type"] == "embed" and n.get("gene")
               for g in [n["gene"]])
