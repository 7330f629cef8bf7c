"""Extraction: a frozen operator, a small adaptor and readouts, shipped as ONE standalone ``.safetensors`` file.

Three stages (DESIGN "Extraction"):

1. **Operator** (:func:`select_operator`): one unit's G x G operator, a weighted pool of units, or the drift
   pair ``[A_early − A_mid, A_mid − A_late]`` taken from an :class:`~sclens.operators.OperatorBank` (or the
   top operator hypothesis of a :class:`~sclens.screen.ScreenReport`); optionally replaced by its truncated
   SVD (``rank``), stored as factors ``left = U_r S_r`` [G, r] and ``right = V_rᵀ`` [r, G].
2. **Adaptor** ``z = ((f − mean) / scale) · Wᵀ + c`` with ``f`` the operator features and d = 10.
   ``adaptor="ruler"`` (the default, :func:`fit_ruler_adaptor`) is closed form on all training cells: features
   centred and divided by one global scale, the stages placed on a sphere whose angles fit the DAG ruler, every
   cell regressed onto its stage's point (ridge on the top 100 PCs), the remaining dimensions filled with the
   top PCs of what the regression left (under 2 s on a Kang split; chosen by measurement over the trained
   adaptor, which lost CD4/CD8 accuracy to PCA-10: docs/extract.md). ``adaptor="let"`` is the anchor-trained
   LET of the screen; ``adaptor="cell"`` (the earlier default) is trained on stage-balanced cells (≤ 500 per stage, 120 epochs, batch 896) with
   ``1.0·L_stage + 0.1·L_local + 0.08·L_recon + 0.4·L_cls``, where (our choices; the papers leave them open)

   * ``L_stage``: LET's ruler fit on every pair of the batch, ``mean (β·arccos cos(z_i, z_j) − ruler_ij)²``;
   * ``L_local``: neighbourhood preservation, ``mean_i d̂(i, n_i)² / mean_{i<j} d̂(i, j)²`` for one random
     feature-space kNN neighbour ``n_i`` (k = 15) of each cell: neighbours must be closer than the batch spread;
   * ``L_recon``: tied-weight reconstruction ``mean ‖Wᵀz + b − f̃‖²`` of the standardised features ``f̃``;
   * ``L_cls``: cross-entropy of a linear stage classifier on ``z`` (used for training only; the shipped
     readouts are fitted in stage 3).
3. **Readouts** on ``z``: multinomial logistic probes for branch and stage, binary probes CD4 vs CD8 and
   monocyte vs macrophage where the training labels hold both classes, and pseudotime = linear regression
   of stage depth (hops from HSC) on ``z``.

Everything is linear up to the readouts, so at apply time operator, standardisation and encoder are folded
into one G x d matrix (computed once in float64 at load; ``fold=False`` runs the explicit chain). Apply
streams over cells in chunks from memory, backed ``.h5ad``, ``.zarr`` or a Dask array.

File format (``FORMAT_VERSION`` 1): tensors ``operator.{i}.dense`` or ``operator.{i}.left/right``,
``adaptor.{mean,scale,weight,bias,beta}``, ``readout.{name}.{coef,intercept}``; metadata ``format``,
``format_version``, ``manifest`` (JSON: panel, normalisation, DAG, label vocabularies, metrics, seeds,
versions, input hashes) and ``content_sha256`` (sha256 over the manifest and every tensor), checked at load.
Loading parses safetensors and JSON only: it never executes code.

Modules: :mod:`.selection` (stage 1), :mod:`.adaptor` (stage 2), :mod:`.readouts` (stage 3), :mod:`.artifact`
(the file), :mod:`.panel` (the panel in a user's data), :mod:`.pipeline` (``extract``, ``validate_transfer``),
:mod:`.streaming` (``apply``, ``apply_dask``, ``apply_file``). Every public name is importable from here.
"""

from __future__ import annotations

from .adaptor import (ADAPTORS, LOSS_WEIGHTS, RULER_PC_WEIGHT, Adaptor, fit_let_adaptor, fit_ruler_adaptor,
                      sphere_ruler_targets, stage_balanced_indices, train_cell_adaptor)
from .artifact import FORMAT, FORMAT_VERSION, ExtractedModel, content_hash, load
from .panel import head_rows, head_value_kind, panel_index, panel_rows
from .pipeline import TransferReport, cell_metrics, extract, validate_transfer
from .readouts import PROBES, Readout, fit_classifier, fit_pseudotime, probe_labels
from .selection import Operator, OperatorBlock, screen_table, select_operator
from .streaming import OBS_KEYS, OBSM_LATENT, apply, apply_dask, apply_file

__all__ = ["ADAPTORS", "FORMAT", "FORMAT_VERSION", "LOSS_WEIGHTS", "OBSM_LATENT", "OBS_KEYS", "PROBES",
           "RULER_PC_WEIGHT", "Adaptor", "ExtractedModel", "Operator", "OperatorBlock", "Readout", "TransferReport",
           "apply", "apply_dask", "apply_file", "cell_metrics", "content_hash", "extract", "fit_classifier",
           "fit_let_adaptor", "fit_pseudotime", "fit_ruler_adaptor", "head_rows", "head_value_kind", "load",
           "panel_index", "panel_rows", "probe_labels", "screen_table", "select_operator", "sphere_ruler_targets",
           "stage_balanced_indices", "train_cell_adaptor", "validate_transfer"]
