"""``sclens circuits``: the cell-sentence LM, transcoders, attribution graphs and the SAE atlas."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SclensError
from .common import Group, app, split_list

circuits_app = typer.Typer(cls=Group, no_args_is_help=True, help="Cell-sentence LM, transcoders, attribution graphs, SAE atlas.")
app.add_typer(circuits_app, name="circuits")


def _tc_config(config: Optional[Path], **overrides):
    from ..circuits.transcoders import TranscoderConfig, read_transcoder_config

    base = read_transcoder_config(config) if config else TranscoderConfig()
    fields = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    return TranscoderConfig.from_dict(fields)


def _layers_opt(s: Optional[str]) -> Optional[list[int]]:
    if not s:
        return None
    try:
        return [int(x) for x in split_list(s)]
    except ValueError:
        raise SclensError(f"--layers must be integers separated by commas, got {s!r}") from None


@circuits_app.command("pretrain")
def circuits_pretrain(
    data_path: Path = typer.Argument(..., help="Cells (.h5ad, counts or log data) with a cell-type column."),
    label_key: str = typer.Option(..., help="obs column of the cell type to predict."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (config.json + model.safetensors)."),
    steps: int = typer.Option(2500), top_k: int = typer.Option(100, help="Genes per cell sentence."),
    d_model: int = typer.Option(128), layers: int = typer.Option(4), heads: int = typer.Option(4),
    d_mlp: int = typer.Option(512), batch_size: int = typer.Option(32), lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0), var_key: Optional[str] = typer.Option(None), layer: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto", help="Where training runs: auto (CUDA when present), cpu, cuda or cuda:N "
                                            "(the model is saved from the CPU)."),
) -> None:
    """Train a gene-level cell-sentence GPT-NeoX from scratch (task: the cell type after the sentence)."""
    from ..circuits.lm import CellLMConfig
    from ..circuits.lm_training import train_cell_lm
    from ..data import read_h5ad

    cfg = CellLMConfig(d_model=d_model, n_layers=layers, n_heads=heads, d_mlp=d_mlp, top_k=top_k, steps=steps,
                       batch_size=batch_size, lr=lr, seed=seed, device=device)
    res = train_cell_lm(read_h5ad(data_path), label_key, cfg, out_dir=out, var_key=var_key, layer=layer)
    f = res.log["final"]
    typer.echo(f"wrote {out}: held-out cell-type accuracy {f['val_accuracy']:.3f}, next-gene CE "
               f"{f['val_gene_ce']:.3f} ({res.log['n_params']:,} parameters)")


@circuits_app.command("transcoders")
def circuits_transcoders(
    data_path: Path = typer.Argument(..., help="Cells (.h5ad) with a cell-type column."),
    label_key: str = typer.Option(..., help="obs column of the cell type (must match the model's labels)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
    model: Optional[Path] = typer.Option(None, help="Cell-sentence model folder (default: the embedded one)."),
    config: Optional[Path] = typer.Option(None, help="TOML of TranscoderConfig fields ([transcoder] table)."),
    layers: Optional[str] = typer.Option(None, help="MLP layers, comma-separated (default: all)."),
    kind: Optional[str] = typer.Option(None, help="topk or l1."), k: Optional[int] = typer.Option(None),
    expansion: Optional[int] = typer.Option(None), epochs: Optional[int] = typer.Option(None),
    decisions: Optional[str] = typer.Option(None, help="Cell types whose decisions are traced, comma-separated "
                                                       "(default: monocytes and nk where the model has them)."),
    n_sample: int = typer.Option(20, help="Random features sampled for the interpretable fraction."),
    seed: int = typer.Option(0), var_key: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto", help="Where the model's forward passes run: auto (CUDA when present), cpu, "
                                            "cuda or cuda:N (transcoders train and decisions are traced on the CPU)."),
) -> None:
    """Transcoders on every MLP layer, feature interpretation and traced decisions, with a report."""
    from ..circuits.pipeline import run_circuits
    from ..circuits.transcoders import transcoder_table
    from ..data import read_h5ad

    cfg = _tc_config(config, kind=kind, k=k, expansion=expansion, epochs=epochs, seed=seed)
    res = run_circuits(read_h5ad(data_path), label_key, model=str(model) if model else None, config=cfg,
                       layers=_layers_opt(layers), decisions=split_list(decisions) if decisions else None,
                       n_sample=n_sample, seed=seed, var_key=var_key, device=device)
    paths = res.save(out)
    for r in transcoder_table(res.transcoders):
        typer.echo(f"L{r['layer']}: L0 {r['l0']:.1f}, FVU {r['fvu']:.3f}, dead {r['dead_fraction']:.3f}")
    s = res.sample
    typer.echo(f"interpretable: {s['n_interpretable']} of {s['n_sampled']} sampled features")
    typer.echo(f"report -> {paths['report_html']}")


@circuits_app.command("trace")
def circuits_trace(
    genes: str = typer.Argument(..., help="The cell sentence: gene symbols, highest expression first, comma-separated."),
    label: str = typer.Option(..., help="The cell type whose decision is traced."),
    transcoders: Path = typer.Option(..., help="Folder with transcoders.json (from `sclens circuits transcoders`)."),
    out: Path = typer.Option(..., "--out", "-o"), model: Optional[Path] = typer.Option(None),
    max_nodes: int = typer.Option(24),
) -> None:
    """Trace the top computational subgraph of one decision for one cell sentence (JSON + PNG)."""
    from ..circuits.attribution import trace_circuit
    from ..circuits.lm import resolve_cell_lm
    from ..circuits.transcoders import TranscoderSet

    m = resolve_cell_lm(str(model) if model else None)
    ts = TranscoderSet.load(transcoders)
    g = trace_circuit(m, ts.transcoders, [x.upper() for x in split_list(genes)], label, max_nodes=max_nodes)
    paths = g.save(out)
    typer.echo(f"predicted {g.target['predicted']}; {g.scores['nodes']} nodes, {g.scores['edges']} edges -> "
               f"{paths['json']}")


@circuits_app.command("sae")
def circuits_sae(
    data_path: Path = typer.Argument(..., help="Cells (.h5ad) for the scGPT-architecture model."),
    out: Path = typer.Option(..., "--out", "-o"),
    label_key: Optional[str] = typer.Option(None, help="obs column for cell-type specificity."),
    model: Optional[Path] = typer.Option(None, help="scGPT checkpoint folder (default: the embedded model)."),
    layers: Optional[str] = typer.Option(None), k: int = typer.Option(16), expansion: int = typer.Option(4),
    epochs: int = typer.Option(4), max_tokens: int = typer.Option(100_000), max_len: int = typer.Option(256),
    seed: int = typer.Option(0), var_key: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto", help="Where the model's forward passes run: auto (CUDA when present), cpu, "
                                            "cuda or cuda:N (the SAEs train on the CPU)."),
) -> None:
    """TopK SAEs on the residual stream of every layer of an scGPT model: the feature atlas (JSON + HTML)."""
    from ..circuits.sae import train_sae_atlas
    from ..circuits.transcoders import TranscoderConfig
    from ..data import read_h5ad
    from ..models.api import resolve_model

    cfg = TranscoderConfig(kind="topk", k=k, expansion=expansion, epochs=epochs, max_tokens=max_tokens, seed=seed)
    m = resolve_model(str(model) if model else None, device)
    atlas = train_sae_atlas(read_h5ad(data_path), label_key, model=m, config=cfg,
                            layers=_layers_opt(layers), max_len=max_len, var_key=var_key)
    paths = atlas.save(out)
    typer.echo(atlas.summary().to_string(index=False))
    typer.echo(f"atlas -> {paths['html']}")
