"""The extracted model as ONE standalone ``.safetensors`` file: format, content hash, save and load."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import GenePanel
from ..errors import ArtifactError
from ..ontology import StageDAG
from ..utils import atomic_write, json_default
from .adaptor import Adaptor
from .selection import Operator, OperatorBlock
from .readouts import Readout


FORMAT = "sclens.extracted"


FORMAT_VERSION = 1


@dataclass
class ExtractedModel:
    """The standalone algorithm: operator → adaptor → readouts, with its manifest."""

    operator: Operator
    adaptor: Adaptor
    readouts: dict[str, Readout]
    manifest: dict = field(default_factory=dict)
    _folded: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def panel(self) -> GenePanel:
        return self.operator.panel

    @property
    def content_sha256(self) -> str | None:
        return self.manifest.get("content_sha256")

    def n_trainable(self) -> dict[str, int]:
        out = {"adaptor": int(self.adaptor.info.get("n_trainable", self.adaptor.weight.size + self.adaptor.bias.size))}
        out.update({f"readout.{k}": r.n_trainable for k, r in self.readouts.items()})
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ compute
    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(M [G, d], c [d])`` with ``z = x · M + c``: operator, standardisation and encoder in one matrix."""
        if self._folded is None:
            a = self.adaptor
            Ws = a.weight.astype(np.float64) / a.scale.astype(np.float64)[None, :]  # [d, F]
            G = len(self.panel)
            M = sum(blk.times(Ws[:, i * G : (i + 1) * G].T) for i, blk in enumerate(self.operator.blocks))
            c = a.bias.astype(np.float64) - Ws @ a.mean.astype(np.float64)
            self._folded = (np.ascontiguousarray(M, dtype=np.float32), c.astype(np.float32))
        return self._folded

    def latent(self, x: np.ndarray, fold: bool = True) -> np.ndarray:
        """``z`` for panel vectors ``x`` [n, G] (log1p-normalised, panel order)."""
        if not fold:
            return self.adaptor.transform(self.operator.features(x))
        M, c = self.folded()
        return np.asarray(x, dtype=np.float32) @ M + c

    def predict(self, x: np.ndarray, fold: bool = True) -> dict[str, np.ndarray]:
        """Every output for panel vectors ``x``: latent, pseudotime, branch / stage probabilities, probe scores."""
        Z = self.latent(x, fold)
        out = {"latent": Z}
        for name, r in self.readouts.items():
            out[name] = r.predict(Z) if r.kind == "regressor" else r.predict_proba(Z)
        return out

    def output_columns(self) -> list[tuple[str, int]]:
        """Layout of :meth:`predict_packed`: (name, width) in order."""
        cols = [("latent", self.adaptor.d)]
        for name, r in self.readouts.items():
            cols.append((name, 1 if r.kind == "regressor" else len(r.classes)))
        return cols

    def predict_packed(self, x: np.ndarray, fold: bool = True) -> np.ndarray:
        """:meth:`predict` as one float32 block [n, sum of widths] (for Dask and on-disk streaming)."""
        res = self.predict(x, fold)
        return np.concatenate([np.asarray(res[n], dtype=np.float32).reshape(len(x), w) for n, w in self.output_columns()],
                              axis=1)

    def unpack(self, P: np.ndarray) -> dict[str, np.ndarray]:
        out, s = {}, 0
        for name, w in self.output_columns():
            out[name] = P[:, s] if name in self.readouts and self.readouts[name].kind == "regressor" else P[:, s : s + w]
            s += w
        return out

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, np.ndarray]:
        t: dict[str, np.ndarray] = {}
        for i, blk in enumerate(self.operator.blocks):
            if blk.dense is not None:
                t[f"operator.{i}.dense"] = blk.dense
            elif blk.sparse:
                t.update(blk.sparse_tensors(f"operator.{i}"))
            else:
                t[f"operator.{i}.left"], t[f"operator.{i}.right"] = blk.left, blk.right
        a = self.adaptor
        t.update({"adaptor.mean": a.mean, "adaptor.scale": a.scale, "adaptor.weight": a.weight, "adaptor.bias": a.bias,
                  "adaptor.beta": np.array([a.beta], dtype=np.float32)})
        for name, r in self.readouts.items():
            t[f"readout.{name}.coef"], t[f"readout.{name}.intercept"] = r.coef, r.intercept
        return {k: np.ascontiguousarray(v, dtype=np.int32 if k.endswith("_idx") else np.float32) for k, v in t.items()}

    def _structure(self) -> dict:
        return {"operator": {"source": self.operator.source, "n_blocks": len(self.operator.blocks),
                             "rank": self.operator.rank, "sparse": bool(self.operator.blocks[0].sparse),
                             "panel": self.panel.to_dict()},
                "adaptor": {"kind": self.adaptor.kind, "d": self.adaptor.d, "info": self.adaptor.info},
                "readouts": {k: {"kind": r.kind, "classes": r.classes, "info": r.info} for k, r in self.readouts.items()}}

    def save(self, path: str | Path) -> Path:
        """Write the single ``.safetensors`` file atomically; returns its path."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = self.tensors()
        manifest = {k: v for k, v in self.manifest.items() if k not in ("content_sha256", "structure")}
        manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "structure": self._structure(),
                         "n_trainable": self.n_trainable(), "operator_values": self.operator.n_values})
        manifest_json = json.dumps(manifest, sort_keys=True, default=json_default)
        digest = content_hash(manifest_json, tensors)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "manifest": manifest_json, "content_sha256": digest}
        atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
        self.manifest = {**json.loads(manifest_json), "content_sha256": digest}
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExtractedModel":
        """Read and verify a file written by :meth:`save` (safetensors + JSON only; no code runs)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no such file: {path}")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a readable .safetensors file (corrupt or truncated?): {exc}") from None
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not an sclens extracted algorithm (format {meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            raise ArtifactError(f"{path} has an unreadable format version {meta.get('format_version')!r}") from None
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{path} was written in format version {version} by a newer sclens; this sclens "
                                f"({__version__}) reads format versions up to {FORMAT_VERSION}. Upgrade sclens.")
        if content_hash(meta.get("manifest", ""), tensors) != meta.get("content_sha256"):
            raise ArtifactError(f"{path} failed its content check: the file was changed after it was written "
                                "(or is corrupt); refusing to load it")
        manifest = json.loads(meta["manifest"])
        manifest["content_sha256"] = meta["content_sha256"]
        st = manifest["structure"]
        panel = GenePanel.from_dict(st["operator"]["panel"])
        blocks = []
        for i in range(st["operator"]["n_blocks"]):
            if f"operator.{i}.dense" in tensors:
                blocks.append(OperatorBlock(dense=tensors[f"operator.{i}.dense"]))
            elif f"operator.{i}.read_idx" in tensors:
                blocks.append(OperatorBlock.from_sparse_tensors(tensors, f"operator.{i}", len(panel)))
            else:
                blocks.append(OperatorBlock(left=tensors[f"operator.{i}.left"], right=tensors[f"operator.{i}.right"]))
        op = Operator(blocks, panel, st["operator"]["source"])
        a = st["adaptor"]
        adaptor = Adaptor(a["kind"], tensors["adaptor.mean"], tensors["adaptor.scale"], tensors["adaptor.weight"],
                          tensors["adaptor.bias"], float(tensors["adaptor.beta"][0]), a["info"])
        readouts = {name: Readout(name, r["kind"], tensors[f"readout.{name}.coef"], tensors[f"readout.{name}.intercept"],
                                  r["classes"], r["info"]) for name, r in st["readouts"].items()}
        return cls(op, adaptor, readouts, manifest)

    @property
    def dag(self) -> StageDAG:
        spec = self.manifest.get("dag")
        return StageDAG(spec) if spec else StageDAG.default()

    def summary(self) -> str:
        m = self.manifest
        nt = self.n_trainable()
        lines = [
            f"sclens extracted algorithm (format {m.get('format_version', FORMAT_VERSION)}, sclens {m.get('sclens_version')})",
            f"  content sha256: {self.content_sha256}",
            f"  operator: {self.operator.describe()} ({self.operator.n_values:,} stored values, frozen)",
            f"  panel: {len(self.panel)} genes ({self.panel.flavor}), e.g. {', '.join(self.panel.genes[:6])}; "
            f"input {self.panel.to_dict()['normalization']}",
            f"  adaptor: {self.adaptor.kind}, d = {self.adaptor.d}, {nt['adaptor']:,} trainable parameters",
        ]
        for name, r in self.readouts.items():
            what = f"{len(r.classes)} classes ({', '.join(r.classes[:6])}{', ...' if len(r.classes) > 6 else ''})" \
                if r.kind == "classifier" else r.info.get("target", "regression")
            lines.append(f"  readout {name}: {r.kind}, {r.n_trainable} parameters, {what}")
        lines.append(f"  trainable parameters in total: {nt['total']:,}")
        if m.get("synthetic"):
            lines.append("  trained on SYNTHETIC data")
        for split, vals in (m.get("metrics") or {}).items():
            if isinstance(vals, dict):
                shown = {k: v for k, v in vals.items() if isinstance(v, float) and not k.endswith(("_n", "_sha256"))}
                lines.append(f"  metrics ({split}, {vals.get('n_cells', vals.get('n_anchors', '?'))} "
                             f"{'cells' if 'n_cells' in vals else 'anchors'}): "
                             + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        lines.append(f"  seeds: {m.get('seeds')}; inputs: {m.get('input_hashes')}")
        return "\n".join(lines)


def content_hash(manifest_json: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load(path: str | Path) -> ExtractedModel:
    """Load an extracted algorithm file (see :meth:`ExtractedModel.load`)."""
    return ExtractedModel.load(path)
