"""The stage subcommands: demo, data, model, embed, pretrain, export-operators, screen, extract, inspect, apply,
validate, bench, view, report, compress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SclensError
from .common import app, split_list


@app.command()
def demo(
    out: Path = typer.Option(Path("sclens_demo"), "--out", "-o", help="Report folder to write."),
    quick: bool = typer.Option(False, help="Smaller data and fewer steps (about a minute)."),
    seed: int = typer.Option(0, help="Seed of every stochastic step."),
) -> None:
    """Run everything that exists so far on the embedded default model and offline data."""
    from ..demo import run_demo

    run_demo(out, quick=quick, seed=seed)


@app.command()
def data(
    path: Path = typer.Argument(..., help=".h5ad file (or .zarr store)."),
    obs_key: List[str] = typer.Option([], "--obs-key", help="obs column that must exist (repeatable)."),
    var_key: Optional[str] = typer.Option(None, help="var column with gene ids (default: var_names)."),
    layer: Optional[str] = typer.Option(None, help="Layer to check instead of X."),
    require: str = typer.Option("any", help="'counts', 'log' or 'any'."),
    label_key: Optional[str] = typer.Option(None, help="Cell-type column to map onto the stage DAG."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint dir for the panel (default: embedded model)."),
    n_genes: int = typer.Option(1200, help="Panel size."),
    panel_out: Optional[Path] = typer.Option(None, help="Write the chosen panel as JSON here."),
    backed: bool = typer.Option(False, help="Open the file backed (X stays on disk)."),
) -> None:
    """Validate a dataset, harmonise gene ids, map labels to stages and choose the gene panel."""
    from ..data import harmonize_gene_ids, read_h5ad, select_panel, validate
    from ..models.api import resolve_model
    from ..ontology import StageDAG

    adata = read_h5ad(path, backed=backed)
    if var_key:
        adata = harmonize_gene_ids(adata if not backed else adata.to_memory(), var_key=var_key)
    report = validate(adata, obs_keys=obs_key + ([label_key] if label_key else []), require=require, layer=layer)
    typer.echo(report.summary())
    m = resolve_model(model)
    import anndata as ad

    ids_only = ad.AnnData(var=adata.var.copy())  # gene ids only: a backed file is not loaded for this
    genes = list((ids_only if var_key else harmonize_gene_ids(ids_only)).var_names.astype(str))
    shared = [g for g in genes if g in m.vocab]
    if not shared:
        raise SclensError(
            f"none of the {len(genes):,} genes (e.g. {genes[:4]}) is in the model vocabulary ({len(m.vocab):,} "
            f"tokens, e.g. {m.vocab.genes[:4]}): check the species and the id column (--var-key)")
    typer.echo(f"model vocabulary: {len(shared):,} of {len(genes):,} genes ({len(shared) / len(genes):.0%}) are model "
               f"tokens ({getattr(m, 'source', 'model')})")
    if label_key:
        typer.echo(StageDAG.default().map_labels(adata.obs[label_key].astype(str)).summary())
    if panel_out:
        m = resolve_model(model)
        a = adata.to_memory() if getattr(adata, "isbacked", False) else adata
        a = harmonize_gene_ids(a, vocabulary=m.vocab.genes)
        panel = select_panel(a, m.vocab.genes, n_genes=n_genes, layer=layer)
        panel.save(panel_out)
        typer.echo(f"panel: {len(panel)} genes ({panel.flavor}) -> {panel_out}")


@app.command("model")
def model_info(
    args: Optional[List[str]] = typer.Argument(
        None, help="[CHECKPOINT]: describe a checkpoint (default: the embedded model); or 'probe CHECKPOINT DATA.h5ad': "
                   "run the learning probes (CHECKPOINT 'default' = the embedded model)."),
    hooks: bool = typer.Option(False, help="List every hook point."),
    allow_unsupported: bool = typer.Option(False, help="Ignore fine-tuning modules sclens does not model."),
    label_key: Optional[str] = typer.Option(None, help="probe: obs column of cell-type labels."),
    donor_key: Optional[str] = typer.Option(None, help="probe: obs column of donors (CV folds grouped by donor)."),
    out: Path = typer.Option(Path("probe"), "--out", "-o", help="probe: folder for probe_<name>.json/.md/.png."),
    n_cells: int = typer.Option(2000, help="probe: cells embedded."),
    random_weights: bool = typer.Option(True, help="probe: also embed with a random-weights copy."),
    var_key: Optional[str] = typer.Option(None, help="probe: var column with gene ids."),
    seed: int = typer.Option(0),
) -> None:
    """Describe a checkpoint (architecture, vocabulary, hook points), or probe what it learned (`model probe`)."""
    from ..models import load_default_model, load_model

    args = list(args or [])
    if args and args[0] == "probe":
        if len(args) != 3:
            raise SclensError("usage: sclens model probe CHECKPOINT DATA.h5ad --label-key COLUMN [--donor-key COLUMN]")
        if not label_key:
            raise SclensError("sclens model probe needs --label-key (the obs column of cell-type labels)")
        _probe(args[1], Path(args[2]), label_key=label_key, donor_key=donor_key, out=out, n_cells=n_cells,
               random_weights=random_weights, var_key=var_key, seed=seed)
        return
    if len(args) > 1:
        raise SclensError(f"expected at most one checkpoint folder, got {args}")
    m = load_model(args[0], allow_unsupported=allow_unsupported) if args else load_default_model()
    c = m.config
    typer.echo(f"source: {getattr(m, 'source', '?')}")
    if m.family == "geneformer":
        typer.echo(f"architecture: Geneformer {'V2' if m.special_token else 'V1'} (BERT, rank-value input), "
                   f"{m.n_layers} layers x {m.n_heads} heads (d_head {c.d_head}), d_model {c.hidden_size}, "
                   f"intermediate {c.intermediate_size}, input size {m.model_input_size}")
        typer.echo(f"vocabulary: {len(m.token_dict):,} tokens ({len(m.vocab.genes):,} genes, "
                   f"{sum(not g.startswith('ENSG') for g in m.vocab.genes):,} named by symbol); "
                   f"parameters: {m.n_parameters():,} (encoder {m.n_parameters(backbone_only=True):,})")
    else:
        typer.echo(f"architecture: scGPT, {c.nlayers} layers x {c.nheads} heads (d_head {c.d_head}), d_model "
                   f"{c.embsize}, d_hid {c.d_hid}, values {c.input_emb_style}, {c.n_bins} bins, max_seq_len {c.max_seq_len}")
        typer.echo(f"vocabulary: {len(m.vocab):,} tokens; parameters: {m.n_parameters():,} "
                   f"(encoder {m.n_parameters(backbone_only=True):,}); MVC head: {m.mvc_decoder is not None}")
    typer.echo(f"checkpoint sha256: {m.checkpoint_sha256}")
    typer.echo(f"hook points: {len(m.hook_dict)}")
    if hooks:
        for n in m.hook_dict:
            typer.echo(f"  {n}")


def _probe(checkpoint: str, data: Path, *, label_key, donor_key, out, n_cells, random_weights, var_key, seed) -> None:
    from ..data import read_h5ad
    from ..models import load_default_model, load_model
    from ..models.probe import probe_model

    m = load_default_model() if checkpoint == "default" else load_model(checkpoint)
    if m.family != "scgpt":
        raise SclensError(f"the learning probe (masked-value MSE, value-binned embeddings) is built for scGPT; "
                          f"{checkpoint} is a {m.family} model")
    res = probe_model(m, read_h5ad(data), label_key=label_key, donor_key=donor_key, name=data.stem, n_cells=n_cells,
                      random_weights=random_weights, var_key=var_key, seed=seed)
    paths = res.save(out)
    typer.echo(res.table())
    typer.echo(f"probe -> {paths['json']}")


@app.command()
def embed(
    path: Path = typer.Argument(..., help="Input .h5ad (never modified)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with obsm['X_scgpt'] or obsm['X_geneformer']."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint dir, scGPT or Geneformer (default: embedded model)."),
    var_key: Optional[str] = typer.Option(None, help="var column with gene ids."),
    layer: Optional[str] = typer.Option(None),
    pooling: Optional[str] = typer.Option(None, help="'cls' or 'avg' (default: the family's official rule)."),
    batch_size: int = typer.Option(64),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
) -> None:
    """Cell embeddings of a foundation model (scGPT: official embed_data rules into obsm['X_scgpt']; Geneformer:
    EmbExtractor rules on raw counts into obsm['X_geneformer'])."""
    from ..data import read_h5ad
    from ..models.api import embed_cells, resolve_model
    from ..utils import atomic_write

    if out.resolve() == path.resolve():
        raise SclensError("--out must differ from the input file: sclens never overwrites its input")
    import warnings

    adata = read_h5ad(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        m = resolve_model(model, device)
        embed_cells(adata, m, var_key=var_key, layer=layer, pooling=pooling, batch_size=batch_size, seed=seed)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.secho(f"note: {w.message}", fg=typer.colors.YELLOW, err=True)
    atomic_write(out, lambda p: adata.write_h5ad(p))
    key = f"X_{m.family}"
    typer.echo(f"wrote {adata.n_obs} embeddings ({adata.obsm[key].shape[1]}-d) to {out} (obsm['{key}'])")


@app.command()
def pretrain(
    paths: List[Path] = typer.Argument(..., help="One or more .h5ad files of raw counts."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint dir to write (official layout)."),
    config: Optional[Path] = typer.Option(None, help="JSON/YAML file of PretrainConfig (or, with --family geneformer, "
                                          "GeneformerPretrainConfig) fields."),
    steps: Optional[int] = typer.Option(None), layers: Optional[int] = typer.Option(None),
    heads: Optional[int] = typer.Option(None), d_model: Optional[int] = typer.Option(None),
    d_hid: Optional[int] = typer.Option(None), seq_len: Optional[int] = typer.Option(None, help="Training tokens per cell."),
    batch_size: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    mvc: Optional[bool] = typer.Option(None, help="Add the cell-embedding (MVC) objective."),
    seed: Optional[int] = typer.Option(None), layer: Optional[str] = typer.Option(None),
    var_key: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default: the config's, else cpu)."),
    family: str = typer.Option("scgpt", help="'scgpt' (masked expression, official scGPT layout) or 'geneformer' "
                                             "(masked genes on rank-value sentences, HF BERT layout)."),
) -> None:
    """Pretrain an scGPT-architecture model (masked expression) or a Geneformer-architecture model (masked genes on
    rank-value sentences) and write the family's official layout. --config fields: PretrainConfig (scgpt) or
    GeneformerPretrainConfig (geneformer); --seq-len sets the training tokens per cell of either."""
    from ..data import harmonize_gene_ids, read_h5ad
    from ..models.pretrain import pretrain_config, pretrain_scgpt
    from ..models.pretrain_geneformer import pretrain_geneformer

    cfg = pretrain_config(family, config, device=device, steps=steps, n_layers=layers, n_heads=heads, d_model=d_model,
                          d_hid=d_hid, batch_size=batch_size, lr=lr, seed=seed, seq_len=seq_len, mvc=mvc)
    datasets = [harmonize_gene_ids(read_h5ad(p), var_key=var_key) for p in paths]
    prov = {"inputs": [str(p) for p in paths]}
    if family == "geneformer":
        _, log = pretrain_geneformer(datasets, cfg, out_dir=out, layer=layer, extra_provenance=prov)
        typer.echo(f"wrote {out} ({log['n_parameters']:,} parameters, {log['vocab_size']:,} tokens; final held-out "
                   f"masked-gene cross-entropy {log['final_eval']['ce']:.3f}, gene frequencies alone "
                   f"{log['unigram_baseline_ce']:.3f})")
        return
    res = pretrain_scgpt(datasets, cfg, out_dir=out, layer=layer, extra_provenance=prov)
    typer.echo(f"wrote {out} ({res.log['n_parameters']:,} parameters, final held-out masked MSE "
               f"{res.log['final_eval']['mlm']:.3f}, constant predictor {res.log['eval_constant_predictor_mse']:.3f})")


@app.command("export-operators")
def export_operators_cmd(
    data_path: Path = typer.Argument(..., help="Reference cells (.h5ad)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for operators_<kind>.safetensors (+ .json) and panel.json."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint dir (default: embedded model)."),
    kinds: str = typer.Option("attn,qk,ov", help="Comma-separated operator kinds."),
    n_genes: int = typer.Option(1200, help="Panel size (HVGs among vocabulary genes)."),
    panel_file: Optional[Path] = typer.Option(None, "--panel", help="Use this panel.json instead of choosing one."),
    n_ref_cells: int = typer.Option(256, help="Reference cells averaged for attn / residual means."),
    var_key: Optional[str] = typer.Option(None), layer: Optional[str] = typer.Option(None),
    batch_size: int = typer.Option(8), seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
) -> None:
    """Export the frozen G x G gene-space operator of every attention unit."""
    from ..data import GenePanel, harmonize_gene_ids, read_h5ad, select_panel
    from ..models.api import resolve_model
    from ..operators import OperatorFolder, export_operators

    m = resolve_model(model, device)
    adata = harmonize_gene_ids(read_h5ad(data_path), var_key=var_key, vocabulary=m.vocab.genes)
    panel = (GenePanel.load(panel_file) if panel_file
             else select_panel(adata, m.vocab.genes, n_genes=n_genes, layer=layer))
    banks = export_operators(m, adata, panel, split_list(kinds), n_ref_cells=n_ref_cells, seed=seed,
                             batch_size=batch_size, layer=layer)
    OperatorFolder(panel, banks).save(out)
    typer.echo(f"wrote {len(banks)} operator banks ({m.n_layers} x {m.n_heads} units, G = {len(panel)}) to {out}")


@app.command("screen")
def screen_cmd(
    data_path: Path = typer.Argument(..., help="Cells with stage labels (.h5ad)."),
    operators: Path = typer.Option(..., help="Folder written by export-operators."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
    label_key: str = typer.Option(..., help="obs column with cell-type / stage labels."),
    donor_key: Optional[str] = typer.Option(None), tissue_key: Optional[str] = typer.Option(None),
    kinds: str = typer.Option("attn,qk,ov"), fitters: str = typer.Option("isomap,gmds,let"),
    dag: Optional[Path] = typer.Option(None, help="A stage DAG YAML (default: the shipped hematopoiesis DAG)."),
    gates: Optional[Path] = typer.Option(None, help="Gate YAML (default: the shipped pre-registered gates)."),
    min_cells: int = typer.Option(5), max_cells: Optional[int] = typer.Option(None),
    n_jobs: int = typer.Option(1), seed: int = typer.Option(0), var_key: Optional[str] = typer.Option(None),
    layer: Optional[str] = typer.Option(None), no_drift: bool = typer.Option(False), no_raw: bool = typer.Option(False),
    random_control: int = typer.Option(3, help="Random-weights copies of the model screened as controls for the "
                                       "'learned' gate (0: skip; the gate is then not evaluated)."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint the operators came from, for the random-weights copies "
                                         "(default: the one recorded in the operators' manifest)."),
    device: str = typer.Option("auto", help="Where the random-weights copies' operators are exported: auto (CUDA "
                                            "when present), cpu, cuda or cuda:N."),
    exact: bool = typer.Option(False, "--exact", help="The earlier evaluation path (every gate of both rulers for "
                                                      "every hypothesis, one permutation test at a time, autograd "
                                                      "LET), to check the staged default (docs/screen.md, 'Speed')."),
) -> None:
    """Screen every unit x featurisation x fitter against the developmental ruler, under the gates."""
    from ..anchors import build_anchors
    from ..data import harmonize_gene_ids, read_h5ad
    from ..ontology import StageDAG
    from ..operators import OperatorFolder, export_random_controls, source_model
    from ..screen import row_failed, screen

    if random_control < 0:
        raise SclensError(f"--random-control must be >= 0, got {random_control}")
    banks = OperatorFolder.load(operators, split_list(kinds)).banks
    panel = next(iter(banks.values())).panel
    adata = harmonize_gene_ids(read_h5ad(data_path), var_key=var_key)
    stage_dag = StageDAG.from_yaml(dag) if dag else StageDAG.default()
    anchors = build_anchors(adata, panel, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                            dag=stage_dag, min_cells=min_cells, max_cells=max_cells, layer=layer, seed=seed)
    controls = []
    if random_control:
        from ..models.api import resolve_device

        m, manifest = source_model(banks, model)
        m = m.to(resolve_device(device))
        controls = export_random_controls(m, adata, panel, list(banks), n_copies=random_control,
                                          n_ref_cells=int(manifest.get("n_reference_cells", 256)),
                                          seed=int(manifest.get("seed", 0)), layer=layer)
    rep = screen(banks, anchors, fitters=split_list(fitters), gates_path=gates, seed=seed, n_jobs=n_jobs,
                 cache_dir=out / "cache", include_drift=not no_drift, include_raw=not no_raw, controls=controls,
                 exact=exact)
    rep.save(out, anchors, banks)
    t = rep.top
    lg = rep.info["learned_gate"]
    learned = (f"{lg['n_passing_learned']} pass 'learned' (beat raw and {len(controls)} random-weights copies)"
               if lg["evaluated"] else "the 'learned' gate was not evaluated (--random-control 0)")
    failed = f"; {rep.info['n_failed']} failed (see the 'failure' column)" if rep.info["n_failed"] else ""
    typer.echo(f"{len(rep.table)} hypotheses on {len(anchors)} anchors; {lg['n_passing_published']} pass the published "
               f"gates with the null failing; {learned}; {int(rep.table['passes_all'].sum())} pass every gate{failed}.")
    if not row_failed(t):
        typer.echo(f"Top: {t['featurisation']} L{int(t['layer'])}H{int(t['head'])} {t['fitter']} (resid. Spearman "
                   f"{t['ruler_spearman_resid']:.3f}, trust {t['trustworthiness']:.3f}, p {t['perm_p']:.4g}, "
                   f"margin over raw {t['margin_over_raw']:.3f}, over random {t['margin_over_random']:.3f}, "
                   f"passes {bool(t['passes_all'])}).")
    typer.echo(f"Report: {out}")


def _parse_units(s: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in u.split(",")) for u in s.split(";") if u.strip()]
    except ValueError:
        raise SclensError(f"units must look like 'L,H' or 'L,H;L,H' (got {s!r})") from None


@app.command("extract")
def extract_cmd(
    data_path: Path = typer.Argument(..., help="Labelled training cells (.h5ad)."),
    operators: Path = typer.Option(..., help="Folder written by export-operators."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write."),
    label_key: str = typer.Option(..., help="obs column with cell-type / stage labels."),
    donor_key: Optional[str] = typer.Option(None), tissue_key: Optional[str] = typer.Option(None),
    kind: Optional[str] = typer.Option(None, help="Operator kind (attn / qk / ov); taken from --from-screen if given."),
    unit: Optional[str] = typer.Option(None, help="One unit 'L,H'."),
    pool: Optional[str] = typer.Option(None, help="Several units 'L,H;L,H' averaged."),
    drift: bool = typer.Option(False, help="Use the drift featurisation of the kind."),
    from_screen: Optional[Path] = typer.Option(None, help="Take the top operator hypothesis of this screen report folder."),
    rank: Optional[int] = typer.Option(None, help="Replace the operator by its truncated SVD of this rank."),
    adaptor: str = typer.Option("ruler", help="'ruler' (closed form on all training cells, default), 'cell' "
                                "(trained on stage-balanced cells) or 'let' (anchor-trained)."),
    d: int = typer.Option(10, help="Latent dimension."),
    epochs: Optional[int] = typer.Option(None, help="Adaptor epochs of 'cell' (120) or 'let' (150); 'ruler' has none."),
    holdout_fraction: float = typer.Option(0.2, help="Share of donors held out for the reported metrics."),
    dag: Optional[Path] = typer.Option(None, help="A stage DAG YAML (default: the shipped hematopoiesis DAG)."),
    seed: int = typer.Option(0), var_key: Optional[str] = typer.Option(None), layer: Optional[str] = typer.Option(None),
) -> None:
    """Train adaptor + readouts over a frozen operator and write ONE standalone .safetensors file."""
    from ..data import harmonize_gene_ids, read_h5ad
    from ..extract import extract, select_operator
    from ..ontology import StageDAG
    from ..operators import OperatorFolder

    banks = OperatorFolder.load(operators, [kind] if kind and not from_screen else None).banks
    op = select_operator(banks, unit=_parse_units(unit)[0] if unit else None,
                         pool=_parse_units(pool) if pool else None, drift=drift, kind=kind,
                         report=from_screen, rank=rank)
    adata = harmonize_gene_ids(read_h5ad(data_path), var_key=var_key)
    model = extract(adata, op, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key, adaptor=adaptor,
                    d=d, epochs=epochs, holdout_fraction=holdout_fraction, seed=seed, layer=layer,
                    dag=StageDAG.from_yaml(dag) if dag else None)
    model.save(out)
    typer.echo(model.summary())
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="An extracted .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Print what an extracted-algorithm file holds (after checking its content hash)."""
    from ..extract import ExtractedModel

    model = ExtractedModel.load(path)
    typer.echo(json.dumps(model.manifest, indent=1) if as_json else model.summary())


@app.command("apply")
def apply_cmd(
    artifact: Path = typer.Argument(..., help="An extracted .safetensors file."),
    data_path: Path = typer.Argument(..., help="Cells to apply it to (.h5ad or .zarr; streamed, never modified)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output store (same format as the input)."),
    layer: Optional[str] = typer.Option(None), chunk_size: int = typer.Option(20000, help="Cells per chunk."),
) -> None:
    """Run the standalone algorithm: obs sclens_pseudotime / sclens_branch / sclens_stage, obsm X_sclens."""
    from ..extract import apply_file

    rec = apply_file(artifact, data_path, out, layer=layer, chunk_size=chunk_size)
    typer.echo(f"applied to {rec['n_cells']:,} cells in {rec['seconds']:.1f} s ({rec['cells_per_second']:,.0f} cells/s; "
               f"panel coverage {rec['panel_coverage']:.0%}, input {rec['input_kind']}) -> {out}")


@app.command("validate")
def validate_cmd(
    artifact: Path = typer.Argument(..., help="An extracted .safetensors file (frozen)."),
    data_path: Path = typer.Argument(..., help="An independent labelled dataset (.h5ad)."),
    label_key: str = typer.Option(..., help="obs column with cell-type / stage labels."),
    donor_key: Optional[str] = typer.Option(None), tissue_key: Optional[str] = typer.Option(None),
    replicates: int = typer.Option(1, help="Pseudo-replicate anchors per group (single-source data)."),
    min_cells: int = typer.Option(5), n_perm: int = typer.Option(2000), seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON here."),
    var_key: Optional[str] = typer.Option(None), layer: Optional[str] = typer.Option(None),
) -> None:
    """Zero-shot transfer check: frozen head, anchors rebuilt on new data, ruler vs null statistics."""
    from ..data import harmonize_gene_ids, read_h5ad
    from ..extract import ExtractedModel, validate_transfer
    from ..utils import write_json

    model = ExtractedModel.load(artifact)
    adata = harmonize_gene_ids(read_h5ad(data_path), var_key=var_key)
    rep = validate_transfer(model, adata, label_key=label_key, donor_key=donor_key, tissue_key=tissue_key,
                            replicates=replicates, min_cells=min_cells, n_perm=n_perm, seed=seed, layer=layer)
    typer.echo(rep.summary())
    if out:
        write_json(out, {"artifact": str(artifact), "data": str(data_path), **rep.to_dict()})
        typer.echo(f"report -> {out}")


@app.command("bench")
def bench_cmd(
    data_path: Path = typer.Argument(..., help="Labelled cells (.h5ad) with a donor column."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (bench_<name>.json/.md/.html)."),
    endpoints: Optional[Path] = typer.Option(None, help="TOML file of [[endpoint]] tables (+ settings, [stage_map])."),
    donor_key: Optional[str] = typer.Option(None, help="obs column of donors (needed unless --scheme cells)."),
    label_key: Optional[str] = typer.Option(None, help="obs column of cell-type labels (stages for the extracted adaptor)."),
    binary: List[str] = typer.Option([], help="Binary endpoint on --label-key: 'A|B vs C' (repeatable)."),
    multiclass: List[str] = typer.Option([], help="Multi-class endpoint on this obs column (repeatable)."),
    depth: List[str] = typer.Option([], help="Depth endpoint: a numeric obs column (repeatable)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all that are installed)."),
    scheme: Optional[str] = typer.Option(None, help="shuffle (default), kfold, loo, cells (single source) or source "
                                         "(train on other sources, test on --test-source)."),
    test_source: List[str] = typer.Option([], help="With --scheme source: a value of --donor-key to test on (repeatable)."),
    n_splits: Optional[int] = typer.Option(None, help="Number of splits (default 12; loo: one per donor)."),
    seed: Optional[int] = typer.Option(None), var_key: Optional[str] = typer.Option(None, help="var column with gene ids."),
    operator: Optional[str] = typer.Option(None, help="Extracted operator: 'drift' (default) or 'L<l>H<h>'."),
    scvi_epochs: Optional[int] = typer.Option(None),
    adaptor: Optional[str] = typer.Option(None, help="Extracted adaptor: 'ruler' (default), 'cell' or 'let'."),
    adaptor_epochs: Optional[int] = typer.Option(None, help="Epochs of the 'cell' / 'let' adaptor."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint dir (default: embedded model)."),
    name: Optional[str] = typer.Option(None, help="Campaign name (default: the data file's stem)."),
    layer: Optional[str] = typer.Option(None),
    random_control: Optional[int] = typer.Option(None, help="Random-weights copies behind the extracted_random control "
                                                 "row (default 3; 0 skips it)."),
    device: str = typer.Option("auto", help="Where the frozen model runs (operator export, embeddings): auto (CUDA "
                                            "when present), cpu, cuda or cuda:N."),
) -> None:
    """Donor-holdout benchmark of the extracted algorithm against the usual tools, on any labelled dataset."""
    from ..bench import run_campaign
    from ..data import read_h5ad
    from ..evaluation import bench_config
    from ..models.api import resolve_model

    cfg = bench_config(endpoints, binary=binary, multiclass=multiclass, depth=depth, donor_key=donor_key,
                       label_key=label_key, scheme=scheme, n_splits=n_splits, seed=seed, var_key=var_key,
                       operator=operator, scvi_epochs=scvi_epochs, adaptor=adaptor, adaptor_epochs=adaptor_epochs,
                       methods=split_list(methods) if methods else None, test_sources=list(test_source) or None,
                       random_control=random_control)
    adata = read_h5ad(data_path)
    res = run_campaign(adata, cfg, model=resolve_model(str(model) if model else None, device),
                       name=name or data_path.stem, layer=layer)
    paths = res.save(out)
    typer.echo(res.summary.to_string(index=False, max_colwidth=28,
                                     columns=["endpoint", "metric", "method", "mean", "ci_low", "ci_high", "saturated"]))
    for m, why in res.skipped.items():
        typer.echo(f"skipped {m}: {why}")
    typer.echo(f"panel {res.info['panel_size']} genes; {res.info['n_splits']} splits; report -> {paths['html']}")


@app.command("view")
def view_cmd(
    artifacts: List[Path] = typer.Argument(..., help="One or more extracted .safetensors files (a selector switches)."),
    data: Path = typer.Option(..., help="Labelled cells (.h5ad) to place as anchors and as the cell cloud."),
    out: Path = typer.Option(Path("sclens_viewer.html"), "--out", "-o", help="The self-contained HTML file."),
    label_key: str = typer.Option(..., help="obs column of cell-type labels (mapped to DAG stages)."),
    donor_key: Optional[str] = typer.Option(None), tissue_key: Optional[str] = typer.Option(None),
    contrast: Optional[str] = typer.Option(None, help="Lens contrast 'A | B vs C' (labels or DAG stage names)."),
    cells: int = typer.Option(20_000, help="Cells sampled for the density cloud (0: none)."),
    min_cells: int = typer.Option(5, help="Smallest (donor, tissue, label) group that makes an anchor."),
    seed: int = typer.Option(0), layer: Optional[str] = typer.Option(None),
) -> None:
    """The interactive 3-D manifold viewer of extracted artifacts (opens offline in any browser)."""
    from ..data import read_h5ad
    from ..viz import manifold_3d

    missing = [str(a) for a in artifacts if not a.is_file()]
    if missing:
        raise SclensError(f"artifact file(s) not found: {missing}")
    view = manifold_3d(read_h5ad(data), list(artifacts), label_key=label_key, donor_key=donor_key,
                       tissue_key=tissue_key, contrast=contrast, n_cells=cells, min_cells=min_cells, seed=seed,
                       layer=layer)
    path = view.save(out)
    for v in view.views:
        lens = f"; lens axis {v.lens['axis']} AUROC {v.lens['auroc']:.3f}" if v.lens else ""
        typer.echo(f"{v.name}: {len(v.anchors)} anchors, {len(v.cells):,} cells{lens}")
    typer.echo(f"viewer -> {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A folder of sclens outputs (a demo run, screen/, bench/, compress/, viewer)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: RUN_DIR/sclens_report.html)."),
    title: Optional[str] = typer.Option(None),
) -> None:
    """One offline HTML page gathering every stage found in RUN_DIR (+ its JSON index and PNG figures)."""
    from ..report import build_report

    path = build_report(run_dir, out, title=title)
    index = json.loads(path.with_suffix(".json").read_text())
    typer.echo("sections: " + ", ".join(s["title"] for s in index["sections"]))
    for m in index["missing"]:
        typer.echo(f"not in this run: {m}")
    typer.echo(f"report -> {path}")


@app.command("compress")
def compress_cmd(
    data_path: Path = typer.Argument(..., help="Labelled cells (.h5ad) with a donor column."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (compress_<name>.json/.md/.html + artifacts/)."),
    endpoints: Path = typer.Option(..., help="TOML endpoint file, as for `sclens bench` (donor/label columns, splits)."),
    report: Optional[Path] = typer.Option(None, help="Screen report folder: its top unit is the single head."),
    unit: Optional[str] = typer.Option(None, help="The single head 'L<l>H<h>' (instead of --report)."),
    unit_kind: Optional[str] = typer.Option(None, help="Operator kind of the single head (attn, qk, ov; default ov)."),
    artifact: Optional[Path] = typer.Option(None, help="Extracted .safetensors whose (pooled / drift) operator and "
                                                       "panel are the reference (default: the model's ov drift)."),
    ranks: str = typer.Option("64,32,16,8", help="SVD ranks, comma-separated."),
    audit_rank: int = typer.Option(64, help="The rank whose factors are audited and sparsified."),
    sparse_factors: int = typer.Option(16), sparse_genes: int = typer.Option(50),
    core_size: int = typer.Option(4), program_genes: int = typer.Option(25),
    model: Optional[Path] = typer.Option(None, help="Checkpoint dir (default: embedded model)."),
    name: Optional[str] = typer.Option(None, help="Report name (default: the data file's stem)."),
    layer: Optional[str] = typer.Option(None),
) -> None:
    """Compaction ladder (single head, SVD ranks, sparse), factor audit and gene programs, with a report."""
    from ..bench import read_bench_config
    from ..compress import CompressConfig, compaction_table, compress
    from ..data import read_h5ad

    try:
        rank_list = tuple(int(r) for r in split_list(ranks))
    except ValueError:
        raise SclensError(f"--ranks must be integers separated by commas, got {ranks!r}") from None
    cfg = read_bench_config(endpoints)
    cc = CompressConfig(single_head=unit, single_head_kind=unit_kind, ranks=rank_list,
                        audit_rank=audit_rank, sparse_factors=sparse_factors, sparse_genes=sparse_genes,
                        core_size=core_size, program_genes=program_genes)
    nm = name or data_path.stem
    res = compress(read_h5ad(data_path), cfg, cc, model=str(model) if model else None, report=report,
                   artifact=artifact, name=nm, layer=layer, artifact_dir=out / "artifacts")
    paths = res.save(out)
    t = compaction_table(res)
    typer.echo(t[["variant", "file_bytes", "operator_bytes", "significant losses vs previous"]].to_string(index=False))
    typer.echo("top-k share of factor impact: " + ", ".join(f"{k}: {v:.3f}" for k, v in res.shares.items()))
    for c in res.cards[:8]:
        typer.echo(f"factor {c['factor']} (impact #{c['rank_by_impact']}): {c['label']}")
    typer.echo(f"report -> {paths['html']}")

