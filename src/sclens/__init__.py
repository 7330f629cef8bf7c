"""sclens: open single-cell foundation models and turn what their attention heads learned into small,
standalone, benchmarked algorithms.

The calls a user makes from Python (each returns a result object with ``save`` / ``load``; AnnData in, results in
``.obs`` / ``.obsm`` as in scanpy)::

    import sclens as sl

    model = sl.load_model("path/to/scgpt_or_geneformer")        # or sl.load_default_model()
    sl.embed_cells(adata, model)                                 # obsm["X_scgpt"] / obsm["X_geneformer"]
    panel = sl.select_panel(adata, model.vocab.genes)
    banks = sl.export_operators(model, adata, panel)             # {kind: OperatorBank}; OperatorFolder saves them
    anchors = sl.build_anchors(adata, panel, label_key="cell_type", donor_key="donor")
    report = sl.run_screen(banks, anchors)                       # ScreenReport
    op = sl.select_operator(banks, report=report)
    art = sl.extract_algorithm(adata, op, label_key="cell_type", donor_key="donor")   # ExtractedModel
    art.save("method.safetensors"); sl.apply(new_adata, "method.safetensors")
    result = sl.run_campaign(adata, sl.read_bench_config("endpoints.toml"))   # BenchResult

Everything else lives in the stage modules (``sclens.data``, ``models``, ``operators``, ``anchors``, ``screen``,
``extract``, ``evaluation``, ``bench``, ``compress``, ``circuits``); see ``docs/architecture.md``.
Names are imported on first use, so ``import sclens`` stays light. The stage functions whose names are also module
names are exported under verbs (``run_screen`` = ``sclens.screen.screen``, ``extract_algorithm`` =
``sclens.extract.extract``, ``run_compress`` = ``sclens.compress.compress``), so ``sclens.screen`` stays the module.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sclens")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

from .errors import CheckpointError, InputError, SclensError  # noqa: E402

_FRONT_DOOR = {
    "load_model": "sclens.models.api", "load_default_model": "sclens.models", "embed_cells": "sclens.models.api",
    "harmonize_gene_ids": "sclens.data", "select_panel": "sclens.data", "read_h5ad": "sclens.data",
    "export_operators": "sclens.operators", "OperatorFolder": "sclens.operators",
    "build_anchors": "sclens.anchors", "run_screen": "sclens.screen:screen", "ScreenReport": "sclens.screen",
    "select_operator": "sclens.extract", "extract_algorithm": "sclens.extract:extract", "apply": "sclens.extract",
    "ExtractedModel": "sclens.extract", "read_bench_config": "sclens.evaluation", "run_campaign": "sclens.bench",
    "BenchResult": "sclens.bench", "run_compress": "sclens.compress:compress",
}

__all__ = ["__version__", "SclensError", "InputError", "CheckpointError", *_FRONT_DOOR]


def __getattr__(name: str):
    """The front door's names, imported from their stage module on first use (PEP 562)."""
    if name in _FRONT_DOOR:
        module, _, attr = _FRONT_DOOR[name].partition(":")
        value = getattr(import_module(module), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sclens' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FRONT_DOOR))
