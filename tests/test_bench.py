"""Benchmark campaigns: leakage, peers through their libraries, controls, failures reported, the CLI."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sclens import bench, bench_report, methods
from sclens.bench import BenchConfig, Endpoint, run_campaign


# ------------------------------------------------------------------ leakage
class _Spy(methods.Method):
    name = "spy"
    seen_fit: list = []

    def fit(self, train, endpoints, targets):
        _Spy.seen_fit.append(set(train.adata.obs["_row"]))

    def embed_or_predict(self, cells, idx):
        return {"embedding": cells.x[:, :5]}


def _toy(n_donors=5, per=30, seed=0):
    rng = np.random.default_rng(seed)
    from sclens.models import load_default_model

    genes = [g for g in load_default_model().vocab.genes if g.isalpha() and g.isupper()][:60]
    n = n_donors * per
    lab = np.array(["CD4 T cells", "CD8 T cells", "B cells"] * (n // 3 + 1))[:n]
    X = rng.poisson(2.0, size=(n, len(genes))).astype(np.float32)
    X[lab == "CD8 T cells", :5] += rng.poisson(6.0, size=((lab == "CD8 T cells").sum(), 5))
    obs = pd.DataFrame({"individual": np.repeat([f"p{i}" for i in range(n_donors)], per), "annot": lab,
                        "maturity": (lab == "B cells").astype(float) + rng.random(n) * 0.1})
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))


def test_methods_fit_on_training_donors_only(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "spy", _Spy)
    _Spy.seen_fit.clear()
    a = _toy()
    cfg = BenchConfig(endpoints=[Endpoint("t", "binary", "annot", positive=["CD8 T cells"], negative=["CD4 T cells"])],
                      donor_key="individual", n_splits=4, methods=["spy"], seed=1)
    res = run_campaign(a, cfg, progress=False)
    donors = a.obs["individual"].to_numpy()
    for seen, sp in zip(_Spy.seen_fit, res.info["splits"]):
        assert not set(donors[list(seen)]) & set(sp["test_groups"])  # no test donor's cell reached fit
        assert len(seen) == sp["n_train"]
    # the shared readouts standardise with TRAINING statistics only
    Ztr, Zte = np.arange(20.0).reshape(10, 2), np.full((4, 2), 100.0)
    y = {"t": np.array([0, 1] * 5, float)}
    _, _, scaler = bench.shared_readouts(Ztr, Zte, cfg.endpoints, y, seed=0, max_cells=100)
    assert np.allclose(scaler.mean_, Ztr.mean(0))
    assert res.info["source_equals_donor"] is False and len(res.scores)
    # cross-source: no cell of the test source reaches fit; the report says source and donor coincide
    _Spy.seen_fit.clear()
    cfg.scheme, cfg.test_sources, cfg.n_splits, cfg.label_key = "source", ["p4"], 3, "annot"
    res = run_campaign(a, cfg, progress=False)
    assert len(_Spy.seen_fit) == 3 and all(not set(np.flatnonzero(donors == "p4")) & seen for seen in _Spy.seen_fit)
    assert res.info["source_equals_donor"] is True and res.info["test_sources"] == ["p4"]
    assert set(res.scores["test_groups"]) == {"p4"} and "Cross-source" in bench_report.summary_markdown(res)


# ------------------------------------------------------------------ CLI, unfamiliar data, end to end
def test_cli_bench_unfamiliar_columns_ensembl_ids_and_own_endpoint_file(tmp_path):
    from sclens.cli import app
    from sclens.data import ensembl_to_symbol

    a = _toy(n_donors=5, per=36)
    sym2ens = {s: e for e, s in ensembl_to_symbol().items()}
    keep = [g for g in a.var_names if g in sym2ens]
    a = a[:, keep].copy()
    a.var["symbol"] = a.var_names
    a.var_names = [sym2ens[g] for g in keep]
    # as a OneK1K download: some Ensembl ids have no symbol (about 6 %: once kept, they read as "mixed" ids)
    import scipy.sparse as sp

    n_fake = max(3, len(keep) // 16)
    extra = ad.AnnData(sp.csr_matrix(np.ones((a.n_obs, n_fake), dtype=np.float32)), obs=a.obs[[]])
    extra.var_names = [f"ENSG9999999{i:04d}" for i in range(n_fake)]
    a = ad.concat([a, extra], axis=1, merge="first")
    a.write_h5ad(tmp_path / "mine.h5ad")
    (tmp_path / "endpoints.toml").write_text(
        'donor_key = "individual"\nlabel_key = "annot"\nn_splits = 3\nscvi_epochs = 2\n'
        'adaptor_epochs = 3\nn_ref_cells = 8\n'
        '[stage_map]\n"CD4 T cells" = "Naive CD4 T"\n"CD8 T cells" = "Naive CD8 T"\n"B cells" = "Naive B"\n'
        '[[endpoint]]\nname = "cd8_vs_cd4"\nkind = "binary"\ncolumn = "annot"\n'
        'positive = ["CD8 T cells"]\nnegative = ["CD4 T cells"]\n'
        'floor_markers = {positive = ["' + keep[0] + '"], negative = []}\n'
        '[[endpoint]]\nname = "types"\nkind = "multiclass"\ncolumn = "annot"\n'
        '[[endpoint]]\nname = "maturity"\nkind = "depth"\ncolumn = "maturity"\n')
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "mine.h5ad"), "--endpoints", str(tmp_path / "endpoints.toml"),
                                 "-o", str(tmp_path / "rep"), "--methods",
                                 "sclens_extracted,extracted_identity,extracted_random,raw_log1p,pca10,dpt,mlp_probe",
                                 "--random-control", "1", "--name", "mine"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "bench_mine.json").read_text())
    back = bench.BenchResult.load(tmp_path / "rep")
    assert back.name == "mine" and back.to_dict()["summary"] == rep["summary"] and back.skipped == rep["skipped"]
    assert rep["info"]["panel_size"] == len(keep) < 1200 and "panel" in r.output
    got = {(s["endpoint"], s["method"]) for s in rep["summary"]}
    assert ("cd8_vs_cd4", "sclens_extracted") in got and ("maturity", "dpt") in got and ("types", "pca10") in got
    assert ("types", "mlp_probe") in got, rep["skipped"]  # the frozen model embeds the harmonised cells
    assert all(c["reference"] == "sclens_extracted" and c["q"] is not None for c in rep["comparisons"] if c["p"] is not None)
    floor = [s for s in rep["summary"] if s["endpoint"] == "cd8_vs_cd4"][0]
    assert keep[0] in floor["floor_rule"] and floor["floor"] > 0.8  # the planted marker gene separates the classes
    assert (tmp_path / "rep" / "bench_mine.html").stat().st_size > 1000
    assert rep["params"]["sclens_extracted"]["method"] > 0
    assert rep["params"]["extracted_random"]["random_copies"] == 1
    assert {a["question"] for a in rep["ablations"]} == {"model contribution", "adaptor cost"}
    # a missing label column is a clear error, not a traceback
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "mine.h5ad"), "-o", str(tmp_path / "x"), "--donor-key",
                                 "individual", "--multiclass", "cell_type"])
    assert r.exit_code == 2 and "cell_type" in r.output


def test_peer_methods_run_through_their_libraries(monkeypatch):
    """scVI, CellTypist, Palantir, DPT and the MLP probe, each through its real library (sclens[bench])."""
    for mod in ("scvi", "celltypist", "palantir"):
        pytest.importorskip(mod)
    a = _toy(n_donors=4, per=45, seed=2)
    eps = [Endpoint("cd8", "binary", "annot", positive=["CD8 T cells"], negative=["CD4 T cells"]),
           Endpoint("types", "multiclass", "annot"), Endpoint("maturity", "depth", "maturity")]
    cfg = BenchConfig(endpoints=eps, donor_key="individual", n_splits=2, scvi_epochs=3, seed=0,
                      methods=["scvi10", "celltypist", "palantir", "dpt", "mlp_probe"])
    res = run_campaign(a, cfg, progress=False)
    assert not res.skipped, res.skipped
    s = res.summary.set_index(["endpoint", "metric", "method"])["mean"]
    assert s[("cd8", "auroc", "celltypist")] > 0.9 and s[("cd8", "auroc", "scvi10")] > 0.5
    assert np.isfinite(s[("maturity", "abs_spearman", "palantir")]) and np.isfinite(s[("maturity", "abs_spearman", "dpt")])
    assert np.isfinite(s[("types", "balanced_accuracy", "mlp_probe")])
    assert all(res.params[m]["total"] > 0 for m in ("scvi10", "celltypist", "mlp_probe"))
    assert (res.runtime.query("method == 'mlp_probe' and split == -1")["seconds"] > 0).all()  # frozen-model embedding
    # a peer that is not installed is reported with the reason, never faked
    monkeypatch.setattr(methods.SCVIMethod, "requires", ("sclens_no_such_module",))
    cfg.methods = ["scvi10", "raw_log1p"]
    res = run_campaign(a, cfg, progress=False)
    assert "sclens[bench]" in res.skipped["scvi10"] and "scvi10" not in set(res.scores.method)


def test_control_rows_identity_and_random_operators_with_ablation_tests(tmp_path):
    """extracted_identity runs the extracted method on the panel itself, extracted_random on operators of
    random-weights copies (split i -> copy i mod K); the report tests the two ablation questions."""
    from sclens.models import load_default_model

    a = _toy(n_donors=5, per=36)
    eps = [Endpoint("cd8", "binary", "annot", positive=["CD8 T cells"], negative=["CD4 T cells"]),
           Endpoint("types", "multiclass", "annot")]
    cfg = BenchConfig(endpoints=eps, donor_key="individual", label_key="annot", n_splits=4, seed=0,
                      n_ref_cells=8, random_control=2,
                      stage_map={"CD4 T cells": "Naive CD4 T", "CD8 T cells": "Naive CD8 T", "B cells": "Naive B"},
                      methods=["sclens_extracted", "extracted_identity", "extracted_random", "pca10"])
    model = load_default_model()
    ci = bench.campaign_inputs(a, cfg, model)
    cells = ci.cells(np.arange(a.n_obs))
    ident = methods.ExtractedIdentityMethod(cfg, model)
    ident.prepare(cells)
    assert np.array_equal(ident.operator.features(cells.x), cells.x)  # the identity operator is the panel itself
    rnd = methods.ExtractedRandomMethod(cfg, model)
    rnd.prepare(cells)
    own = methods.ExtractedMethod(cfg, model)
    own.prepare(cells)
    assert len(rnd.operators) == 2
    f_own, f0, f1 = (op.features(cells.x[:20]) for op in (own.operator, *rnd.operators))
    assert not np.allclose(f_own, f0) and not np.allclose(f0, f1)
    assert rnd.operators[0].source["model_sha256"] != own.operator.source["model_sha256"]

    res = run_campaign(a, cfg, model=model, progress=False)
    assert not res.skipped and set(res.scores.method) == set(cfg.methods)
    ab = res.ablations
    assert set(ab["question"]) == {"model contribution", "adaptor cost"}
    assert len(ab) == 2 * 4  # 2 questions x (cd8: AUROC, bal. acc; types: bal. acc, macro-F1)
    row = ab[(ab.question == "adaptor cost") & (ab.endpoint == "cd8") & (ab.metric == "auroc")].iloc[0]
    wide = res.scores.query("endpoint == 'cd8' and metric == 'auroc'").pivot(index="split", columns="method", values="value")
    assert row["mean_diff"] == pytest.approx(float((wide["extracted_identity"] - wide["pca10"]).mean()))
    assert ab["q"].notna().all() and (ab["q"] >= ab["p"] - 1e-12).all()
    # the manifold beside the endpoints: every extracted row, every split; reported, never tested
    diag = res.scores[res.scores.endpoint == bench.DIAGNOSTICS]
    assert set(diag.method) == {"sclens_extracted", "extracted_identity", "extracted_random"}
    assert set(diag.metric) == {"trustworthiness", "heldout_ruler_spearman"}
    assert len(diag) == 3 * 2 * 4 and diag.query("metric == 'trustworthiness'")["value"].between(0, 1).all()
    assert bench.DIAGNOSTICS not in set(ab.endpoint) and bench.DIAGNOSTICS not in set(res.comparisons.endpoint)
    assert (res.summary.query("endpoint == @bench.DIAGNOSTICS")["kind"] == "diagnostic").all()
    out = res.save(tmp_path)
    md = out["md"].read_text()
    assert "**Controls**" in md and "model contribution" in md and "adaptor cost" in md
    assert "**manifold · trustworthiness** (diagnostic" in md
    again = bench.BenchResult.from_json(out["json"])
    assert len(again.ablations) == len(ab)
    # K = 0 skips the random control with its reason
    cfg.random_control, cfg.methods = 0, ["extracted_random", "pca10"]
    res = run_campaign(a, cfg, model=model, progress=False)
    assert "random_control = 0" in res.skipped["extracted_random"]


class _NaNMethod(methods.Method):
    name = "nan_embedding"

    def fit(self, train, endpoints, targets):
        pass

    def embed_or_predict(self, cells, idx):
        Z = cells.x[:, :3].copy()
        Z[0, 0] = np.nan
        return {"embedding": Z}


class _Broken(methods.Method):
    name = "broken"

    def fit(self, train, endpoints, targets):
        raise np.linalg.LinAlgError("singular matrix")


class _Constant(_NaNMethod):
    name = "constant_embedding"

    def embed_or_predict(self, cells, idx):
        return {"embedding": np.zeros((cells.n, 4))}


def test_a_failing_method_is_reported_and_the_campaign_goes_on(monkeypatch):
    for cls in (_NaNMethod, _Broken, _Constant):
        monkeypatch.setitem(methods.METHODS, cls.name, cls)
    cfg = BenchConfig(endpoints=[Endpoint("t", "binary", "annot", positive=["CD8 T cells"], negative=["CD4 T cells"])],
                      donor_key="individual", n_splits=2, seed=0,
                      methods=["nan_embedding", "broken", "constant_embedding", "pca10"])
    res = run_campaign(_toy(), cfg, progress=False)
    assert "non-finite" in res.skipped["nan_embedding"] and "failed on split" in res.skipped["nan_embedding"]
    assert "LinAlgError: singular matrix" in res.skipped["broken"]
    assert "constant" in res.skipped["constant_embedding"]
    assert set(res.scores.method) == {"pca10"}
