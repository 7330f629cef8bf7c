"""Stage 3 of extraction: readouts on the latent (branch / stage / binary probes, pseudotime)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np



# binary probes: name -> (negative class, positive class) -> stages of the default DAG in each class
PROBES = {
    "cd4_cd8": {"CD4": ("Naive CD4 T", "Memory CD4 T", "Regulatory T"), "CD8": ("Naive CD8 T", "Memory CD8 T")},
    "mono_macro": {"monocyte": ("Classical monocyte", "Non-classical monocyte"), "macrophage": ("Macrophage",)},
}


@dataclass
class Readout:
    """A linear probe on z: classifier (logistic; binary stores one row) or regressor (pseudotime)."""

    name: str
    kind: str  # "classifier" | "regressor"
    coef: np.ndarray  # [C or 1, d]
    intercept: np.ndarray  # [C or 1]
    classes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_trainable(self) -> int:
        return int(self.coef.size + self.intercept.size)

    def logits(self, Z: np.ndarray) -> np.ndarray:
        return Z @ self.coef.T + self.intercept

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        if self.kind == "classifier" and len(self.classes) == 1:
            return np.ones((len(Z), 1), np.float32)  # one class seen in training (e.g. a B-cell-only set)
        s = self.logits(Z).astype(np.float64)
        if s.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-s[:, 0]))
            return np.stack([1 - p1, p1], axis=1).astype(np.float32)
        s = s - s.max(1, keepdims=True)
        e = np.exp(s)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def predict(self, Z: np.ndarray) -> np.ndarray:
        if self.kind == "regressor":
            return self.logits(Z)[:, 0].astype(np.float32)
        return np.asarray(self.classes)[self.predict_proba(Z).argmax(1)]


def fit_classifier(name: str, Z: np.ndarray, labels: np.ndarray, *, seed: int = 0, C: float = 1.0) -> Readout:
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) == 1:  # nothing to separate: a constant readout, stated in its info
        return Readout(name, "classifier", np.zeros((1, Z.shape[1]), np.float32), np.zeros(1, np.float32),
                       [str(classes[0])], {"n_train": int(len(labels)), "C": C, "constant": True})
    # fitted on standardised z (it converges in far fewer iterations, and C means the same whatever the latent's
    # scale), then folded back, so the stored probe reads z itself
    mu, sd = Z.mean(0), Z.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    clf = LogisticRegression(C=C, max_iter=3000, random_state=seed).fit((Z - mu) / sd, labels)
    coef = clf.coef_ / sd
    intercept = clf.intercept_ - coef @ mu
    return Readout(name, "classifier", coef.astype(np.float32), intercept.astype(np.float32),
                   [str(c) for c in clf.classes_], {"n_train": int(len(labels)), "C": C, "standardised": True,
                                                     "n_iter": int(np.max(clf.n_iter_))})


def fit_pseudotime(Z: np.ndarray, depth: np.ndarray) -> Readout:
    from sklearn.linear_model import LinearRegression

    reg = LinearRegression().fit(Z, depth)
    return Readout("pseudotime", "regressor", reg.coef_[None].astype(np.float32),
                   np.atleast_1d(reg.intercept_).astype(np.float32), [],
                   {"n_train": int(len(depth)), "target": "stage depth (hops from the DAG root)"})


def probe_labels(stages: np.ndarray, probe: str) -> np.ndarray:
    """Class of each cell for a binary probe (None where the cell's stage is in neither class)."""
    out = np.full(len(stages), None, dtype=object)
    for cls_name, members in PROBES[probe].items():
        out[np.isin(stages, members)] = cls_name
    return out
