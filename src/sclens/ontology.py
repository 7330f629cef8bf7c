"""The hematopoietic stage DAG: label mapping, developmental ruler, depth, and the null ruler.

The default DAG ships as data (``resources/hematopoiesis.yaml``): 36 stages from HSC to mature types in 7
branches, each with synonyms covering Cell Ontology / Tabula Sapiens names, CellTypist names and common
PBMC labels. ``ruler(a, b)`` is the undirected hop distance between stages; ``depth(s)`` is the hop
distance from the root (HSC). A user can pass their own YAML of the same shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import yaml
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from .errors import InputError, preview


def normalize_label(label: str) -> str:
    """Case-insensitive key: collapse whitespace, '_', '-', '/', '.', ',' to single spaces."""
    return re.sub(r"[\s_\-/.,]+", " ", str(label).lower()).strip()


@dataclass
class LabelMapping:
    """Result of mapping free-text labels onto stages. ``unmapped`` lists labels with no stage (and counts)."""

    stage: pd.Series  # per cell: stage name or NaN
    unmapped: dict[str, int] = field(default_factory=dict)

    @property
    def n_unmapped_cells(self) -> int:
        return int(sum(self.unmapped.values()))

    def summary(self) -> str:
        if not self.unmapped:
            return f"all {len(self.stage)} cells mapped to stages"
        return (f"{self.n_unmapped_cells} of {len(self.stage)} cells have labels with no stage: "
                + ", ".join(f"{k!r} ({v})" for k, v in sorted(self.unmapped.items(), key=lambda kv: -kv[1])))


class StageDAG:
    """A developmental stage DAG with branches and synonyms."""

    def __init__(self, spec: Mapping):
        import copy

        self.spec = copy.deepcopy(dict(spec)) if isinstance(spec, Mapping) else spec  # embedded in artifacts
        try:
            stages = spec["stages"]
            self.root: str = spec["root"]
            self.branch_labels: dict[str, str] = dict(spec.get("branches", {}))
        except (KeyError, TypeError) as exc:
            raise InputError(f"a stage DAG needs 'root' and 'stages' (missing {exc})") from None
        self.name = spec.get("name", "custom")
        self.stages: list[str] = list(stages)
        self.branch: dict[str, str] = {}
        self.parents: dict[str, list[str]] = {}
        synonyms: dict[str, str] = {}
        for s, info in stages.items():
            info = info or {}
            self.branch[s] = info.get("branch", "unassigned")
            if self.branch_labels and self.branch[s] not in self.branch_labels:
                raise InputError(f"stage {s!r} has branch {self.branch[s]!r}, not one of {list(self.branch_labels)}")
            self.parents[s] = list(info.get("parents", []))
            for syn in [s, *info.get("synonyms", [])]:
                key = normalize_label(syn)
                if key in synonyms and synonyms[key] != s:
                    raise InputError(f"synonym {syn!r} is claimed by both {synonyms[key]!r} and {s!r}")
                synonyms[key] = s
        self.synonyms = synonyms
        if self.root not in self.branch:
            raise InputError(f"root {self.root!r} is not a stage")
        for s, ps in self.parents.items():
            bad = [p for p in ps if p not in self.branch]
            if bad:
                raise InputError(f"stage {s!r} lists unknown parent(s) {bad}")
        self._check_acyclic()
        unreachable = [s for s, d in zip(self.stages, self.ruler_matrix[self.index[self.root]]) if not np.isfinite(d)]
        if unreachable:
            raise InputError(f"stages not connected to the root {self.root!r}: {unreachable}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> "StageDAG":
        return cls.from_yaml(files("sclens").joinpath("resources/hematopoiesis.yaml"))

    @classmethod
    def from_yaml(cls, path) -> "StageDAG":
        try:
            text = Path(path).read_text() if not hasattr(path, "read_text") else path.read_text()
        except FileNotFoundError:
            raise InputError(f"no stage DAG file at {path}") from None
        try:
            return cls(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise InputError(f"{path} is not valid YAML: {exc}") from None

    def _check_acyclic(self) -> None:
        state: dict[str, int] = {}

        def visit(s: str, path: list[str]) -> None:
            if state.get(s) == 1:
                raise InputError(f"the stage graph has a cycle: {' -> '.join(path + [s])}")
            if state.get(s) == 2:
                return
            state[s] = 1
            for p in self.parents[s]:
                visit(p, path + [s])
            state[s] = 2

        for s in self.stages:
            visit(s, [])

    # ------------------------------------------------------------------ structure
    @cached_property
    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.stages)}

    @cached_property
    def children(self) -> dict[str, list[str]]:
        ch: dict[str, list[str]] = {s: [] for s in self.stages}
        for s, ps in self.parents.items():
            for p in ps:
                ch[p].append(s)
        return ch

    @cached_property
    def ruler_matrix(self) -> np.ndarray:
        """Undirected hop distance between every pair of stages [n_stages, n_stages]."""
        n = len(self.stages)
        rows, cols = [], []
        for s, ps in self.parents.items():
            for p in ps:
                rows += [self.index[s], self.index[p]]
                cols += [self.index[p], self.index[s]]
        A = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
        return shortest_path(A, directed=False, unweighted=True)

    def ruler(self, a: str, b: str) -> float:
        return float(self.ruler_matrix[self.index[a], self.index[b]])

    def depth(self, stage: str) -> float:
        return self.ruler(self.root, stage)

    @property
    def depths(self) -> dict[str, float]:
        return {s: self.depth(s) for s in self.stages}

    @property
    def branches(self) -> list[str]:
        return list(dict.fromkeys(self.branch[s] for s in self.stages))

    def leaves(self) -> list[str]:
        return [s for s in self.stages if not self.children[s]]

    def null_ruler_matrix(self, seed: int = 0) -> tuple[np.ndarray, dict[str, str]]:
        """Ruler after shuffling stage labels within each branch (keeps branch structure, breaks ordering)."""
        rng = np.random.default_rng(seed)
        perm: dict[str, str] = {}
        for b in self.branches:
            members = [s for s in self.stages if self.branch[s] == b]
            shuffled = list(rng.permutation(members)) if len(members) > 1 else members
            perm.update(dict(zip(members, shuffled)))
        idx = np.array([self.index[perm[s]] for s in self.stages])
        return self.ruler_matrix[np.ix_(idx, idx)], perm

    # ------------------------------------------------------------------ labels
    def lookup(self, label: str) -> str | None:
        return self.synonyms.get(normalize_label(label))

    def map_labels(self, labels: Iterable[str]) -> LabelMapping:
        """Map free-text cell-type labels to stages; unmapped labels are reported with their cell counts."""
        labels = pd.Series(list(labels), dtype="object")
        uniq = labels.dropna().unique()
        table = {u: self.lookup(u) for u in uniq}
        stage = labels.map(table)
        unmapped_counts = labels[stage.isna() & labels.notna()].value_counts()
        return LabelMapping(stage=stage, unmapped={str(k): int(v) for k, v in unmapped_counts.items()})

    def annotate(self, adata, label_key: str, *, prefix: str = "sclens_", copy: bool = False):
        """Write ``obs['sclens_stage']``, ``sclens_branch`` and ``sclens_depth`` from a label column."""
        from .data import require_obs_columns

        require_obs_columns(adata, [label_key])
        out = adata.copy() if copy else adata
        m = self.map_labels(out.obs[label_key].astype(str))
        out.obs[f"{prefix}stage"] = pd.Categorical(m.stage.values, categories=self.stages)
        out.obs[f"{prefix}branch"] = pd.Categorical(m.stage.map(self.branch).values, categories=self.branches)
        out.obs[f"{prefix}depth"] = m.stage.map(self.depths).astype(float).values
        out.uns[f"{prefix}label_mapping"] = {"label_key": label_key, "dag": self.name, "unmapped": m.unmapped}
        return out if copy else m

    def __repr__(self) -> str:
        return f"StageDAG({self.name!r}: {len(self.stages)} stages, {len(self.branches)} branches, root {self.root!r})"


def check_labels(dag: StageDAG, labels: Iterable[str]) -> LabelMapping:
    """Map labels and raise if none maps (a sign of the wrong column)."""
    m = dag.map_labels(labels)
    if m.stage.notna().sum() == 0:
        raise InputError(f"no label maps to a stage of {dag.name!r}; labels seen: {preview(m.unmapped)}")
    return m


def parse_label_groups(spec: str) -> tuple[list[str], list[str]]:
    """``"CD4 T | Treg vs CD8 T"`` -> (``["CD4 T", "Treg"]``, ``["CD8 T"]``): two label groups, '|' between labels."""
    if " vs " not in spec:
        raise InputError(f"{spec!r}: expected 'A vs B' or 'A | B vs C' (several labels per side separated by '|')")
    left, right = spec.split(" vs ", 1)
    split = lambda s: [x.strip() for x in s.split("|") if x.strip()]  # noqa: E731
    neg, pos = split(left), split(right)
    if not neg or not pos:
        raise InputError(f"{spec!r}: both sides need at least one label")
    return neg, pos
