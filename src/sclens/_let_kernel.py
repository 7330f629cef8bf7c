"""LET's pair pass, compiled (numba): one sweep over the anchor pairs per optimisation step, with no anchors x anchors
array (see :meth:`sclens.manifold.LETModel._fit_fused`)."""

from __future__ import annotations

import numba
import numpy as np

_f32 = np.float32
# arccos on [0, 1] as sqrt(1 - x) * P(x), P of degree 7 (Abramowitz & Stegun 4.4.46, |error| <= 2e-8: below float32's
# rounding of the angle); written out so that the loop vectorises (a call to the C library's acosf does not)
_A = tuple(_f32(a) for a in (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046, 0.0308918810, -0.0170881256,
                             0.0066700901, -0.0012624911))
_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7 = _A
_PI = _f32(np.pi)


# error_model="numpy": no zero-division check (the denominators are >= sqrt(1 - hi^2) > 0), which would stop the
# loops from vectorising; fastmath only lets the sums be reassociated and products fused (no finite-math assumptions)
@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy", cache=True, nogil=True)
def let_pair_pass(znT, T, beta, hi, g_znT, c, gc):  # pragma: no cover - compiled (tests/test_manifold.py)
    """For unit latent columns ``znT`` [d, n] (float32) and the ruler's pairs i < j packed row by row in ``T``
    (:func:`packed_upper`): the fit's squared residuals summed over the pairs, ``sum (beta acos(c_ij) - T_ij)^2``,
    the sum of ``residual_ij * acos(c_ij)``, and, into ``g_znT``, ``sum_j g_ij zn_j`` for every anchor i with
    ``g_ij = residual_ij / sqrt(1 - c_ij^2)`` (0 where |c_ij| > hi, where the cosine is clamped to +-hi).
    ``c`` and ``gc`` are float32 scratch rows of length n."""
    d, n = znT.shape
    one, zero = _f32(1.0), _f32(0.0)
    g_znT[:] = zero
    fit_sum, g_sum = 0.0, 0.0
    start = 0
    for i in range(n - 1):
        m = i + 1
        cr, gr, Ti = c[m:], gc[m:], T[start:start + n - m]
        start += n - m
        cr[:] = zero
        for k in range(d):  # the cosines of anchor i with every later anchor
            zik, zr = znT[k, i], znT[k, m:]
            for j in range(cr.shape[0]):
                cr[j] += zik * zr[j]
        fs, gs = zero, zero
        for j in range(cr.shape[0]):
            x = cr[j]
            ax = min(abs(x), hi)
            s = np.sqrt(one - ax)
            p = ((((((_A7 * ax + _A6) * ax + _A5) * ax + _A4) * ax + _A3) * ax + _A2) * ax + _A1) * ax + _A0
            th = s * p if x >= zero else _PI - s * p
            e = beta * th - Ti[j]
            fs += e * e
            gs += e * th
            g = e / (s * np.sqrt(one + ax))
            gr[j] = g if abs(x) <= hi else zero
        fit_sum += fs
        g_sum += gs
        for k in range(d):  # both sides of each pair: anchor i gathers, the later anchors receive
            zik, zr, gzr = znT[k, i], znT[k, m:], g_znT[k, m:]
            acc = zero
            for j in range(cr.shape[0]):
                acc += gr[j] * zr[j]
                gzr[j] += gr[j] * zik
            g_znT[k, i] += acc
    return fit_sum, g_sum


def packed_upper(R: np.ndarray) -> np.ndarray:
    """The pairs i < j of a square matrix, row by row, as float32 (half the memory the pass reads each step)."""
    return R[np.triu_indices(len(R), 1)].astype(_f32)
