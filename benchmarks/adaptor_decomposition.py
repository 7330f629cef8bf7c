"""What the extracted adaptor costs or adds against PCA-10, old (trained) and new (closed-form ruler) adaptor (issue 18)

    python benchmarks/adaptor_decomposition.py [--shared ../shared] [--out benchmarks/results]

Kang 2018 leave-one-donor-out (8 splits), the same shared readouts for every row.

On the identity operator (the panel itself, so the model plays no part), five 10-dimensional linear maps of the
same panel values:

  pca10                        PCA of the training cells' panel log1p values (the bench's row)
  pca10_zscored                the same after z-scoring every gene (the trained adaptor's input scaling)
  identity_cell_untrained      the trained adaptor with 0 epochs: the top-10 PCs of the z-scored features of the
                               stage-balanced training cells (its starting point)
  extracted_identity_cell      the trained adaptor (120 epochs of the ruler/local/recon/stage loss; the earlier
                               default)
  extracted_identity           the closed-form ruler adaptor (the default now)

and on the default model's ov drift operator, the trained adaptor (``sclens_extracted_cell``) and the ruler adaptor
(``sclens_extracted``).

Tests (paired two-sided Wilcoxon across splits, BH over the whole table): every identity row against pca10; the
ruler adaptor against the trained one on both operators, on every endpoint-metric and on the two manifold
diagnostics (trustworthiness of the latent against the operator features on up to 1,000 test cells; held-out
ruler Spearman of the test donor's anchors). Fit seconds per split are the extracted method's whole per-split fit
(adaptor + the extracted file's own readouts). Writes ``adaptor_decomposition.{json,md}``. Run it alone (timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import anndata as ad

import pandas as pd

from sclens.bench import run_campaign
from sclens.evaluation import DIAGNOSTICS, read_bench_config
from sclens.methods import METHODS, ExtractedIdentityMethod, ExtractedMethod, PCAMethod
from sclens.stats import bh_qvalues, paired_wilcoxon

HERE = Path(__file__).resolve().parent
IDENTITY = ["pca10", "pca10_zscored", "identity_cell_untrained", "extracted_identity_cell", "extracted_identity"]
DRIFT = ["sclens_extracted_cell", "sclens_extracted"]
ORDER = IDENTITY + DRIFT
# (method, baseline) pairs tested; diagnostics only where both rows are extracted methods
PAIRS = [(m, "pca10") for m in IDENTITY[1:]] + [("extracted_identity", "extracted_identity_cell"),
                                                ("sclens_extracted", "sclens_extracted_cell")]


class UntrainedIdentityAdaptor(ExtractedIdentityMethod):
    name = "identity_cell_untrained"
    description = "extracted method on the identity operator, trained adaptor with 0 epochs (its PCA start)"

    def __init__(self, config, model=None):
        super().__init__(dataclasses.replace(config, adaptor="cell", adaptor_epochs=0), model)


class TrainedIdentityAdaptor(ExtractedIdentityMethod):
    name = "extracted_identity_cell"
    description = "extracted method on the identity operator, trained adaptor (120 epochs; the earlier default)"

    def __init__(self, config, model=None):
        super().__init__(dataclasses.replace(config, adaptor="cell"), model)


class TrainedDriftAdaptor(ExtractedMethod):
    name = "sclens_extracted_cell"
    description = "extracted method on the default model's ov drift, trained adaptor (the earlier default)"

    def __init__(self, config, model=None):
        super().__init__(dataclasses.replace(config, adaptor="cell"), model)


class ZscoredPCA(PCAMethod):
    name = "pca10_zscored"
    description = "PCA (10 components) of the z-scored panel log1p values of the training cells"

    def fit(self, train, endpoints, targets):
        from sklearn.decomposition import PCA
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.pca = make_pipeline(StandardScaler(), PCA(n_components=10, random_state=self.config.seed)).fit(train.x)
        scaler, pca = self.pca[0], self.pca[-1]
        self.n_trainable = int(scaler.mean_.size + scaler.scale_.size + pca.components_.size + pca.mean_.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    for m in (UntrainedIdentityAdaptor, TrainedIdentityAdaptor, TrainedDriftAdaptor, ZscoredPCA):
        METHODS[m.name] = m
    cfg = read_bench_config(HERE / "campaigns/kang2018_donor_holdout.toml", methods=ORDER)
    a = ad.read_h5ad(args.shared / "data/kang2018_pbmc/kang2018_ctrl_8donors.h5ad")
    t0 = time.perf_counter()
    res = run_campaign(a, cfg, name="adaptor_decomposition", progress=True)
    seconds = time.perf_counter() - t0
    s = res.scores
    rows = []
    for (ep, metric), sub in s.groupby(["endpoint", "metric"], sort=False):
        wide = sub.pivot_table(index="split", columns="method", values="value", dropna=False)
        for m, base in PAIRS:
            if m in wide and base in wide:
                r = paired_wilcoxon(wide[m].to_numpy(), wide[base].to_numpy())
                rows.append({"endpoint": ep, "metric": metric, "method": m, "baseline": base,
                             "mean_method": float(wide[m].mean()), "mean_baseline": float(wide[base].mean()), **r})
    tab = pd.DataFrame(rows)
    tab["q"] = bh_qvalues(tab["p"].to_numpy())
    fit = res.runtime[res.runtime.stage == "fit"].groupby("method").seconds.mean()
    means = s.pivot_table(index=["endpoint", "metric"], columns="method", values="value")[ORDER]
    out = {"campaign": "kang2018 leave-one-donor-out; identity operator and the default model's ov drift",
           "n_splits": int(s.split.nunique()), "seconds_total": seconds,
           "fit_seconds_per_split": {k: float(v) for k, v in fit.items()},
           "means": {m: {f"{e}/{k}": float(v) for (e, k), v in means[m].items()} for m in ORDER},
           "tests": json.loads(tab.to_json(orient="records")), "skipped": res.skipped, "info": res.info}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptor_decomposition.json").write_text(json.dumps(out, indent=1, default=str))

    def cell(ep, metric, m, base):
        v = means.loc[(ep, metric), m] if (ep, metric) in means.index else float("nan")
        t = tab[(tab.endpoint == ep) & (tab.metric == metric) & (tab.method == m) & (tab.baseline == base)]
        return f"{v:.3f}" + (f" (q {float(t.q.iloc[0]):.2f})" if len(t) else "")

    lines = ["# The adaptor against PCA-10 and against itself (Kang 2018, 8 leave-one-donor-out splits)", "",
             "## Identity operator (q: against pca10)", "",
             "| endpoint · metric | " + " | ".join(IDENTITY) + " |", "|---|" + "---|" * len(IDENTITY)]
    for ep, metric in means.index:
        if ep != DIAGNOSTICS:
            lines.append(f"| {ep} · {metric} | " + " | ".join(cell(ep, metric, m, "pca10") for m in IDENTITY) + " |")
    lines += ["", "## Ruler adaptor (new) against the trained adaptor (earlier default), same operator "
              "(q: new against old)", "",
              "| endpoint · metric | identity: cell | identity: ruler | default drift: cell | default drift: ruler |",
              "|---|---|---|---|---|"]
    for ep, metric in means.index:
        lines.append(f"| {ep} · {metric} | {cell(ep, metric, 'extracted_identity_cell', '')} | "
                     f"{cell(ep, metric, 'extracted_identity', 'extracted_identity_cell')} | "
                     f"{cell(ep, metric, 'sclens_extracted_cell', '')} | "
                     f"{cell(ep, metric, 'sclens_extracted', 'sclens_extracted_cell')} |")
    lines += ["", f"q: paired two-sided Wilcoxon over the splits, BH over all {len(tab)} tests. `{DIAGNOSTICS}` rows "
              "are diagnostics (trustworthiness of the latent against the operator features, k = 15, up to 1,000 "
              "test cells; held-out ruler Spearman of the test donor's anchors). Fit seconds per split: "
              + ", ".join(f"{m} {fit[m]:.1f}" for m in ORDER if m in fit) + f". Total {seconds:.0f} s, 2 cores."]
    (args.out / "adaptor_decomposition.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
