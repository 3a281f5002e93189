"""Fused multi-tensor update rules on the CPU (Numba): Adam, AdamW, FAdam, Coupled Adam.

Same names and signatures as the reference (fisheropt.refimpl); same numerics:

* elementwise arithmetic in the parameter dtype, in the reference's order of
  operations, with every scalar coefficient computed in float64 on the host
  and rounded to the parameter dtype (the float32 kernels see only float32
  scalars, so nothing promotes); no fastmath, no FMA contraction: float32 and
  float64 results of Adam/AdamW agree with the reference bit for bit;
* one allowed rewrite (spec/fadam.md, "Order of operations"): FAdam multiplies
  by r = 1/(f^p + ε_t) and by the reciprocal clip scales instead of dividing,
  a few ulp from the reference's quotients;
* global reductions (FAdam's RMS values, Coupled Adam's column means of g^2)
  accumulated in float64 with a fixed structure (per-chunk, 64 lanes, chunks
  combined in order), so results do not depend on the thread count; they may
  differ from NumPy's pairwise sums in the last bits of the float64 sum, which
  after rounding to float32 is almost always invisible. FAdam's sums of squares
  use an explicit fma (acc ← x·x + acc, one instruction): for float32 data x·x
  is exact in float64, so that gives the very same bits as acc + x·x.

Each step is one call into one parallel kernel per dtype present in the lists
(float32 and float64 tensors may be mixed), whatever the number of tensors; see
:mod:`._core` for the chunk tables and the plan cache.

Bytes moved per element (float32): Adam/AdamW 28 (read θ,g,m,v; write θ,m,v);
FAdam 40 in two passes (g,f,θ → f | g,f,θ,m → m,θ), or 44 in three for a tensor
with a tiny gradient (see the FAdam section); Coupled Adam 24 (g | θ,g,m → θ,m);
all_finite 4.
"""

import math
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange

from ._core import (CHUNK, PlanCache, addresses, as_pointer, dtype_groups, flat_chunks, fma64, launch,
                    row_chunks, run_all)

__all__ = ["all_finite", "adam_step", "adamw_step", "fadam_step", "coupled_adam_step", "clear_cache"]

LANES = 64  # float64 accumulators per chunk in the reductions (vectorizable, fixed order)

# Coupled Adam: at most this many row blocks per tensor in the column reduction,
# which bounds its float64 partials to COUPLED_MAX_BLOCKS * d per tensor.
COUPLED_MAX_BLOCKS = 64

_plans = PlanCache()


def clear_cache() -> None:
    """Forget every cached plan (addresses and chunk tables); they are rebuilt on demand."""
    _plans.clear()
    _finite_plan.cache_clear()


# =============================================================================
# all_finite
# =============================================================================
@njit(parallel=True, cache=True)
def _finite_kernel(addr, ctens, cstart, cstop, mask, limit):
    # Integer view of the floats: |x| bits >= the exponent-all-ones pattern <=> NaN or Inf.
    # An integer max reduction vectorizes exactly (no float reassociation involved).
    nch = ctens.size
    bad = np.zeros(nch, np.uint8)
    for c in prange(nch):
        p = as_pointer(addr[ctens[c]], mask)
        mx = mask - mask
        for i in range(cstart[c], cstop[c]):
            mx = max(mx, p[i] & mask)
        if mx >= limit:
            bad[c] = 1
    for c in range(nch):
        if bad[c] != 0:
            return False
    return True


# (mask, limit) as *signed* integers: |x|'s bit pattern is non-negative, and a signed max
# maps to one vector instruction (vpmaxsd) where an unsigned one may not.
_FINITE_BITS = {
    np.dtype(np.float32): (np.int32(0x7FFFFFFF), np.int32(0x7F800000)),
    np.dtype(np.float64): (np.int64(0x7FFFFFFFFFFFFFFF), np.int64(0x7FF0000000000000)),
}


@lru_cache(maxsize=64)
def _finite_plan(signature):
    """signature: tuple of (dtype, size) per array -> [(dtype, idx, ctens, cstart, cstop)]."""
    groups: dict = {}
    for i, (dt, n) in enumerate(signature):
        groups.setdefault(dt, []).append(i)
    plan = []
    for dt, idx in groups.items():
        tens, start, stop, _ = flat_chunks([signature[i][1] for i in idx])
        plan.append((dt, idx, tens, start, stop, sum(signature[i][1] for i in idx)))
    return plan


def all_finite(arrays) -> bool:
    """True when every element of every array is finite (no NaN, no ±Inf)."""
    arrays = list(arrays)
    if not arrays:
        return True
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype not in _FINITE_BITS or not a.flags.c_contiguous:
            # Not a layout the fused kernel reads: fall back to NumPy (never wrong).
            return all(bool(np.isfinite(x).all()) for x in arrays)
    plan = _finite_plan(tuple((a.dtype, a.size) for a in arrays))
    for dt, idx, tens, start, stop, n in plan:
        mask, limit = _FINITE_BITS[dt]
        if not launch(_finite_kernel, n, addresses(arrays, idx), tens, start, stop, mask, limit):
            return False
    return True


# =============================================================================
# Adam / AdamW
# =============================================================================
@njit(parallel=True, cache=True)
def _adam_kernel(a_th, a_g, a_m, a_v, ctens, cstart, cstop,
                 b1, omb1, b2, omb2, bc2, eps, step_size, wd, mode):
    # mode 0: Adam, no decay; 1: Adam with L2 decay g + wd*θ; 2: AdamW, θ*(1 - lr*wd) (wd holds that factor).
    for c in prange(ctens.size):
        t = ctens[c]
        th = as_pointer(a_th[t], b1)
        g = as_pointer(a_g[t], b1)
        m = as_pointer(a_m[t], b1)
        v = as_pointer(a_v[t], b1)
        s = cstart[c]
        e = cstop[c]
        if mode == 2:
            for i in range(s, e):
                gi = g[i]
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = th[i] * wd - step_size * (mi / (np.sqrt(vi) / bc2 + eps))
        elif mode == 1:
            for i in range(s, e):
                ti = th[i]
                gi = g[i] + wd * ti
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = ti - step_size * (mi / (np.sqrt(vi) / bc2 + eps))
        else:
            for i in range(s, e):
                gi = g[i]
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = th[i] - step_size * (mi / (np.sqrt(vi) / bc2 + eps))


def _build_flat_plan(lists):
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        tens, start, stop, first = flat_chunks([params[i].size for i in idx])
        sizes = np.array([params[i].size for i in idx], dtype=np.int64)
        plan.append((dt, idx, [addresses(lst, idx) for lst in lists], tens, start, stop, first,
                     sizes, int(sizes.sum())))
    return plan


def _adam_launches(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """The kernel launches of one Adam/AdamW step, every argument allocated (nothing written yet)."""
    if not params:
        return []
    plan = _plans.get("adam", (params, m, v), _build_flat_plan)
    step_size = lr / (1 - beta1**step)
    bc2 = math.sqrt(1 - beta2**step)
    if decoupled:
        mode, wd = 2, 1 - lr * weight_decay
    else:
        mode, wd = (1 if weight_decay != 0 else 0), weight_decay
    launches = []
    for dt, idx, (a_th, a_m, a_v), tens, start, stop, _first, _sizes, n in plan:
        T = dt.type
        launches.append((_adam_kernel, n, (a_th, addresses(grads, idx), a_m, a_v, tens, start, stop,
                                           T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(bc2), T(eps),
                                           T(step_size), T(wd), mode)))
    return launches


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam."""
    run_all(_adam_launches(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay, False))


def adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for AdamW."""
    run_all(_adam_launches(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay, True))


# =============================================================================
# FAdam
# =============================================================================
# ε_t needs RMS(g) of the whole tensor before ḡ = g/(f^p + ε_t) can be formed, so a
# plain step takes three passes (Σg² | f, Σḡ², Σw̄² | m, θ): 44 B per float32
# element. But ε_t = min(ε, ε₂·RMS(g))^{2p} is the constant ε^{2p} unless the
# gradient is tiny (RMS(g) < ε/ε₂: 1e-6 at the defaults). So pass 1 *guesses*
# ε_t = ε^{2p} and computes f, Σg², Σḡ² and Σw̄² in one sweep (16 B), and the step
# takes two passes: 40 B. A tensor whose true ε_t, rounded to its dtype, is not the
# guess has its Σḡ² and Σw̄² recomputed from the new f (12 B more); the plan then
# remembers it ("defer"), and on its next step pass 1 only sums g² for it (the
# three-pass 44 B schedule) until its guess holds again.
#
# Every schedule evaluates the same block function with the same ε_t on the same
# values, so the sums, and hence the results, are the same bits whichever one ran
# (tested): the guess and the hint change the speed, never the numbers.
#
# Arithmetic matters here, unlike in Adam: per element, pass 1 takes a square root, a
# division and three float64 squares-and-adds, about as long as its 16 B of memory
# traffic on one core of the 2-core CI machine. So both passes form r = 1/(f^p + ε_t)
# once and multiply (g·r, θ·r, then by 1/s_g and 1/s_w): one division per element
# per pass instead of 2 and 4 (spec/fadam.md allows this rewrite). Pass 1 is one
# loop body per element (see _fadam_sums), which lets the core overlap that work with
# the memory stream. These two gave 1.2x on 2^20 elements (in cache) and 1.35x on
# 2^25, measured in one process against the kernel before them; summing the squares
# with fma then took pass 1 on 2^25 from 17.8 to 15.6 ms. Pass 2 now runs at the
# speed of a kernel that moves the same bytes with trivial arithmetic.
def _pmode(p):
    """How f^p is evaluated: 0 sqrt (p = ½), 1 f itself (p = 1), 2 pow. The first two give
    the reference's bits (sqrt is correctly rounded, and pow(x, 1) = x exactly) and are a
    vector instruction or nothing, where pow is a scalar libm call: FAdam with p = 1
    took 7-10x less time per step than through pow (2^22 and 2^25 elements, measured)."""
    return 0 if p == 0.5 else (1 if p == 1 else 2)


@njit(cache=True, inline="always")
def _pow_p(x, pmode, p_t):
    # The scalar form, for loop tails; the hot loops branch on pmode outside or in line.
    if pmode == 0:
        return np.sqrt(x)
    if pmode == 1:
        return x
    return x ** p_t


@njit(cache=True, inline="always")
def _fadam_update(th, g, m, i, r, b1, omb1, lr, wd, rcg, rcw):
    # Pass 2 for element i, r = 1/(f^p + ε_t): m ← β₁m + (1-β₁)ḡ/s_g;  θ ← θ - lr (m + λ w̄/s_w).
    ti = th[i]
    mi = b1 * m[i] + omb1 * ((g[i] * r) * rcg)
    m[i] = mi
    th[i] = ti - lr * (mi + wd * ((ti * r) * rcw))


@njit(cache=True, inline="always")
def _fadam_sums(th, g, f, s, e, et, b2h, omb2h, p_t, pmode, update_f, one):
    """Over elements [s, e) of one tensor: (Σg², Σḡ², Σw̄²) in float64, ḡ = g·r and
    w̄ = θ·r with r = one/(f^p + et) (``one``: 1 in the parameter dtype; f^p as
    :func:`_pow_p` with ``pmode``); with ``update_f``, first f ← β̂₂ f + (1-β̂₂) g² (stored).

    Fixed order: LANES float64 accumulators (acc ← fma(x, x, acc)) over whole blocks,
    then the tail into a scalar, then the lanes added in order (the same structure
    as :func:`_sumsq`).
    One loop body does everything for an element (the branches are loop-invariant,
    so LLVM unswitches them and vectorizes each version). Splitting it into
    separate f, ḡ/w̄ and sum loops per block, joined by scratch arrays, vectorized
    too, but took about 1.5x as long on 2^25 elements (measured): the extra loads,
    stores and alias checks per block seem to keep the core from overlapping its
    arithmetic with the memory stream."""
    acc1 = np.zeros(LANES, np.float64)
    accg = np.zeros(LANES, np.float64)
    accw = np.zeros(LANES, np.float64)
    i = s
    while i + LANES <= e:
        for j in range(LANES):
            gi = g[i + j]
            if update_f:
                fi = b2h * f[i + j] + omb2h * (gi * gi)
                f[i + j] = fi
            else:
                fi = f[i + j]
            if pmode == 0:
                r = one / (np.sqrt(fi) + et)
            elif pmode == 1:
                r = one / (fi + et)
            else:
                r = one / (fi ** p_t + et)
            x = np.float64(gi)
            y = np.float64(gi * r)
            z = np.float64(th[i + j] * r)
            acc1[j] = fma64(x, x, acc1[j])
            accg[j] = fma64(y, y, accg[j])
            accw[j] = fma64(z, z, accw[j])
        i += LANES
    s1 = 0.0
    sg = 0.0
    sw = 0.0
    while i < e:
        gi = g[i]
        if update_f:
            fi = b2h * f[i] + omb2h * (gi * gi)
            f[i] = fi
        else:
            fi = f[i]
        r = one / (_pow_p(fi, pmode, p_t) + et)
        x = np.float64(gi)
        y = np.float64(gi * r)
        z = np.float64(th[i] * r)
        s1 = fma64(x, x, s1)
        sg = fma64(y, y, sg)
        sw = fma64(z, z, sw)
        i += 1
    for j in range(LANES):
        s1 += acc1[j]
        sg += accg[j]
        sw += accw[j]
    return s1, sg, sw


@njit(cache=True)
def _sumsq(p, s, e):
    """Σ x² over p[s:e] in float64, in exactly the order :func:`_fadam_sums` sums g²."""
    acc = np.zeros(LANES, np.float64)
    i = s
    while i + LANES <= e:
        for j in range(LANES):
            x = np.float64(p[i + j])
            acc[j] = fma64(x, x, acc[j])
        i += LANES
    r = 0.0
    while i < e:
        x = np.float64(p[i])
        r = fma64(x, x, r)
        i += 1
    for j in range(LANES):
        r += acc[j]
    return r


@njit(cache=True)
def _rms(total, n):
    # math.sqrt(np.mean(x64 * x64)) of the reference; 0 for an empty tensor.
    if n == 0:
        return 0.0
    return math.sqrt(total / n)


@njit(parallel=True, cache=True)
def _fadam_kernel(a_th, a_g, a_m, a_f, sizes, ctens, cstart, cstop, first, ws, defer, part, resum,
                  b1, omb1, b2h, omb2h, lr, wd, p_t, pmode, eps, eps2, two_p, clip, tiny):
    # ws (parameter dtype): ε_t per tensor, the two clip scales per tensor, then the guess.
    # defer (uint8 per tensor, kept in the plan): 1 = the guess failed on the last step.
    # part (float64, 3 per chunk): Σg², Σḡ², Σw̄²; resum (uint8 per tensor, zeroed by the
    # caller): 1 = Σḡ², Σw̄² still to be (re)computed. Allocated by the caller: a kernel
    # that allocates could fail after an earlier kernel of the same step has written.
    nch = ctens.size
    ntens = sizes.size
    one = ws.dtype.type(1)
    guess = ws[3 * ntens:]
    guess[0] = eps ** two_p                # ε^{2p}, rounded to the parameter dtype
    if guess[0] < tiny:
        guess[0] = tiny

    # Pass 1: f and all three sums with the guessed ε_t; Σg² alone for deferred tensors.
    for c in prange(nch):
        t = ctens[c]
        g = as_pointer(a_g[t], b1)
        if defer[t] != 0:
            part[c] = _sumsq(g, cstart[c], cstop[c])
        else:
            part[c], part[nch + c], part[2 * nch + c] = _fadam_sums(
                as_pointer(a_th[t], b1), g, as_pointer(a_f[t], b1), cstart[c], cstop[c],
                guess[0], b2h, omb2h, p_t, pmode, True, one)

    # Per tensor (chunk order): ε_t = min(ε, ε₂·RMS(g))^{2p} in float64, rounded to the
    # parameter dtype; ε^{2p} where that is 0; then at least the dtype's smallest normal.
    any_resum = False
    for t in range(ntens):
        s = 0.0
        for c in range(first[t], first[t + 1]):
            s += part[c]
        x = eps2 * _rms(s, sizes[t])
        ws[t] = (x if x < eps else eps) ** two_p  # rounded to the parameter dtype
        if ws[t] == 0:
            ws[t] = eps ** two_p
        if ws[t] < tiny:
            ws[t] = tiny
        if defer[t] != 0 or ws[t] != guess[0]:
            resum[t] = 1
            any_resum = True

    # Pass 1b: Σḡ², Σw̄² with the true ε_t (deferred tensors update f here).
    if any_resum:
        for c in prange(nch):
            t = ctens[c]
            if resum[t] != 0:
                _s1, part[nch + c], part[2 * nch + c] = _fadam_sums(
                    as_pointer(a_th[t], b1), as_pointer(a_g[t], b1), as_pointer(a_f[t], b1),
                    cstart[c], cstop[c], ws[t], b2h, omb2h, p_t, pmode, defer[t] != 0, one)

    # Per tensor: clip scales max(1, RMS/c), rounded to the parameter dtype; the hint.
    for t in range(ntens):
        sg = 0.0
        sw = 0.0
        for c in range(first[t], first[t + 1]):
            sg += part[nch + c]
            sw += part[2 * nch + c]
        y = _rms(sg, sizes[t]) / clip
        ws[ntens + t] = y if y > 1.0 else 1.0
        y = _rms(sw, sizes[t]) / clip
        ws[2 * ntens + t] = y if y > 1.0 else 1.0
        defer[t] = 1 if ws[t] != guess[0] else 0

    # Pass 2: m ← β₁m + (1-β₁)ḡ/clip_g;  θ ← θ - lr (m + λ w̄/clip_w).
    for c in prange(nch):
        t = ctens[c]
        th = as_pointer(a_th[t], b1)
        g = as_pointer(a_g[t], b1)
        m = as_pointer(a_m[t], b1)
        f = as_pointer(a_f[t], b1)
        et = ws[t]
        rcg = one / ws[ntens + t]
        rcw = one / ws[2 * ntens + t]
        s, e = cstart[c], cstop[c]
        if pmode == 0:      # one loop per pmode: LLVM does not unswitch this one by itself
            for i in range(s, e):
                _fadam_update(th, g, m, i, one / (np.sqrt(f[i]) + et), b1, omb1, lr, wd, rcg, rcw)
        elif pmode == 1:
            for i in range(s, e):
                _fadam_update(th, g, m, i, one / (f[i] + et), b1, omb1, lr, wd, rcg, rcw)
        else:
            for i in range(s, e):
                _fadam_update(th, g, m, i, one / (f[i] ** p_t + et), b1, omb1, lr, wd, rcg, rcw)


def _build_fadam_plan(lists):
    # The flat plan plus, per dtype group, the "defer" hint (see above), all 0 to start.
    return [entry + (np.zeros(len(entry[1]), dtype=np.uint8),) for entry in _build_flat_plan(lists)]


def _fadam_launches(params, grads, m, f, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    if not params:
        return []
    plan = _plans.get("fadam", (params, m, f), _build_fadam_plan)
    beta2_hat = beta2 * (1 - beta2 ** (step - 1)) / (1 - beta2**step)
    launches = []
    for dt, idx, (a_th, a_m, a_f), tens, start, stop, first, sizes, n, defer in plan:
        T = dt.type
        scratch = (np.empty(3 * len(idx) + 1, dtype=dt), defer,
                   np.zeros(3 * tens.size, np.float64), np.zeros(len(idx), np.uint8))
        launches.append((_fadam_kernel, n, (
            a_th, addresses(grads, idx), a_m, a_f, sizes, tens, start, stop, first, *scratch,
            T(beta1), T(1 - beta1), T(beta2_hat), T(1 - beta2_hat), T(lr), T(weight_decay),
            T(p), _pmode(p), float(eps), float(eps2), float(2 * p), float(clip), np.finfo(dt).tiny)))
    return launches


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam."""
    run_all(_fadam_launches(params, grads, m, f, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay))


# =============================================================================
# Coupled Adam
# =============================================================================
@njit(parallel=True, cache=True)
def _coupled_kernel(a_th, a_g, a_m, a_vc, rows, cols, rtens, rstart, rstop, rfirst, poff, part,
                    utens, ustart, ustop, doff, ws, itemsize,
                    b1, omb1, b2, omb2, bc2, eps, step_size, decay):
    # part: float64 column partials, zeroed by the caller (see _fadam_kernel on why).
    nr = rtens.size
    ntens = rows.size

    # Pass 1: per row block, column sums of g² in float64 (rows in order within the block).
    # (The partial row is addressed through a pointer: plain `part[o + j]` indexing keeps a
    # negative-index check in the loop, which stops LLVM from vectorizing it.)
    zero64 = np.float64(0.0)
    part_addr = part.ctypes.data
    for c in prange(nr):
        t = rtens[c]
        d = cols[t]
        acc = as_pointer(part_addr + 8 * poff[c], zero64)
        for r in range(rstart[c], rstop[c]):
            row = as_pointer(a_g[t] + r * d * itemsize, b1)
            for j in range(d):
                x = np.float64(row[j])
                acc[j] += x * x

    # Per tensor and column: mean over the V rows (blocks combined in order), v̄ update, denominator.
    for t in prange(ntens):
        d = cols[t]
        vc = as_pointer(a_vc[t], b1)
        o = doff[t]
        for j in range(d):
            s = 0.0
            for c in range(rfirst[t], rfirst[t + 1]):
                s += part[poff[c] + j]
            ws[o + j] = s / rows[t]          # the column mean, rounded to the parameter dtype
            vj = b2 * vc[j] + omb2 * ws[o + j]
            vc[j] = vj
            ws[o + j] = np.sqrt(vj) / bc2 + eps

    # Pass 2: θ ← θ(1-lr·λ) - step_size · m/denom_j with m ← β₁m + (1-β₁)g.
    ws_addr = ws.ctypes.data
    for c in prange(utens.size):
        t = utens[c]
        d = cols[t]
        den = as_pointer(ws_addr + itemsize * doff[t], b1)
        for r in range(ustart[c], ustop[c]):
            off = r * d * itemsize
            th = as_pointer(a_th[t] + off, b1)
            g = as_pointer(a_g[t] + off, b1)
            m = as_pointer(a_m[t] + off, b1)
            for j in range(d):
                mi = b1 * m[j] + omb1 * g[j]
                m[j] = mi
                th[j] = th[j] * decay - step_size * (mi / den[j])


def _build_coupled_plan(lists):
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        rows = np.array([params[i].shape[0] for i in idx], dtype=np.int64)
        cols = np.array([params[i].shape[1] for i in idx], dtype=np.int64)
        rtens, rstart, rstop, rfirst = row_chunks(rows, cols, max_blocks=COUPLED_MAX_BLOCKS)
        poff = np.zeros(rtens.size + 1, dtype=np.int64)
        np.cumsum(cols[rtens], out=poff[1:])
        utens, ustart, ustop, _ = row_chunks(rows, cols)
        doff = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(cols, out=doff[1:])
        plan.append((dt, idx, [addresses(lst, idx) for lst in lists], rows, cols,
                     rtens, rstart, rstop, rfirst, poff[:-1].copy(), int(poff[-1]),
                     utens, ustart, ustop, doff[:-1].copy(), int(doff[-1]), int((rows * cols).sum())))
    return plan


def _coupled_launches(params, grads, m, v_col, step, lr, beta1, beta2, eps, weight_decay):
    if not params:
        return []
    plan = _plans.get("coupled", (params, m, v_col), _build_coupled_plan)
    step_size = lr / (1 - beta1**step)
    bc2 = math.sqrt(1 - beta2**step)
    launches = []
    for (dt, idx, (a_th, a_m, a_vc), rows, cols, rtens, rstart, rstop, rfirst, poff, plen,
         utens, ustart, ustop, doff, dlen, n) in plan:
        T = dt.type
        launches.append((_coupled_kernel, n, (
            a_th, addresses(grads, idx), a_m, a_vc, rows, cols, rtens, rstart, rstop, rfirst, poff,
            np.zeros(plen, np.float64), utens, ustart, ustop, doff, np.empty(dlen, dtype=dt), dt.itemsize,
            T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(bc2), T(eps), T(step_size),
            T(1 - lr * weight_decay))))
    return launches


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam.

    ``coupled[i]`` True: a V×d tensor with v[i] of shape (d,); False: AdamW with
    v[i] like params[i]. Both kinds are prepared before either runs."""
    hp = (step, lr, beta1, beta2, eps, weight_decay)
    yes = [i for i, c in enumerate(coupled) if c]
    no = [i for i, c in enumerate(coupled) if not c]
    pick = lambda idx, lst: [lst[i] for i in idx]  # noqa: E731
    run_all(_adam_launches(*(pick(no, x) for x in (params, grads, m, v)), *hp, True)
            + _coupled_launches(*(pick(yes, x) for x in (params, grads, m, v)), *hp))
