"""sclens.bench: donor-holdout benchmark campaigns against the tools people already use.

A campaign = a dataset, a list of :class:`~sclens.evaluation.Endpoint` s, seeded grouped splits (no donor on both
sides) and a list of methods from :data:`sclens.methods.METHODS`. Every method follows one protocol (``prepare``
once, ``fit(train)``, ``embed_or_predict(cells)``); embedding methods are scored through the SAME readouts
(standardised logistic regression for classes, linear regression for depth), fitted on the training split only.
Scores are computed per test donor and averaged per split; the extracted algorithm is compared with every other
method by a paired two-sided Wilcoxon test across splits, with Benjamini-Hochberg over endpoints x comparisons.

Every endpoint states its room: depth endpoints carry the ceiling (the |Spearman| a perfect ordering reaches
given the tied depth levels) and each method's fraction of it; classification endpoints carry a no-training
floor (a marker rule where the markers exist, else chance). An endpoint whose floor lies inside the best
method's confidence interval is marked saturated, and no win is claimed there.

Endpoints, the configuration, splits and readouts live in :mod:`sclens.evaluation`, the methods in
:mod:`sclens.methods`, the statistics in :mod:`sclens.stats`; their public names are re-exported here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__
from .errors import DATA_ERRORS, InputError
from .evaluation import (DIAGNOSTICS, METRICS, BenchConfig, Cells, Endpoint, Split, campaign_inputs, check_embedding,
                         donor_splits, gene_positions, json_records, parse_binary_spec, read_bench_config,
                         score_endpoint, shared_readouts)
from .methods import METHODS, ROOT_MARKERS, Method, MethodSkipped
from .stats import bh_qvalues, depth_ceiling, mean_ci, paired_wilcoxon
from .utils import array_sha256, package_versions, result_file

__all__ = ["ABLATIONS", "METHODS", "REFERENCE", "BenchConfig", "BenchResult", "Endpoint", "Method", "Split",
           "ablations", "donor_splits", "parse_binary_spec", "read_bench_config", "run_campaign"]
log = logging.getLogger(__name__)


# ==================================================================================== data handed to methods


# the two ablations every campaign reports next to the extracted method: (question, method, baseline)
ABLATIONS = (("model contribution", "sclens_extracted", "extracted_random"),
             ("adaptor cost", "extracted_identity", "pca10"))
REFERENCE = "sclens_extracted"


# ==================================================================================== the harness


def _floor(ep: Endpoint, cells: Cells, target: np.ndarray, groups: np.ndarray) -> dict:
    """No-training floor: the marker rule where its genes exist, else chance."""
    if ep.kind == "depth":
        return {}
    fm = ep.floor_markers or {}
    where = gene_positions(cells.panel)
    if ep.kind == "binary":
        pos = [g for g in fm.get("positive", []) if g in where]
        neg = [g for g in fm.get("negative", []) if g in where]
        if fm and (pos or neg):
            s = (cells.x[:, [where[g] for g in pos]].mean(1) if pos else 0.0) - \
                (cells.x[:, [where[g] for g in neg]].mean(1) if neg else 0.0)
            s = np.asarray(s, float)
            # a marker rule has no fitted threshold: call "positive" above the midpoint of the score's range
            out = score_endpoint(ep, target, {"score": 1 / (1 + np.exp(-(s - np.median(s)) * 4))}, groups)
            return {**out, "rule": f"mean log1p({'+'.join(pos) or '-'}) - mean log1p({'+'.join(neg) or '-'})",
                    "missing_markers": [g for g in fm.get("positive", []) + fm.get("negative", []) if g not in where]}
        missing = fm.get("positive", []) + fm.get("negative", [])
        return {"auroc": 0.5, "balanced_accuracy": 0.5,
                "rule": "chance" + (f" (marker genes {missing} absent from the panel)" if missing else "")}
    classes = sorted(set(target[pd.notna(target)].astype(str)))
    usable = {c: [g for g in genes if g in where] for c, genes in fm.items()}
    usable = {c: g for c, g in usable.items() if g}
    if usable:
        names = list(usable)
        S = np.stack([cells.x[:, [where[g] for g in usable[c]]].mean(1) for c in names], axis=1)
        S = (S - S.mean(0)) / (S.std(0) + 1e-8)  # markers differ in level; compare z-scores
        pred = np.asarray(names)[S.argmax(1)]
        out = score_endpoint(ep, target, {"pred": pred}, groups)
        return {**out, "rule": "argmax of z-scored marker means (" + ", ".join(names) + ")"}
    return {"balanced_accuracy": 1.0 / max(1, len(classes)), "macro_f1": float("nan"), "rule": f"chance (1/{len(classes)})"}


@dataclass
class BenchResult:
    """Everything a campaign measured. ``scores``: one row per (split, method, endpoint, metric)."""

    name: str
    scores: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    runtime: pd.DataFrame
    params: dict
    skipped: dict
    info: dict
    ablations: pd.DataFrame = field(default_factory=pd.DataFrame)  # the controls' paired tests (see ABLATIONS)

    def to_dict(self) -> dict:
        rec = lambda df: json_records(df)  # noqa: E731
        return {"name": self.name, "info": self.info, "summary": rec(self.summary), "comparisons": rec(self.comparisons),
                "ablations": rec(self.ablations), "runtime": rec(self.runtime), "params": self.params,
                "skipped": self.skipped, "scores": rec(self.scores)}

    @classmethod
    def from_json(cls, path: str | Path) -> "BenchResult":
        """Reload a saved campaign (``bench_<name>.json``), e.g. to re-render its report."""
        import json

        d = json.loads(Path(path).read_text())
        df = lambda k: pd.DataFrame(d[k]).astype({"value": float} if k == "scores" else {})  # noqa: E731
        return cls(d["name"], df("scores"), df("summary").fillna(np.nan), df("comparisons"), df("runtime"),
                   d["params"], d["skipped"], d["info"], pd.DataFrame(d.get("ablations", [])))

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``bench_<name>.json`` / ``.md`` / ``.html`` (+ figures) in ``out_dir``."""
        from .bench_report import write_report

        return write_report(self, Path(out_dir))

    @classmethod
    def load(cls, path: str | Path) -> "BenchResult":
        """Reload a saved campaign from its ``bench_<name>.json`` or the folder holding it."""
        return cls.from_json(result_file(path, "bench_*.json", "a saved campaign"))


def run_campaign(adata: ad.AnnData, config: BenchConfig, *, model=None, name: str = "campaign",
                 layer: str | None = None, progress: bool = True) -> BenchResult:
    """Run every method on every split and score every endpoint; see the module docstring.

    Parameters
    ----------
    adata
        Labelled cells with a donor column (unless ``config.scheme`` is ``cells``).
    config
        Endpoints, splits and methods (:func:`sclens.evaluation.read_bench_config` reads them from TOML,
        :func:`sclens.evaluation.bench_config` from endpoint specs).
    model
        The frozen model behind the extracted method and the MLP probe (default: the embedded model).
    name, layer
        Campaign name (file names); the layer of ``adata`` to read.

    Returns
    -------
    :class:`BenchResult`: per-split scores, summaries with CIs, paired tests with BH q, the controls' ablations,
    runtimes; ``save(folder)`` writes JSON, Markdown and HTML, ``BenchResult.load`` reads them back.
    """
    from .models.api import resolve_model

    t_start = time.perf_counter()
    model = resolve_model(model)
    ci = campaign_inputs(adata, config, model, layer=layer)
    adata, panel, x, kind, donors, targets, splits = ci.adata, ci.panel, ci.x, ci.kind, ci.donors, ci.targets, ci.splits
    obs, libsize, mapped, cells = adata.obs, ci.libsize, ci.mapped, ci.cells

    wanted = config.methods or list(METHODS)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise InputError(f"unknown methods {unknown}; available: {list(METHODS)}")
    has_depth = any(ep.kind == "depth" for ep in config.endpoints)
    methods, skipped = {}, {}
    for mname in wanted:
        cls = METHODS[mname]
        reason = cls.unavailable()
        if reason is None and cls.output == "pseudotime" and not has_depth:
            reason = "pseudotime-only method and no depth endpoint is declared"
        if reason:
            skipped[mname] = reason
        else:
            methods[mname] = cls(config, model)
            methods[mname].progress = progress
    rows, runtime = [], []
    all_cells = cells(np.arange(adata.n_obs))
    for mname, m in list(methods.items()):
        t0 = time.perf_counter()
        try:
            m.prepare(all_cells)
        except MethodSkipped as exc:
            skipped[mname] = str(exc)
            methods.pop(mname)
            continue
        except DATA_ERRORS as exc:
            skipped[mname] = f"failed while preparing: {type(exc).__name__}: {exc}"
            methods.pop(mname)
            continue
        runtime.append({"method": mname, "split": -1, "stage": "prepare (one-time)", "seconds": time.perf_counter() - t0})
    params: dict[str, dict] = {}
    floors: dict[str, list] = {ep.name: [] for ep in config.endpoints}
    ceilings: dict[str, list] = {ep.name: [] for ep in config.endpoints}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(splits) * len(methods), desc=f"bench {name}", unit="fit", disable=not progress)
    for sp_ in splits:
        train, test = cells(sp_.train), cells(sp_.test)
        t_tr = {k: v[sp_.train] for k, v in targets.items()}
        t_te = {k: v[sp_.test] for k, v in targets.items()}
        groups = test.donors if config.scheme != "cells" else np.full(test.n, "cells", dtype=object)
        for ep in config.endpoints:
            f = _floor(ep, test, t_te[ep.name], groups)
            floors[ep.name].append(f)
            if ep.kind == "depth":
                vals = [depth_ceiling(t_te[ep.name][(groups == g) & np.isfinite(t_te[ep.name])]) for g in np.unique(groups)]
                ceilings[ep.name].append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
        for mname, m in list(methods.items()):
            bar.set_postfix_str(f"split {sp_.index} {mname}")
            try:
                t0 = time.perf_counter()
                m.fit(train, config.endpoints, t_tr)
                t1 = time.perf_counter()
                if m.output == "embedding":
                    Ztr = m.embed_or_predict(train, sp_.train)["embedding"]
                    Zte = m.embed_or_predict(test, sp_.test)["embedding"]
                    check_embedding(Ztr, "training")
                    check_embedding(Zte, "test")
                    t2 = time.perf_counter()
                    preds, n_ro, _ = shared_readouts(Ztr, Zte, config.endpoints, t_tr, config.seed)
                    t3 = time.perf_counter()
                else:
                    res = m.embed_or_predict(test, sp_.test)
                    t2 = t3 = time.perf_counter()
                    n_ro = 0
                    preds = res.get("predictions") or {ep.name: {"pseudotime": res["pseudotime"]}
                                                       for ep in config.endpoints if ep.kind == "depth"}
            except MethodSkipped as exc:
                skipped[mname] = str(exc)
                methods.pop(mname)
                bar.update(1)
                continue
            except DATA_ERRORS as exc:  # a method that breaks is reported as failed, with why; the others go on
                skipped[mname] = f"failed on split {sp_.index}: {type(exc).__name__}: {exc}"
                methods.pop(mname)
                bar.update(1)
                continue
            for metric, v in m.diagnostics(test).items():
                rows.append({"split": sp_.index, "method": mname, "endpoint": DIAGNOSTICS, "metric": metric,
                             "value": v, "test_groups": ",".join(sp_.test_groups)})
            runtime += [{"method": mname, "split": sp_.index, "stage": "fit", "seconds": t1 - t0},
                        {"method": mname, "split": sp_.index, "stage": "embed/predict", "seconds": t2 - t1},
                        {"method": mname, "split": sp_.index, "stage": "readouts", "seconds": t3 - t2}]
            params[mname] = {"method": int(m.n_trainable), "readouts": n_ro, "total": int(m.n_trainable) + n_ro, **m.info}
            for ep in config.endpoints:
                if ep.name not in preds:
                    continue
                sc_ = score_endpoint(ep, t_te[ep.name], preds[ep.name], groups)
                if ep.kind == "depth" and libsize is not None:
                    # negative control: an ordering that follows sequencing depth is not maturation
                    sc_["libsize_abs_spearman"] = score_endpoint(
                        ep, libsize[sp_.test], preds[ep.name], groups)["abs_spearman"]
                for metric, v in sc_.items():
                    rows.append({"split": sp_.index, "method": mname, "endpoint": ep.name, "metric": metric, "value": v,
                                 "test_groups": ",".join(sp_.test_groups)})
            bar.update(1)
    bar.close()
    # a method skipped on any split is reported as skipped, with no partial scores or times
    rows = [r for r in rows if r["method"] not in skipped]
    runtime = [r for r in runtime if r["method"] not in skipped]
    params = {k: v for k, v in params.items() if k not in skipped}
    scores = pd.DataFrame(rows, columns=["split", "method", "endpoint", "metric", "value", "test_groups"])
    summary = _summarise(scores, config.endpoints, floors, ceilings)
    comparisons = _compare(scores)
    runtime_df = pd.DataFrame(runtime, columns=["method", "split", "stage", "seconds"])
    info = {"name": name, "title": config.title or name, "notes": config.notes, "sclens_version": __version__,
            "versions": package_versions(("sclens", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn",
                                          "scvi-tools", "palantir", "celltypist")),
            "n_cells": int(adata.n_obs), "n_donors": int(len(set(donors))), "panel_size": len(panel),
            "value_kind": kind, "scheme": config.scheme, "n_splits": len(splits), "seed": config.seed,
            "splits": [{"index": s.index, "test_groups": s.test_groups, "n_train": int(len(s.train)),
                        "n_test": int(len(s.test))} for s in splits],
            "endpoints": [asdict(ep) for ep in config.endpoints], "stage_map": config.stage_map,
            "n_cells_stage_mapped": int(mapped.sum()), "operator": config.operator,
            "input_hashes": {"x_panel": array_sha256(x), "obs_names": array_sha256(np.asarray(obs.index.astype(str)))},
            "root_rule": "training cells at the lowest depth level; highest mean z-scored log1p of "
                         f"{list(ROOT_MARKERS)} present in the panel, else the medoid",
            "wall_seconds": time.perf_counter() - t_start,
            "source_equals_donor": config.scheme in ("cells", "source"),
            "test_sources": list(config.test_sources) if config.scheme == "source" else None}
    info["runtime_ratio"] = _runtime_ratio(runtime_df)
    return BenchResult(name, scores, summary, comparisons, runtime_df, params, skipped, info, ablations(scores))


def _summarise(scores: pd.DataFrame, endpoints, floors, ceilings) -> pd.DataFrame:
    out = []
    for ep in endpoints:
        extra = ("libsize_abs_spearman",) if ep.kind == "depth" and "libsize_abs_spearman" in set(scores.metric) else ()
        for metric in ep.metrics + extra:
            sub = scores[(scores.endpoint == ep.name) & (scores.metric == metric)]
            fl = [f.get(metric) for f in floors[ep.name] if f.get(metric) is not None]
            floor = float(np.nanmean(fl)) if fl and np.isfinite(fl).any() else float("nan")
            ceiling = float(np.nanmean(ceilings[ep.name])) if ep.kind == "depth" and ceilings[ep.name] else 1.0
            rule = floors[ep.name][0].get("rule", "") if floors[ep.name] else ""
            if metric == "libsize_abs_spearman":
                floor, ceiling = float("nan"), float("nan")
                rule = "negative control: |Spearman| of the depth prediction with library size (lower is better)"
            best_lo = -np.inf
            rows_ep = []
            for mname, g in sub.groupby("method", sort=False):
                m, lo, hi = mean_ci(g["value"])
                rows_ep.append({"endpoint": ep.name, "kind": ep.kind, "metric": metric, "method": mname, "mean": m,
                                "ci_low": lo, "ci_high": hi, "n_splits": int(g["value"].notna().sum()),
                                "fraction_of_ceiling": m / ceiling if ceiling and np.isfinite(ceiling) else float("nan"),
                                "floor": floor, "floor_rule": rule, "ceiling": ceiling})
                if np.isfinite(m):
                    best_lo = max(best_lo, lo if np.isfinite(lo) else m)
            saturated = bool(np.isfinite(floor) and floor >= best_lo)
            for r in rows_ep:
                r["saturated"] = saturated
            out += rows_ep
    diag = scores[scores.endpoint == DIAGNOSTICS]
    for (metric, mname), g in diag.groupby(["metric", "method"], sort=False):
        m, lo, hi = mean_ci(g["value"])
        out.append({"endpoint": DIAGNOSTICS, "kind": "diagnostic", "metric": metric, "method": mname, "mean": m,
                    "ci_low": lo, "ci_high": hi, "n_splits": int(g["value"].notna().sum()),
                    "fraction_of_ceiling": float("nan"), "floor": float("nan"),
                    "floor_rule": "diagnostic of the extracted manifold (reported, not tested)", "ceiling": float("nan"),
                    "saturated": False})
    return pd.DataFrame(out)


def _tested_splits(scores: pd.DataFrame):
    """(endpoint, metric, split x method table) for every tested metric; diagnostics (the library-size control)
    are reported, not tested."""
    tested = sum(METRICS.values(), ())
    for (ep, metric), sub in scores.groupby(["endpoint", "metric"], sort=False):
        if metric in tested:
            yield ep, metric, sub.pivot_table(index="split", columns="method", values="value", dropna=False)


def _compare(scores: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    rows = []
    if reference not in set(scores.method):
        return pd.DataFrame(columns=["endpoint", "metric", "method", "p", "q"])
    for ep, metric, wide in _tested_splits(scores):
        if reference not in wide:
            continue
        for other in wide.columns:
            if other == reference:
                continue
            r = paired_wilcoxon(wide[reference].to_numpy(), wide[other].to_numpy())
            rows.append({"endpoint": ep, "metric": metric, "reference": reference, "method": other, **r})
    df = pd.DataFrame(rows)
    if len(df):
        df["q"] = bh_qvalues(df["p"].to_numpy())
        df["verdict"] = [("win" if d > 0 else "loss") if (np.isfinite(q) and q <= 0.05) else "tie"
                         for d, q in zip(df["mean_diff"], df["q"])]
    return df


def ablations(scores: pd.DataFrame) -> pd.DataFrame:
    """Per endpoint-metric, the two control questions of :data:`ABLATIONS`: what the model contributes
    (``sclens_extracted`` - ``extracted_random``) and what the adaptor costs (``extracted_identity`` - ``pca10``),
    as paired two-sided Wilcoxon tests across splits with BH over every row of this table."""
    cols = ["question", "endpoint", "metric", "method", "baseline", "n", "mean_method", "mean_baseline", "mean_diff",
            "wins", "ties", "losses", "statistic", "p", "q", "verdict"]
    rows = []
    for ep, metric, wide in _tested_splits(scores):
        for question, a, b in ABLATIONS:
            if a not in wide or b not in wide:
                continue
            r = paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())
            rows.append({"question": question, "endpoint": ep, "metric": metric, "method": a, "baseline": b,
                         "mean_method": float(np.nanmean(wide[a])), "mean_baseline": float(np.nanmean(wide[b])), **r})
    df = pd.DataFrame(rows)
    if not len(df):
        return pd.DataFrame(columns=cols)
    df["q"] = bh_qvalues(df["p"].to_numpy())
    df["verdict"] = [("method higher" if d > 0 else "baseline higher") if (np.isfinite(q) and q <= 0.05) else "no difference"
                     for d, q in zip(df["mean_diff"], df["q"])]
    return df[cols]


def _runtime_ratio(runtime: pd.DataFrame) -> dict:
    tot = runtime.groupby("method")["seconds"].sum()
    out = {k: float(v) for k, v in tot.items()}
    if REFERENCE in tot and "mlp_probe" in tot and tot[REFERENCE] > 0:
        out["mlp_probe_over_extracted"] = float(tot["mlp_probe"] / tot[REFERENCE])
    return out
