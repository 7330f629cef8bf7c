"""The unit screen: every attention unit x featurisation x fitter, judged by pre-registered gates.

For each hypothesis (a featurisation of the anchors and a fitter) the ruler pipeline and the same pipeline
with the within-branch-shuffled null ruler are both run. A hypothesis passes when, with the true ruler,
every gate of ``resources/gates.yaml`` holds (trustworthiness, random / donor / branch holdout Spearman,
blocked-permutation p, BH q) and the null does not pass the same gates. A gate that cannot be evaluated
(e.g. a donor holdout with one donor) fails - gates are never relaxed. Hypotheses passing every gate are
ranked first; within that group and the rest, by the ruler correlation residualised on donor and tissue.

Featurisations: the ``attn`` / ``qk`` / ``ov`` operator of each unit, the ``drift`` of each kind, and the
raw panel (``x`` itself) as a control. Work is cached per (featurisation, unit) so an interrupted screen
resumes, and runs in parallel over units with joblib.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import yaml
from scipy.stats import false_discovery_control

from . import __version__
from .anchors import Anchors
from .errors import InputError
from .manifold import FITTERS, evaluate, fit_manifold, latent_distances, spearman_pairs, trustworthiness, twonn_dimension
from .operators import OperatorBank
from .utils import array_sha256, package_versions, write_json


def load_gates(path: str | Path | None = None) -> tuple[dict, str]:
    """The gate thresholds and the sha256 of the file they came from."""
    text = Path(path).read_text() if path else files("sclens").joinpath("resources/gates.yaml").read_text()
    gates = yaml.safe_load(text)
    need = {"trustworthiness_min", "holdout_spearman_min", "permutation_p_max", "n_permutations", "null_must_fail"}
    missing = need - set(gates)
    if missing:
        raise InputError(f"gate file lacks {sorted(missing)}")
    return gates, hashlib.sha256(text.encode()).hexdigest()


def gate_checks(m: dict, gates: dict, prefix: str = "") -> dict[str, bool]:
    """Each gate as a boolean; NaN (not evaluable) fails."""
    def ge(v, t):
        return bool(np.isfinite(v) and v >= t)

    out = {f"{prefix}gate_trustworthiness": ge(m["trustworthiness"], gates["trustworthiness_min"])}
    for h in gates.get("holdouts", ["random", "donor", "branch"]):
        out[f"{prefix}gate_holdout_{h}"] = ge(m[f"holdout_{h}"], gates["holdout_spearman_min"])
    out[f"{prefix}gate_permutation"] = bool(np.isfinite(m["perm_p"]) and m["perm_p"] <= gates["permutation_p_max"])
    return out


@dataclass
class ScreenReport:
    table: pd.DataFrame
    gates: dict
    gates_sha256: str
    config: dict
    info: dict = field(default_factory=dict)

    @property
    def top(self) -> pd.Series:
        return self.table.iloc[0]

    @property
    def passing(self) -> pd.DataFrame:
        return self.table[self.table["passes_all"]]

    def save(self, out_dir: str | Path, anchors: Anchors | None = None, banks: dict | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "screen_table.csv", index=False)
        figures = {}
        for kind in sorted(set(self.table["featurisation"]) & {"attn", "qk", "ov"}):
            figures[f"heatmap_{kind}"] = plot_unit_heatmap(self.table, kind, out / f"screen_heatmap_{kind}.png").name
        if anchors is not None and banks is not None:
            figures["top_unit_3d"] = plot_top_3d(self, anchors, banks, out / "screen_top_unit_3d.png").name
        report = {"gates": self.gates, "gates_sha256": self.gates_sha256, "config": self.config, "info": self.info,
                  "figures": figures, "n_hypotheses": len(self.table), "n_passing": int(self.table["passes_all"].sum()),
                  "top": _jsonable(self.table.head(20).to_dict(orient="records"))}
        write_json(out / "screen_report.json", report)
        return out


def _jsonable(rows):
    out = []
    for r in rows:
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else (v.item() if hasattr(v, "item") else v))
                    for k, v in r.items()})
    return out


def _features(anchors: Anchors, feat: str, bank: OperatorBank | None, layer: int, head: int) -> np.ndarray:
    X = anchors.X
    if feat == "raw":
        return X.astype(np.float64)
    if feat.startswith("drift:"):
        d1, d2 = bank.drift_operators()
        return np.concatenate([X @ d1, X @ d2], axis=1).astype(np.float64)
    return (X @ bank.unit(layer, head)).astype(np.float64)


def _run_job(job, anchors, bank, fitters, ruler, null_ruler, null_stage_ruler, gates, d, k, seed, let_epochs, cache_dir, key):
    import torch

    torch.set_num_threads(1)
    feat, layer, head = job
    cache_file = Path(cache_dir) / f"{feat.replace(':', '-')}_{layer}_{head}.json" if cache_dir else None
    if cache_file and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["rows"]
    F = _features(anchors, feat, bank, layer, head)
    rows = []
    for fitter in fitters:
        t0 = time.perf_counter()
        res, _ = evaluate(F, anchors, fitter, rulers={"ruler": (ruler, anchors.dag.ruler_matrix),
                                                      "null": (null_ruler, null_stage_ruler)},
                          d=d, k=k, n_perm=gates["n_permutations"], seed=seed, let_epochs=let_epochs)
        pos, neg = res["ruler"], res["null"]
        row = {"featurisation": feat, "layer": layer, "head": head, "fitter": fitter, "d": pos.pop("latent_dim")}
        row.update(pos)
        row.update({f"null_{k2}": v for k2, v in neg.items() if k2 != "latent_dim"})
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    if cache_file:
        cache_file.write_text(json.dumps({"key": key, "rows": rows}, default=float))
    return rows


def screen(
    banks: OperatorBank | dict[str, OperatorBank] | None, anchors: Anchors, *, fitters: Iterable[str] = FITTERS,
    units: Iterable[tuple[int, int]] | None = None, include_drift: bool = True, include_raw: bool = True, d: int = 10,
    k: int = 15, gates_path: str | Path | None = None, seed: int = 0, null_seed: int = 0, n_jobs: int = 1,
    cache_dir: str | Path | None = None, let_epochs: int = 150, progress: bool = True,
) -> ScreenReport:
    """Run the hypothesis search and return the ranked, gated table (see the module docstring)."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    fitters = list(fitters)
    bad = [f for f in fitters if f not in FITTERS]
    if bad:
        raise InputError(f"unknown fitter(s) {bad}; choose from {FITTERS}")
    if isinstance(banks, OperatorBank):
        banks = {banks.kind: banks}
    banks = banks or {}
    for b in banks.values():
        if tuple(b.panel.genes) != tuple(anchors.panel.genes):
            raise InputError("the operator bank and the anchors were built on different gene panels")
    if len(anchors) < 10:
        raise InputError(f"a screen needs at least 10 anchors, got {len(anchors)}")
    if anchors.obs["stage"].nunique() < 3:
        raise InputError("a screen needs anchors from at least 3 stages (the ruler would be nearly constant)")
    gates, gates_sha = load_gates(gates_path)
    ruler = anchors.ruler
    null_stage_ruler, perm = anchors.dag.null_ruler_matrix(null_seed)
    s = anchors.stage_index
    null_ruler = null_stage_ruler[np.ix_(s, s)]
    jobs, skipped = [], []
    for kind, bank in banks.items():
        for (l, h) in (units if units is not None else bank.units):
            jobs.append((kind, l, h))
        if include_drift and bank.n_layers >= 3:
            jobs.append((f"drift:{kind}", -1, -1))
        elif include_drift:
            skipped.append(f"drift:{kind} (needs >= 3 layers, model has {bank.n_layers})")
    if include_raw:
        jobs.append(("raw", -1, -1))
    config = {"fitters": fitters, "d": d, "k": k, "seed": seed, "null_seed": null_seed, "let_epochs": let_epochs,
              "n_jobs": n_jobs, "anchors_sha256": array_sha256(anchors.X, anchors.obs["stage"].to_numpy()),
              "banks": {kind: {"shape": list(b.operators.shape), "model_sha256": b.manifest.get("model_sha256"),
                               "reference_set_sha256": b.manifest.get("reference_set_sha256")} for kind, b in banks.items()}}
    key = hashlib.sha256(json.dumps([config, gates_sha], sort_keys=True, default=str).encode()).hexdigest()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def bank_for(feat):
        return None if feat == "raw" else banks[feat.split(":")[-1]]

    args = (fitters, ruler, null_ruler, null_stage_ruler, gates, d, k, seed, let_epochs, str(cache_dir) if cache_dir else None, key)
    bar = dict(total=len(jobs), desc="screening", unit="unit", disable=not progress)
    if n_jobs == 1:
        results = [_run_job(j, anchors, bank_for(j[0]), *args) for j in tqdm(jobs, **bar)]
    else:
        gen = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_run_job)(j, anchors, bank_for(j[0]), *args) for j in jobs)
        results = list(tqdm(gen, **bar))
    table = pd.DataFrame([r for rows in results for r in rows])
    for prefix in ("", "null_"):
        checks = table.apply(lambda r: gate_checks({k2[len(prefix):]: r[k2] for k2 in r.index if k2.startswith(prefix)},
                                                   gates, prefix), axis=1, result_type="expand")
        table = pd.concat([table, checks], axis=1)
    pvals = table["perm_p"].fillna(1.0).clip(0, 1).to_numpy()
    table["q"] = false_discovery_control(pvals, method="bh")
    gate_cols = [c for c in table.columns if c.startswith("gate_")]
    null_cols = [c for c in table.columns if c.startswith("null_gate_")]
    table["gate_bh"] = table["q"] <= gates.get("bh_alpha", 0.05)
    table["passes_gates"] = table[gate_cols + ["gate_bh"]].all(axis=1)
    table["null_passes"] = table[null_cols].all(axis=1)
    table["passes_all"] = table["passes_gates"] & (~table["null_passes"] if gates["null_must_fail"] else True)
    # hypotheses that pass every gate (null failing) come first; within each group, the residualised ruler
    # correlation orders them (LET's is in-sample, so it must never outrank a gated result on its own)
    table = table.sort_values(["passes_all", "ruler_spearman_resid"], ascending=[False, False], na_position="last",
                              kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    info = {"n_anchors": len(anchors), "anchor_info": anchors.info, "n_jobs_run": len(jobs), "skipped": skipped,
            "null_permutation": perm, "wall_seconds": time.perf_counter() - t0, "versions": package_versions(),
            "sclens_version": __version__, "synthetic": anchors.info.get("synthetic", False)}
    report = ScreenReport(table, gates, gates_sha, config, info)
    if len(table):
        report.info["top_intrinsic_dimension"] = intrinsic_dimension(report, anchors, banks)
    return report


def _top_features(report: ScreenReport, anchors: Anchors, banks: dict) -> np.ndarray:
    t = report.top
    bank = None if t["featurisation"] == "raw" else banks[t["featurisation"].split(":")[-1]]
    return _features(anchors, t["featurisation"], bank, int(t["layer"]), int(t["head"]))


def intrinsic_dimension(report: ScreenReport, anchors: Anchors, banks: dict, dims=range(2, 13)) -> dict:
    """TwoNN on the top hypothesis' features, and the LET ruler fit / trustworthiness versus latent d."""
    from .manifold import zscore_fit

    F = _top_features(report, anchors, banks)
    mu, sd = zscore_fit(F)
    curve = []
    for dd in dims:
        if dd >= len(anchors) - 2:
            break
        m = fit_manifold(F, "let", d=dd, ruler=anchors.ruler, seed=report.config["seed"], let_epochs=report.config["let_epochs"])
        curve.append({"d": dd, "ruler_spearman": spearman_pairs(latent_distances(m, m.Z), anchors.ruler),
                      "trustworthiness": trustworthiness((F - mu) / sd, m.Z)})
    return {"twonn": twonn_dimension((F - mu) / sd), "let_curve": curve}


def plot_unit_heatmap(table: pd.DataFrame, kind: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[table["featurisation"] == kind]
    L, H = int(t["layer"].max()) + 1, int(t["head"].max()) + 1
    M = np.full((L, H), np.nan)
    P = np.zeros((L, H), bool)
    for (l, h), g in t.groupby(["layer", "head"]):
        M[l, h] = g["ruler_spearman_resid"].max()
        P[l, h] = g["passes_all"].any()
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * H, 1.0 + 0.4 * L))
    im = ax.imshow(M, cmap="magma", aspect="auto")
    for l, h in zip(*np.nonzero(P)):
        ax.text(h, l, "*", ha="center", va="center", color="cyan", fontsize=14)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_title(f"{kind}: best residualised ruler Spearman (* = passes gates, null fails)", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_top_3d(report: ScreenReport, anchors: Anchors, banks: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report.top
    F = _top_features(report, anchors, banks)
    m = fit_manifold(F, t["fitter"], d=max(3, int(t["d"])), ruler=anchors.ruler, seed=report.config["seed"],
                     let_epochs=report.config["let_epochs"])
    Z = m.Z[:, :3]
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    branches = anchors.obs["branch"].to_numpy()
    for i, b in enumerate(sorted(set(branches))):
        sel = branches == b
        ax.scatter(Z[sel, 0], Z[sel, 1], Z[sel, 2], s=8 + 4 * np.log1p(anchors.obs["n_cells"].to_numpy()[sel]),
                   color=plt.get_cmap("tab10")(i), label=b)
    stem = anchors.obs["branch"].to_numpy() == "stem_progenitor"
    ax.scatter(Z[stem, 0], Z[stem, 1], Z[stem, 2], s=60, facecolors="none", edgecolors="k", label="stem / progenitor")
    unit = "" if t["layer"] < 0 else f" L{int(t['layer'])}H{int(t['head'])}"
    ax.set_title(f"top hypothesis: {t['featurisation']}{unit}, {t['fitter']} (anchors)"
                 + (" - SYNTHETIC" if report.info.get("synthetic") else ""), fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
