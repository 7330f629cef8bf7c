import json

import pytest
from typer.testing import CliRunner

from sclens.cli import app

runner = CliRunner()


@pytest.fixture()
def h5ad(tmp_path, sim_small):
    p = tmp_path / "sim.h5ad"
    sim_small.write_h5ad(p)
    return p


def test_data_command_reports_and_writes_panel(h5ad, tmp_path):
    r = runner.invoke(app, ["data", str(h5ad), "--obs-key", "donor", "--label-key", "cell_type",
                            "--panel-out", str(tmp_path / "panel.json"), "--n-genes", "50"])
    assert r.exit_code == 0, r.output
    assert "counts" in r.output and "all 360 cells mapped" in r.output
    assert len(json.loads((tmp_path / "panel.json").read_text())["genes"]) == 50
    from sclens.data import GenePanel
    from sclens.errors import InputError

    assert len(GenePanel.load(tmp_path / "panel.json")) == 50
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="holds no 'genes' list"):
        GenePanel.load(tmp_path / "bad.json")


def test_data_command_missing_column_is_exit_2(h5ad):
    r = runner.invoke(app, ["data", str(h5ad), "--obs-key", "celltype"])
    assert r.exit_code == 2
    assert "available obs columns" in r.output


def test_model_command_on_default_model():
    r = runner.invoke(app, ["model", "--hooks"])
    assert r.exit_code == 0, r.output
    assert "blocks.0.attn.hook_pattern" in r.output and "scGPT" in r.output


def test_model_command_on_bad_dir(tmp_path):
    r = runner.invoke(app, ["model", str(tmp_path)])
    assert r.exit_code == 2 and "is not a model folder" in r.output and "Geneformer needs config.json" in r.output


def test_model_and_embed_on_a_geneformer_checkpoint(tmp_path):
    import anndata as ad
    import numpy as np

    pytest.importorskip("transformers")
    from tests.models.test_geneformer import _counts, _genes, build_checkpoint

    d = build_checkpoint(tmp_path / "gf")
    r = runner.invoke(app, ["model", str(d)])
    assert r.exit_code == 0, r.output
    assert "Geneformer V1" in r.output and "3 layers x 4 heads" in r.output
    X = _counts(n_cells=10)
    a = ad.AnnData(X.round().astype(np.float32) + (X > 0))  # integer counts, every expressed gene >= 1
    a.var_names = _genes()
    a.write_h5ad(tmp_path / "counts.h5ad")
    r = runner.invoke(app, ["embed", str(tmp_path / "counts.h5ad"), "-o", str(tmp_path / "e.h5ad"), "--model", str(d)])
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_geneformer"].shape == (10, 32)
    a.X = np.log1p(a.X)
    a.write_h5ad(tmp_path / "log.h5ad")
    r = runner.invoke(app, ["embed", str(tmp_path / "log.h5ad"), "-o", str(tmp_path / "e2.h5ad"), "--model", str(d)])
    assert r.exit_code == 2 and "counts" in r.output


def test_operators_screen_and_bench_on_a_geneformer_checkpoint(h5ad, sim_small, tmp_path):
    pytest.importorskip("transformers")
    from sclens.data import ensembl_to_symbol
    from tests.models.test_geneformer import build_checkpoint

    ens = {s: e for e, s in ensembl_to_symbol().items()}
    d = build_checkpoint(tmp_path / "gf", genes=[ens[g] for g in sim_small.var_names], max_pos=512)
    r = runner.invoke(app, ["export-operators", str(h5ad), "-o", str(tmp_path / "ops"), "--model", str(d),
                            "--kinds", "ov", "--n-ref-cells", "24", "--n-genes", "60"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "ops" / "operators_ov.safetensors.json").read_text())
    assert manifest["model_family"] == "geneformer" and manifest["shape"] == [3, 4, 60, 60]
    r = runner.invoke(app, ["screen", str(h5ad), "--operators", str(tmp_path / "ops"), "-o", str(tmp_path / "scr"),
                            "--label-key", "cell_type", "--donor-key", "donor", "--kinds", "ov", "--fitters", "gmds",
                            "--random-control", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bench", str(h5ad), "-o", str(tmp_path / "b"), "--donor-key", "donor", "--label-key",
                            "cell_type", "--multiclass", "cell_type", "--methods",
                            "sclens_extracted,extracted_identity,extracted_random,mlp_probe", "--model", str(d),
                            "--n-splits", "2", "--random-control", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(next((tmp_path / "b").glob("bench_*.json")).read_text())
    assert {"sclens_extracted", "extracted_identity", "extracted_random", "mlp_probe"} <= {
        row["method"] for row in res["scores"]}, res["skipped"]


def test_compress_and_sae_atlas_on_a_geneformer_checkpoint(h5ad, sim_small, tmp_path):
    pytest.importorskip("transformers")
    from sclens.data import ensembl_to_symbol
    from tests.models.test_geneformer import build_checkpoint

    ens = {s: e for e, s in ensembl_to_symbol().items()}
    d = build_checkpoint(tmp_path / "gf", genes=[ens[g] for g in sim_small.var_names], max_pos=512)
    (tmp_path / "ep.toml").write_text(
        'donor_key = "donor"\nlabel_key = "cell_type"\nscheme = "shuffle"\nn_splits = 2\nadaptor_epochs = 2\n'
        'n_ref_cells = 4\nn_genes = 100\n[[endpoint]]\nname = "branch"\nkind = "multiclass"\ncolumn = "branch"\n')
    r = runner.invoke(app, ["compress", str(h5ad), "--endpoints", str(tmp_path / "ep.toml"), "-o", str(tmp_path / "c"),
                            "--unit", "L1H0", "--unit-kind", "ov", "--ranks", "4,2", "--audit-rank", "4",
                            "--sparse-factors", "2", "--sparse-genes", "5", "--name", "gf", "--model", str(d)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "artifacts" / "gf_sparse.safetensors").is_file()
    r = runner.invoke(app, ["circuits", "sae", str(h5ad), "-o", str(tmp_path / "sae"), "--label-key", "cell_type",
                            "--model", str(d), "--epochs", "1", "--max-tokens", "5000", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sae" / "sae_atlas.html").is_file() and "live_features" in r.output


def test_pretrain_then_embed(h5ad, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_layers: 1\nn_heads: 2\nd_model: 16\nd_hid: 32\ntrain_seq_len: 32\nbatch_size: 8\n"
                   "eval_every: 5\neval_cells: 16\nwarmup_steps: 2\n")
    r = runner.invoke(app, ["pretrain", str(h5ad), "-o", str(tmp_path / "m"), "--config", str(cfg), "--steps", "5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["embed", str(h5ad), "-o", str(tmp_path / "e.h5ad"), "--model", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    import anndata as ad

    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_scgpt"].shape == (360, 16)
    r = runner.invoke(app, ["embed", str(h5ad), "-o", str(h5ad), "--model", str(tmp_path / "m")])
    assert r.exit_code == 2 and "never overwrites" in r.output


def test_pretrain_rejects_unknown_config_field(h5ad, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_layer: 1\n")
    r = runner.invoke(app, ["pretrain", str(h5ad), "-o", str(tmp_path / "m"), "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown PretrainConfig field" in r.output


def test_export_operators_then_screen(tmp_path):
    from tests.planted import build_planted_checkpoint, planted_cells

    model_dir = build_planted_checkpoint(tmp_path / "m")
    cells = planted_cells()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    panel = tmp_path / "panel.json"
    panel.write_text(json.dumps({"genes": list(cells.var_names), "flavor": "given"}))
    r = runner.invoke(app, ["export-operators", str(tmp_path / "cells.h5ad"), "-o", str(tmp_path / "ops"), "--model",
                            str(model_dir), "--kinds", "ov", "--panel", str(panel), "--n-ref-cells", "8"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ops" / "operators_ov.safetensors").is_file()
    r = runner.invoke(app, ["screen", str(tmp_path / "cells.h5ad"), "--operators", str(tmp_path / "ops"), "-o",
                            str(tmp_path / "scr"), "--label-key", "cell_type", "--donor-key", "donor", "--kinds", "ov",
                            "--fitters", "gmds"])
    assert r.exit_code == 0, r.output
    assert "Top: ov L0H2 gmds" in r.output
    report = json.loads((tmp_path / "scr" / "screen_report.json").read_text())
    assert report["n_passing"] >= 1 and len(report["gates_sha256"]) == 64
    r = runner.invoke(app, ["screen", str(tmp_path / "cells.h5ad"), "--operators", str(tmp_path / "ops"), "-o",
                            str(tmp_path / "scr2"), "--label-key", "cell_type", "--kinds", "qk"])
    assert r.exit_code == 2 and "run `sclens export-operators` first" in r.output
    # the planted unit, extracted from the screen report, then inspected, applied and validated on new cells
    art = tmp_path / "head.safetensors"
    r = runner.invoke(app, ["extract", str(tmp_path / "cells.h5ad"), "--operators", str(tmp_path / "ops"), "-o", str(art),
                            "--label-key", "cell_type", "--donor-key", "donor", "--from-screen", str(tmp_path / "scr"),
                            "--adaptor", "cell", "--epochs", "20"])
    assert r.exit_code == 0, r.output
    assert "operator: ov L0H2" in r.output and art.is_file()
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 0 and "readout pseudotime" in r.output and "content sha256" in r.output
    r = runner.invoke(app, ["inspect", str(art), "--json"])
    assert json.loads(r.output)["structure"]["operator"]["source"]["layer"] == 0
    from tests.planted import planted_cells

    planted_cells(n_donors=3, seed=9).write_h5ad(tmp_path / "new.h5ad")
    r = runner.invoke(app, ["apply", str(art), str(tmp_path / "new.h5ad"), "-o", str(tmp_path / "new_out.h5ad")])
    assert r.exit_code == 0, r.output
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "new_out.h5ad")
    assert {"sclens_pseudotime", "sclens_branch", "sclens_stage"} <= set(out.obs) and "X_sclens" in out.obsm
    r = runner.invoke(app, ["apply", str(art), str(tmp_path / "new.h5ad"), "-o", str(tmp_path / "new.h5ad")])
    assert r.exit_code == 2 and "never overwrites" in r.output
    r = runner.invoke(app, ["validate", str(art), str(tmp_path / "new.h5ad"), "--label-key", "cell_type", "--donor-key",
                            "donor", "--n-perm", "200", "-o", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    assert "zero-shot transfer" in r.output and json.loads((tmp_path / "v.json").read_text())["metrics"]["n_donors"] == 3
    art.write_bytes(art.read_bytes()[:-3] + b"xyz")
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 2 and "content check" in r.output


def test_degenerate_inputs_get_clear_messages(h5ad, tmp_path, sim_small):
    """0 cells to embed, log-normalised input to embed, no gene in the model vocabulary: each is said plainly."""
    import anndata as ad
    import numpy as np
    import scanpy as sc

    sim_small[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    r = runner.invoke(app, ["embed", str(tmp_path / "empty.h5ad"), "-o", str(tmp_path / "e0.h5ad")])
    assert r.exit_code == 2 and "0 cells" in r.output and "Traceback" not in r.output
    # log1p-normalised input: embedded with a note, and the same embeddings as from the counts (per-cell bins)
    sub = sim_small[:24].copy()
    sub.write_h5ad(tmp_path / "counts.h5ad")
    lg = sub.copy()
    sc.pp.normalize_total(lg, target_sum=1e4)
    sc.pp.log1p(lg)
    lg.write_h5ad(tmp_path / "log.h5ad")
    r1 = runner.invoke(app, ["embed", str(tmp_path / "counts.h5ad"), "-o", str(tmp_path / "ec.h5ad")])
    r2 = runner.invoke(app, ["embed", str(tmp_path / "log.h5ad"), "-o", str(tmp_path / "el.h5ad")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r2.output
    assert "log1p normalized values, not raw counts" in r2.output and "note:" not in r1.output
    e1, e2 = ad.read_h5ad(tmp_path / "ec.h5ad").obsm["X_scgpt"], ad.read_h5ad(tmp_path / "el.h5ad").obsm["X_scgpt"]
    assert np.allclose(e1, e2, atol=1e-5)
    # no gene in the vocabulary
    alien = sim_small[:10].copy()
    alien.var_names = [f"zz{i}" for i in range(alien.n_vars)]
    alien.write_h5ad(tmp_path / "alien.h5ad")
    r = runner.invoke(app, ["data", str(tmp_path / "alien.h5ad")])
    assert r.exit_code == 2 and "none of the" in r.output and "model vocabulary" in r.output
    r = runner.invoke(app, ["data", str(h5ad)])
    assert r.exit_code == 0 and "are model tokens" in r.output


def test_device_option(h5ad, tmp_path):
    import torch

    from sclens.errors import InputError
    from sclens.models.api import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(InputError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the missing-CUDA message cannot be checked here")
    with pytest.raises(InputError, match="CUDA is not available here"):
        resolve_device("cuda:0")
    r = runner.invoke(app, ["embed", str(h5ad), "-o", str(tmp_path / "e.h5ad"), "--device", "cuda"])
    assert r.exit_code == 2 and "CUDA is not available here" in r.output
    r = runner.invoke(app, ["export-operators", str(h5ad), "-o", str(tmp_path / "ops"), "--device", "cuda"])
    assert r.exit_code == 2 and "use --device cpu or auto" in r.output
    r = runner.invoke(app, ["circuits", "sae", str(h5ad), "-o", str(tmp_path / "sae"), "--device", "cuda:1"])
    assert r.exit_code == 2 and "CUDA is not available here" in r.output
    for cmd in ("pretrain", "transcoders"):
        r = runner.invoke(app, ["circuits", cmd, str(h5ad), "--label-key", "cell_type", "-o", str(tmp_path / cmd),
                                "--device", "cuda"])
        assert r.exit_code == 2 and "CUDA is not available here" in r.output, (cmd, r.output)
        assert not (tmp_path / cmd).exists()


def test_pretrain_a_geneformer_then_embed(h5ad, tmp_path):
    pytest.importorskip("transformers")
    r = runner.invoke(app, ["pretrain", str(h5ad), "-o", str(tmp_path / "gf"), "--family", "geneformer", "--steps", "5",
                            "--layers", "1", "--heads", "2", "--d-model", "16", "--d-hid", "32", "--seq-len", "32",
                            "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "masked-gene cross-entropy" in r.output
    r = runner.invoke(app, ["embed", str(h5ad), "-o", str(tmp_path / "e.h5ad"), "--model", str(tmp_path / "gf")])
    assert r.exit_code == 0, r.output
    import anndata as ad

    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_geneformer"].shape == (360, 16)
    r = runner.invoke(app, ["pretrain", str(h5ad), "-o", str(tmp_path / "x"), "--family", "geneformer", "--mvc"])
    assert r.exit_code == 2 and "--mvc is an scGPT objective" in r.output
    r = runner.invoke(app, ["pretrain", str(h5ad), "-o", str(tmp_path / "x"), "--family", "bert"])
    assert r.exit_code == 2 and "--family must be" in r.output
