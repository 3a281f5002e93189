r"""The spec's numerics (spec/conventions.md, "Numbers") under ``jax.jit``.

The spec computes every scalar coefficient (bias corrections, β̂₂, 1 − αλ, ε_t, clip
scales) on the host in float64 and rounds it once to the parameter dtype, and
accumulates every reduction in float64. Under ``jit`` the step count is traced, so
these scalars are computed on the device, in one of two ways:

* **x64 enabled** (``jax.config.update("jax_enable_x64", True)`` or
  ``with jax.enable_x64(True)``): :class:`F64`, float64 with the reference's own
  formulas (``1 - beta**t``; XLA's float64 ``pow`` agrees with the C library's for
  normal results, checked in the tests), and float64 reductions. This is the reference,
  up to the order in which float64 sums are accumulated.
* **x64 disabled** (JAX's default): there is no float64, so the scalars are computed
  in *float-float* arithmetic, :class:`DD`: a value is an unevaluated sum hi + lo of two
  float32 numbers (a 48-bit significand), with error-free transformations (TwoSum, and
  a TwoProd whose splitting masks bits, so that XLA's contraction of a·b + c into an FMA
  cannot break it; their rounded intermediates pass an optimization barrier, because
  XLA's algebraic simplifier rewrites (b + 1) − 1 as b). 1 − βᵗ comes from a host table of
  β^(2^k) and 1 − β^(2^k) (float64) combined over the bits of t with 1 − β^(a+b) = (1 − β^a) + β^a(1 − β^b), which never
  cancels. The float-float value is within ~2⁻⁴⁵ of the float64 one, so rounding it to
  float32 gives the reference's float32 scalar except where the value lies within that
  distance of a rounding boundary. (Plain float32 would not do: β₂ = 0.999 rounded to
  float32 is off by 1.3e-8, and 1 − β₂ᵗ at t = 1000 then by 7.6e-6 relative, four times
  the vectors' tolerance; ``jnp.expm1`` in float32 is up to 5 ulp off.)
  Reductions of float32 data are float32 sums (XLA's order: measured within ~1e-7
  relative up to 4M elements), redone on data scaled by 2^-80 or 2^88 (exact) when the
  plain sum overflowed or may have lost small squares to underflow, so that squares
  which overflow or underflow float32 but not float64 still give the float64 result;
  RMS and clip scales from them are float32 (a float32 sum carries ~1 ulp anyway). An RMS
  keeps its unscaled factor and the scale (:class:`ScaledDD`): below float32's normal range
  the RMS itself has lost bits, and FAdam's ε_t = (ε₂·RMS)^{2p} is formed from the factors.

Both produce values of the scalar classes below, which the rules round with
``.round(dtype)``. XLA:CPU flushes subnormal numbers to zero (inputs and results); no
float arithmetic here can change that (see spec/vectors.md, "Functional implementations").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

__all__ = [
    "x64_enabled",
    "numbers",
    "F64",
    "DD",
    "ScaledDD",
    "rms",
    "rms_of",
    "column_mean_of_squares",
    "adaptive_epsilon",
    "clip_scale",
    "power",
]

_MASK32 = np.uint32(0xFFFFF000)  # keeps sign, exponent and the top 11 stored bits: a 12-bit significand


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


class Scalar(Protocol):
    """A scalar of the step's host-precision arithmetic (an :class:`F64` or a :class:`DD`; an
    operation takes another of the same class, or a float or array, which it converts)."""

    def __add__(self, o: Any, /) -> Scalar: ...
    def __radd__(self, o: Any, /) -> Scalar: ...
    def __sub__(self, o: Any, /) -> Scalar: ...
    def __rsub__(self, o: Any, /) -> Scalar: ...
    def __mul__(self, o: Any, /) -> Scalar: ...
    def __rmul__(self, o: Any, /) -> Scalar: ...
    def __truediv__(self, o: Any, /) -> Scalar: ...
    def __rtruediv__(self, o: Any, /) -> Scalar: ...
    def sqrt(self) -> Scalar: ...
    def value(self) -> jax.Array: ...
    def round(self, dtype: DTypeLike) -> jax.Array: ...


class Numbers(Protocol):
    """The scalar class of the current trace (:class:`F64` or :class:`DD`, see :func:`numbers`)."""

    def const(self, v: float, /) -> Scalar: ...
    def of(self, v: ArrayLike, /) -> Scalar: ...
    def one_minus_pow(self, beta: float, n: ArrayLike, /) -> Scalar: ...


def numbers() -> Numbers:
    """The scalar class for the current trace: F64 with x64, DD without."""
    return F64 if x64_enabled() else DD


# ---- float64 (x64) ---------------------------------------------------------------------------
class F64:
    """A float64 scalar (x64 enabled): the reference's host arithmetic, on the device."""

    __slots__ = ("x",)

    def __init__(self, x: ArrayLike) -> None:
        self.x = jnp.asarray(x, jnp.float64)

    @classmethod
    def const(cls, v: float) -> F64:
        return cls(np.float64(v))

    @classmethod
    def of(cls, v: ArrayLike) -> F64:
        """A traced scalar (a schedule's learning rate) or a Python float."""
        return cls(v)

    @staticmethod
    def _x(o: F64 | ArrayLike) -> jax.Array:
        return o.x if isinstance(o, F64) else jnp.asarray(o, jnp.float64)

    def __add__(self, o: F64 | ArrayLike) -> F64:
        return F64(self.x + self._x(o))

    def __radd__(self, o: F64 | ArrayLike) -> F64:
        return F64(self._x(o) + self.x)

    def __sub__(self, o: F64 | ArrayLike) -> F64:
        return F64(self.x - self._x(o))

    def __rsub__(self, o: F64 | ArrayLike) -> F64:
        return F64(self._x(o) - self.x)

    def __mul__(self, o: F64 | ArrayLike) -> F64:
        return F64(self.x * self._x(o))

    def __rmul__(self, o: F64 | ArrayLike) -> F64:
        return F64(self._x(o) * self.x)

    def __truediv__(self, o: F64 | ArrayLike) -> F64:
        return F64(self.x / self._x(o))

    def __rtruediv__(self, o: F64 | ArrayLike) -> F64:
        return F64(self._x(o) / self.x)

    def sqrt(self) -> F64:
        return F64(jnp.sqrt(self.x))

    def value(self) -> jax.Array:
        """The value in the scalar dtype (float64)."""
        return self.x

    def round(self, dtype: DTypeLike) -> jax.Array:
        return self.x.astype(dtype)

    @staticmethod
    def one_minus_pow(beta: float, n: ArrayLike) -> F64:
        """1 − βⁿ as the reference computes it: ``1 - beta**n`` in float64 (n ≥ 0, traced int)."""
        return F64(1.0 - jnp.power(jnp.float64(beta), jnp.asarray(n).astype(jnp.float64)))


# ---- float-float (x64 disabled) ---------------------------------------------------------------
# Every rounded result that an error term refers to passes an optimization barrier: XLA's
# algebraic simplifier otherwise rewrites e.g. (b + 1) - 1 as b (valid for reals, not for floats),
# and a multiply could be contracted into an FMA in one use but not in another.
_barrier = lax.optimization_barrier


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = _barrier(a + b)
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _quick_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = _barrier(a + b)
    return s, b - (s - a)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a = hi + lo exactly, each with a 12-bit significand (by masking bits: no FMA can interfere)."""
    hi = _barrier(lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.uint32) & _MASK32, jnp.float32))
    return hi, a - hi


def _two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p + e = a·b exactly (Dekker); every product below is exact, so an FMA changes nothing."""
    p = _barrier(a * b)
    ah, al = _split(a)
    bh, bl = _split(b)
    e = al * bl - (((p - ah * bh) - al * bh) - ah * bl)
    return p, e


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _dd(raw: jax.Array, s: jax.Array, e: jax.Array) -> DD:
    """Normalise s + e; where the float32 result ``raw`` is not finite, the result is ``raw``
    itself (Inf or NaN propagate as in float64; the error terms would turn them into NaN)."""
    hi, lo = _quick_two_sum(s, e)
    ok = jnp.isfinite(raw)
    return DD(jnp.where(ok, hi, raw), jnp.where(ok, lo, 0.0))


def _dd_where(ok: jax.Array, s: jax.Array, c: jax.Array) -> DD:
    """s + c normalised where ``ok``, else s alone (sqrt of 0, Inf or NaN)."""
    hi, lo = _quick_two_sum(s, c)
    return DD(jnp.where(ok, hi, s), jnp.where(ok, lo, 0.0))


class DD:
    """A float-float scalar hi + lo (two float32), ~48-bit significand (x64 disabled)."""

    __slots__ = ("hi", "lo")

    def __init__(self, hi: ArrayLike, lo: ArrayLike | None = None) -> None:
        self.hi = _f32(hi)
        self.lo = jnp.zeros((), jnp.float32) if lo is None else _f32(lo)

    @classmethod
    def const(cls, v: float) -> DD:
        v = float(v)
        with np.errstate(over="ignore"):
            hi = np.float32(v)
        if not math.isfinite(float(hi)):
            return cls(hi, np.float32(0.0))
        return cls(hi, np.float32(v - float(hi)))

    @classmethod
    def of(cls, v: ArrayLike) -> DD:
        if isinstance(v, (int, float)):
            return cls.const(v)
        return cls(jnp.asarray(v).astype(jnp.float32))

    @staticmethod
    def _d(o: DD | ArrayLike) -> DD:
        return o if isinstance(o, DD) else DD.of(o)

    def __add__(self, o: DD | ArrayLike) -> DD:
        o = self._d(o)
        s, e = _two_sum(self.hi, o.hi)
        return _dd(s, s, e + (self.lo + o.lo))

    __radd__ = __add__

    def __neg__(self) -> DD:
        return DD(-self.hi, -self.lo)

    def __sub__(self, o: DD | ArrayLike) -> DD:
        return self + (-self._d(o))

    def __rsub__(self, o: DD | ArrayLike) -> DD:
        return self._d(o) - self

    def __mul__(self, o: DD | ArrayLike) -> DD:
        o = self._d(o)
        p, e = _two_prod(self.hi, o.hi)
        return _dd(p, p, e + (self.hi * o.lo + self.lo * o.hi))

    __rmul__ = __mul__

    def __truediv__(self, o: DD | ArrayLike) -> DD:
        o = self._d(o)
        q1 = self.hi / o.hi
        r = self - o * DD(jnp.where(jnp.isfinite(q1), q1, 0.0))
        return _dd(q1, q1, r.hi / o.hi)

    def __rtruediv__(self, o: DD | ArrayLike) -> DD:
        return self._d(o) / self

    def sqrt(self) -> DD:
        s = jnp.sqrt(self.hi)
        ok = jnp.isfinite(s) & (s > 0)
        s_ok = jnp.where(ok, s, 1.0)
        p, e = _two_prod(s_ok, s_ok)
        r = (self.hi - p) - e + self.lo
        return _dd_where(ok, s, r / (2 * s_ok))

    def value(self) -> jax.Array:
        """The value in the scalar dtype (float32)."""
        return self.hi

    def round(self, dtype: DTypeLike) -> jax.Array:
        # hi is the float32 nearest to hi + lo (normalised): the rounding of the float-float value.
        hi = jnp.where(jnp.isfinite(self.hi), self.hi + self.lo, self.hi)
        return hi.astype(dtype)

    @staticmethod
    def one_minus_pow(beta: float, n: ArrayLike) -> DD:
        """1 − βⁿ for a traced int n ≥ 0: products of β^(2^k) over the bits of n, with the
        complement carried along (1 − β^(a+b) = (1 − β^a) + β^a (1 − β^b)): no cancellation."""
        beta = float(beta)
        bits = 31
        P = np.empty(bits)
        C = np.empty(bits)
        for k in range(bits):
            if beta == 0.0:
                P[k], C[k] = 0.0, 1.0
            else:
                x = math.ldexp(math.log(beta), k)  # 2^k · ln β (exact scaling)
                P[k], C[k] = math.exp(x), -math.expm1(x)
        if beta != 0.0:
            P[0], C[0] = beta, 1.0 - beta  # exact for β ≥ 1/2 (Sterbenz), as the reference
        tables = [np.asarray([np.float32(v) for v in T], np.float32) for T in (P, C)]
        tables = [
            tables[0],
            np.asarray(P - tables[0].astype(np.float64), np.float32),
            tables[1],
            np.asarray(C - tables[1].astype(np.float64), np.float32),
        ]
        ch, cl = _complement_of_power(*tables, jnp.asarray(n).astype(jnp.int32))
        return DD(ch, cl)


class ScaledDD(DD):
    """The RMS of float32 data (:func:`rms_of` without x64): a :class:`DD` whose value is
    ``unscaled · inv_scale``, kept with its two factors. ``inv_scale`` is 1, 2^-88 or 2^80 (the
    exact rescaling of :func:`_sums_sq_f32`) and ``unscaled`` lies in float32's normal range: where
    the RMS itself is below it (a subnormal, a few significant bits left) FAdam's ε_t is computed
    from the factors, which lost nothing."""

    __slots__ = ("unscaled", "inv_scale")

    def __init__(self, unscaled: jax.Array, inv_scale: jax.Array) -> None:
        super().__init__(unscaled * inv_scale)  # exact, or rounded once where it is subnormal
        self.unscaled = unscaled
        self.inv_scale = inv_scale


@jax.jit
def _complement_of_power(
    p_hi: jax.Array, p_lo: jax.Array, c_hi: jax.Array, c_lo: jax.Array, n: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """1 − βⁿ from the tables of β^(2^k) and 1 − β^(2^k) (float-float), over the 31 bits of n.
    A module-level jitted function: eager calls reuse one compilation."""

    def body(k: int, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        ph, pl, ch, cl = carry
        acc_p, acc_c = DD(ph, pl), DD(ch, cl)
        pk, ck = DD(p_hi[k], p_lo[k]), DD(c_hi[k], c_lo[k])
        new_c = acc_c + acc_p * ck
        new_p = acc_p * pk
        on = ((n >> k) & 1) == 1
        return (
            jnp.where(on, new_p.hi, ph),
            jnp.where(on, new_p.lo, pl),
            jnp.where(on, new_c.hi, ch),
            jnp.where(on, new_c.lo, cl),
        )

    z = jnp.float32(0)
    _, _, ch, cl = lax.fori_loop(0, p_hi.shape[0], body, (jnp.float32(1), z, z, z))
    return ch, cl


# ---- reductions ----------------------------------------------------------------------------
# The arrays reduced are passed as a function of existing buffers (``make(*operands)``), not as
# arrays: XLA then computes them inside the reduction's loop (and the rare second pass below
# recomputes them), so nothing the size of a parameter is materialised for a reduction. The
# operands pass an optimization barrier first, so that XLA does not merge (CSE) the reduction's
# squares with the same squares elsewhere (FAdam's g·g) and materialise them to share them.
# Scale for sums whose squares may have underflowed: the smallest subnormal x = 2^-149 becomes
# 2^-61, whose square 2^-122 is normal (2^64 lost squares of |x| < 2^-138 to underflow: a subnormal
# gradient then looked like a zero one and FAdam took ε^{2p} for ε_t). The scaled path is taken only
# for sums below n·2^-101, so the scaled sum stays below n·2^75: no overflow.
_UP = np.float32(2.0**88)
_DOWN = np.float32(2.0**-80)  # scale for sums that overflowed: (2^128·2^-80)² = 2^96, n·2^96 < 2^128
_ONE = np.float32(1.0)
#: make(*operands) -> the arrays whose squares are summed (module-level: it is a static jit argument).
Reduced = Callable[..., Sequence[jax.Array]]


def _add_pairs(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _sums(xs: Sequence[jax.Array], axis: int | None) -> list[jax.Array]:
    """Σx² for each x: one single-output reduce for one array (XLA:CPU's vectorised kernel), one
    variadic reduce for several (one loop over the operands: the kernel cannot take a traced scalar
    such as ε_t, so separate sums made XLA materialise f^p + ε_t for them)."""
    if len(xs) == 1:
        return [jnp.sum(xs[0] * xs[0], axis=axis)]
    dims = tuple(range(xs[0].ndim)) if axis is None else (axis,)
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    return list(lax.reduce(tuple(x * x for x in xs), zeros, _add_pairs, dims))


@partial(jax.jit, static_argnames=("make", "axis"))
def _sums_sq_f32(operands: tuple[jax.Array, ...], make: Reduced, axis: int | None) -> list[tuple[jax.Array, jax.Array]]:
    """Σx² for each x of ``make(*operands)`` (float32), in float32 without float32's overflow and
    underflow of the squares (float64's result, up to the order of the additions).

    The plain sums, where finite and large enough that no square can have been lost to underflow
    (squares below 2^-126 flush to zero on XLA:CPU: at most n·2^-126, < 2^-25 of a sum ≥ n·2^-101);
    otherwise, in a second pass (``cond``: taken only then), the sums of (x·c)² with c = 2^88
    (small data) or 2^-80 (overflow), both exact scalings. Returns [(sum of (x·c)², 1/c)].
    Jitted at module level (``make`` a module-level function) so that eager calls compile once."""
    xs = make(*lax.optimization_barrier(tuple(operands)))
    n = xs[0].size if axis is None else xs[0].shape[0]
    plain = _sums(xs, axis)
    small = np.float32(min(max(n, 1) * 2.0**-101, 1e38))
    needs = jnp.any(jnp.stack([jnp.any(~(jnp.isfinite(p) & (p >= small))) for p in plain]))

    def scaled(ops: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        cs = [jnp.where(jnp.isfinite(p), jnp.where(p >= small, _ONE, _UP), _DOWN) for p in plain]
        ys = [y * (c if axis is None else c[None, ...]) for y, c in zip(make(*ops), cs)]
        return tuple(_sums(ys, axis)), tuple(_ONE / c for c in cs)

    def fast(ops: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        return tuple(plain), tuple(jnp.ones(p.shape, jnp.float32) for p in plain)

    sums, inv = lax.cond(needs, scaled, fast, tuple(operands))
    return list(zip(sums, inv))


def rms_of(make: Reduced, operands: tuple[jax.Array, ...], N: Numbers) -> list[Scalar]:
    """[RMS(x) for x in make(*operands)] as N values: √(mean(x²)), squares and sums in float64
    (x64) or emulated in float32 (:func:`_sums_sq_f32`); 0 for an empty tensor."""
    xs_shape = jax.eval_shape(lambda *o: make(*o), *operands)
    size = math.prod(xs_shape[0].shape)
    if size == 0:
        return [N.const(0.0) for _ in xs_shape]
    if N is F64:
        xs = [x.astype(jnp.float64) for x in make(*lax.optimization_barrier(tuple(operands)))]
        sums = _sums(xs, None)
        # the barrier keeps XLA from rewriting sqrt(x·x) as |x| for one element (x² may underflow)
        return [F64(jnp.sqrt(lax.optimization_barrier(s) / np.float64(size))) for s in sums]
    out: list[Scalar] = []
    for s, inv_c in _sums_sq_f32(tuple(operands), make, None):
        s = lax.optimization_barrier(s)
        # float32 from here: the sum carries ~1 ulp (XLA's order); float-float would not help
        out.append(ScaledDD(jnp.sqrt(s / np.float32(size)), inv_c))  # exact scaling, or +Inf on overflow
    return out


def _identity(*xs: jax.Array) -> tuple[jax.Array, ...]:
    return xs


def rms(x: jax.Array, N: Numbers) -> Scalar:
    """RMS(x) of one array."""
    return rms_of(_identity, (x.astype(jnp.float32) if N is DD else x,), N)[0]


def column_mean_of_squares(g: jax.Array, dtype: DTypeLike, N: Numbers) -> jax.Array:
    r"""\frac1V \sum_i g_{ij}^2 for a V×d tensor, accumulated in float64 (or emulated), rounded to dtype."""
    V = g.shape[0]
    if N is F64:
        g64 = g.astype(jnp.float64)
        return (jnp.sum(g64 * g64, axis=0) / np.float64(V)).astype(dtype)
    ((s, inv_c),) = _sums_sq_f32((g.astype(jnp.float32),), _identity, 0)
    # mean = s/V·(1/c)²: divide first, then scale twice (exact, or +Inf where the mean overflows)
    return (((s / np.float32(V)) * inv_c) * inv_c).astype(dtype)


# ---- FAdam's scalars -------------------------------------------------------------------------
def _exponent_limits(dtype: DTypeLike) -> tuple[float, float]:
    info = np.finfo(dtype)
    # log2 of the smallest normal, and the largest log2 that rounds to 0 (half the smallest subnormal)
    return float(np.log2(info.tiny)), float(np.log2(info.smallest_subnormal)) - 1.0


def power(x: jax.Array, p: float, dtype: DTypeLike) -> jax.Array:
    """x**p as the spec evaluates it: sqrt for p = 0.5, x itself for p = 1, else pow (p rounded)."""
    if p == 0.5:
        return jnp.sqrt(x)
    if p == 1.0:
        return x
    return x ** jnp.asarray(p, dtype)


def adaptive_epsilon(rms_g: Scalar, *, eps: float, eps2: float, p: float, dtype: DTypeLike, N: Numbers) -> jax.Array:
    r"""ε_t = min(ε, ε₂·RMS(g))^{2p} rounded to ``dtype``; ε^{2p} where that is 0; at least the
    smallest normal number (refimpl.fadam.adaptive_epsilon).

    The two guards are decided on log₂ of the unrounded value, not on the rounded one:
    XLA:CPU flushes subnormal results to zero, so a value the reference rounds to a subnormal
    (and then raises to the smallest normal) would otherwise look like 0. Where ε is the smaller,
    ε^{2p} is the host's float64 value rounded once, as the reference's."""
    log_tiny, log_zero = _exponent_limits(dtype)
    eps_pow = np.dtype(dtype).type(eps ** (2 * p))  # host, as the reference
    floor = max(eps_pow, np.finfo(dtype).tiny)
    tiny = jnp.asarray(np.finfo(dtype).tiny, dtype)
    if N is F64:
        m = N.const(eps2) * rms_g
        mv = m.value()
        # log₂ from log₂ RMS: ε₂·RMS may be flushed where RMS is not
        log_m = jnp.fmin(jnp.float64(math.log2(eps)), jnp.float64(math.log2(eps2)) + jnp.log2(rms_g.value()))
        smaller = mv < eps  # False for NaN: ε, as Python's min(ε, nan)
        if 2 * p == 1.0:
            y = m.round(dtype)
        else:  # (a flushed m, 0 on XLA:CPU: its log, which does not flush, gives the value)
            y = jnp.where(mv > 0, mv ** jnp.float64(2 * p), jnp.exp2(jnp.float64(2 * p) * log_m)).astype(dtype)
    else:
        y, log_m, smaller = _eps2_rms_power(rms_g, eps=eps, eps2=eps2, p=p, dtype=dtype)
    log_y = 2 * p * log_m
    y = jnp.where(smaller, y, jnp.asarray(eps_pow, dtype))
    zero = ~(log_y > log_zero)  # also RMS = 0 (log = -inf)
    return jnp.where(zero, jnp.asarray(floor, dtype), jnp.where(log_y < log_tiny, tiny, jnp.maximum(y, tiny)))


def _eps2_rms_power(
    rms_g: Scalar, *, eps: float, eps2: float, p: float, dtype: DTypeLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Without x64: ((ε₂·RMS)^{2p} rounded to dtype, log₂ min(ε, ε₂·RMS), whether ε₂·RMS < ε),
    from the RMS's unscaled factor (:class:`ScaledDD`), so that an RMS below float32's normal range
    loses no bits: with RMS = r·s (s = 1, 2^-88 or 2^80), (ε₂·RMS)^{2p} = (ε₂r)^{2p}·s^{2p}, formed as
    ((ε₂r)^p·s^p)², each factor normal wherever the result is (~4 ulp; plain pow where s = 1)."""
    if isinstance(rms_g, ScaledDD):
        r, inv = rms_g.unscaled, rms_g.inv_scale
    else:
        r, inv = rms_g.value(), jnp.float32(1)
    up, down = inv < 1, inv > 1  # data scaled up by 2^88 (small), down by 2^-80 (overflowed)
    u = np.float32(eps2) * r  # ε₂·RMS / s, normal
    log_s = jnp.where(up, np.float32(-88), jnp.where(down, np.float32(80), np.float32(0)))
    log_m = jnp.fmin(np.float32(math.log2(eps)), np.float32(math.log2(eps2)) + jnp.log2(r) + log_s)
    # ε₂·RMS < ε, compared as u < ε/s (a power-of-two scaling of ε: exact unless ε/s is subnormal)
    eps_over_s = jnp.where(up, np.float32(eps * 2.0**88), jnp.where(down, np.float32(eps * 2.0**-80), np.float32(eps)))
    smaller = u < eps_over_s
    if 2 * p == 1.0:
        return (u * inv).astype(dtype), log_m, smaller  # exact scaling, or one rounding to a subnormal
    plain = u ** np.float32(2 * p)
    half = (u ** np.float32(p)) * jnp.where(up, np.float32(2.0 ** (-88 * p)), np.float32(2.0 ** (80 * p)))
    y = jnp.where(up | down, half * half, plain)
    return y.astype(dtype), log_m, smaller


def clip_scale(rms_x: Scalar, clip: float, dtype: DTypeLike, N: Numbers) -> jax.Array:
    """max(1, RMS(x)/c) rounded to dtype (rounding is monotone, so max after rounding is the same)."""
    if N is DD:
        r = (rms_x.value() / np.float32(clip)).astype(dtype)  # float32 RMS: one more rounding is noise
    else:
        r = (rms_x / N.const(clip)).round(dtype)
    return jnp.fmax(jnp.asarray(1.0, dtype), r)  # fmax: NaN gives 1, as Python's max(1.0, nan)
