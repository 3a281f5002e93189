"""The numbers a fused backend must reproduce, and how closely: shared by the backend tests.

Tolerances (derived, not tuned):

* Arrays the spec makes purely elementwise (Adam, AdamW, Lion; FAdam's Fisher EMA f;
  Coupled Adam's m) are evaluated with the same IEEE operations in the same order in
  the parameter dtype (scalars rounded from float64 the same way; no fastmath, so no
  FMA contraction or reassociation): they must be **bitwise equal** in float32 and
  float64, NaN/Inf included.
* FAdam's backend multiplies by r = 1/(f^p + ε_t) and by 1/s_g, 1/s_w where the
  reference divides (spec/fadam.md allows it): ḡ and w̄ carry up to two extra
  roundings (≤ ~2 ulp; ≤ ~5 where 1/d is subnormal, d > 2^126 in float32), which
  reach m and θ scaled by 1 - β₁ and αλ, inside the per-step budget below.
* FAdam (RMS(g), RMS(ḡ), RMS(w̄)) and Coupled Adam (column means of g²) reduce in
  float64; the backend sums in a fixed chunked/64-lane order, NumPy pairwise (or
  row-sequential), so the float64 sums differ by at most ~n·2^-53 relative
  (n ≤ ~10^4 elements here: ≤ ~1e-12). In float64 that perturbation flows
  linearly into ε_t, the clip scales and v̄, hence into m and θ: we allow
  ``1e-12`` relative per step (every step is checked from identical inputs), normwise
  (atol = rtol·max|expected| of the tensor, for elements near zero after cancellation
  θ - lr·u, with the scale taken as the larger of the tensor's magnitude before and
  after the step: when the update nearly cancels θ, e.g. FAdam's clipped decay
  θ - λα·c·θ/RMS(θ) with λαc ≈ RMS(θ), the result is small but its error is relative
  to the operands). In float32 the float64 scalars are rounded to float32, so they
  differ by at most 1 ulp when they differ at all; each element then differs by a few
  float32 ulps per step: rtol ``8·2^-24`` (≈ 4.8e-7) per step, normwise as above. A
  real bug (a wrong or swapped coefficient, a missing bias correction, a dropped tail
  element) moves values by far more than 1e-6 of the tensor's scale and fails.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

INTERESTING_SHAPES = [
    (),
    (0,),
    (1,),
    (1, 1),
    (3,),
    (7,),
    (8,),
    (9,),
    (15,),
    (17,),
    (31,),
    (33,),
    (63,),
    (65,),
    (127,),
    (129,),
    (3, 5),
    (0, 4),
    (4, 0),
    (2, 3, 5),
    (1000,),
    (257, 3),
    (64, 65),
]


def tol(dtype, steps):
    if np.dtype(dtype) == np.float64:
        return 1e-12 * steps
    return 8 * 2.0**-24 * steps


def assert_exact(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    # NaN must be NaN in the same places; everything else bit for bit (incl. ±0 via view).
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN positions differ"
    ok = ~nan_a
    a_bits = actual[ok].view(np.uint32 if actual.dtype == np.float32 else np.uint64)
    e_bits = expected[ok].view(np.uint32 if expected.dtype == np.float32 else np.uint64)
    if not np.array_equal(a_bits, e_bits):
        bad = np.flatnonzero(a_bits != e_bits)[:5]
        raise AssertionError(f"{what}: not bitwise equal at {bad}: {actual[ok][bad]} vs {expected[ok][bad]}")


def assert_close(actual, expected, rtol, what, before=None):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN positions differ"
    inf_e = np.isinf(expected)
    assert np.array_equal(actual[inf_e], expected[inf_e]), f"{what}: Inf differ"
    fin = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), fin), f"{what}: finite positions differ"
    if not fin.any():
        return
    e = expected[fin].astype(np.float64)
    a = actual[fin].astype(np.float64)
    scale = np.max(np.abs(e))
    if before is not None and np.isfinite(before).any():
        # x_new = x_old - u with u ~ |x_old|: the error is relative to the operands, not to a
        # result that cancellation may have made tiny.
        scale = max(scale, float(np.max(np.abs(before[np.isfinite(before)]).astype(np.float64))))
    err = np.abs(a - e)
    limit = rtol * np.abs(e) + rtol * scale
    if not np.all(err <= limit):
        i = int(np.argmax(err - limit))
        raise AssertionError(
            f"{what}: |diff| {err[i]:.3g} > {limit[i]:.3g} (value {e[i]:.6g}, scale {scale:.3g}, rtol {rtol:.3g})"
        )


def make_tensor(rng, shape, dtype, exponent, zero=False):
    if zero:
        return np.zeros(shape, dtype=dtype)
    x = np.asarray(rng.standard_normal(shape), dtype=np.float64)
    x *= 10.0**exponent
    if x.size > 3:
        x.flat[rng.integers(0, x.size, size=max(1, x.size // 10))] = 0.0  # exact zeros too
    x = x.astype(dtype)
    assert x.shape == tuple(shape) and x.flags.c_contiguous
    return x


def max_exponent(dtype):
    # float32 keeps |x| ≤ ~1e30 (representable); squares may overflow to inf — on both sides alike.
    return 30


shapes_st = st.one_of(
    st.sampled_from(INTERESTING_SHAPES),
    st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    st.integers(1, 5000).map(lambda n: (n,)),
)


@st.composite
def problems(draw, *, matrices=False, min_tensors=1, max_tensors=6):
    """(shapes, dtypes, param exponents, grad exponents, steps, zero-grad masks, seed);
    ``matrices``: 2-D shapes only (for a rule with a per-matrix flag)."""
    n = draw(st.integers(min_tensors, max_tensors))
    if matrices:
        shapes = [draw(st.tuples(st.integers(1, 80), st.integers(0, 70))) for _ in range(n)]
    else:
        shapes = [draw(shapes_st) for _ in range(n)]
    dtypes = [draw(st.sampled_from([np.float32, np.float64])) for _ in range(n)]
    p_exp = [draw(st.integers(-30, 30)) for _ in range(n)]
    g_exp = [draw(st.integers(-30, 30)) for _ in range(n)]
    steps = draw(st.integers(1, 4))
    zero_grads = [[draw(st.booleans()) and draw(st.booleans()) for _ in range(n)] for _ in range(steps)]
    seed = draw(st.integers(0, 2**32 - 1))
    return shapes, dtypes, p_exp, g_exp, steps, zero_grads, seed
