"""Where does the extracted adaptor lose to PCA-10? (issue 18, first measurement)

    python benchmarks/adaptor_decomposition.py [--shared ../shared] [--out benchmarks/results]

On the identity operator (the panel itself, so the model plays no part), Kang 2018 leave-one-donor-out (8 splits),
the same shared readouts for four 10-dimensional linear maps of the same panel values:

  pca10                       PCA of the training cells' panel log1p values (the bench's row)
  pca10_zscored               the same after z-scoring every gene (the adaptor's input scaling)
  identity_adaptor_untrained  the extracted method with 0 adaptor epochs: the top-10 PCs of the z-scored features
                              of the stage-balanced training cells (the adaptor's starting point)
  extracted_identity          the extracted method as shipped (120 epochs of the ruler/local/recon/stage loss)

Each step from the first row to the last adds one ingredient, so the differences split the adaptor's cost into
input scaling, stage-balanced sampling and the training objective. Paired Wilcoxon per split against ``pca10``,
BH over all tests (the bench's own comparison, pca10 as the reference). Writes ``adaptor_decomposition.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import anndata as ad

from sclens.bench import METHODS, ExtractedIdentityMethod, PCAMethod, _compare, read_bench_config, run_campaign

HERE = Path(__file__).resolve().parent
ORDER = ["pca10", "pca10_zscored", "identity_adaptor_untrained", "extracted_identity"]


class UntrainedIdentityAdaptor(ExtractedIdentityMethod):
    name = "identity_adaptor_untrained"
    description = "extracted method on the identity operator with 0 adaptor epochs (its PCA start)"

    def __init__(self, config, model=None):
        super().__init__(dataclasses.replace(config, adaptor_epochs=0), model)


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
    for m in (UntrainedIdentityAdaptor, ZscoredPCA):
        METHODS[m.name] = m
    cfg = read_bench_config(HERE / "campaigns/kang2018_donor_holdout.toml", methods=ORDER)
    a = ad.read_h5ad(args.shared / "data/kang2018_pbmc/kang2018_ctrl_8donors.h5ad")
    t0 = time.perf_counter()
    res = run_campaign(a, cfg, name="adaptor_decomposition", progress=False)
    seconds = time.perf_counter() - t0
    s = res.scores
    # the bench's own paired tests with pca10 as the reference (mean_diff = pca10 - method), BH over the table
    tab = _compare(s, reference="pca10")
    fit = res.runtime[res.runtime.stage == "fit"].groupby("method").seconds.mean()
    out = {"campaign": "kang2018 leave-one-donor-out, identity operator", "n_splits": int(s.split.nunique()),
           "seconds_total": seconds, "fit_seconds_per_split": {k: float(v) for k, v in fit.items()},
           "means": {m: {f"{e}/{k}": float(v) for (e, k), v in
                         s[s.method == m].groupby(["endpoint", "metric"]).value.mean().items()} for m in ORDER},
           "versus_pca10": json.loads(tab.to_json(orient="records")), "info": res.info}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptor_decomposition.json").write_text(json.dumps(out, indent=1, default=str))
    means = s.pivot_table(index=["endpoint", "metric"], columns="method", values="value")[ORDER]
    lines = ["# Where the adaptor loses to PCA-10 (identity operator, Kang 2018, 8 leave-one-donor-out splits)", "",
             "| endpoint · metric | " + " | ".join(ORDER) + " |", "|---|" + "---|" * len(ORDER)]
    for (ep, metric), r in means.iterrows():
        cells = []
        for m in ORDER:
            q = tab[(tab.endpoint == ep) & (tab.metric == metric) & (tab.method == m)].q
            cells.append(f"{r[m]:.3f}" + (f" (q {float(q.iloc[0]):.2f})" if len(q) else ""))
        lines.append(f"| {ep} · {metric} | " + " | ".join(cells) + " |")
    lines += ["", "q: paired Wilcoxon against pca10 over the splits, BH over the table. Fit seconds per split: "
              + ", ".join(f"{m} {fit[m]:.1f}" for m in ORDER) + f". Total {seconds:.0f} s on 2 cores."]
    (args.out / "adaptor_decomposition.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
