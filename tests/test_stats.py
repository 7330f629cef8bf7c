"""sclens.stats: metrics, paired tests, multiple testing and enrichment with known answers."""

import math

import numpy as np
import pytest
from scipy.stats import hypergeom, norm

from sclens.stats import (abs_spearman, auroc, balanced_accuracy, bh_qvalues, depth_ceiling, hypergeom_enrichment,
                          macro_f1, paired_wilcoxon)


# ------------------------------------------------------------------ metrics
def test_metrics_known_answers():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))
    assert balanced_accuracy(["a", "a", "a", "b"], ["a", "a", "b", "b"]) == pytest.approx((2 / 3 + 1) / 2)
    # a class that is only predicted (c) adds no zero recall
    assert balanced_accuracy(["a", "b"], ["a", "c"]) == pytest.approx(0.5)
    # F1(a) = 2/3, F1(b) = 0.8
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 0.8) / 2)
    assert abs_spearman([0, 1, 2, 3], [9, 5, 2, 1]) == pytest.approx(1.0)
    assert math.isnan(abs_spearman([0, 1, 2, 3], [1, 1, 1, 1]))
    # ceiling with two tied levels: Spearman(depth, 0..3) = corr([1.5,1.5,3.5,3.5], [1,2,3,4])
    assert depth_ceiling([0, 0, 1, 1]) == pytest.approx(2 / math.sqrt(5))
    assert depth_ceiling([0, 1, 2, 3]) == pytest.approx(1.0)


# ------------------------------------------------------------------ statistics
def test_paired_wilcoxon_known_answers():
    r = paired_wilcoxon([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0])
    assert r["p"] == pytest.approx(2 / 64) and (r["wins"], r["ties"], r["losses"]) == (6, 0, 0)  # exact
    # tied magnitudes: normal approximation with tie correction (var = 91/4 - (6^3-6)/48)
    r = paired_wilcoxon([1] * 6, [0] * 6)
    assert r["p"] == pytest.approx(2 * norm.sf(10.5 / math.sqrt(22.75 - 210 / 48)))
    # a zero difference (Pratt): ranked with the others, then dropped; mean and variance corrected for it
    r = paired_wilcoxon([0, 1, 2, -3, 4, 5], [0] * 6)
    mu, var = 6 * 7 / 4 - 2 / 4, 6 * 7 * 13 / 24 - 6 / 24
    assert r["ties"] == 1 and r["p"] == pytest.approx(2 * norm.sf((16 - mu) / math.sqrt(var)))
    assert paired_wilcoxon([0.5, 0.7, 0.1], [0.5, 0.7, 0.1])["p"] == 1.0  # all zero differences
    assert math.isnan(paired_wilcoxon([0.5, np.nan], [0.1, 0.2])["p"])  # one usable pair


def test_bh_qvalues_known_answers_and_nan():
    q = bh_qvalues([0.01, 0.04, 0.03, 0.5, np.nan])
    assert np.allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert math.isnan(q[4])


def test_enrichment_p_values_match_scipy_and_the_hand_count():
    universe = [f"g{i}" for i in range(20)]
    gene_set = ["g0", "g1", "g2", "g3", "g4", "not_in_panel"]
    selected = ["g0", "g1", "g2", "g10"]
    e = hypergeom_enrichment(selected, gene_set, universe)
    assert e["overlap"] == 3 and e["set_size_in_universe"] == 5 and e["genes"] == ["g0", "g1", "g2"]
    by_hand = sum(math.comb(5, k) * math.comb(15, 4 - k) for k in (3, 4)) / math.comb(20, 4)
    assert math.isclose(e["p"], by_hand, rel_tol=1e-9)
    assert math.isclose(e["p"], hypergeom.sf(2, 20, 5, 4), rel_tol=1e-9)
    assert hypergeom_enrichment(["g15"], gene_set, universe)["p"] == 1.0  # no overlap: P(X >= 0) = 1
