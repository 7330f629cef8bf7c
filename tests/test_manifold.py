import numpy as np
import pytest

from sclens.errors import InputError
from sclens.manifold import (LETModel, PermutationDesign, blocked_permutation_p, fit_manifold, knn_geodesic, pdist,
                             residualized_spearman, row_space_basis, smacof_metric, spearman_pairs,
                             standardised_pair_ranks, trustworthiness, twonn_dimension)


def test_spearman_pairs_known_values():
    x = np.arange(6.0)[:, None]
    D = pdist(x)
    assert spearman_pairs(D, D) == pytest.approx(1.0)
    assert spearman_pairs(D, D.max() - D) == pytest.approx(-1.0)
    assert np.isnan(spearman_pairs(D, np.zeros_like(D)))


def test_residualised_spearman_removes_a_donor_effect():
    rng = np.random.default_rng(0)
    donors = np.repeat(["a", "b"], 20)
    stage = np.tile(np.arange(20.0), 2)
    R = np.abs(stage[:, None] - stage[None, :])
    Z = np.c_[stage + rng.normal(0, 0.1, 40), np.where(donors == "a", 0, 50.0)]  # huge donor offset
    D = pdist(Z)
    assert spearman_pairs(D, R) < 0.5
    assert residualized_spearman(D, R, donors, np.repeat("t", 40)) > 0.9


def test_trustworthiness_identity_and_scramble():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 5))
    assert trustworthiness(X, X, 10) == pytest.approx(1.0)
    assert trustworthiness(X, rng.normal(size=(80, 2)), 10) < 0.75


def test_twonn_recovers_dimension():
    rng = np.random.default_rng(2)
    Y = rng.uniform(size=(2000, 3)) @ rng.normal(size=(3, 12))
    assert 2.5 < twonn_dimension(Y) < 3.5


def test_geodesic_distances_follow_a_curve():
    t = np.linspace(0, 3 * np.pi, 200)
    X = np.c_[np.cos(t), np.sin(t), 0.3 * t]
    D, _ = knn_geodesic(X, 5)
    arc = np.sqrt(1 + 0.09) * np.abs(t[:, None] - t[None, :])
    assert spearman_pairs(D, arc) > 0.99


@pytest.mark.parametrize("fitter", ["isomap", "gmds", "let"])
def test_fitters_recover_a_ruler(fitter):
    rng = np.random.default_rng(3)
    stage = np.repeat(np.arange(8.0), 6)
    R = np.abs(stage[:, None] - stage[None, :])
    F = np.c_[np.cos(stage / 3), np.sin(stage / 3), stage / 4] @ rng.normal(size=(3, 20)) + rng.normal(0, 0.02, (48, 20))
    m = fit_manifold(F, fitter, d=3, ruler=R, let_epochs=400)
    from sclens.manifold import latent_distances

    assert spearman_pairs(latent_distances(m, m.Z), R) > 0.8
    Zt = m.transform(F[:5])
    assert Zt.shape == (5, m.Z.shape[1])


def test_permutation_p_add_one_rule_and_blocks():
    stage_ruler = np.abs(np.arange(10.0)[:, None] - np.arange(10.0)[None, :])
    sidx = np.tile(np.arange(10), 3)
    blocks = np.repeat([0, 1, 2], 10)
    D = stage_ruler[np.ix_(sidx, sidx)] + 0.01
    p, n = blocked_permutation_p(D, sidx, stage_ruler, blocks, n_perm=500, seed=0)
    assert n == 500 and p == pytest.approx(1 / 501)
    rng = np.random.default_rng(0)
    Dn = pdist(rng.normal(size=(30, 3)))
    p2, n2 = blocked_permutation_p(Dn, sidx, stage_ruler, blocks, n_perm=2000, seed=0)
    assert p2 > 0.05 and n2 < 2000  # a clear failure stops early
    # a constant-within-block labelling cannot be permuted into anything else: p = 1
    p3, _ = blocked_permutation_p(D, sidx, stage_ruler, np.arange(30), n_perm=50)
    assert p3 == pytest.approx(1.0)


@pytest.mark.parametrize("case", range(6))
def test_permutation_p_design_path_equals_the_pair_path(case):
    """The default (PermutationDesign's matrix product) and the exact (pair gathering) statistic agree on every
    permutation: same p and same number of permutations run, also with tied ruler values, stages absent from
    the anchors, singleton blocks and relabellings that only swap anchors of one stage."""
    rng = np.random.default_rng(case)
    S = int(rng.integers(3, 9))
    stage_ruler = rng.integers(0, 4, size=(S, S)).astype(float)  # many tied values
    stage_ruler = np.triu(stage_ruler, 1) + np.triu(stage_ruler, 1).T
    A = int(rng.integers(8, 40))
    sidx = rng.integers(0, S - 1, size=A)  # the last stage never occurs
    blocks = rng.integers(0, int(rng.integers(1, 6)), size=A)
    blocks[0] = 99  # a singleton block
    signal = stage_ruler[np.ix_(sidx, sidx)] * (case % 2)
    D = signal + pdist(rng.normal(size=(A, 2)))
    for n_perm, stop in ((300, 20), (1000, 10**9)):
        fast = blocked_permutation_p(D, sidx, stage_ruler, blocks, n_perm=n_perm, seed=case, stop_after=stop)
        exact = blocked_permutation_p(D, sidx, stage_ruler, blocks, n_perm=n_perm, seed=case, stop_after=stop,
                                      exact=True)
        assert fast == exact
        # the batched design (the screen's default path) gives the same, several latents at once
        # (with the relabellings' ranks kept by the design, and gathered per batch when they would not fit)
        flipped = blocked_permutation_p(D[::-1, ::-1], sidx, stage_ruler, blocks, n_perm=n_perm, seed=case,
                                        stop_after=stop, exact=True)
        for cache_bytes in (4e9, 0):
            design = PermutationDesign(sidx, stage_ruler, blocks, n_perm=n_perm, seed=case, stop_after=stop,
                                       cache_bytes=cache_bytes)
            assert (design._cached_ranks(1) is None) == (cache_bytes == 0)
            for _ in range(2):  # a second batch reuses the kept ranks
                batch = design.p_values(np.stack([standardised_pair_ranks(D), standardised_pair_ranks(D[::-1, ::-1])]))
                assert batch == [exact, flipped]


def test_permutation_design_rejects_a_latent_of_another_size():
    design = PermutationDesign(np.arange(6) % 3, np.ones((3, 3)), np.zeros(6), n_perm=10)
    with pytest.raises(InputError, match="anchor pairs"):
        design.p_values(np.zeros((1, 14)))


@pytest.mark.parametrize("n", [40, 120])
def test_fused_let_follows_the_autograd_fit(n):
    """The fused gradient is the same objective and optimiser: the fits agree (closely; Adam magnifies rounding in
    coordinates whose gradient is near zero, more so on small problems)."""
    rng = np.random.default_rng(n)
    t = np.sort(rng.uniform(0, 3, n))
    X = np.c_[np.cos(t), np.sin(t), t, rng.normal(size=(n, 20)) * 0.3]
    X = (X - X.mean(0)) / X.std(0)
    R = np.abs(t[:, None] - t[None, :])
    a = LETModel(d=4, epochs=120).fit(X, R)
    f = LETModel(d=4, epochs=120, engine="fused").fit(X, R)
    assert abs(a.final_fit_loss - f.final_fit_loss) <= 1e-3 * max(1.0, a.final_fit_loss)
    assert abs(a.beta - f.beta) <= 1e-3 * a.beta
    Za, Zf = a.transform(X), f.transform(X)
    assert spearman_pairs(a.angular_distances(Za), f.angular_distances(Zf)) > 0.999
    with pytest.raises(InputError, match="engine"):
        LETModel(engine="jit")


@pytest.mark.parametrize("n", [2, 3, 37, 130])
def test_let_pair_pass_matches_the_dense_formulas(n):
    """The compiled pair pass against the dense float64 formulas: the fit's sums and the gradient wrt the unit
    latent, with duplicated and opposite anchors (cosines at +-1: clamped, zero gradient) among them."""
    from sclens._let_kernel import let_pair_pass, packed_upper

    rng = np.random.default_rng(n)
    Z = rng.normal(size=(5, n)).astype(np.float32)
    if n > 3:
        Z[:, 1], Z[:, 2] = Z[:, 0], -Z[:, 0]
    Z /= np.linalg.norm(Z, axis=0)
    R = rng.uniform(0, 3, size=(n, n))
    beta, hi = np.float32(1.7), np.float32(1 - 1e-6)
    g = np.full_like(Z, np.nan)
    fit_sum, g_sum = let_pair_pass(Z, packed_upper(R), beta, hi, g, np.empty(n, np.float32), np.empty(n, np.float32))
    iu = np.triu_indices(n, 1)
    C = Z.astype(float).T @ Z.astype(float)
    Cc = np.clip(C, -float(hi), float(hi))
    E = float(beta) * np.arccos(Cc) - R
    assert fit_sum == pytest.approx((E[iu] ** 2).sum(), rel=1e-5)
    assert g_sum == pytest.approx((E[iu] * np.arccos(Cc[iu])).sum(), rel=1e-5, abs=1e-5)
    G = np.zeros((n, n))
    G[iu] = np.where(np.abs(C[iu]) <= float(hi), E[iu] / np.sqrt(1 - Cc[iu] ** 2), 0.0)
    G = G + G.T
    if n > 3:
        assert G[0, 1] == G[0, 2] == 0.0  # the clamped pairs carry no gradient
    np.testing.assert_allclose(g, Z.astype(float) @ G, rtol=1e-4, atol=1e-4 * np.abs(Z @ G).max())


def test_let_pair_pass_arccos_is_accurate_over_the_range():
    """The pass's arccos (a polynomial, so that it vectorises) within float32 rounding of numpy's over [-1, 1]."""
    from sclens._let_kernel import let_pair_pass

    scratch = np.empty(2, np.float32), np.empty(2, np.float32)
    for x in np.linspace(-1 + 1e-6, 1 - 1e-6, 2001).astype(np.float32):
        Z = np.array([[1.0, x], [0.0, np.sqrt(1 - np.float64(x) ** 2)]], np.float32)  # cosine: exactly x
        fit_sum, g_sum = let_pair_pass(Z, np.zeros(1, np.float32), np.float32(1.0), np.float32(1 - 1e-6),
                                       np.empty_like(Z), *scratch)  # ruler 0: the residual is the angle itself
        assert np.sqrt(fit_sum) == pytest.approx(np.arccos(np.float64(x)), abs=1e-6)
        assert g_sum == pytest.approx(fit_sum, rel=1e-6)


@pytest.mark.parametrize("n, dup", [(40, False), (120, True)])
def test_smacof_metric_is_scikit_learns_iteration(n, dup):
    """The buffered SMACOF gives scikit-learn's configuration (same iteration count, same stopping rule, zero
    distances read as 1e-5: a duplicated point makes one)."""
    from sklearn.manifold import smacof

    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, 6))
    if dup:
        X[1] = X[0]
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    init = rng.normal(size=(n, 3))
    for max_iter, eps in ((5, 1e-6), (300, 1e-4)):
        ref, _, it = smacof(D, n_components=3, init=init, n_init=1, max_iter=max_iter, metric=True, eps=eps,
                            random_state=0, normalized_stress="auto", return_n_iter=True)
        Z = smacof_metric(D, init, max_iter=max_iter, eps=eps)
        np.testing.assert_allclose(Z, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    assert it < 300  # the stopping rule fired, and at the same step (else the configurations would differ)


def test_trustworthiness_with_the_feature_side_cached_is_scikit_learns():
    from sklearn.manifold import trustworthiness as sk

    rng = np.random.default_rng(3)
    F = rng.normal(size=(90, 30))
    F[5] = F[4]  # a tie in the feature-space distances
    cache: dict = {}
    for d in (2, 5):
        Z = F[:, :d] + rng.normal(scale=0.3, size=(90, d))
        for k in (5, 15):
            assert trustworthiness(F, Z, k, cache) == pytest.approx(sk(F, Z, n_neighbors=k), abs=1e-12)
    assert len(cache) == 1  # one ranking of F served every embedding and k
    assert np.isnan(trustworthiness(F[:2], Z[:2], 5, cache))


def _svd_basis(X):
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    V = Vt[S > S[0] * 1e-7]
    return V * np.where(V[np.arange(len(V)), np.abs(V).argmax(1)] < 0, -1.0, 1.0)[:, None]


@pytest.mark.parametrize("case", ["centred", "uncentred", "low_rank", "tall"])
def test_row_space_basis_is_the_svds_with_canonical_signs_whichever_route(case, monkeypatch):
    rng = np.random.default_rng(3)
    n, G = (40, 12) if case == "tall" else (40, 90)
    X = rng.normal(size=(n, G)) * np.linspace(1, 30, G)
    if case == "low_rank":  # rank 6 plus float32 rounding noise near the cut: the SVD decides
        X = (rng.normal(size=(n, 6)) @ rng.normal(size=(6, G))).astype(np.float32).astype(np.float64)
    if case in ("centred", "low_rank"):
        X = (X - X.mean(0)) / X.std(0)
    svd_calls = []
    real_svd = np.linalg.svd
    monkeypatch.setattr(np.linalg, "svd", lambda *a, **k: svd_calls.append(1) or real_svd(*a, **k))
    V, coords = row_space_basis(X)
    monkeypatch.undo()
    assert bool(svd_calls) == (case in ("low_rank", "tall"))  # the Gram route only where it is certain
    ref = _svd_basis(X)
    assert V.shape == ref.shape
    np.testing.assert_allclose(V, ref, atol=1e-8)
    np.testing.assert_allclose(coords, X @ ref.T, atol=1e-8 * np.abs(X).max())
    np.testing.assert_allclose(V @ V.T, np.eye(len(V)), atol=1e-10)
    lead = V[np.arange(len(V)), np.abs(V).argmax(1)]
    assert (lead > 0).all()
