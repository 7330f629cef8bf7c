"""Manifold fitting and the statistics that decide whether a featurisation encodes a ruler.

Fitters (anchors x features -> anchors x d latent):

* ``isomap`` — scikit-learn Isomap on z-scored features (kNN graph, k = 15 by default).
* ``gmds``   — geodesic MDS: shortest paths on the same kNN graph, then metric MDS (SMACOF, initialised
  from classical MDS). Held-out anchors are placed by inverse-distance interpolation of their 5 nearest
  training anchors in feature space.
* ``let``    — latent embedding transfer: ``z = W (x − b)``, ``d̂_ij = β · arccos(cos(z_i, z_j))``, loss
  ``mean (d̂ − ruler)² + α · mean ‖Wᵀz + b − x‖²`` with d = 10, α = 0.1, learnable β initialised at
  ruler max / (π/2), z-scored features rotated onto their row space (exact), 150 full-batch Adam steps. It is the only fitter that sees the ruler.

Statistics: trustworthiness (Venna & Kaski, k = 15), Spearman between latent (or kNN-geodesic) distances
and the ruler over anchor pairs, the same correlation residualised on same-donor / same-tissue pair
indicators, random (20 %) / donor (3 folds) / branch (leave one branch out) holdout Spearman (fit on the
rest, score the held-out anchors), a
blocked permutation test (stage labels permuted within donor blocks, add-one rule, Besag–Clifford early
stop for clear failures), and intrinsic dimension (TwoNN, plus the LET score-versus-d curve).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.sparse.csgraph import connected_components, shortest_path
from scipy.stats import rankdata, spearmanr
from sklearn.manifold import trustworthiness as _sk_trustworthiness
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors, kneighbors_graph

from .errors import InputError

FITTERS = ("isomap", "gmds", "let")


# ---------------------------------------------------------------------------- helpers
def upper(D: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(D.shape[0], k=1)
    return D[i, j]


def pdist(Z: np.ndarray) -> np.ndarray:
    sq = (Z**2).sum(1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * Z @ Z.T, 0))
    np.fill_diagonal(D, 0)
    return D


def zscore_fit(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = F.mean(0)
    sd = F.std(0)
    sd[sd < 1e-12] = 1.0
    return mu, sd


def spearman_pairs(D: np.ndarray, R: np.ndarray) -> float:
    """Spearman correlation between two distance matrices over the upper triangle."""
    a, b = upper(D), upper(R)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0 or not np.isfinite(a).all():
        return float("nan")
    return float(spearmanr(a, b).statistic)


def residualized_spearman(D: np.ndarray, R: np.ndarray, donors, tissues) -> float:
    """Partial Spearman of latent distance and ruler given same-donor and same-tissue pair indicators (the ruler's
    side is kept per process for the next call with the same ruler and groups)."""
    return _ruler_pairs(R, donors, tissues).residualized(rankdata(upper(D)))


def trustworthiness(F: np.ndarray, Z: np.ndarray, k: int = 15, cache: dict | None = None) -> float:
    """scikit-learn's trustworthiness of the embedding Z of F (k neighbours, capped below half the anchors).

    ``cache`` (a dict shared by the fits of one featurisation) keeps F's side, the rank of every anchor among each
    anchor's neighbours in feature space, so that the fitters of the same anchors rank F once; the value is
    scikit-learn's (the same distances, order and formula)."""
    n = len(F)
    k = min(k, (n - 1) // 2)
    if k < 1:
        return float("nan")
    if cache is None:
        return float(_sk_trustworthiness(F, Z, n_neighbors=k))
    key = _cache_key("trust_ranks", F)
    if key not in cache:
        dist = pairwise_distances(F)
        np.fill_diagonal(dist, np.inf)
        rank_of = np.empty((n, n), dtype=np.int32)  # rank_of[i, j]: j's place among i's neighbours, from 1
        np.put_along_axis(rank_of, np.argsort(dist, axis=1), np.arange(1, n + 1, dtype=np.int32)[None, :], axis=1)
        cache[key] = rank_of
    near = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors(return_distance=False)
    ranks = np.take_along_axis(cache[key], near, axis=1).astype(np.int64) - k
    return float(1.0 - ranks[ranks > 0].sum() * (2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))))


def _cache_key(tag: str, X: np.ndarray, *extra) -> tuple:
    X = np.ascontiguousarray(X)
    # sha256: hardware-accelerated on current x86 / ARM CPUs, twice blake2b's speed here (6.7 MB in 4.8 ms)
    return (tag, X.shape, X.dtype.str, *extra, hashlib.sha256(X.view(np.uint8)).hexdigest())


def knn_geodesic(F: np.ndarray, k: int = 15, cache: dict | None = None) -> tuple[np.ndarray, int]:
    """Shortest-path distances on the symmetric kNN graph; k grows until the graph is connected.

    ``cache`` (a dict) keeps the result per (features, k): the ruler-free fitters of one featurisation fit the same
    anchors (the full set and each holdout's training anchors), so they share each graph."""
    key = None
    if cache is not None:
        key = _cache_key("knn_geodesic", F, k)
        if key in cache:
            return cache[key]
    n = len(F)
    k = max(1, min(k, n - 1))
    while True:
        G = kneighbors_graph(F, k, mode="distance")
        G = G.maximum(G.T)
        if connected_components(G, directed=False)[0] == 1 or k >= n - 1:
            out = shortest_path(G, directed=False), k
            break
        k = min(n - 1, k * 2)
    if key is not None:
        cache[key] = out
    return out


class GeodesicIsomap:
    """scikit-learn's Isomap on precomputed kNN shortest paths (:func:`knn_geodesic`): the embedding is the kernel PCA
    of -0.5 x the squared geodesics (``KernelPCA(kernel="precomputed")`` with Isomap's settings), and new points reach
    the training graph through their k nearest training anchors, as ``Isomap.transform`` does. Given the same graph it
    gives Isomap's numbers without building the graph a second time."""

    def __init__(self, n_neighbors: int, n_components: int):
        self.n_neighbors, self.n_components = n_neighbors, n_components

    def fit(self, X: np.ndarray, geodesic: np.ndarray) -> "GeodesicIsomap":
        from sklearn.decomposition import KernelPCA

        self.nbrs_ = NearestNeighbors(n_neighbors=self.n_neighbors).fit(X)
        self.dist_matrix_ = geodesic
        self.kernel_pca_ = KernelPCA(n_components=self.n_components, kernel="precomputed", eigen_solver="auto",
                                     tol=0, max_iter=None)
        self.embedding_ = self.kernel_pca_.fit_transform(-0.5 * geodesic**2)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        dist, idx = self.nbrs_.kneighbors(X, return_distance=True)
        G_X = np.min(self.dist_matrix_[idx] + dist[:, :, None], axis=1)
        return self.kernel_pca_.transform(-0.5 * G_X**2)


def twonn_dimension(F: np.ndarray) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): MLE from the ratio of 2nd to 1st neighbour distances."""
    if len(F) < 4:
        return float("nan")
    d, _ = NearestNeighbors(n_neighbors=3).fit(F).kneighbors(F)
    r1, r2 = d[:, 1], d[:, 2]
    ok = (r1 > 0) & (r2 > r1)
    mu = r2[ok] / r1[ok]
    return float(len(mu) / np.log(mu).sum()) if len(mu) else float("nan")


# ---------------------------------------------------------------------------- fitters
@dataclass
class FittedManifold:
    """A fitted map from (raw, un-scaled) features to the latent."""

    fitter: str
    Z: np.ndarray
    mu: np.ndarray
    sd: np.ndarray
    model: object = None
    train_scaled: np.ndarray | None = None
    geodesic: np.ndarray | None = None  # kNN shortest paths of train_scaled (ruler-free fitters)

    def transform(self, F: np.ndarray) -> np.ndarray:
        X = (F - self.mu) / self.sd
        if self.fitter in ("isomap", "let"):
            return self.model.transform(X)
        nn = NearestNeighbors(n_neighbors=min(5, len(self.train_scaled))).fit(self.train_scaled)
        d, idx = nn.kneighbors(X)
        w = 1.0 / np.maximum(d, 1e-9)
        w /= w.sum(1, keepdims=True)
        return (w[:, :, None] * self.Z[idx]).sum(1)


def _sign_canonical(V: np.ndarray) -> np.ndarray:
    """+1 / -1 per row of V that makes the row's largest-magnitude entry positive."""
    if not V.size:
        return np.ones(len(V))
    lead = V[np.arange(len(V)), np.abs(V).argmax(1)]
    return np.where(lead < 0, -1.0, 1.0)


def row_space_basis(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An orthonormal basis ``V`` [k, features] of the row space of ``X`` [anchors, features] and the anchors'
    coordinates in it, ``X V^T`` [anchors, k]: the right singular vectors whose singular value exceeds 1e-7 of the
    largest, each signed so that its largest-magnitude entry is positive (LAPACK builds choose singular vectors'
    signs differently; LET's seeded initialisation lives in this basis, so its fit would follow them).

    With fewer anchors than features the eigendecomposition of the anchors' Gram matrix ``X X^T`` is used (about
    twice as fast as the SVD) when it keeps the SVD's directions for certain: every eigenvalue above 1e-11 of the
    largest (singular values above 3e-6 of the largest, far above the cut, where the eigensolver's error of
    ~1e-13 of the largest eigenvalue cannot move them across it), but for centred ``X`` (z-scored features) the
    one along the all-ones vector, checked directly: its singular value ``||X^T 1|| / sqrt(n)`` lies below 1e-9 of
    the largest. Otherwise - a rank-deficient spectrum, or float32 rounding noise near the cut (e.g. features of a
    low-rank operator) - the SVD decides. The two give the same basis to float rounding (tests/test_manifold.py).
    """
    X = np.asarray(X, dtype=np.float64)
    n, G = X.shape
    if 2 <= n <= G:
        lam, U = np.linalg.eigh(X @ X.T)  # ascending
        top = float(lam[-1])
        if top > 0:
            clear = lam > 1e-11 * top
            n_unclear = n - int(clear.sum())
            if n_unclear == 0 or (n_unclear == 1 and not clear[0]
                                  and np.linalg.norm(X.sum(0)) / np.sqrt(n) <= 1e-9 * np.sqrt(top)):
                U, S = U[:, clear][:, ::-1], np.sqrt(lam[clear][::-1])
                V = (U.T @ X) / S[:, None]
                signs = _sign_canonical(V)
                return V * signs[:, None], (U * S) * signs
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    V = Vt[S > S[0] * 1e-7] if len(S) else Vt[:0]
    V = V * _sign_canonical(V)[:, None]
    return V, X @ V.T


class LETModel:
    """Latent embedding transfer (torch): linear encoder with tied-weight reconstruction and angular ruler fit."""

    def __init__(self, d: int = 10, alpha: float = 0.1, epochs: int = 150, lr: float = 1e-2, seed: int = 0,
                 engine: str = "autograd"):
        if engine not in ("autograd", "fused"):
            raise InputError(f"LET engine must be 'autograd' or 'fused', got {engine!r}")
        self.d, self.alpha, self.epochs, self.lr, self.seed, self.engine = d, alpha, epochs, lr, seed, engine

    def fit(self, X: np.ndarray, R: np.ndarray, cache: dict | None = None) -> "LETModel":
        import torch

        # The objective only sees X through its row space: rotate onto it (rank <= anchors - 1) so that each
        # step costs O(anchors^2) instead of O(anchors x genes). The reconstruction error is a sum over genes
        # divided by G, which the rotation preserves exactly (the discarded directions carry zero variance).
        G = X.shape[1]
        key = _cache_key("let_basis", X) if cache is not None else None
        if key is not None and key in cache:  # e.g. the null ruler's fit of the same anchors
            self.V, Xr = cache[key]
        else:
            self.V, Xr = row_space_basis(X)  # [k, G], [n, k]
            if key is not None:
                cache[key] = (self.V, Xr)
        g = torch.Generator().manual_seed(self.seed)
        Xt = torch.as_tensor(Xr, dtype=torch.float32)
        n, k = Xt.shape
        W = torch.nn.Parameter(torch.randn(self.d, k, generator=g) / np.sqrt(k))
        b = torch.nn.Parameter(torch.zeros(k))
        log_beta = torch.nn.Parameter(torch.tensor(float(np.log(max(float(R.max()), 1e-3) / (np.pi / 2)))))
        if self.engine == "fused":
            self._fit_fused(Xt, R, W.detach(), b.detach(), log_beta.detach(), G)
        else:
            target = torch.as_tensor(R, dtype=torch.float32)
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            opt = torch.optim.Adam([W, b, log_beta], lr=self.lr)
            n_pairs = mask.sum()
            for _ in range(self.epochs):
                z = (Xt - b) @ W.T
                zn = z / z.norm(dim=1, keepdim=True).clamp(min=1e-8)
                cos = (zn @ zn.T).clamp(-1 + 1e-6, 1 - 1e-6)
                fit = (((log_beta.exp() * torch.arccos(cos) - target) ** 2) * mask).sum() / n_pairs
                recon = ((z @ W + b - Xt) ** 2).sum() / (n * G)
                loss = fit + self.alpha * recon
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.W, self.b = W.detach().numpy(), b.detach().numpy()
            self.beta = float(log_beta.detach().exp())
            self.final_fit_loss = float(fit.detach())
        self.train_latent_ = (Xr - self.b) @ self.W.T  # transform(X) without projecting X again
        return self

    def _fit_fused(self, Xt, R: np.ndarray, W, b, log_beta, G: int) -> "LETModel":
        """The same objective, initialisation and Adam steps (torch's update formula) with the gradient written out.
        Each step makes one compiled pass over the anchor pairs (:func:`sclens._let_kernel.let_pair_pass`): the
        cosines, the angles, the ruler fit's residuals and their gradient wrt the unit latent, pair by pair, with no
        anchors x anchors array (autograd makes about ten passes over such arrays per step, each a fresh allocation).
        The arccos is a degree-7 polynomial (|error| <= 2e-8) so that the pass vectorises; the clamp of the cosines
        to (-1 + 1e-6, 1 - 1e-6) applies pair by pair, with zero gradient where it bites, as autograd's clamp. The
        latent is kept as [d, anchors] and numpy (float32) does the small products and steps. Float rounding differs
        from the autograd path, and Adam can magnify it in coordinates whose gradient is near zero: fits agree to
        ~1e-6 on well-conditioned problems, to ~1e-2 in the weights on small ones (tests/test_manifold.py)."""
        from ._let_kernel import let_pair_pass, packed_upper

        f32 = np.float32
        X = Xt.numpy()  # [n, k]
        XT = np.ascontiguousarray(X.T)  # W @ X.T reads a transposed view at half the speed
        n = X.shape[0]
        T = packed_upper(R)  # only the pairs i < j, as the autograd path's mask selects them
        n_pairs = float(len(T))
        col_sum = X.sum(0)
        c_rec = f32(2 * self.alpha / (n * G))
        W, b = W.numpy().astype(f32), b.numpy().astype(f32)
        eye = np.eye(W.shape[0], dtype=f32)
        log_beta = float(log_beta)
        hi = f32(1 - 1e-6)
        b1, b2, eps = 0.9, 0.999, 1e-8
        m1 = [np.zeros_like(W), np.zeros_like(b), 0.0]
        m2 = [np.zeros_like(W), np.zeros_like(b), 0.0]
        zT, g_znT = np.empty((W.shape[0], n), dtype=f32), np.empty((W.shape[0], n), dtype=f32)
        c_row, g_row = np.empty(n, dtype=f32), np.empty(n, dtype=f32)
        fit = float("nan")
        for t in range(1, self.epochs + 1):
            # z^T = W (x - b)^T without forming x - b (its [anchors, rank] passes cost as much as the pair ones)
            np.matmul(W, XT, out=zT)
            zT -= (W @ b)[:, None]
            norm = np.sqrt(np.einsum("ij,ij->j", zT, zT))
            nc = np.maximum(norm, f32(1e-8))
            znT = zT / nc
            beta = float(np.exp(log_beta))
            fit_sum, g_sum = let_pair_pass(znT, T, f32(beta), hi, g_znT, c_row, g_row)
            fit = fit_sum / n_pairs
            g_log_beta = beta * 2.0 / n_pairs * g_sum
            # d/dC of beta * arccos(C) = -beta / sqrt(1 - C^2), each pair counted once in the mean
            g_znT *= f32(-beta * 2.0 / n_pairs)
            gzT = (g_znT - znT * np.einsum("ij,ij->j", znT, g_znT) * (norm >= 1e-8)) / nc
            # reconstruction ||z W - (x - b)||^2 * alpha / (n G), differentiated through z and W directly
            gzT += c_rec * ((W @ W.T - eye) @ zT)
            hT = gzT - c_rec * zT  # one product with x serves both terms of the weights' gradient
            gW = hT @ X - np.outer(hT.sum(1), b) + c_rec * ((zT @ zT.T) @ W)
            gb = -(gzT.sum(1) @ W) + c_rec * (zT.sum(1) @ W - col_sum + n * b)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            params = [W, b, log_beta]
            for i, g in enumerate((gW, gb, g_log_beta)):
                m1[i] = m1[i] * b1 + g * (1 - b1)
                m2[i] = m2[i] * b2 + g * g * (1 - b2)
                params[i] = params[i] - (self.lr / bc1) * m1[i] / (np.sqrt(m2[i]) / math.sqrt(bc2) + eps)
            W, b, log_beta = params
        self.W, self.b = W.astype(f32), b.astype(f32)
        self.beta = float(np.exp(log_beta))
        self.final_fit_loss = fit
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X @ self.V.T - self.b) @ self.W.T

    def angular_distances(self, Z: np.ndarray) -> np.ndarray:
        zn = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-8)
        return self.beta * np.arccos(np.clip(zn @ zn.T, -1, 1))


def _euclidean_into(X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances of the rows of X written into ``out`` (scikit-learn's formula for X against
    itself: squared norms minus twice the Gram matrix, clipped at 0, zero diagonal)."""
    sq = np.einsum("ij,ij->i", X, X)
    np.matmul(X * -2.0, X.T, out=out)
    out += sq[:, None]
    out += sq[None, :]
    np.maximum(out, 0.0, out=out)
    np.fill_diagonal(out, 0.0)
    return np.sqrt(out, out=out)


def smacof_metric(D: np.ndarray, init: np.ndarray, *, max_iter: int = 100, eps: float = 1e-6) -> np.ndarray:
    """Metric SMACOF from ``init``: the Guttman-transform iteration and stopping rule of scikit-learn's
    ``smacof(D, metric=True, n_init=1, init=init, max_iter=max_iter, eps=eps)`` (zero distances read as 1e-5;
    stop when the stress falls by less than ``eps`` of half the squared distances), written into buffers allocated
    once instead of several fresh anchors x anchors arrays per iteration; the same configuration to float rounding
    (tests/test_manifold.py)."""
    n = len(D)
    X = np.array(init, dtype=np.float64)
    dist, work = np.empty((n, n)), np.empty((n, n))
    _euclidean_into(X, dist)
    diag = np.arange(n)
    neg_D = -np.asarray(D, dtype=np.float64)
    old_stress = None
    for _ in range(max_iter):
        np.copyto(dist, 1e-5, where=dist == 0)
        np.divide(neg_D, dist, out=work)  # minus the ratio; B = diag(row sums of the ratio) - ratio
        work[diag, diag] -= work.sum(1)
        X = (work @ X) / n
        _euclidean_into(X, dist)
        np.subtract(dist, D, out=work)
        stress = float(np.dot(work.ravel(), work.ravel())) / 2
        if old_stress is not None and (old_stress - stress) / (float(np.dot(dist.ravel(), dist.ravel())) / 2) < eps:
            break
        old_stress = stress
    return X


def fit_manifold(F: np.ndarray, fitter: str, *, d: int = 10, ruler: np.ndarray | None = None, k: int = 15,
                 seed: int = 0, let_epochs: int = 150, let_engine: str = "autograd",
                 fit_cache: dict | None = None) -> FittedManifold:
    """Fit one fitter on features F [anchors, features]; ``ruler`` is needed (only) by ``let``
    (``let_engine``: :class:`LETModel`'s ``autograd`` or ``fused`` gradient; ``fit_cache``: a dict shared by fits of
    the same features, which reuse each kNN graph (:func:`knn_geodesic`) and LET row-space basis it holds)."""
    if fitter not in FITTERS:
        raise InputError(f"unknown fitter {fitter!r}; choose from {FITTERS}")
    n = len(F)
    if n < 6:
        raise InputError(f"need at least 6 anchors to fit a manifold, got {n}")
    mu, sd = zscore_fit(F)
    X = (F - mu) / sd
    d_eff = min(d, n - 2)
    if fitter == "isomap":
        Dg, k_used = knn_geodesic(X, k, fit_cache)
        model = GeodesicIsomap(n_neighbors=k_used, n_components=d_eff).fit(X, Dg)
        return FittedManifold(fitter, model.embedding_, mu, sd, model, X, Dg)
    if fitter == "gmds":
        Dg, _ = knn_geodesic(X, k, fit_cache)
        # classical MDS start: the top d_eff eigenpairs of the double-centred -0.5 x squared geodesics (centred by
        # row / column means rather than two n x n products with the centring matrix; only the pairs used are
        # computed; SMACOF's answer does not depend on an eigenvector's sign: it mirrors that coordinate)
        D2 = Dg**2
        row = D2.mean(1)
        Bm = -0.5 * (D2 - row[:, None] - row[None, :] + row.mean())
        vals, vecs = scipy.linalg.eigh(Bm, subset_by_index=[n - d_eff, n - 1])
        vals, vecs = vals[::-1], vecs[:, ::-1]
        init = vecs * np.sqrt(np.maximum(vals, 1e-12))
        Z = smacof_metric(Dg, init, max_iter=100)
        return FittedManifold(fitter, Z, mu, sd, None, X, Dg)
    if ruler is None:
        raise InputError("the LET fitter needs the ruler between anchors")
    model = LETModel(d=d_eff, seed=seed, epochs=let_epochs, engine=let_engine).fit(X, ruler, cache=fit_cache)
    return FittedManifold(fitter, model.train_latent_, mu, sd, model, X)


def latent_distances(m: FittedManifold, Z: np.ndarray) -> np.ndarray:
    return m.model.angular_distances(Z) if m.fitter == "let" else pdist(Z)


# ---------------------------------------------------------------------------- holdouts
def _group_folds(groups: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    uniq = rng.permutation(uniq)
    n_folds = min(n_folds, len(uniq))
    return [np.isin(groups, part) for part in np.array_split(uniq, n_folds)]


def holdout_spearman(F, rulers: dict, fitter, test_masks, *, d=10, k=15, seed=0, let_epochs=150,
                     min_test=4, fits: dict | None = None, let_engine: str = "autograd",
                     fit_cache: dict | None = None) -> dict[str, float]:
    """Per ruler: mean over folds of Spearman(latent distances among held-out anchors, their ruler).

    Ruler-free fitters fit each fold once and score every ruler on it; LET refits per ruler. ``fits``, when
    given, receives each LET fit as ``fits[(fold, ruler name)]`` for a caller that needs the same fit again.
    """
    vals: dict[str, list[float]] = {name: [] for name in rulers}
    for i, test in enumerate(test_masks):
        train = ~test
        if test.sum() < min_test or train.sum() < 6:
            continue
        shared = None
        for name, R in rulers.items():
            Rtest = R[np.ix_(test, test)]
            if np.ptp(upper(Rtest)) == 0:
                continue
            if fitter == "let" or shared is None:
                m = fit_manifold(F[train], fitter, d=d, ruler=R[np.ix_(train, train)], k=k, seed=seed,
                                 let_epochs=let_epochs, let_engine=let_engine, fit_cache=fit_cache)
                if fits is not None and fitter == "let":
                    fits[(i, name)] = m
                Dt = latent_distances(m, m.transform(F[test]))
                if fitter != "let":
                    shared = Dt
            else:
                Dt = shared
            vals[name].append(spearman_pairs(Dt, Rtest))
    out = {}
    for name, v in vals.items():
        v = [x for x in v if np.isfinite(x)]
        out[name] = float(np.mean(v)) if v else float("nan")
    return out


# ---------------------------------------------------------------------------- permutation test
def blocked_permutation_p(D: np.ndarray, stage_idx: np.ndarray, stage_ruler: np.ndarray, blocks,
                          n_perm: int = 2000, seed: int = 0, stop_after: int = 20, chunk: int = 100,
                          exact: bool = False) -> tuple[float, int]:
    """One-sided p that Spearman(D, ruler) is this high when stage labels are permuted within blocks.

    Add-one rule ``(1 + #{perm >= obs}) / (1 + n)``; once ``stop_after`` permutations reach the observed
    value the test stops early (Besag & Clifford 1991, p = stop_after / n done) - only clear failures stop early.
    Returns (p, permutations run).

    The statistic is ``sum over anchor pairs of rank(D) x rank(ruler)``, scored by :class:`PermutationDesign`;
    ``exact=True`` gathers every anchor pair of every relabelling instead (the reference the design is checked
    against: same relabellings, same statistic up to float rounding).
    """
    # one latent: nothing would reuse the design's store of relabelled ranks, so it is not kept
    design = PermutationDesign(stage_idx, stage_ruler, blocks, n_perm=n_perm, seed=seed, stop_after=stop_after,
                               chunk=chunk, cache_bytes=0)
    a = standardised_pair_ranks(D)
    if not exact:
        return design.p_values(a)[0]
    iu = design.iu
    ranks = np.zeros((design.A, design.A))
    ranks[iu] = design.r_obs
    ranks = ranks + ranks.T
    obs = float(a @ design.r_obs)
    exceed, done = 0, 0
    for start in range(0, design.n_perm, chunk):
        perms = design.perms[start:start + chunk]
        vals = np.einsum("pk,k->p", ranks[perms[:, iu[0]], perms[:, iu[1]]], a)
        exceed += int((vals >= obs - 1e-9).sum())
        done += len(perms)
        if exceed >= stop_after:
            return exceed / done, done
    return (exceed + 1) / (done + 1), done


def standardised_pair_ranks(D: np.ndarray) -> np.ndarray:
    """Ranks of the upper-triangle entries of a distance matrix, standardised: the vector a permutation test scores."""
    a = rankdata(upper(D))
    return _standardised(a)


class PermutationDesign:
    """One blocked permutation design (anchors' stages, stage ruler, donor blocks, number of relabellings, seed),
    drawn once and scored against many latents at once.

    :func:`blocked_permutation_p` draws its relabellings from its seed, so every hypothesis of a screen that tests
    the same anchors against the same ruler sees the same ones. The statistic is linear in the latent's
    (standardised) distance ranks ``a``: ``stat = a . r_perm`` with ``r_perm`` the ruler ranks of the anchor pairs
    under a relabelling. Scoring H latents therefore costs one pass over the relabellings' ``r_perm`` and one
    [H, pairs] x [pairs, relabellings] matrix product, instead of H separate tests. The Besag-Clifford stop of
    :func:`blocked_permutation_p` (``stop_after`` exceedances, checked after each chunk of ``chunk``) is applied
    afterwards to each latent's sequence of statistics, so p-values and permutation counts are the same.
    The ``r_perm`` are gathered once and kept in float32 (exact for midranks) while they fit ``cache_bytes``
    (2.5 GB: 2,000 relabellings of up to ~790 anchors' pairs), so later batches (a screen scores its latents as
    they come) only multiply; beyond that they are gathered again for every batch.
    """

    def __init__(self, stage_idx: np.ndarray, stage_ruler: np.ndarray, blocks, n_perm: int = 2000, seed: int = 0,
                 stop_after: int = 20, chunk: int = 100, cache_bytes: float = 2.5e9):
        self.cache_bytes, self._r32, self._filled = float(cache_bytes), None, 0
        stage_idx = np.asarray(stage_idx)
        A = len(stage_idx)
        self.A, self.n_perm, self.stop_after, self.chunk = A, int(n_perm), int(stop_after), int(chunk)
        self.iu = np.triu_indices(A, k=1)
        r = rankdata(stage_ruler[np.ix_(stage_idx, stage_idx)][self.iu])  # ruler ranks of the anchor pairs
        # a midrank depends only on the ruler value, so it is a function of the (present) stage pair
        _, lab = np.unique(stage_idx, return_inverse=True)
        S = int(lab.max()) + 1 if A else 0
        rv = np.zeros((S, S))
        rv[lab[self.iu[0]], lab[self.iu[1]]] = r
        rv[lab[self.iu[1]], lab[self.iu[0]]] = r
        self.S, self.rv_flat, self.r_obs = S, rv.ravel(), r
        small = S * S < 2**31 and A < 2**31  # 32-bit labels and pair indices: less memory traffic per relabelling
        self.lab = lab.astype(np.int32 if small else np.int64)
        self.iu32 = tuple(i.astype(self.lab.dtype) for i in self.iu)
        blocks = np.asarray(blocks)
        self.n_blocks = int(len(np.unique(blocks)))
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
        perms, done = [], 0
        while done < self.n_perm:  # the same draws, chunk by chunk, as blocked_permutation_p
            m = min(self.chunk, self.n_perm - done)
            p = np.tile(np.arange(A), (m, 1))
            for idx in members:
                if len(idx) > 1:
                    p[:, idx] = idx[rng.permuted(np.tile(np.arange(len(idx)), (m, 1)), axis=1)]
            perms.append(p)
            done += m
        self.perms = np.concatenate(perms) if perms else np.zeros((0, A), np.int64)

    @property
    def n_pairs(self) -> int:
        return len(self.r_obs)

    def _relabelled_ranks(self, start: int, end: int) -> np.ndarray:
        """The ruler ranks of every anchor pair under relabellings ``start:end`` [end - start, pairs]."""
        i0, i1 = self.iu32
        labp = self.lab[self.perms[start:end]]
        return self.rv_flat[labp[:, i0] * self.lab.dtype.type(self.S) + labp[:, i1]]

    def _cached_ranks(self, end: int) -> np.ndarray | None:
        """Relabellings ``0:end``'s ruler ranks from the design's float32 store (filled on first use, kept for the
        next latents), or None when the store would exceed ``cache_bytes``. Midranks are multiples of 0.5 below
        the number of pairs, so float32 holds them exactly while there are fewer than 2^23 pairs. Filled through
        index buffers allocated once (fresh large temporaries cost page faults comparable to the gathering)."""
        if self.n_perm * self.n_pairs * 4 > self.cache_bytes or self.n_pairs >= 2**23:
            return None
        if self._r32 is None:
            self._r32, self._filled = np.empty((self.n_perm, self.n_pairs), dtype=np.float32), 0
        if self._filled < end:
            rv32 = self.rv_flat.astype(np.float32)
            i0, i1 = self.iu32
            step = max(1, int(32e6 // (8 * max(self.n_pairs, 1))))
            b0, b1 = (np.empty((step, self.n_pairs), dtype=self.lab.dtype) for _ in range(2))
            for s in range(self._filled, end, step):
                m = min(s + step, end) - s
                labp = self.lab[self.perms[s:s + m]]
                np.take(labp, i0, axis=1, out=b0[:m])
                np.take(labp, i1, axis=1, out=b1[:m])
                b0[:m] *= self.lab.dtype.type(self.S)
                b0[:m] += b1[:m]
                np.take(rv32, b0[:m], out=self._r32[s:s + m])
            self._filled = end
        return self._r32

    def _statistics(self, a: np.ndarray, start: int, end: int, max_bytes: float = 32e6) -> np.ndarray:
        """Relabellings ``start:end`` scored against standardised pair ranks ``a`` [H, pairs] -> [H, end - start]."""
        r32 = self._cached_ranks(end)
        if r32 is not None:
            # blocks of anchor pairs: each block of ``a`` is read once for all the relabellings (one matrix product
            # per block, in float64 like the uncached path, through one buffer; only the order of additions differs)
            out = np.zeros((len(a), end - start))
            step = max(1, int(max_bytes // (8 * max(end - start, 1))))
            buf = np.empty((end - start, min(step, self.n_pairs)))
            for k in range(0, self.n_pairs, step):
                blk = buf[:, :min(step, self.n_pairs - k)]
                np.copyto(blk, r32[start:end, k:k + step])
                out += a[:, k:k + step] @ blk.T
            return out
        out = np.empty((len(a), end - start))
        step = max(1, int(max_bytes // (8 * max(self.n_pairs, 1))))
        for s in range(start, end, step):
            r = self._relabelled_ranks(s, min(s + step, end))
            out[:, s - start:s - start + len(r)] = a @ r.T
        return out

    def p_values(self, a: np.ndarray) -> list[tuple[float, int]]:
        """``(p, permutations counted)`` per row of ``a`` (standardised pair ranks, [H, pairs] or [pairs]), as
        :func:`blocked_permutation_p` gives them: chunk by chunk, a row leaves once it is decided, and the pass
        ends when every row has. The statistics are computed for the first chunk, the next four, then the rest
        (fewer, larger products; a row decided inside a stretch is stopped where the chunk rule stops it)."""
        a = np.atleast_2d(np.asarray(a, dtype=np.float64))
        if a.shape[1] != self.n_pairs:
            raise InputError(f"the latent has {a.shape[1]} anchor pairs, the permutation design {self.n_pairs}")
        obs = a @ self.r_obs
        # ties (relabellings that only swap anchors of one stage) must count whatever the summation order
        tol = 1e-9 * np.maximum(1.0, np.abs(a).sum(1) * np.abs(self.rv_flat).max(initial=0.0))
        exceed = np.zeros(len(a), dtype=int)
        out: list = [None] * len(a)
        active = np.arange(len(a))
        stretch_ends = sorted({min(self.chunk, self.n_perm), min(5 * self.chunk, self.n_perm), self.n_perm})
        start = 0
        for stretch_end in stretch_ends:
            if not len(active) or start >= stretch_end:
                break
            stats = self._statistics(a if len(active) == len(a) else a[active], start, stretch_end)
            for c0 in range(start, stretch_end, self.chunk):
                c1 = min(c0 + self.chunk, stretch_end)
                exceed[active] += (stats[:, c0 - start:c1 - start] >= (obs - tol)[active, None]).sum(1)
                hit = exceed[active] >= self.stop_after
                for i in active[hit]:
                    out[i] = (float(exceed[i] / c1), c1)
                if hit.any():
                    active, stats = active[~hit], stats[~hit]
                if not len(active):
                    break
            start = stretch_end
        for i in active:
            out[i] = ((int(exceed[i]) + 1) / (self.n_perm + 1), self.n_perm)
        return out


# ---------------------------------------------------------------------------- one hypothesis
def random_holdout_mask(n: int, seed: int) -> np.ndarray:
    """The anchors held out by the random (20 %) holdout of :func:`evaluate` with this seed."""
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.choice(n, size=max(4, int(round(0.2 * n))), replace=False)] = True
    return test


def degenerate_reason(F: np.ndarray, min_distinct: int = 6) -> str | None:
    """Why a featurisation cannot be fitted (None when it can): non-finite values, no features, constant
    (e.g. all-zero) features, or fewer distinct anchor rows than the fitters need."""
    F = np.asarray(F)
    if F.ndim != 2 or F.shape[1] == 0 or F.shape[0] == 0:
        return f"no features (shape {tuple(F.shape)})"
    bad = int((~np.isfinite(F)).sum())
    if bad:
        return f"{bad} non-finite feature values (NaN/inf) out of {F.size}"
    if not np.abs(F).max() > 0:
        return "all-zero features"
    scale = float(np.abs(F).max())
    if float(np.ptp(F, axis=0).max()) <= 1e-10 * scale:
        return "constant features (every anchor has the same feature vector)"
    n_distinct = len(np.unique(np.round(F / scale, 10), axis=0))
    if n_distinct < min_distinct:
        return f"only {n_distinct} distinct anchor feature rows; the fitters need at least {min_distinct}"
    return None


def learned_statistic(F: np.ndarray, anchors, fitter: str, metric: str, *, ruler: np.ndarray, d: int = 10,
                      k: int = 15, seed: int = 0, let_epochs: int = 150, let_engine: str = "autograd",
                      fit_cache: dict | None = None) -> float:
    """One metric of :func:`evaluate` (true ruler only), computed exactly as :func:`evaluate` computes it, for the
    random-weights controls of the ``learned`` gate: ``ruler_spearman_resid`` (one full fit) or ``holdout_random``
    (one fit on the random holdout's training anchors)."""
    kw = dict(d=d, k=k, seed=seed, let_epochs=let_epochs, let_engine=let_engine, fit_cache=fit_cache)
    if metric == "ruler_spearman_resid":
        m = fit_manifold(F, fitter, ruler=ruler, **kw)
        return residualized_spearman(latent_distances(m, m.Z), ruler, anchors.obs["donor"].to_numpy(),
                                     anchors.obs["tissue"].to_numpy())
    if metric == "holdout_random":
        return holdout_spearman(F, {"ruler": ruler}, fitter, [random_holdout_mask(len(F), seed)], **kw)["ruler"]
    raise InputError(f"the learned gate's metric must be ruler_spearman_resid or holdout_random, got {metric!r}")


def evaluate(F: np.ndarray, anchors, fitter: str, *, rulers: dict[str, tuple[np.ndarray, np.ndarray]], d: int = 10,
             k: int = 15, n_perm: int = 2000, seed: int = 0, let_epochs: int = 150, holdout_folds: int = 3,
             exact: bool = False) -> dict:
    """Every metric of one (features, fitter) hypothesis on a set of anchors, for each ruler.

    ``rulers`` maps a name (e.g. ``"ruler"``, ``"null"``) to ``(anchor ruler [A, A], stage ruler [S, S])``.
    Ruler-free fitters (isomap, gmds) are fitted once per fold and scored against every ruler; LET is
    fitted per ruler. Returns ``{name: metrics}``. The default path scores the permutation test with
    :class:`PermutationDesign` and reuses LET's random-holdout fit for it (the same fit, made once);
    ``exact=True`` is the earlier path (pair-gathering statistic, the fit made twice), kept for checking.
    """
    obs = anchors.obs
    donors, tissues, branches = obs["donor"].to_numpy(), obs["tissue"].to_numpy(), obs["branch"].to_numpy()
    sidx = anchors.stage_index
    rand_test = random_holdout_mask(len(F), seed)
    kw = dict(d=d, k=k, seed=seed, let_epochs=let_epochs)
    anchor_rulers = {name: R for name, (R, _) in rulers.items()}
    out: dict[str, dict] = {name: {} for name in rulers}
    full: dict[str, FittedManifold] = {}
    for name, (R, _) in rulers.items():
        if fitter == "let" or not full:
            full[name] = fit_manifold(F, fitter, ruler=R, **kw)
        else:
            full[name] = next(iter(full.values()))
    for name, (R, _) in rulers.items():
        m = full[name]
        out[name].update(_full_metrics(m, R, donors, tissues, k)[0], latent_dim=int(m.Z.shape[1]))
    rand_fits: dict | None = None if exact else {}
    hold = {
        "holdout_random": holdout_spearman(F, anchor_rulers, fitter, [rand_test], fits=rand_fits, **kw),
        # donor folds need two donors; leave-one-branch-out measures ordering WITHIN a lineage, which is
        # exactly what the within-branch-shuffled null destroys
        "holdout_donor": (holdout_spearman(F, anchor_rulers, fitter, _group_folds(donors, holdout_folds, seed), **kw)
                          if len(np.unique(donors)) >= 2 else {n: float("nan") for n in rulers}),
        "holdout_branch": (holdout_spearman(F, anchor_rulers, fitter, [branches == b for b in np.unique(branches)], **kw)
                           if len(np.unique(branches)) >= 2 else {n: float("nan") for n in rulers}),
    }
    for key, per in hold.items():
        for name in rulers:
            out[name][key] = per[name]
    # permutation test on a latent the ruler never shaped: the full latent for ruler-free fitters, the
    # random-holdout anchors' out-of-sample latent for LET
    for name, (R, stage_R) in rulers.items():
        if fitter == "let":
            mt = (rand_fits or {}).get((0, name))
            if mt is None:
                mt = fit_manifold(F[~rand_test], fitter, ruler=R[np.ix_(~rand_test, ~rand_test)], **kw)
            Dp, sp_, blocks = latent_distances(mt, mt.transform(F[rand_test])), sidx[rand_test], donors[rand_test]
        else:
            Dp, sp_, blocks = latent_distances(full[name], full[name].Z), sidx, donors
        p, n_done = blocked_permutation_p(Dp, sp_, stage_R, blocks, n_perm=n_perm, seed=seed, exact=exact)
        out[name].update({"perm_p": p, "perm_n": n_done, "perm_blocks": int(len(np.unique(blocks)))})
    return out, full


class _RulerPairs:
    """One ruler's side of :func:`spearman_pairs` and :func:`residualized_spearman` over the anchor pairs (its ranks,
    the same-donor / same-tissue covariates' projection), computed once and applied to many latents' ranks."""

    def __init__(self, R: np.ndarray, donors, tissues):
        donors, tissues = np.asarray(donors), np.asarray(tissues)
        self.r = upper(R)
        self.b = rankdata(self.r)
        cov = [np.ones_like(self.b)]
        for g in (donors, tissues):
            same = upper((g[:, None] == g[None, :]).astype(float))
            if np.ptp(same) > 0:
                cov.append(same)
        self.C = np.stack(cov, 1)
        self.pinv = np.linalg.pinv(self.C)
        self.rb = self.b - self.C @ (self.pinv @ self.b)

    def spearman(self, d: np.ndarray, ranks: np.ndarray) -> float:
        if len(d) < 3 or np.ptp(d) == 0 or np.ptp(self.r) == 0 or not np.isfinite(d).all():
            return float("nan")
        return float(np.corrcoef(ranks, self.b)[0, 1])

    def residualized(self, ranks: np.ndarray) -> float:
        ra = ranks - self.C @ (self.pinv @ ranks)
        if ra.std() == 0 or self.rb.std() == 0:
            return float("nan")
        return float(np.corrcoef(ra, self.rb)[0, 1])


_RULER_PAIRS: dict = {}


def _ruler_pairs(R: np.ndarray, donors, tissues) -> _RulerPairs:
    key = _cache_key("ruler_pairs", R, _cache_key("groups", np.asarray([*map(str, donors), *map(str, tissues)],
                                                                       dtype="U")))
    if key not in _RULER_PAIRS:
        if len(_RULER_PAIRS) >= 4:
            _RULER_PAIRS.pop(next(iter(_RULER_PAIRS)))
        _RULER_PAIRS[key] = _RulerPairs(R, donors, tissues)
    return _RULER_PAIRS[key]


def _full_metrics(m: FittedManifold, R: np.ndarray, donors, tissues, k: int,
                  cache: dict | None = None) -> tuple[dict, np.ndarray]:
    """The full fit's statistics (as :func:`evaluate` computes them) and the latent distances' pair ranks
    (``cache``: :func:`trustworthiness`'s)."""
    rp = _ruler_pairs(R, donors, tissues)
    d = upper(latent_distances(m, m.Z))
    ranks = rankdata(d)
    res = {"trustworthiness": trustworthiness(m.train_scaled, m.Z, k, cache),
           "ruler_spearman": rp.spearman(d, ranks), "ruler_spearman_resid": rp.residualized(ranks)}
    if m.geodesic is not None:
        g = upper(m.geodesic)
        res["geodesic_spearman"] = rp.spearman(g, rankdata(g))
    return res, ranks


def _standardised(ranks: np.ndarray) -> np.ndarray:
    return (ranks - ranks.mean()) / (ranks.std() or 1.0)


def evaluate_staged(F: np.ndarray, anchors, fitter: str, *, rulers: dict[str, np.ndarray], trust_min: float,
                    holdout_min: float, holdouts=("random", "donor", "branch"), d: int = 10, k: int = 15,
                    seed: int = 0, let_epochs: int = 150, holdout_folds: int = 3, let_engine: str = "fused",
                    fit_cache: dict | None = None) -> tuple[dict, dict, dict, dict]:
    """:func:`evaluate` with the gates checked as they become known, cheapest first, and the rest skipped once one
    fails; the permutation tests are returned for a caller to score many at once (:class:`PermutationDesign`).

    ``rulers`` maps names to anchor rulers [A, A]; the first is the true ruler, the others nulls. Order: the full fit
    (trustworthiness, the ranking statistics), the random holdout, then the donor and branch holdouts (one that cannot
    be evaluated first, then branch, then donor). A gate below its threshold (``trust_min``, ``holdout_min`` for the holdouts listed in ``holdouts``) stops
    the true ruler's evaluation; a null is evaluated only when the true ruler passed every gate checked here (only
    then can its result matter), in the same order with the random holdout first, and stops at its first failure.
    The same fits, seeds and folds as :func:`evaluate`, so every value computed is the value :func:`evaluate` gives.

    Returns ``(metrics, skipped, stopped, perm)``: ``metrics[name]`` as :func:`evaluate`'s; ``skipped[name]``, the
    gated metrics not computed (``["*"]``: a null not evaluated); ``stopped[name]``, the metric whose gate failed
    first ("" when none did); ``perm[name] = (design, a)`` with ``design`` ``"all"``
    (every anchor; ruler-free fitters) or ``"random"`` (the random holdout's test anchors; LET) and ``a`` the
    latent's standardised pair ranks (:func:`standardised_pair_ranks`).
    """
    obs = anchors.obs
    donors, tissues, branches = obs["donor"].to_numpy(), obs["tissue"].to_numpy(), obs["branch"].to_numpy()
    rand_test = random_holdout_mask(len(F), seed)
    kw = dict(d=d, k=k, seed=seed, let_epochs=let_epochs, let_engine=let_engine,
              fit_cache={} if fit_cache is None else fit_cache)
    names = list(rulers)
    folds = {"random": [rand_test],
             "donor": _group_folds(donors, holdout_folds, seed) if len(np.unique(donors)) >= 2 else None,
             "branch": [branches == b for b in np.unique(branches)] if len(np.unique(branches)) >= 2 else None}
    gated = [h for h in ("donor", "branch") if h in holdouts]
    # a holdout that cannot be evaluated costs nothing and fails: first; then the branch holdout before the donor
    # holdout (more folds, but in every committed multi-donor screen it failed far more often: docs/screen.md)
    later = (sorted(gated, key=lambda h: (folds[h] is not None, h != "branch"))
             + [h for h in ("donor", "branch") if h not in gated])
    out: dict[str, dict] = {name: {} for name in names}
    skipped: dict[str, list] = {name: [] for name in names}
    stopped: dict[str, str] = {name: "" for name in names}
    perm: dict[str, tuple] = {}

    def holdout(h, rs: dict, fits=None) -> dict[str, float]:
        if folds[h] is None:
            return {n: float("nan") for n in rs}
        return holdout_spearman(F, rs, fitter, folds[h], fits=fits, **kw)

    def fails(metric: str, value: float, name: str) -> bool:
        if metric == "trustworthiness":
            bad = not (np.isfinite(value) and value >= trust_min)
        else:
            bad = metric.removeprefix("holdout_") in holdouts and not (np.isfinite(value) and value >= holdout_min)
        if bad and not stopped[name]:
            stopped[name] = metric
        return bad

    if fitter != "let":  # one fit per fold serves every ruler: a null costs only its scores
        m = fit_manifold(F, fitter, **kw)
        res, ranks = _full_metrics(m, rulers[names[0]], donors, tissues, k, kw["fit_cache"])
        out[names[0]].update(res, latent_dim=int(m.Z.shape[1]))
        a = _standardised(ranks)
        failed = fails("trustworthiness", out[names[0]]["trustworthiness"], names[0])
        for h in ["random"] + later:
            if failed:
                skipped[names[0]].append(f"holdout_{h}")
                continue
            vals = holdout(h, rulers)
            for name in names:
                out[name][f"holdout_{h}"] = vals[name]
            failed = fails(f"holdout_{h}", vals[names[0]], names[0])
        perm[names[0]] = ("all", a)
        for name in names[1:]:
            if failed:
                out[name], skipped[name] = {}, ["*"]
            else:
                out[name].update(_full_metrics(m, rulers[name], donors, tissues, k, kw["fit_cache"])[0])
                perm[name] = ("all", a)
        return out, skipped, stopped, perm

    def let_side(name: str, null: bool) -> bool:
        R = rulers[name]
        res, skip = out[name], skipped[name]

        def full():
            m = fit_manifold(F, fitter, ruler=R, **kw)
            res.update(_full_metrics(m, R, donors, tissues, k, kw["fit_cache"])[0])
            res["latent_dim"] = int(m.Z.shape[1])
            return fails("trustworthiness", res["trustworthiness"], name)

        def random_holdout():
            fits: dict = {}
            res["holdout_random"] = holdout("random", {name: R}, fits)[name]
            mt = fits.get((0, name))
            if mt is None:  # the fold was too small or constant to score: fit it for the permutation test all the same
                mt = fit_manifold(F[~rand_test], fitter, ruler=R[np.ix_(~rand_test, ~rand_test)], **kw)
            perm[name] = ("random", standardised_pair_ranks(latent_distances(mt, mt.transform(F[rand_test]))))
            return fails("holdout_random", res["holdout_random"], name)

        # the full fit (ranking statistics) and the random holdout (the permutation test's latent, the learned
        # gate's statistic) are made for the true ruler whatever the outcome; a null stops at its first failure
        steps = ([("holdout_random", random_holdout), ("trustworthiness", full)] if null
                 else [("trustworthiness", full), ("holdout_random", random_holdout)])
        failed = False
        for metric, step in steps:
            if failed and null:
                skip.append(metric)
            else:
                failed = step() or failed
        for h in later:
            if failed:
                skip.append(f"holdout_{h}")
                continue
            res[f"holdout_{h}"] = holdout(h, {name: R})[name]
            failed = fails(f"holdout_{h}", res[f"holdout_{h}"], name)
        return failed

    failed = let_side(names[0], null=False)
    for name in names[1:]:
        if failed:
            skipped[name] = ["*"]
        else:
            let_side(name, null=True)
    return out, skipped, stopped, perm
