"""Compression and mechanism: how small the extracted algorithm can get, and what its parts mean.

The compaction ladder (DESIGN.md "Compression")::

    reference (the artifact's pooled / drift operator)
      -> single_head   the best unit of the screen, dense G x G
      -> rank64 ... rank8   truncated SVD of that head, stored as factors [G, r] + [r, G]
      -> sparse        the top-k factors (singular-value order) x the top-n read and write genes of each,
                       stored as gene indices + values

At every step the adaptor and the readouts are retrained on each split's training donors
(:func:`sclens.extract.extract`, then the benchmark's shared readouts) and every endpoint is re-measured on
the same held-out donors; paired two-sided Wilcoxon tests across splits, BH over all rows, say which losses
against the previous step and against the reference are significant. Each variant is also fitted on all
cells and saved, and its file size in bytes is measured.

**Factor audit** (on the rank-``audit_rank`` surrogate): with the adaptor and readouts of each split frozen,
zero one rank-1 factor at a time at inference and record the drop on every endpoint. Factors are ranked by
the pooled drop (mean over splits and endpoint metrics); the share of total impact held by the top 1, 4, 10,
16 factors is reported (shares of the positive drops). The **core** for split *s* is the top ``core_size``
factors ranked on the *other* splits (so a split never chooses its own core); the core-only model and every
non-empty subset of the core are scored on split *s*.

**Gene programs**: each factor ``A_j = l_j r_jᵀ`` reads genes through ``l_j`` (input loadings) and writes
genes through ``r_j`` (output loadings). For each end (read +/−, write +/−) the top ``program_genes`` genes by
signed loading are tested against the curated marker sets shipped with sclens (``resources/marker_sets.yaml``,
each with its literature sources) by the hypergeometric test with the panel as universe, BH over every
(factor, end, set). A factor is labelled with its most significant set (q ≤ ``alpha``), else "unresolved".
"""

from __future__ import annotations

import html
import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__
from .evaluation import (BenchConfig, CampaignInputs, campaign_inputs, fit_extracted, fit_shared_readouts, json_records,
                         score_endpoint)
from .errors import InputError
from .extract import ExtractedModel, Operator, screen_table, select_operator
from .datasets import marker_set_table
from .stats import bh_qvalues, hypergeom_enrichment, paired_wilcoxon
from .utils import array_sha256, atomic_write, package_versions, result_file, write_json

SHARE_AT = (1, 4, 10, 16)


@dataclass
class CompressConfig:
    """Choices of the compaction ladder, the audit and the gene programs."""

    reference: str = "drift"  # "drift", or "L<l>H<h>" for a single-unit reference (ignored with an artifact)
    reference_kind: str = "ov"
    single_head: str | None = None  # "L<l>H<h>"; None: the top unit of the screen report
    single_head_kind: str | None = None  # default: the report's featurisation, else reference_kind
    ranks: tuple[int, ...] = (64, 32, 16, 8)
    audit_rank: int = 64
    sparse_factors: int = 16
    sparse_genes: int = 50
    core_size: int = 4
    program_genes: int = 25
    n_cards: int = 16
    alpha: float = 0.05


def parse_unit(spec: str) -> tuple[int, int]:
    try:
        layer, head = (int(v) for v in spec.upper().replace("L", "").replace("H", ",").split(","))
    except ValueError:
        raise InputError(f"a unit is written 'L<layer>H<head>' (e.g. L0H3), got {spec!r}") from None
    return layer, head


@dataclass
class CompressResult:
    name: str
    variants: pd.DataFrame  # one row per variant: description, rank, values, bytes
    scores: pd.DataFrame  # split, variant, endpoint, metric, value
    summary: pd.DataFrame  # variant x endpoint x metric: mean, CI
    comparisons: pd.DataFrame  # variant vs previous / reference
    audit: pd.DataFrame  # split, factor, endpoint, metric, base, ablated, drop
    ranking: pd.DataFrame  # factor, singular value, pooled drop, cumulative share
    shares: dict[int, float]
    core: pd.DataFrame  # subset scores
    programs: pd.DataFrame  # factor, end, set, overlap, p, q
    cards: list[dict]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "info": self.info, "variants": json_records(self.variants),
                "summary": json_records(self.summary), "comparisons": json_records(self.comparisons),
                "scores": json_records(self.scores), "audit_ranking": json_records(self.ranking),
                "top_k_share": {str(k): v for k, v in self.shares.items()}, "core": json_records(self.core),
                "programs": json_records(self.programs), "factor_cards": self.cards}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``compress_<name>.json`` / ``.md`` / ``.html`` in ``out_dir``."""
        return write_compress_report(self, Path(out_dir))

    @classmethod
    def load(cls, path: str | Path) -> "CompressResult":
        """Reload a saved run from its ``compress_<name>.json`` or the folder holding it (the per-split factor
        audit is not saved; its ranking is)."""
        return cls.from_json(result_file(path, "compress_*.json", "a saved compression run"))

    @classmethod
    def from_json(cls, path: str | Path) -> "CompressResult":
        """Reload a saved run (``compress_<name>.json``), e.g. to put it in a report."""
        import json

        d = json.loads(Path(path).read_text())
        df = lambda k: pd.DataFrame(d[k]).fillna(np.nan)  # noqa: E731
        return cls(d["name"], df("variants"), df("scores"), df("summary"), df("comparisons"), pd.DataFrame(),
                   df("audit_ranking"), {int(k): v for k, v in d["top_k_share"].items()}, df("core"), df("programs"),
                   d["factor_cards"], d["info"])


# ==================================================================================== building the ladder
def _operators(model, ci: CampaignInputs, config: BenchConfig, cc: CompressConfig, artifact: ExtractedModel | None,
               report) -> tuple[list[tuple[str, Operator, str | None]], Operator, dict]:
    """[(variant, operator, previous variant)], the rank-``audit_rank`` head, and where each came from."""
    from .operators import export_operators

    ranks = sorted({int(r) for r in cc.ranks}, reverse=True)
    G = len(ci.panel)
    if not ranks or ranks[-1] < 1 or max(ranks + [cc.audit_rank]) > G:
        raise InputError(f"ranks must be between 1 and the panel size {G}; got {ranks} (audit rank {cc.audit_rank})")
    if cc.audit_rank not in ranks:
        raise InputError(f"audit_rank {cc.audit_rank} must be one of the ranks {ranks}")
    if not 1 <= cc.sparse_factors <= cc.audit_rank:
        raise InputError(f"sparse_factors must be between 1 and audit_rank {cc.audit_rank}, got {cc.sparse_factors}")
    head_kind, unit = cc.single_head_kind, None
    if cc.single_head:
        unit = parse_unit(cc.single_head)
    elif report is not None:
        row = _top_unit_row(report)
        unit, head_kind = (int(row["layer"]), int(row["head"])), head_kind or str(row["featurisation"])
    else:
        raise InputError("choose the single head: pass a screen report (its top unit) or single_head='L<l>H<h>'")
    head_kind = head_kind or cc.reference_kind
    kinds = sorted({head_kind} | ({cc.reference_kind} if artifact is None else set()))
    a = ad.AnnData(ci.adata.X, var=pd.DataFrame(index=ci.adata.var_names))
    t0 = time.perf_counter()
    banks = export_operators(model, a, ci.panel, kinds=kinds, n_ref_cells=min(config.n_ref_cells, ci.adata.n_obs),
                             seed=config.seed, progress=False)
    export_s = time.perf_counter() - t0
    if artifact is not None:
        ref = artifact.operator
        if any(b.rank for b in ref.blocks):
            raise InputError("the artifact's operator is already low-rank; compress a dense pooled / drift / unit artifact")
    elif cc.reference == "drift":
        ref = select_operator(banks, drift=True, kind=cc.reference_kind)
    else:
        ref = select_operator(banks, unit=parse_unit(cc.reference), kind=cc.reference_kind)
    head = select_operator(banks, unit=unit, kind=head_kind)
    full = head.low_rank(ranks[0])
    ladder: list[tuple[str, Operator, str | None]] = [("reference", ref, None), ("single_head", head, "reference")]
    prev = "single_head"
    lows = {}
    for r in ranks:
        op = full if r == ranks[0] else full.low_rank(r)
        lows[r] = op
        ladder.append((f"rank{r}", op, prev))
        prev = f"rank{r}"
    sparse = lows[cc.audit_rank].sparsified(range(cc.sparse_factors), cc.sparse_genes, cc.sparse_genes)
    ladder.append(("sparse", sparse, f"rank{cc.audit_rank}"))
    where = {"single_head": {"layer": unit[0], "head": unit[1], "kind": head_kind,
                             "chosen_by": "single_head" if cc.single_head else "screen report (top unit)"},
             "reference": ref.describe() + (" (from the artifact)" if artifact is not None else ""),
             "export_seconds": export_s}
    return ladder, lows[cc.audit_rank], where


def _top_unit_row(report) -> dict:
    """The best-ranked single-unit hypothesis (attn / qk / ov of one head) of a screen report or its folder."""
    table = screen_table(report)
    units = table[table["featurisation"].isin(["attn", "qk", "ov"]) & (table["layer"] >= 0)]
    if units.empty:
        raise InputError("the screen report ranks no single-unit hypothesis (attn / qk / ov of one head); name the "
                         "head with single_head='L<l>H<h>'")
    return units.iloc[0].to_dict()


def _score(ep_list, t_te, preds, groups) -> dict[tuple[str, str], float]:
    out = {}
    for ep in ep_list:
        if ep.name in preds:
            for metric, v in score_endpoint(ep, t_te[ep.name], preds[ep.name], groups).items():
                out[(ep.name, metric)] = v
    return out


def _fit_variant(ci: CampaignInputs, idx: np.ndarray, op: Operator, config: BenchConfig) -> ExtractedModel:
    return fit_extracted(ci.cells(idx), op, config)


def factor_contributions(model: ExtractedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a one-block factored operator: ``(z, u, v)`` with ``z`` the latent, ``u = x·L`` [n, r] the factor
    activations and ``v`` [r, d] each factor's write into the latent, so that zeroing factor j gives
    ``z − u[:, j] v[j]`` exactly (the operator is linear, the adaptor affine)."""
    if len(model.operator.blocks) != 1 or model.operator.rank is None:
        raise InputError("the factor audit needs a one-block low-rank operator (a rank-r single head)")
    blk, a = model.operator.blocks[0], model.adaptor
    x = np.asarray(x, dtype=np.float64)
    u = x @ blk.left.astype(np.float64)
    v = (blk.right.astype(np.float64) / a.scale.astype(np.float64)[None, :]) @ a.weight.astype(np.float64).T
    z = model.latent(x.astype(np.float32), fold=False).astype(np.float64)
    return z, u, v


# ==================================================================================== gene programs


def gene_programs(op: Operator, factors: Sequence[int], *, n_genes: int = 25, alpha: float = 0.05,
                  sets: dict | None = None) -> tuple[pd.DataFrame, dict[int, dict]]:
    """Enrichment of each factor's read / write ends against the marker sets; returns the test table (with BH
    q over every row) and per factor its ends' top genes and its label."""
    sets = sets or marker_set_table()
    blk = op.blocks[0]
    genes = np.asarray(op.panel.genes)
    rows, ends = [], {}
    for j in factors:
        ends[j] = {}
        for side, vec in (("read", blk.left[:, j]), ("write", blk.right[j])):
            for sign, order in (("+", np.argsort(-vec, kind="stable")), ("−", np.argsort(vec, kind="stable"))):
                top = order[:n_genes]
                top = top[(vec[top] > 0) if sign == "+" else (vec[top] < 0)]
                end = f"{side}{sign}"
                ends[j][end] = [(str(genes[i]), float(vec[i])) for i in top]
                for key, spec in sets.items():
                    e = hypergeom_enrichment(genes[top], spec["genes"], genes)
                    rows.append({"factor": int(j), "end": end, "set": key, "set_label": spec["label"], **e})
    tab = pd.DataFrame(rows)
    if len(tab):
        tab["q"] = bh_qvalues(tab["p"].to_numpy())
        tab["genes"] = tab["genes"].map(", ".join)
    labels = {}
    for j in factors:
        sub = tab[(tab.factor == j) & (tab.q <= alpha)].sort_values("q") if len(tab) else tab
        if len(sub):
            best = sub.iloc[0]
            labels[j] = {"label": f"{best['set_label']} ({best['end']})",
                         "programs": [f"{r.set_label} ({r.end}, q={r.q:.2g})" for r in sub.itertuples()]}
        else:
            labels[j] = {"label": "unresolved", "programs": []}
    return tab, {j: {"ends": ends[j], **labels[j]} for j in factors}


# ==================================================================================== the run
def compress(
    adata: ad.AnnData, bench_config: BenchConfig, config: CompressConfig | None = None, *, model=None,
    report=None, artifact: str | Path | ExtractedModel | None = None, name: str = "compress",
    layer: str | None = None, artifact_dir: str | Path | None = None, progress: bool = True,
) -> CompressResult:
    """Run the compaction ladder, the factor audit and the gene programs on labelled cells with donors.

    ``bench_config`` gives the endpoints, donor / label columns, splits and adaptor settings exactly as for
    :func:`sclens.bench.run_campaign`; ``report`` (a screen report or its folder) names the single head unless
    ``config.single_head`` does; ``artifact`` (an extracted ``.safetensors`` or model) supplies the reference
    operator and the panel. Variant files are written to ``artifact_dir`` (default: a temporary folder).
    """
    from tqdm.auto import tqdm

    from .models.api import resolve_model

    cc = config or CompressConfig()
    t_start = time.perf_counter()
    model = resolve_model(model)
    art = ExtractedModel.load(artifact) if isinstance(artifact, (str, Path)) else artifact
    ci = campaign_inputs(adata, bench_config, model, layer=layer, panel=art.panel if art is not None else None)
    ladder, audit_op, where = _operators(model, ci, bench_config, cc, art, report)
    eps = bench_config.endpoints
    splits = ci.splits
    rows, audit_rows, per_split = [], [], {}
    bar = tqdm(total=len(splits) * len(ladder), desc=f"compress {name}", unit="fit", disable=not progress)
    for sp_ in splits:
        t_tr = {k: v[sp_.train] for k, v in ci.targets.items()}
        t_te = {k: v[sp_.test] for k, v in ci.targets.items()}
        groups = ci.donors[sp_.test] if bench_config.scheme != "cells" else np.full(len(sp_.test), "cells", object)
        x_tr, x_te = ci.x[sp_.train], ci.x[sp_.test]
        for vname, op, _ in ladder:
            bar.set_postfix_str(f"split {sp_.index} {vname}")
            m = _fit_variant(ci, sp_.train, op, bench_config)
            ro = fit_shared_readouts(m.latent(x_tr), eps, t_tr, bench_config.seed)
            sc = _score(eps, t_te, ro.predict(m.latent(x_te)), groups)
            rows += [{"split": sp_.index, "variant": vname, "endpoint": e, "metric": k, "value": v}
                     for (e, k), v in sc.items()]
            if op is audit_op:
                per_split[sp_.index] = (m, ro, t_te, groups, sc)
            bar.update(1)
    bar.close()
    scores = pd.DataFrame(rows, columns=["split", "variant", "endpoint", "metric", "value"])
    order = [v for v, _, _ in ladder]
    summary = _summarise(scores, order)
    comparisons = _compare(scores, ladder, cc.alpha)

    # ------------------------------------------------------------ factor audit
    r = audit_op.rank
    core_rows = []
    contributions = {s: factor_contributions(m, ci.x[splits[s].test]) for s, (m, *_) in per_split.items()}
    for s, (m, ro, t_te, groups, base) in per_split.items():
        z, u, v = contributions[s]
        for j in range(r):
            abl = _score(eps, t_te, ro.predict((z - np.outer(u[:, j], v[j])).astype(np.float32)), groups)
            audit_rows += [{"split": s, "factor": j, "endpoint": e, "metric": k, "base": base[(e, k)],
                            "ablated": val, "drop": base[(e, k)] - val} for (e, k), val in abl.items()]
    audit = pd.DataFrame(audit_rows, columns=["split", "factor", "endpoint", "metric", "base", "ablated", "drop"])
    pooled = audit.groupby("factor")["drop"].mean().reindex(range(r)).fillna(0.0)
    sv = np.linalg.norm(audit_op.blocks[0].left, axis=0)  # left = U·S with orthonormal U: column norm = σ_j
    ranking = pd.DataFrame({"factor": range(r), "singular_value": sv, "pooled_drop": pooled.to_numpy()})
    ranking = ranking.sort_values("pooled_drop", ascending=False, kind="stable").reset_index(drop=True)
    ranking["rank_by_impact"] = np.arange(1, r + 1)
    pos = np.clip(ranking["pooled_drop"].to_numpy(), 0, None)
    ranking["cumulative_share"] = np.cumsum(pos) / pos.sum() if pos.sum() > 0 else np.nan
    shares = {k: float(ranking["cumulative_share"].iloc[k - 1]) for k in SHARE_AT if k <= r}
    # core chosen on the OTHER splits; core-only, every subset of the core, and no factor at all
    k_core = min(cc.core_size, r)
    core_by_split = {}
    for s, (m, ro, t_te, groups, base) in per_split.items():
        others = audit[audit.split != s] if len(per_split) > 1 else audit
        rank_s = others.groupby("factor")["drop"].mean().reindex(range(r)).fillna(0.0)
        core = list(rank_s.sort_values(ascending=False, kind="stable").index[:k_core])
        core_by_split[s] = [int(c) for c in core]
        z, u, v = contributions[s]
        z0 = z - u @ v  # the latent with every factor removed
        subsets = [("all factors", list(range(r))), ("no factor", [])]
        subsets += [("core " + "+".join(f"#{i + 1}" for i in S), [core[i] for i in S])
                    for n in range(k_core, 0, -1) for S in itertools.combinations(range(k_core), n)]
        for label, keep in subsets:
            zk = z0 + (u[:, keep] @ v[keep] if keep else 0.0)
            sc = _score(eps, t_te, ro.predict(zk.astype(np.float32)), groups)
            core_rows += [{"split": s, "subset": label, "n_factors": len(keep), "endpoint": e, "metric": k, "value": val}
                          for (e, k), val in sc.items()]
    core_df = pd.DataFrame(core_rows, columns=["split", "subset", "n_factors", "endpoint", "metric", "value"])
    core_summary = (core_df.groupby(["subset", "n_factors", "endpoint", "metric"], sort=False)["value"].mean()
                    .reset_index().rename(columns={"value": "mean"}))

    # ------------------------------------------------------------ gene programs and cards
    top = [int(f) for f in ranking["factor"].iloc[: min(cc.n_cards, r)]]
    programs, labelled = gene_programs(audit_op, top, n_genes=cc.program_genes, alpha=cc.alpha)
    cards = []
    for f in top:
        rr = ranking[ranking.factor == f].iloc[0]
        ab = audit[audit.factor == f].groupby(["endpoint", "metric"])["drop"].mean()
        cards.append({"factor": f, "rank_by_impact": int(rr["rank_by_impact"]), "singular_value": float(rr["singular_value"]),
                      "pooled_drop": float(rr["pooled_drop"]), "label": labelled[f]["label"],
                      "programs": labelled[f]["programs"],
                      "drop_by_endpoint": {f"{e} · {k}": float(v) for (e, k), v in ab.items()},
                      "top_genes": {end: [g for g, _ in lst[:10]] for end, lst in labelled[f]["ends"].items()},
                      "loadings": {end: [[g, round(w, 5)] for g, w in lst] for end, lst in labelled[f]["ends"].items()}})

    # ------------------------------------------------------------ the files themselves
    out_dir = Path(artifact_dir) if artifact_dir else Path(tempfile.mkdtemp(prefix="sclens_compress_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    all_idx = np.arange(ci.adata.n_obs)
    vrows = []
    for vname, op, prev in ladder:
        m = _fit_variant(ci, all_idx, op, bench_config)
        path = m.save(out_dir / f"{name}_{vname}.safetensors")
        t = m.tensors()
        op_bytes = sum(v.nbytes for k, v in t.items() if k.startswith("operator."))
        vrows.append({"variant": vname, "previous": prev, "operator": op.describe(), "rank": op.rank,
                      "operator_values": int(op.n_values), "operator_bytes": int(op_bytes),
                      "file_bytes": int(path.stat().st_size), "file": path.name,
                      "adaptor_and_readout_params": int(m.n_trainable()["total"])})
    variants = pd.DataFrame(vrows)
    info = {"name": name, "sclens_version": __version__, "created_unix": int(time.time()),
            "versions": package_versions(("sclens", "torch", "numpy", "scipy", "anndata", "scikit-learn")),
            "n_cells": int(ci.adata.n_obs), "n_donors": int(len(set(ci.donors))), "panel_size": len(ci.panel),
            "scheme": bench_config.scheme, "n_splits": len(splits), "seed": bench_config.seed,
            "splits": [{"index": s.index, "test_groups": s.test_groups} for s in splits],
            "endpoints": [e.name for e in eps], "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                          for k, v in cc.__dict__.items()},
            "single_head": where["single_head"], "reference": where["reference"],
            "operator_export_seconds": where["export_seconds"], "audit_rank": r, "core_by_split": core_by_split,
            "core_rule": f"top {k_core} factors by pooled drop on the other splits (never the split's own test cells)",
            "share_rule": "sum of the top-k positive pooled drops / sum of all positive pooled drops",
            "sparse_rule": f"first {cc.sparse_factors} factors by singular value (label-free) x top {cc.sparse_genes} "
                           "|loading| read and write genes each",
            "core_summary": json_records(core_summary), "artifact_dir": str(out_dir),
            "source_equals_donor": bench_config.scheme in ("cells", "source"),
            "input_hashes": {"x_panel": array_sha256(ci.x)},
            "synthetic": bool(adata.uns.get("sclens_synthetic", {}).get("synthetic", False)),
            "wall_seconds": time.perf_counter() - t_start}
    return CompressResult(name, variants, scores, summary, comparisons, audit, ranking, shares, core_df, programs,
                          cards, info)


def _summarise(scores: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    from .stats import mean_ci

    out = []
    for (v, e, k), sub in scores.groupby(["variant", "endpoint", "metric"], sort=False):
        m, lo, hi = mean_ci(sub["value"].to_numpy())
        out.append({"variant": v, "endpoint": e, "metric": k, "mean": m, "ci_low": lo, "ci_high": hi,
                    "n_splits": int(sub["value"].notna().sum())})
    df = pd.DataFrame(out)
    if len(df):
        df["variant"] = pd.Categorical(df["variant"], order, ordered=True)
        df = df.sort_values(["endpoint", "metric", "variant"]).reset_index(drop=True)
        df["variant"] = df["variant"].astype(str)
    return df


def _compare(scores: pd.DataFrame, ladder, alpha: float) -> pd.DataFrame:
    rows = []
    wide = scores.pivot_table(index=["endpoint", "metric", "split"], columns="variant", values="value")
    for vname, _, prev in ladder:
        for against in dict.fromkeys([prev, "reference"]):
            if against is None or against == vname:
                continue
            for (e, k), sub in wide.groupby(level=[0, 1]):
                if vname not in sub or against not in sub:
                    continue
                w = paired_wilcoxon(sub[vname].to_numpy(), sub[against].to_numpy())
                rows.append({"variant": vname, "against": against, "step": "previous" if against == prev else "reference",
                             "endpoint": e, "metric": k, **{x: w[x] for x in ("mean_diff", "n", "wins", "ties",
                                                                              "losses", "p")}})
    df = pd.DataFrame(rows)
    if len(df):
        df["q"] = bh_qvalues(df["p"].to_numpy())
        df["significant_loss"] = (df["q"] <= alpha) & (df["mean_diff"] < 0)
        df["significant_gain"] = (df["q"] <= alpha) & (df["mean_diff"] > 0)
    return df


# ==================================================================================== report
def compaction_table(res: CompressResult) -> pd.DataFrame:
    """variant, bytes, each endpoint's mean, and the significant losses vs the previous step / reference."""
    s = res.summary.copy()
    s["col"] = s["endpoint"] + " · " + s["metric"]
    wide = s.pivot_table(index="variant", columns="col", values="mean", sort=False)
    t = res.variants.set_index("variant")[["operator", "file_bytes", "operator_bytes", "operator_values"]].join(wide)
    c = res.comparisons
    for step in ("previous", "reference"):
        # the single head's previous step IS the reference: that one test answers both columns
        lost = (c[c.significant_loss & ((c.step == "previous") if step == "previous" else (c.against == "reference"))]
                if len(c) else c)
        t[f"significant losses vs {step}"] = [", ".join(f"{r.endpoint} · {r.metric} ({r.mean_diff:+.3f}, q={r.q:.2g})"
                                                        for r in lost[lost.variant == v].itertuples()) or "none"
                                              for v in t.index]
    return t.reset_index()


def summary_markdown(res: CompressResult) -> str:
    i = res.info
    lines = [f"### Compression of the extracted algorithm — {res.name}", "",
             f"{i['n_cells']} cells, {i['n_donors']} donors, panel {i['panel_size']} genes; scheme {i['scheme']}, "
             f"{i['n_splits']} splits, seed {i['seed']}" + (" — **SYNTHETIC**" if i.get("synthetic") else "") + ".",
             f"Reference: {i['reference']}. Single head: {i['single_head']['kind']} L{i['single_head']['layer']}"
             f"H{i['single_head']['head']} ({i['single_head']['chosen_by']}).", ""]
    t = compaction_table(res)
    cols = [c for c in t.columns if "·" in c]
    lines += ["| variant | file bytes | operator bytes | " + " | ".join(cols) + " | significant losses vs previous | vs reference |",
              "|---" * (5 + len(cols)) + "|"]
    for r in t.itertuples(index=False):
        d = dict(zip(t.columns, r))
        vals = " | ".join("–" if not np.isfinite(d[c]) else f"{d[c]:.3f}" for c in cols)
        lines.append(f"| {d['variant']} | {d['file_bytes']:,} | {d['operator_bytes']:,} | {vals} | "
                     f"{d['significant losses vs previous']} | {d['significant losses vs reference']} |")
    lines += ["", f"**Factor audit** (rank {i['audit_rank']}): share of total impact held by the top "
              + ", ".join(f"{k}: {v:.3f}" for k, v in res.shares.items()) + f" ({i['share_rule']}).", ""]
    cs = pd.DataFrame(i["core_summary"])
    if len(cs):
        cs["col"] = cs["endpoint"] + " · " + cs["metric"]
        w = cs.pivot_table(index=["subset", "n_factors"], columns="col", values="mean", sort=False).reset_index()
        cols = [c for c in w.columns if "·" in c]
        lines += [f"**Core subsets** ({i['core_rule']})", "", "| subset | factors | " + " | ".join(cols) + " |",
                  "|---" * (2 + len(cols)) + "|"]
        for _, r in w.iterrows():
            lines.append(f"| {r['subset']} | {r['n_factors']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
        lines.append("")
    lines += ["**Factor cards**", "", "| impact rank | factor | σ | pooled drop | label | top read + | top read − | "
              "top write + | top write − |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res.cards:
        tg = c["top_genes"]
        lines.append(f"| {c['rank_by_impact']} | {c['factor']} | {c['singular_value']:.3g} | {c['pooled_drop']:.4f} | "
                     f"{c['label']} | {', '.join(tg.get('read+', [])[:6])} | {', '.join(tg.get('read−', [])[:6])} | "
                     f"{', '.join(tg.get('write+', [])[:6])} | {', '.join(tg.get('write−', [])[:6])} |")
    return "\n".join(lines) + "\n"


def write_compress_report(res: CompressResult, out_dir: Path) -> dict[str, Path]:
    import plotly.graph_objects as go

    from .htmlkit import ensure_plotly_js, md_to_html

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"compress_{res.name}"
    paths = {"json": write_json(out_dir / f"{stem}.json", res.to_dict())}
    md = summary_markdown(res)
    paths["md"] = atomic_write(out_dir / f"{stem}.md", lambda p: Path(p).write_text(md))
    figs = []
    rk = res.ranking
    f1 = go.Figure(go.Scatter(x=rk["rank_by_impact"], y=rk["cumulative_share"], mode="lines+markers",
                              hovertext=[f"factor {f}, drop {d:.4f}" for f, d in zip(rk["factor"], rk["pooled_drop"])]))
    f1.update_layout(title="Factor impact curve: cumulative share of the pooled drop", xaxis_title="top-k factors",
                     yaxis_title="share of total impact", height=380)
    figs.append(f1)
    top = rk.head(24)
    f2 = go.Figure(go.Bar(x=[f"f{f}" for f in top["factor"]], y=top["pooled_drop"]))
    f2.update_layout(title="Pooled drop when one factor is zeroed (adaptor and readouts frozen)", height=360,
                     yaxis_title="mean drop over splits and endpoint metrics")
    figs.append(f2)
    s = res.summary.copy()
    s["col"] = s["endpoint"] + " · " + s["metric"]
    f3 = go.Figure()
    for col, sub in s.groupby("col", sort=False):
        f3.add_trace(go.Scatter(x=sub["variant"], y=sub["mean"], mode="lines+markers", name=col,
                                error_y=dict(type="data", symmetric=False, array=sub["ci_high"] - sub["mean"],
                                             arrayminus=sub["mean"] - sub["ci_low"])))
    f3.update_layout(title="Every endpoint along the compaction ladder (mean and 95% CI across splits)", height=440)
    figs.append(f3)
    v = res.variants
    f4 = go.Figure(go.Bar(x=v["variant"], y=v["file_bytes"], text=[f"{b / 1e6:.3f} MB" for b in v["file_bytes"]]))
    f4.update_layout(title="Artifact file size", yaxis_type="log", yaxis_title="bytes", height=360)
    figs.append(f4)
    ensure_plotly_js(out_dir)
    divs = [f.to_html(full_html=False, include_plotlyjs="directory" if i == 0 else False) for i, f in enumerate(figs)]
    body = (f"<h1>Compression — {html.escape(res.name)}</h1>" + md_to_html(md) + "".join(divs)
            + "<h2>Enrichment tests</h2>" + res.programs[res.programs.q <= 0.05].to_html(index=False)
            + f"<p class='note'>sclens {__version__}; seeds, versions and input hashes in {stem}.json.</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>sclens compress</title>"
            + "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px}</style>"
            "</head><body>" + body + "</body></html>")
    paths["html"] = atomic_write(out_dir / f"{stem}.html", lambda p: Path(p).write_text(page))
    return paths


__all__ = ["CompressConfig", "CompressResult", "compress", "compaction_table", "factor_contributions",
           "gene_programs", "parse_unit"]
