"""extract() (operator + adaptor + readouts from labelled training cells) and validate_transfer() on new data."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import __version__
from ..data import detect_gene_id_type, harmonize_gene_ids, require_obs_columns
from ..errors import InputError
from ..ontology import StageDAG
from ..utils import array_sha256, package_versions
from .adaptor import ADAPTORS, fit_let_adaptor, fit_ruler_adaptor, stage_balanced_indices, train_cell_adaptor
from .artifact import ExtractedModel
from .selection import Operator
from .panel import panel_rows
from .readouts import PROBES, fit_classifier, fit_pseudotime, probe_labels


def _split_donors(donors: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out cells (whole donors); all False when fewer than 3 donors or frac == 0."""
    uniq = np.unique(donors)
    if frac <= 0 or len(uniq) < 3:
        return np.zeros(len(donors), bool)
    n_hold = int(min(len(uniq) - 2, max(1, round(frac * len(uniq)))))
    held = np.random.default_rng(seed).choice(uniq, size=n_hold, replace=False)
    return np.isin(donors, held)


def extract(
    adata: ad.AnnData, operator: Operator, *, label_key: str, donor_key: str | None = None,
    tissue_key: str | None = None, adaptor: str = "ruler", d: int = 10, dag: StageDAG | None = None,
    holdout_fraction: float = 0.2, seed: int = 0, layer: str | None = None, epochs: int | None = None,
    batch_size: int = 896, max_cells_per_stage: int = 500, loss_weights: dict | None = None,
    readout_max_cells: int = 50_000, eval_max_cells: int = 20_000, min_cells: int = 5, n_perm: int = 2000,
    progress: bool = True, fit_readouts: bool = True,
) -> ExtractedModel:
    """Stages 2 and 3 on labelled cells: train the adaptor and the readouts over a frozen operator.

    Whole donors (``holdout_fraction``, at least one, when there are >= 3 donors) are held out before any
    training; the model is trained on the rest and ``manifest['metrics']['holdout']`` scores it on the held-out
    donors (cell-level probes and pseudotime, plus the anchor-level transfer check of :func:`validate_transfer`).
    With fewer than 3 donors, metrics are in-sample and marked so. The returned model is what was scored.
    ``fit_readouts=False`` stops after the adaptor (no readouts, no scores): for callers that read the latent with
    readouts of their own, like the benchmark's shared readouts.

    Parameters
    ----------
    adata
        Labelled training cells (counts or log1p) holding the operator's panel genes.
    operator
        The frozen operator (:func:`select_operator`).
    label_key, donor_key, tissue_key
        obs columns of cell-type labels (mapped onto the DAG), donors (held out whole) and tissues.
    adaptor, d, epochs
        ``ruler`` (closed form, default), ``cell`` or ``let``; latent size; training epochs of the trained adaptors.
    seed
        Seed of every stochastic step (recorded in the manifest).

    Returns
    -------
    :class:`ExtractedModel`: operator + adaptor + readouts; ``save(path)`` writes ONE ``.safetensors`` file.
    """
    t0 = time.perf_counter()
    if adaptor not in ADAPTORS:
        raise InputError(f"adaptor must be one of {list(ADAPTORS)}, got {adaptor!r}")
    if adaptor == "ruler" and epochs is not None:
        raise InputError(f"the ruler adaptor is fitted in closed form: epochs (got {epochs}) apply to the 'cell' and "
                         "'let' adaptors only")
    if epochs is not None and (epochs < 0 or (adaptor == "let" and epochs < 1)):
        raise InputError(f"epochs must be >= 0 (>= 1 for the LET adaptor; 0 keeps the cell adaptor at its PCA "
                         f"start), got {epochs}")
    dag = dag or StageDAG.default()
    require_obs_columns(adata, [label_key, donor_key, tissue_key])
    mapping = dag.map_labels(adata.obs[label_key].astype(str))
    stages = mapping.stage.to_numpy(dtype=object)
    mapped = pd.notna(stages)
    if mapped.sum() < 20:
        raise InputError(f"only {int(mapped.sum())} cells have labels that map to a stage ({mapping.summary()})")
    donors = adata.obs[donor_key].astype(str).to_numpy() if donor_key else np.full(adata.n_obs, "all", dtype=object)
    held = _split_donors(donors[mapped], holdout_fraction, seed)
    mapped_idx = np.flatnonzero(mapped)
    train_idx, hold_idx = mapped_idx[~held], mapped_idx[held]
    rng = np.random.default_rng(seed)
    # readout cells: a seeded subsample of the training donors; adaptor cells: the same for the ruler adaptor
    # (it subsamples to its own max_cells), stage-balanced for the trained cell adaptor
    ro = np.sort(rng.choice(train_idx, size=min(len(train_idx), readout_max_cells), replace=False))
    bal = ro if adaptor == "ruler" else train_idx[stage_balanced_indices(stages[train_idx], max_cells_per_stage, seed)]
    need = np.union1d(bal, ro)
    x_need = panel_rows(adata, operator.panel, need, layer=layer)
    pos = {c: i for i, c in enumerate(need)}
    x_bal, x_ro = x_need[[pos[c] for c in bal]], x_need[[pos[c] for c in ro]]
    if adaptor == "let":
        from ..anchors import build_anchors

        sub = adata[train_idx]
        anchors = build_anchors(sub, operator.panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                                dag=dag, min_cells=min_cells, seed=seed, layer=layer)
        ad_model = fit_let_adaptor(operator.features(anchors.X), anchors.ruler, d=d, seed=seed,
                                   epochs=150 if epochs is None else epochs)
    else:
        F_bal = operator.features(x_bal)
        sidx = np.array([dag.index[s] for s in stages[bal]])
        if adaptor == "ruler":
            ad_model = fit_ruler_adaptor(F_bal, sidx, dag.ruler_matrix, d=d, seed=seed)
        else:
            ad_model = train_cell_adaptor(F_bal, sidx, dag.ruler_matrix, d=d,
                                          epochs=120 if epochs is None else epochs, batch_size=batch_size,
                                          weights=loss_weights, seed=seed, progress=progress)
    model = ExtractedModel(operator, ad_model, {})
    if not fit_readouts:  # adaptor only: the caller scores the latent with its own readouts (bench, compress)
        readouts, skipped, eval_idx = {}, list(PROBES), np.empty(0, int)
        metrics = {"skipped": "fit_readouts=False: adaptor only, no readouts of its own, no scores"}
    else:
        Z_ro = model.latent(x_ro)
        st_ro = stages[ro].astype(str)
        readouts = {key: fit_classifier(key, Z_ro, lab, seed=seed)
                    for key, lab in (("branch", np.array([dag.branch[s] for s in st_ro])), ("stage", st_ro))}
        for probe in PROBES:
            lab = probe_labels(st_ro, probe)
            have = pd.notna(lab)
            counts = pd.Series(lab[have]).value_counts()
            if len(counts) == 2 and counts.min() >= 10:
                neg, pos_cls = PROBES[probe]
                r = fit_classifier(probe, Z_ro[have], (lab[have] == pos_cls).astype(int), seed=seed)
                r.classes = [neg, pos_cls]  # score = P(second class)
                readouts[probe] = r
        readouts["pseudotime"] = fit_pseudotime(Z_ro, np.array([dag.depth(s) for s in st_ro], dtype=np.float64))
        model.readouts = readouts
        skipped = [p for p in PROBES if p not in readouts]
        # ---------------------------------------------------------------- honest scores
        eval_idx, split = (hold_idx, "holdout") if len(hold_idx) else (train_idx, "in_sample")
        if len(eval_idx) > eval_max_cells:
            eval_idx = np.sort(rng.choice(eval_idx, size=eval_max_cells, replace=False))
        x_eval = panel_rows(adata, operator.panel, eval_idx, layer=layer)
        metrics = {split: cell_metrics(model, x_eval, stages[eval_idx].astype(str), donors[eval_idx], dag)}
        if len(hold_idx):
            try:
                tr = validate_transfer(model, adata[hold_idx], label_key=label_key, donor_key=donor_key,
                                       tissue_key=tissue_key, min_cells=min_cells, n_perm=n_perm, seed=seed, layer=layer,
                                       cell_level=False)
                metrics["holdout_anchors"] = tr.metrics
            except InputError as exc:
                metrics["holdout_anchors"] = {"skipped": str(exc)}
    synthetic = bool(adata.uns.get("sclens_synthetic", {}).get("synthetic", False)) if hasattr(adata, "uns") else False
    model.manifest = {
        "sclens_version": __version__, "created_unix": int(time.time()), "versions": package_versions(),
        "synthetic": synthetic, "dag": dag.spec, "label_key": label_key, "donor_key": donor_key, "tissue_key": tissue_key,
        "label_vocabularies": {k: r.classes for k, r in readouts.items() if r.kind == "classifier"},
        "probes": {p: {c: list(m) for c, m in PROBES[p].items()} for p in PROBES}, "probes_skipped": skipped,
        "normalization": operator.panel.to_dict()["normalization"], "n_genes": len(operator.panel),
        "seeds": {"seed": seed}, "split": {"held_out_donors": sorted(set(donors[hold_idx])) if len(hold_idx) else [],
                                           "train_donors": sorted(set(donors[train_idx])), "n_train_cells": int(len(train_idx)),
                                           "n_adaptor_cells": int(len(bal)), "n_readout_cells": int(len(ro)),
                                           "n_eval_cells": int(len(eval_idx))},
        "input_hashes": {"adaptor_cells_x": array_sha256(x_bal), "labels": array_sha256(stages[mapped].astype(str)),
                         "obs_names": array_sha256(np.asarray(adata.obs_names.astype(str)))},
        "metrics": metrics, "train_seconds": time.perf_counter() - t0,
    }
    return model


def _per_donor_spearman(pred: np.ndarray, depth: np.ndarray, donors: np.ndarray, absolute: bool = False) -> float:
    from scipy.stats import spearmanr

    vals = []
    for dn in np.unique(donors):
        m = donors == dn
        if m.sum() >= 3 and np.ptp(depth[m]) > 0 and np.ptp(pred[m]) > 0:
            r = spearmanr(pred[m], depth[m]).statistic
            vals.append(abs(r) if absolute else r)
    return float(np.mean(vals)) if vals else float("nan")


def cell_metrics(model: ExtractedModel, x: np.ndarray, stages: np.ndarray, donors: np.ndarray, dag: StageDAG) -> dict:
    """Cell-level scores of the readouts against known stages (cells whose class the readout knows)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    def bal_acc(y, p):
        with warnings.catch_warnings():  # a held-out donor may lack classes the probe predicts
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            return float(balanced_accuracy_score(y, p))

    out = {"n_cells": int(len(x))}
    res = model.predict(x)
    for name, truth in (("branch", np.array([dag.branch[s] for s in stages])), ("stage", stages)):
        r = model.readouts[name]
        known = np.isin(truth, r.classes)
        if known.sum():
            pred = np.asarray(r.classes)[res[name][known].argmax(1)]
            out[f"{name}_balanced_accuracy"] = bal_acc(truth[known], pred)
            out[f"{name}_macro_f1"] = float(f1_score(truth[known], pred, average="macro"))
        out[f"{name}_cells_with_unknown_class"] = int((~known).sum())
    for probe in PROBES:
        if probe not in model.readouts:
            continue
        lab = probe_labels(stages, probe)
        have = pd.notna(lab)
        if have.sum() and len(set(lab[have])) == 2:
            r = model.readouts[probe]
            p = res[probe][have][:, 1]
            y = lab[have] == r.classes[1]
            out[f"{probe}_auroc"] = float(roc_auc_score(y, p))
            out[f"{probe}_balanced_accuracy"] = bal_acc(y, p >= 0.5)
    depth = np.array([dag.depth(s) for s in stages])
    out["pseudotime_depth_spearman"] = _per_donor_spearman(res["pseudotime"], depth, donors)
    out["pseudotime_depth_abs_spearman"] = _per_donor_spearman(res["pseudotime"], depth, donors, absolute=True)
    return out


@dataclass
class TransferReport:
    """Zero-shot transfer of a frozen extracted head to an independent dataset."""

    metrics: dict
    anchors_obs: pd.DataFrame
    latent: np.ndarray

    def summary(self) -> str:
        m = self.metrics
        lines = [f"zero-shot transfer: {m['n_anchors']} anchors ({m['n_donors']} donors, {m['n_stages']} stages) "
                 f"from {m['n_cells_in_anchors']} cells" + (" - SYNTHETIC" if m.get("synthetic") else "")]
        for key in ("trustworthiness", "ruler_spearman", "ruler_spearman_resid", "perm_p", "null_ruler_spearman",
                    "null_ruler_spearman_resid", "null_perm_p"):
            if key in m:
                lines.append(f"  {key:<28} {m[key]:.4g}")
        lines.append(f"  gates: {m['gates']}  -> passes: {m['passes']}")
        for key, v in (m.get("cells") or {}).items():
            if isinstance(v, float):
                lines.append(f"  cells {key:<24} {v:.4g}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "anchors": self.anchors_obs.to_dict(orient="list"),
                "latent": self.latent.tolist()}


def validate_transfer(
    model: ExtractedModel, adata: ad.AnnData, *, label_key: str, donor_key: str | None = None,
    tissue_key: str | None = None, min_cells: int = 5, replicates: int = 1, n_perm: int = 2000, seed: int = 0,
    null_seed: int = 0, layer: str | None = None, gates_path: str | Path | None = None, cell_level: bool = True,
    max_cells: int = 20_000,
) -> TransferReport:
    """Freeze the extracted head, rebuild anchors on new data and score the latent against the ruler and the null.

    Reports trustworthiness (standardised features vs latent, k = 15), Spearman of the latent (angular)
    distances with the ruler over anchor pairs (raw and residualised on donor / tissue), the blocked permutation
    p (stage labels permuted within donors), and the same for the within-branch-shuffled null ruler. Gates
    (from the gate file): trustworthiness, Spearman >= the holdout threshold (the new data is itself the
    holdout), permutation p, and the null failing. ``cell_level`` adds readout scores on the mapped cells.
    """
    from ..anchors import build_anchors
    from ..manifold import blocked_permutation_p, residualized_spearman, spearman_pairs, trustworthiness
    from ..screen import load_gates

    dag = model.dag
    if detect_gene_id_type(adata.var_names) != "symbol":
        adata = harmonize_gene_ids(adata)
    anchors = build_anchors(adata, model.panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                            dag=dag, min_cells=min_cells, seed=seed, layer=layer, replicates=replicates)
    if len(anchors) < 6 or anchors.obs["stage"].nunique() < 3:
        raise InputError(f"the transfer check needs >= 6 anchors over >= 3 stages; got {len(anchors)} anchors on "
                         f"{anchors.obs['stage'].nunique()} stages")
    F = model.operator.features(anchors.X)
    Z = model.adaptor.transform(F)
    D = model.adaptor.angular_distances(Z)
    obs = anchors.obs
    donors, tissues = obs["donor"].to_numpy(), obs["tissue"].to_numpy()
    sidx = anchors.stage_index
    gates, gates_sha = load_gates(gates_path)
    null_stage, _ = dag.null_ruler_matrix(null_seed)
    m: dict = {"n_anchors": len(anchors), "n_donors": anchors.info["n_donors"], "n_stages": anchors.info["n_stages"],
               "n_cells_in_anchors": int(obs["n_cells"].sum()), "synthetic": anchors.info.get("synthetic", False),
               "pseudo_replicates": replicates > 1, "gates_sha256": gates_sha, "artifact_sha256": model.content_sha256,
               "trustworthiness": trustworthiness((F - model.adaptor.mean) / model.adaptor.scale, Z)}
    for prefix, stage_R in (("", dag.ruler_matrix), ("null_", null_stage)):
        R = stage_R[np.ix_(sidx, sidx)]
        m[f"{prefix}ruler_spearman"] = spearman_pairs(D, R)
        m[f"{prefix}ruler_spearman_resid"] = residualized_spearman(D, R, donors, tissues)
        p, n_done = blocked_permutation_p(D, sidx, stage_R, donors, n_perm=n_perm, seed=seed)
        m[f"{prefix}perm_p"], m[f"{prefix}perm_n"] = p, n_done

    def gate(prefix: str) -> dict:
        return {"trustworthiness": bool(m["trustworthiness"] >= gates["trustworthiness_min"]),
                "ruler_spearman": bool(np.isfinite(m[f"{prefix}ruler_spearman"])
                                       and m[f"{prefix}ruler_spearman"] >= gates["holdout_spearman_min"]),
                "permutation": bool(m[f"{prefix}perm_p"] <= gates["permutation_p_max"])}

    g, gn = gate(""), gate("null_")
    m["gates"] = {**g, "null_fails": not all(gn.values())}
    m["passes"] = all(m["gates"].values()) if gates["null_must_fail"] else all(g.values())
    m["permutation_blocks"] = int(len(np.unique(donors)))
    if cell_level:
        stages = dag.map_labels(adata.obs[label_key].astype(str)).stage.to_numpy(dtype=object)
        idx = np.flatnonzero(pd.notna(stages))
        if len(idx) > max_cells:
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_cells, replace=False))
        dn = adata.obs[donor_key].astype(str).to_numpy()[idx] if donor_key else np.full(len(idx), "all", dtype=object)
        m["cells"] = cell_metrics(model, panel_rows(adata, model.panel, idx, layer=layer), stages[idx].astype(str), dn, dag)
    return TransferReport(m, obs.copy(), Z)
