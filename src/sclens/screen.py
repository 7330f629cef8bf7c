"""The unit screen: every attention unit x featurisation x fitter, judged by pre-registered gates.

For each hypothesis (a featurisation of the anchors and a fitter) the ruler pipeline and the same pipeline
with the within-branch-shuffled null ruler are both run. A hypothesis passes when, with the true ruler,
every gate of ``resources/gates.yaml`` holds (trustworthiness, random / donor / branch holdout Spearman,
blocked-permutation p, BH q) and the null does not pass the same gates. A gate that cannot be evaluated
(e.g. a donor holdout with one donor) fails - gates are never relaxed. Hypotheses passing every gate are
ranked first; within that group and the rest, by the ruler correlation residualised on donor and tissue.
By default the gates are checked cheapest first and a hypothesis stops at its first failure (the null runs
only where the true ruler passes); the permutation tests of all hypotheses are scored together in batches
(``exact=True``: the earlier, exhaustive path).

Featurisations: the ``attn`` / ``qk`` / ``ov`` operator of each unit, the ``drift`` of each kind, and the
raw panel (``x`` itself) as a control. Work is cached per (featurisation, unit) so an interrupted screen
resumes, and runs in parallel over units with joblib.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from scipy.stats import false_discovery_control

from . import __version__
from .anchors import Anchors
from .errors import DATA_ERRORS, InputError
from .manifold import (FITTERS, PermutationDesign, degenerate_reason, evaluate, evaluate_staged, fit_manifold,
                       latent_distances, learned_statistic, random_holdout_mask, spearman_pairs, trustworthiness,
                       twonn_dimension)
from .operators import OperatorBank
from .utils import array_sha256, package_versions, restores_torch_threads, write_json


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

    nan = float("nan")
    out = {f"{prefix}gate_trustworthiness": ge(m.get("trustworthiness", nan), gates["trustworthiness_min"])}
    for h in gates.get("holdouts", ["random", "donor", "branch"]):
        out[f"{prefix}gate_holdout_{h}"] = ge(m.get(f"holdout_{h}", nan), gates["holdout_spearman_min"])
    p = m.get("perm_p", nan)
    out[f"{prefix}gate_permutation"] = bool(np.isfinite(p) and p <= gates["permutation_p_max"])
    return out


@dataclass
class ScreenReport:
    table: pd.DataFrame
    gates: dict
    gates_sha256: str
    config: dict
    info: dict = field(default_factory=dict)
    controls: pd.DataFrame | None = None  # the random-weights copies' learned-gate statistics, one row per hypothesis
    figures: dict = field(default_factory=dict)  # figure name -> file name in the saved folder

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
        if self.controls is not None:
            self.controls.to_csv(out / "screen_controls.csv", index=False)
        figures = {}
        for kind in sorted(set(self.table["featurisation"]) & {"attn", "qk", "ov"}):
            figures[f"heatmap_{kind}"] = plot_unit_heatmap(self.table, kind, out / f"screen_heatmap_{kind}.png").name
        if anchors is not None and banks is not None and len(self.table) and not row_failed(self.top):
            figures["top_unit_3d"] = plot_top_3d(self, anchors, banks, out / "screen_top_unit_3d.png").name
        report = {"gates": self.gates, "gates_sha256": self.gates_sha256, "config": self.config, "info": self.info,
                  "figures": figures, "n_hypotheses": len(self.table), "n_passing": int(self.table["passes_all"].sum()),
                  "n_passing_published": int(self.table["passes_published"].sum()) if "passes_published" in self.table else None,
                  "top": _jsonable(self.table.head(20).to_dict(orient="records"))}
        write_json(out / "screen_report.json", report)
        self.figures = figures
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "ScreenReport":
        """Reload a saved screen (``screen_table.csv``, ``screen_report.json``, ``screen_controls.csv`` if present)."""
        folder = Path(folder)
        table_file = folder / "screen_table.csv" if folder.is_dir() else folder
        if not table_file.is_file():
            raise InputError(f"{folder} is not a screen folder: screen_table.csv is missing (run `sclens screen`)")
        folder = table_file.parent
        table = pd.read_csv(table_file)
        for c in ("failure", "skipped", "stopped_at", "null_stopped_at"):
            if c in table:
                table[c] = table[c].fillna("").astype(str)
        for c in table.columns:  # gates not evaluated (or skipped) are NA: nullable booleans, as when screened
            if (c.startswith(("gate_", "passes_", "null_gate_", "null_passes"))
                    and (table[c].dtype == object or table[c].isna().all())):
                table[c] = table[c].map({True: True, False: False, "True": True, "False": False}).astype("boolean")
        rep_file = folder / "screen_report.json"
        rep = json.loads(rep_file.read_text()) if rep_file.is_file() else {}
        ctl = folder / "screen_controls.csv"
        return cls(table, rep.get("gates", {}), rep.get("gates_sha256", ""), rep.get("config", {}), rep.get("info", {}),
                   pd.read_csv(ctl) if ctl.is_file() else None, rep.get("figures", {}))


def row_failed(row) -> bool:
    """True when a screen row could not be evaluated (its ``failure`` says why)."""
    f = row.get("failure", "")
    return isinstance(f, str) and f != ""


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


def _min_distinct(n_anchors: int) -> int:
    return min(n_anchors, 6)


def _cached(cache_file: Path | None, key: str):
    if cache_file and cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached["rows"]
    return None


@restores_torch_threads
def _rows(cache_file: Path | None, key: str, F_args: tuple, fitters, base: dict, fit_one,
          write_cache: bool = True) -> list[dict]:
    """One featurisation x every fitter: the resume cache, the degeneracy check and the failure record around
    ``fit_one(F, fitter) -> metrics`` (``write_cache=False``: the caller writes it, once the rows are complete)."""
    import torch

    torch.set_num_threads(1)
    if (rows := _cached(cache_file, key)) is not None:
        return rows
    F = _features(*F_args)
    reason = degenerate_reason(F, _min_distinct(len(F)))
    rows, fit_cache = [], {}  # fits of these features share kNN graphs and LET bases
    for fitter in fitters:
        t0 = time.perf_counter()
        row = {**base, "fitter": fitter, "failure": ""}
        if reason:
            row["failure"] = f"degenerate featurisation: {reason}"
        else:
            try:
                row.update(fit_one(F, fitter, fit_cache=fit_cache))
            except DATA_ERRORS as exc:  # what the degeneracy check lets through
                row["failure"] = f"{fitter} failed: {type(exc).__name__}: {exc}"
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    if cache_file and write_cache:
        _write_cache(cache_file, key, rows)
    return rows


def _write_cache(cache_file: Path, key: str, rows: list[dict]) -> None:
    cache_file.write_text(json.dumps({"key": key, "rows": rows}, default=float))


def _evaluate_both(F, fitter, *, anchors, ruler, null_ruler, null_stage_ruler, gates, d, k, seed, let_epochs,
                   fit_cache=None) -> dict:
    """The --exact path (:func:`sclens.manifold.evaluate`: every gate of both rulers; ``fit_cache`` unused)."""
    res, _ = evaluate(F, anchors, fitter, rulers={"ruler": (ruler, anchors.dag.ruler_matrix),
                                                  "null": (null_ruler, null_stage_ruler)},
                      d=d, k=k, n_perm=gates["n_permutations"], seed=seed, let_epochs=let_epochs, exact=True)
    pos, neg = res["ruler"], res["null"]
    out = {"d": pos.pop("latent_dim"), **pos}
    out.update({f"null_{k2}": v for k2, v in neg.items() if k2 != "latent_dim"})
    return out


def _evaluate_staged_row(F, fitter, *, anchors, ruler, null_ruler, gates, d, k, seed, let_epochs,
                         fit_cache=None) -> dict:
    """The default path: gates cheapest first with early exit; the permutation tests go back to the caller."""
    res, skipped, stopped, perm = evaluate_staged(
        F, anchors, fitter, rulers={"ruler": ruler, "null": null_ruler}, trust_min=gates["trustworthiness_min"],
        holdout_min=gates["holdout_spearman_min"], holdouts=gates.get("holdouts", ["random", "donor", "branch"]),
        d=d, k=k, seed=seed, let_epochs=let_epochs, fit_cache=fit_cache)
    pos, neg = res["ruler"], res["null"]
    out = {"d": pos.pop("latent_dim"), **pos}
    out.update({f"null_{k2}": v for k2, v in neg.items() if k2 != "latent_dim"})
    out["stopped_at"] = stopped["ruler"]
    out["null_stopped_at"] = "not evaluated" if skipped["null"] == ["*"] else stopped["null"]
    out["skipped"] = ";".join(skipped["ruler"] + [f"null_{m}" for m in skipped["null"]])
    out["_perm"] = {("" if name == "ruler" else "null_"): (design, name, a) for name, (design, a) in perm.items()}
    return out


def _control_value(F, fitter, *, anchors, metrics, ruler, d, k, seed, let_epochs, let_engine="autograd",
                   fit_cache=None) -> dict:
    return {"value": learned_statistic(F, anchors, fitter, metrics[fitter], ruler=ruler, d=d, k=k, seed=seed,
                                       let_epochs=let_epochs, let_engine=let_engine, fit_cache=fit_cache)}


def _cache_file(cache_dir, feat: str, layer: int, head: int, prefix: str = "") -> Path | None:
    return Path(cache_dir) / f"{prefix}{feat.replace(':', '-')}_{layer}_{head}.json" if cache_dir else None


class _PermutationQueue:
    """The default path's permutation tests, queued per design (anchors x ruler) and scored many at once
    (:class:`sclens.manifold.PermutationDesign`) once the queued rank vectors reach ``max_bytes``."""

    def __init__(self, anchors: Anchors, stage_rulers: dict, n_perm: int, seed: int, max_bytes: float = 384e6):
        self.anchors, self.stage_rulers, self.n_perm, self.seed, self.max_bytes = (anchors, stage_rulers, n_perm,
                                                                                   seed, max_bytes)
        self.designs: dict = {}
        self.items: dict = {}
        self.nbytes, self.seconds, self.n_tests = 0, 0.0, 0

    def _design(self, key) -> PermutationDesign:
        if key not in self.designs:
            subset, name = key
            sel = (np.ones(len(self.anchors), bool) if subset == "all"
                   else random_holdout_mask(len(self.anchors), self.seed))
            self.designs[key] = PermutationDesign(self.anchors.stage_index[sel], self.stage_rulers[name],
                                                  self.anchors.obs["donor"].to_numpy()[sel], n_perm=self.n_perm,
                                                  seed=self.seed)
        return self.designs[key]

    def add(self, key, a: np.ndarray, row: dict, prefix: str) -> None:
        self.items.setdefault(key, []).append((a, row, prefix))
        self.nbytes += a.nbytes
        if self.nbytes > self.max_bytes:
            self.flush()

    def flush(self) -> None:
        t0 = time.perf_counter()
        for key, items in self.items.items():
            design = self._design(key)
            for (_, row, prefix), (p, n) in zip(items, design.p_values(np.stack([it[0] for it in items]))):
                row.update({f"{prefix}perm_p": p, f"{prefix}perm_n": n, f"{prefix}perm_blocks": design.n_blocks})
            self.n_tests += len(items)
        self.items, self.nbytes = {}, 0
        self.seconds += time.perf_counter() - t0


def _run_job(job, anchors, bank, fitters, ruler, null_ruler, null_stage_ruler, gates, d, k, seed, let_epochs, cache_dir,
             key, exact=False):
    feat, layer, head = job
    cache_file = _cache_file(cache_dir, feat, layer, head)
    if exact:
        fit_one = partial(_evaluate_both, anchors=anchors, ruler=ruler, null_ruler=null_ruler,
                          null_stage_ruler=null_stage_ruler, gates=gates, d=d, k=k, seed=seed, let_epochs=let_epochs)
    else:
        fit_one = partial(_evaluate_staged_row, anchors=anchors, ruler=ruler, null_ruler=null_ruler, gates=gates,
                          d=d, k=k, seed=seed, let_epochs=let_epochs)
    base = {"featurisation": feat, "layer": layer, "head": head}
    # the default path's rows wait for their permutation tests (scored by the caller, many at once)
    rows = _rows(cache_file, key, (anchors, feat, bank, layer, head), fitters, base, fit_one, write_cache=exact)
    # keep the table's column order: identity, fitter, d, metrics
    return [{"featurisation": r["featurisation"], "layer": r["layer"], "head": r["head"], "fitter": r["fitter"],
             "d": r.get("d", float("nan")), **r} for r in rows]


def _run_control_job(job, anchors, bank, fitters, metrics, ruler, d, k, seed, let_epochs, cache_dir, key,
                     let_engine="autograd"):
    """The learned gate's statistic of one unit of one random-weights copy, for every fitter (reduced design:
    only the statistic the gate compares, with the same fits and seeds as the model's own hypotheses)."""
    feat, layer, head, copy = job
    cache_file = _cache_file(cache_dir, feat, layer, head, prefix=f"control{copy}_")
    fit_one = partial(_control_value, anchors=anchors, metrics=metrics, ruler=ruler, d=d, k=k, seed=seed,
                      let_epochs=let_epochs, let_engine=let_engine)
    base = {"copy": copy, "featurisation": feat, "layer": layer, "head": head}
    rows = _rows(cache_file, key, (anchors, feat, bank, layer, head), fitters, base, fit_one)
    return [{**r, "metric": metrics[r["fitter"]], "value": r.get("value", float("nan"))} for r in rows]


def _wide_jobs_first(job) -> bool:
    return not (job[0] == "raw" or job[0].startswith("drift:"))


def _feature_jobs(banks: dict, units, include_drift: bool) -> tuple[list[tuple[str, int, int]], list[str]]:
    jobs, skipped = [], []
    for kind, bank in banks.items():
        for (l, h) in (units if units is not None else bank.units):
            jobs.append((kind, l, h))
        if include_drift and bank.n_layers >= 3:
            jobs.append((f"drift:{kind}", -1, -1))
        elif include_drift:
            skipped.append(f"drift:{kind} (needs >= 3 layers, model has {bank.n_layers})")
    return jobs, skipped


METRICS = ("trustworthiness", "ruler_spearman", "ruler_spearman_resid", "geodesic_spearman", "holdout_random",
           "holdout_donor", "holdout_branch", "perm_p", "perm_n", "perm_blocks")  # per ruler; the null's: "null_" + each

_GATE_OF = {"trustworthiness": "gate_trustworthiness", "holdout_random": "gate_holdout_random",
            "holdout_donor": "gate_holdout_donor", "holdout_branch": "gate_holdout_branch", "perm_p": "gate_permutation"}


def _mark_skipped(table: pd.DataFrame) -> pd.DataFrame:
    """Gates the default path did not evaluate (an earlier gate of the same ruler failed) become NA, not False."""
    for col, fill in (("skipped", ""), ("stopped_at", ""), ("null_stopped_at", "")):
        table[col] = table[col].fillna(fill).astype(str) if col in table else fill
    gate_cols = [c for c in table.columns if c.startswith(("gate_", "null_gate_"))]
    table[gate_cols] = table[gate_cols].astype("boolean")
    null_gates = [c for c in gate_cols if c.startswith("null_gate_")]
    for i, skipped in table["skipped"].items():
        for m in filter(None, skipped.split(";")):
            if m == "null_*":
                table.loc[i, null_gates] = pd.NA
            elif m.startswith("null_") and m[5:] in _GATE_OF:
                table.loc[i, "null_" + _GATE_OF[m[5:]]] = pd.NA
            elif m in _GATE_OF:
                table.loc[i, _GATE_OF[m]] = pd.NA
    return table


def learned_settings(gates: dict, fitters: Sequence[str]) -> dict:
    """The ``learned`` block of the gate file, checked (metric per fitter, raw rule, random quantile)."""
    cfg = gates.get("learned")
    if not isinstance(cfg, dict):
        raise InputError("the gate file has no 'learned' block (metric per fitter, must_beat_raw, random_quantile)")
    metrics = cfg.get("metric", {})
    missing = [f for f in fitters if f not in metrics]
    if missing:
        raise InputError(f"the gate file's learned.metric names no statistic for fitter(s) {missing}")
    q = float(cfg.get("random_quantile", 0.95))
    if not 0 < q < 1:
        raise InputError(f"learned.random_quantile must lie in (0, 1), got {q}")
    return {"metric": {f: metrics[f] for f in fitters}, "must_beat_raw": bool(cfg.get("must_beat_raw", True)),
            "random_quantile": q, "min_random_copies": int(cfg.get("min_random_copies", 1))}


def apply_learned_gate(table: pd.DataFrame, controls: pd.DataFrame | None, settings: dict, n_copies: int) -> pd.DataFrame:
    """Add the learned-gate columns: the compared statistic, the raw panel's value and the random copies'
    quantile for the row's kind and fitter, both margins and ``gate_learned`` (NA when not evaluated)."""
    t = table.copy()
    t["learned_metric"] = t["fitter"].map(settings["metric"])
    t["learned_value"] = [float(r.get(m, np.nan)) if isinstance(m, str) else np.nan
                          for r, m in zip(t.to_dict("records"), t["learned_metric"])]
    is_raw = t["featurisation"] == "raw"
    raw_val = t[is_raw].set_index("fitter")["learned_value"]
    t["raw_value"] = t["fitter"].map(raw_val).astype(float)
    t["margin_over_raw"] = t["learned_value"] - t["raw_value"]
    if controls is not None and len(controls) and n_copies >= settings["min_random_copies"]:
        # a unit is compared with every unit of the same kind in the copies; a drift with the copies' drifts
        c = controls[np.isfinite(controls["value"].astype(float))]
        qs = c.groupby(["featurisation", "fitter"])["value"].quantile(settings["random_quantile"])
        t["random_quantile_value"] = [float(qs.get((ft, f), np.nan)) for ft, f in zip(t["featurisation"], t["fitter"])]
        t["margin_over_random"] = t["learned_value"] - t["random_quantile_value"]
        beats_raw = (t["margin_over_raw"] > 0) if settings["must_beat_raw"] else True
        t["gate_learned"] = (~is_raw & beats_raw & (t["margin_over_random"] > 0)).astype(bool)
    else:
        t["random_quantile_value"] = np.nan
        t["margin_over_random"] = np.nan
        t["gate_learned"] = pd.array([pd.NA] * len(t), dtype="boolean")
    return t


def screen(
    banks: OperatorBank | dict[str, OperatorBank] | None, anchors: Anchors, *, fitters: Iterable[str] = FITTERS,
    units: Iterable[tuple[int, int]] | None = None, include_drift: bool = True, include_raw: bool = True, d: int = 10,
    k: int = 15, gates_path: str | Path | None = None, seed: int = 0, null_seed: int = 0, n_jobs: int = 1,
    cache_dir: str | Path | None = None, let_epochs: int = 150, progress: bool = True,
    controls: Sequence[OperatorBank | dict[str, OperatorBank]] | None = None, exact: bool = False,
) -> ScreenReport:
    """Run the hypothesis search and return the ranked, gated table (see the module docstring).

    Parameters
    ----------
    banks
        The model's operator banks, ``{kind: OperatorBank}`` (or one bank).
    anchors
        Anchors built on the same gene panel (:func:`sclens.anchors.build_anchors`).
    fitters, units, include_drift, include_raw
        The hypothesis space: fitters, units (default: all), the drift of each kind, the raw panel.
    controls
        Operator banks of K random-weights copies of the model (:func:`sclens.operators.export_random_controls`),
        one ``{kind: OperatorBank}`` per copy. They feed the ``learned`` gate; without them (or with fewer
        copies than the gate file's ``min_random_copies``) ``gate_learned`` is NA and ``passes_all`` rests
        on the published gates alone, which the report states.
    gates_path, seed, null_seed, d, k, let_epochs
        Gate file (default: the shipped pre-registered gates) and the fitters' settings.
    n_jobs, cache_dir, progress
        joblib workers over featurisations; a folder that makes an interrupted screen resume; a progress bar.
    exact
        Use the earlier evaluation path (every gate of both rulers for every hypothesis, one pair-level
        permutation test at a time, autograd LET) to check the default staged engine: gates cheapest first with
        early exit (skipped gates NA, ``stopped_at`` names the failing one; the null only for hypotheses whose
        true ruler passes), permutation tests scored in batches with the same relabellings, shared kNN graphs,
        LET's fused gradient (docs/screen.md, "Speed").

    Returns
    -------
    :class:`ScreenReport` with one row per hypothesis; a featurisation that cannot be fitted (constant, all-zero,
    NaN / inf, too few distinct anchors) or a fitter that fails gets its reason in ``failure`` and fails every gate.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    fitters = list(fitters)
    bad = [f for f in fitters if f not in FITTERS]
    if bad:
        raise InputError(f"unknown fitter(s) {bad}; choose from {FITTERS}")
    if isinstance(banks, OperatorBank):
        banks = {banks.kind: banks}
    banks = banks or {}
    controls = [({c.kind: c} if isinstance(c, OperatorBank) else dict(c)) for c in (controls or [])]
    for b in list(banks.values()) + [b for c in controls for b in c.values()]:
        if tuple(b.panel.genes) != tuple(anchors.panel.genes):
            raise InputError("the operator bank and the anchors were built on different gene panels")
    for i, c in enumerate(controls):
        if set(c) != set(banks):
            raise InputError(f"random-weights control #{i} has operator kinds {sorted(c)}, the model {sorted(banks)}")
    if len(anchors) < 10:
        raise InputError(f"a screen needs at least 10 anchors, got {len(anchors)}")
    if anchors.obs["stage"].nunique() < 3:
        raise InputError("a screen needs anchors from at least 3 stages (the ruler would be nearly constant)")
    gates, gates_sha = load_gates(gates_path)
    learned = learned_settings(gates, fitters)
    if controls and not include_raw:
        include_raw = True  # the learned gate compares every hypothesis with the raw panel
    ruler = anchors.ruler
    null_stage_ruler, perm = anchors.dag.null_ruler_matrix(null_seed)
    s = anchors.stage_index
    null_ruler = null_stage_ruler[np.ix_(s, s)]
    jobs, skipped = _feature_jobs(banks, units, include_drift)
    if include_raw:
        jobs.append(("raw", -1, -1))
    control_jobs = [(feat, l, h, ci) for ci, c in enumerate(controls) for (feat, l, h) in _feature_jobs(c, units, include_drift)[0]]
    # the widest featurisations (a drift: two operators' features side by side; the raw panel) are among the
    # slowest jobs: submitted first, none of them is the last one running while the other workers idle
    jobs.sort(key=_wide_jobs_first)
    control_jobs.sort(key=_wide_jobs_first)
    config = {"fitters": fitters, "d": d, "k": k, "seed": seed, "null_seed": null_seed, "let_epochs": let_epochs,
              "exact": bool(exact),
              "n_jobs": n_jobs, "anchors_sha256": array_sha256(anchors.X, anchors.obs["stage"].to_numpy()),
              "banks": {kind: {"shape": list(b.operators.shape), "model_sha256": b.manifest.get("model_sha256"),
                               "reference_set_sha256": b.manifest.get("reference_set_sha256")} for kind, b in banks.items()},
              "random_controls": [{"model_sha256": next(iter(c.values())).manifest.get("model_sha256"),
                                   "random_control": next(iter(c.values())).manifest.get("random_control")}
                                  for c in controls]}
    key = hashlib.sha256(json.dumps([config, gates_sha], sort_keys=True, default=str).encode()).hexdigest()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def bank_for(feat, copy=-1):
        if feat == "raw":
            return None
        return (banks if copy < 0 else controls[copy])[feat.split(":")[-1]]

    cdir = str(cache_dir) if cache_dir else None
    args = (fitters, ruler, null_ruler, null_stage_ruler, gates, d, k, seed, let_epochs, cdir, key)
    cargs = (fitters, learned["metric"], ruler, d, k, seed, let_epochs, cdir, key)
    calls = ([delayed(_run_job)(j, anchors, bank_for(j[0]), *args, exact=exact) for j in jobs]
             + [delayed(_run_control_job)(j, anchors, bank_for(j[0], j[3]), *cargs,
                                          let_engine="autograd" if exact else "fused") for j in control_jobs])
    bar = dict(total=len(calls), desc="screening" + (f" (+ {len(controls)} random-weights copies)" if controls else ""),
               unit="featurisation", disable=not progress)
    stream = ((fn(*a, **kw) for fn, a, kw in calls) if n_jobs == 1
              else Parallel(n_jobs=n_jobs, return_as="generator")(calls))
    queue = _PermutationQueue(anchors, {"ruler": anchors.dag.ruler_matrix, "null": null_stage_ruler},
                              gates["n_permutations"], seed)
    results, unwritten = [], []
    for i, rows in enumerate(tqdm(stream, **bar)):
        results.append(rows)
        if i < len(jobs) and not exact:  # queue the permutation tests; a job is cached once they are scored
            for r in rows:
                for prefix, (design, name, a) in r.pop("_perm", {}).items():
                    queue.add((design, name), a, r, prefix)
            if cdir:
                unwritten.append((_cache_file(cdir, *jobs[i]), rows))
            if not queue.items:
                for file, done in unwritten:
                    _write_cache(file, key, done)
                unwritten = []
    queue.flush()
    for file, done in unwritten:
        _write_cache(file, key, done)
    table = pd.DataFrame([r for rows in results[: len(jobs)] for r in rows])
    control_table = (pd.DataFrame([r for rows in results[len(jobs):] for r in rows]) if controls else None)
    # the same columns whatever the staged engine skipped: a metric no hypothesis reached is NaN, not absent
    for col in [p + m for p in ("", "null_") for m in METRICS]:
        if col not in table:
            table[col] = np.nan
    for prefix in ("", "null_"):
        checks = table.apply(lambda r: gate_checks({k2[len(prefix):]: r[k2] for k2 in r.index if k2.startswith(prefix)},
                                                   gates, prefix), axis=1, result_type="expand")
        table = pd.concat([table, checks], axis=1)
    table = _mark_skipped(table)
    pvals = table["perm_p"].astype(float).fillna(1.0).clip(0, 1).to_numpy()
    table["q"] = false_discovery_control(pvals, method="bh")
    gate_cols = [c for c in table.columns if c.startswith("gate_")]
    null_cols = [c for c in table.columns if c.startswith("null_gate_")]
    table["gate_bh"] = table["q"] <= gates.get("bh_alpha", 0.05)
    # a gate skipped (NA) follows a failed one of the same ruler, so a row with one never passes
    table["passes_gates"] = table[gate_cols + ["gate_bh"]].astype("boolean").fillna(False).all(axis=1)
    null_passes = table[null_cols].astype("boolean").fillna(False).all(axis=1).astype("boolean")
    null_passes[table["null_stopped_at"] == "not evaluated"] = pd.NA
    table["null_passes"] = null_passes
    table["passes_published"] = table["passes_gates"] & (~null_passes.fillna(False).astype(bool)
                                                         if gates["null_must_fail"] else True)
    table = apply_learned_gate(table, control_table, learned, len(controls))
    evaluated = bool(table["gate_learned"].notna().all()) and len(table) > 0
    table["passes_all"] = table["passes_published"] & (table["gate_learned"].fillna(False).astype(bool) if evaluated
                                                       else True)
    # hypotheses that pass every gate (null failing) come first; within each group, the residualised ruler
    # correlation orders them (LET's is in-sample, so it must never outrank a gated result on its own)
    table = table.sort_values(["passes_all", "ruler_spearman_resid"], ascending=[False, False], na_position="last",
                              kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    failures = table[table["failure"].astype(str) != ""]
    info = {"n_anchors": len(anchors), "anchor_info": anchors.info, "n_jobs_run": len(jobs), "skipped": skipped,
            "engine": ("exact: every gate of every hypothesis, pair-level permutation statistic" if exact else
                       "staged: gates cheapest first with early exit, permutation tests scored in batches"),
            "stopped_at": {str(k2): int(v) for k2, v in table["stopped_at"].value_counts().items()},
            "permutation_tests": {"n": queue.n_tests, "seconds": queue.seconds, "designs": len(queue.designs)},
            "null_permutation": perm, "wall_seconds": time.perf_counter() - t0, "versions": package_versions(),
            "sclens_version": __version__, "synthetic": anchors.info.get("synthetic", False),
            "n_failed": int(len(failures)),
            "failures": _jsonable(failures[["featurisation", "layer", "head", "fitter", "failure"]].head(50)
                                  .to_dict(orient="records")),
            "learned_gate": {**learned, "evaluated": evaluated, "n_random_copies": len(controls),
                             "n_control_rows": 0 if control_table is None else int(len(control_table)),
                             "n_control_failed": 0 if control_table is None else int((control_table["failure"] != "").sum()),
                             "n_passing_learned": int(table["gate_learned"].fillna(False).astype(bool).sum()),
                             "n_passing_published": int(table["passes_published"].sum()),
                             "note": ("" if evaluated else "not evaluated: no random-weights copies were run "
                                      "(--random-control 0); passes_all rests on the published gates alone")}}
    report = ScreenReport(table, gates, gates_sha, config, info, controls=control_table)
    usable = table[table["failure"].astype(str) == ""]
    if len(usable) and usable.index[0] == 0:
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
    curve, cache = [], {}  # one row-space basis for every d
    engine = "autograd" if report.config.get("exact") else "fused"
    for dd in dims:
        if dd >= len(anchors) - 2:
            break
        m = fit_manifold(F, "let", d=dd, ruler=anchors.ruler, seed=report.config["seed"],
                         let_epochs=report.config["let_epochs"], let_engine=engine, fit_cache=cache)
        curve.append({"d": dd, "ruler_spearman": spearman_pairs(latent_distances(m, m.Z), anchors.ruler),
                      "trustworthiness": trustworthiness((F - mu) / sd, m.Z)})
    return {"twonn": twonn_dimension((F - mu) / sd), "let_curve": curve}


def plot_unit_heatmap(table: pd.DataFrame, kind: str, path: Path) -> Path:
    """Layers x heads: the best residualised ruler Spearman of each unit (* = passes every gate) and, when the
    learned gate was evaluated, the best margin over the random-weights copies' quantile (raw margin in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[table["featurisation"] == kind]
    L, H = int(t["layer"].max()) + 1, int(t["head"].max()) + 1
    M, R = np.full((L, H), np.nan), np.full((L, H), np.nan)
    P = np.zeros((L, H), bool)
    has_margin = "margin_over_random" in t and t["margin_over_random"].notna().any()
    for (l, h), g in t.groupby(["layer", "head"]):
        M[l, h] = g["ruler_spearman_resid"].max()
        P[l, h] = g["passes_all"].any()
        if has_margin:
            R[l, h] = g["margin_over_random"].max()
    panels = [(M, "magma", "best residualised ruler Spearman")]
    if has_margin:
        panels.append((R, "RdBu_r", "best margin over random-weights q95"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.6 + 0.5 * H), 1.2 + 0.4 * L), squeeze=False)
    for ax, (V, cmap, title) in zip(axes[0], panels):
        kw = {}
        if cmap == "RdBu_r" and np.isfinite(V).any():
            lim = float(np.nanmax(np.abs(V))) or 1.0
            kw = dict(vmin=-lim, vmax=lim)
        im = ax.imshow(V, cmap=cmap, aspect="auto", **kw)
        for l, h in zip(*np.nonzero(P)):
            ax.text(h, l, "*", ha="center", va="center", color="cyan", fontsize=14)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_title(f"{kind}: {title}", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.suptitle("* = passes every gate" + (" incl. learned" if has_margin else "") + ", null fails", fontsize=7)
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
