"""FAdam on the CPU: fused, multi-tensor Numba kernels (reference: refimpl/fadam.py).

Same numerics as the reference (spec/fadam.md), with one allowed rewrite
("Order of operations"): both passes multiply by r = 1/(f^p + ε_t) and by the
reciprocal clip scales instead of dividing, a few ulp from the reference's
quotients. The per-tensor RMS values are float64 sums with a fixed structure
(per chunk, LANES lanes, chunks combined in order), so results do not depend on
the thread count. A step is two launches per dtype group: the reductions
(read only) for every group first, then the updates.
"""

import math

import numpy as np
from numba import njit, prange

from fisheropt.refimpl.fadam import RULE

from ._core import PLANS, addresses, all_finite_at, as_pointer, fma64, per_tensor_table, run_phases
from .adam import build_flat_plan

__all__ = ["fadam_step", "fadam_step_checked"]

LANES = 64  # float64 accumulators per chunk in the reductions (vectorizable, fixed order)


# ε_t needs RMS(g) of the whole tensor before ḡ = g/(f^p + ε_t) can be formed, so a
# plain step takes three passes (Σg² | Σḡ², Σw̄² | f, m, θ): 44 B per float32
# element. But ε_t = min(ε, ε₂·RMS(g))^{2p} is the constant ε^{2p} unless the
# gradient is tiny (RMS(g) < ε/ε₂: 1e-6 at the defaults). So pass 1 *guesses*
# ε_t = ε^{2p} and computes Σg², Σḡ² and Σw̄² in one sweep over θ, g, f (12 B), and
# the step takes two passes: 40 B. A tensor whose true ε_t, rounded to its dtype, is
# not the guess has its Σḡ² and Σw̄² recomputed (12 B more); the plan then remembers
# it ("defer"), and on its next step pass 1 only sums g² for it (the three-pass 44 B
# schedule) until its guess holds again.
#
# Pass 1 writes nothing: it forms the new f in a register (_new_f) and pass 2 forms it
# again from the same inputs and stores it. So the reductions of every dtype group run
# before anything is written, and their Σg² doubles as the finiteness check: a NaN or
# Inf in g makes Σg² non-finite (fadam_step_checked refuses the step at no extra read).
#
# Every schedule evaluates the same block function with the same ε_t on the same
# values, so the sums, and hence the results, are the same bits whichever one ran
# (tested): the guess and the hint change the speed, never the numbers.
#
# Arithmetic matters here, unlike in Adam: per element, pass 1 takes a square root, a
# division and three float64 squares-and-adds, about as long as its 12 B of memory
# traffic on one core of the 2-core CI machine. So both passes form r = 1/(f^p + ε_t)
# once and multiply (g·r, θ·r, then by 1/s_g and 1/s_w): one division per element
# per pass instead of 2 and 4 (spec/fadam.md allows this rewrite). Pass 1 is one
# loop body per element (see _fadam_sums), which lets the core overlap that work with
# the memory stream. Measured in one process, these two make a step 1.2x (2^20
# elements, in cache) to 1.35x (2^25) faster than dividing in separate loops, and
# summing the squares with fma takes pass 1 on 2^25 elements from 17.8 to 15.6 ms.
# Pass 2 runs at the speed of a kernel that moves the same bytes with trivial arithmetic.
def _pow_mode(p):
    """How f^p is evaluated: 0 sqrt (p = ½), 1 f itself (p = 1), 2 pow. The first two give
    the reference's bits (sqrt is correctly rounded, and pow(x, 1) = x exactly) and are a
    vector instruction or nothing, where pow is a scalar libm call: FAdam with p = 1
    took 7-10x less time per step than through pow (2^22 and 2^25 elements, measured)."""
    return 0 if p == 0.5 else (1 if p == 1 else 2)


@njit(cache=True, inline="always")
def _pow_p(x, pow_mode, p):
    # The scalar form, for loop tails; the hot loops branch on pow_mode outside or in line.
    if pow_mode == 0:
        return np.sqrt(x)
    if pow_mode == 1:
        return x
    return x**p


@njit(cache=True, inline="always")
def _new_f(f, g, i, beta2_hat, one_minus_beta2_hat):
    # f ← β̂₂ f + (1-β̂₂) g², from the stored (old) f: pass 1 computes it without storing it,
    # so that nothing is written until the whole step is known to go ahead; pass 2 stores it.
    gi = g[i]
    return beta2_hat * f[i] + one_minus_beta2_hat * (gi * gi)


@njit(cache=True, inline="always")
def _fadam_update(theta, g, m, i, r, beta1, one_minus_beta1, lr, weight_decay, inv_clip_g, inv_clip_w):
    # Pass 2 for element i, r = 1/(f^p + ε_t): m ← β₁m + (1-β₁)ḡ/s_g;  θ ← θ - lr (m + λ w̄/s_w).
    ti = theta[i]
    mi = beta1 * m[i] + one_minus_beta1 * ((g[i] * r) * inv_clip_g)
    m[i] = mi
    theta[i] = ti - lr * (mi + weight_decay * ((ti * r) * inv_clip_w))


@njit(cache=True, inline="always")
def _fadam_sums(theta, g, f, start, stop, eps_t, beta2_hat, one_minus_beta2_hat, p, pow_mode, one):
    """Over elements [start, stop) of one tensor: (Σg², Σḡ², Σw̄²) in float64, ḡ = g·r and
    w̄ = θ·r with r = one/(f^p + eps_t) (``one``: 1 in the parameter dtype; f^p as
    :func:`_pow_p` with ``pow_mode``) and f the new f ← β̂₂ f + (1-β̂₂) g², formed here and not stored.

    Fixed order: LANES float64 accumulators (lane ← fma(x, x, lane)) over whole blocks,
    then the tail into a scalar, then the lanes added in order (the same structure
    as :func:`_sumsq`).
    One loop body does everything for an element (the branches are loop-invariant,
    so LLVM unswitches them and vectorizes each version). Splitting it into
    separate f, ḡ/w̄ and sum loops per block, joined by scratch arrays, vectorized
    too, but took about 1.5x as long on 2^25 elements (measured): the extra loads,
    stores and alias checks per block seem to keep the core from overlapping its
    arithmetic with the memory stream."""
    lanes_g2 = np.zeros(LANES, np.float64)
    lanes_gbar2 = np.zeros(LANES, np.float64)
    lanes_wbar2 = np.zeros(LANES, np.float64)
    i = start
    while i + LANES <= stop:
        for j in range(LANES):
            gi = g[i + j]
            fi = beta2_hat * f[i + j] + one_minus_beta2_hat * (gi * gi)
            if pow_mode == 0:
                r = one / (np.sqrt(fi) + eps_t)
            elif pow_mode == 1:
                r = one / (fi + eps_t)
            else:
                r = one / (fi**p + eps_t)
            x = np.float64(gi)
            y = np.float64(gi * r)
            z = np.float64(theta[i + j] * r)
            lanes_g2[j] = fma64(x, x, lanes_g2[j])
            lanes_gbar2[j] = fma64(y, y, lanes_gbar2[j])
            lanes_wbar2[j] = fma64(z, z, lanes_wbar2[j])
        i += LANES
    sum_g2 = 0.0
    sum_gbar2 = 0.0
    sum_wbar2 = 0.0
    while i < stop:
        gi = g[i]
        fi = beta2_hat * f[i] + one_minus_beta2_hat * (gi * gi)
        r = one / (_pow_p(fi, pow_mode, p) + eps_t)
        x = np.float64(gi)
        y = np.float64(gi * r)
        z = np.float64(theta[i] * r)
        sum_g2 = fma64(x, x, sum_g2)
        sum_gbar2 = fma64(y, y, sum_gbar2)
        sum_wbar2 = fma64(z, z, sum_wbar2)
        i += 1
    for j in range(LANES):
        sum_g2 += lanes_g2[j]
        sum_gbar2 += lanes_gbar2[j]
        sum_wbar2 += lanes_wbar2[j]
    return sum_g2, sum_gbar2, sum_wbar2


@njit(cache=True)
def _sumsq(values, start, stop):
    """Σ x² over values[start:stop] in float64, in exactly the order :func:`_fadam_sums` sums g²."""
    lanes = np.zeros(LANES, np.float64)
    i = start
    while i + LANES <= stop:
        for j in range(LANES):
            x = np.float64(values[i + j])
            lanes[j] = fma64(x, x, lanes[j])
        i += LANES
    total = 0.0
    while i < stop:
        x = np.float64(values[i])
        total = fma64(x, x, total)
        i += 1
    for j in range(LANES):
        total += lanes[j]
    return total


@njit(cache=True)
def _rms(total, n):
    # math.sqrt(np.mean(x64 * x64)) of the reference; 0 for an empty tensor.
    if n == 0:
        return 0.0
    return math.sqrt(total / n)


@njit(parallel=True, cache=True)
def _fadam_reduce(
    theta_addrs,
    grad_addrs,
    f_addrs,
    sizes,
    chunk_tensor,
    chunk_start,
    chunk_stop,
    first,
    scalars,
    defer,
    partials,
    resum,
    beta2_hat,
    one_minus_beta2_hat,
    p,
    pow_mode,
    eps,
    eps2,
    two_p,
    clip,
    tiny,
    check,
):
    """Passes 1 and 1b and the per-tensor scalars; writes only the scratch arrays.

    scalars (parameter dtype): ε_t per tensor, the two clip scales per tensor, then the guess.
    defer (uint8 per tensor, kept in the plan): 1 = the guess failed on the last step.
    partials (float64, 3 per chunk): Σg², Σḡ², Σw̄²; resum (uint8 per tensor, zeroed by the
    caller): 1 = Σḡ², Σw̄² still to be (re)computed. Returns False, having written
    nothing but scratch, when ``check`` and a gradient holds NaN or Inf.

    The hyperparameters are scalar arguments, one launch per set of them (see
    fadam_launches): read per tensor from a table inside the parallel loop, they kept
    LLVM from vectorizing the sums (2-3x slower, measured)."""
    n_chunks = chunk_tensor.size
    n_tensors = sizes.size
    one = scalars.dtype.type(1)
    guess = scalars[3 * n_tensors :]
    guess[0] = eps**two_p  # ε^{2p}, rounded to the parameter dtype
    if guess[0] < tiny:
        guess[0] = tiny

    # Pass 1: all three sums with the guessed ε_t; Σg² alone for deferred tensors.
    for c in prange(n_chunks):
        t = chunk_tensor[c]
        g = as_pointer(grad_addrs[t], one)
        if defer[t] != 0:
            partials[c] = _sumsq(g, chunk_start[c], chunk_stop[c])
        else:
            partials[c], partials[n_chunks + c], partials[2 * n_chunks + c] = _fadam_sums(
                as_pointer(theta_addrs[t], one),
                g,
                as_pointer(f_addrs[t], one),
                chunk_start[c],
                chunk_stop[c],
                guess[0],
                beta2_hat,
                one_minus_beta2_hat,
                p,
                pow_mode,
                one,
            )

    # Per tensor (chunk order): ε_t = min(ε, ε₂·RMS(g))^{2p} in float64, rounded to the
    # parameter dtype; ε^{2p} where that is 0; then at least the dtype's smallest normal.
    any_resum = False
    for t in range(n_tensors):
        sum_g2 = 0.0
        for c in range(first[t], first[t + 1]):
            sum_g2 += partials[c]
        # A NaN/Inf in g makes Σg² non-finite; so can a float64 |g| above 1e154 (g² overflows):
        # only then is the tensor read again, to tell the two apart.
        if check and not np.isfinite(sum_g2) and not all_finite_at(as_pointer(grad_addrs[t], one), sizes[t]):
            return False
        x = eps2 * _rms(sum_g2, sizes[t])
        scalars[t] = (x if x < eps else eps) ** two_p  # rounded to the parameter dtype
        if scalars[t] == 0:
            scalars[t] = eps**two_p
        if scalars[t] < tiny:
            scalars[t] = tiny
        if defer[t] != 0 or scalars[t] != guess[0]:
            resum[t] = 1
            any_resum = True

    # Pass 1b: Σḡ², Σw̄² with the true ε_t.
    if any_resum:
        for c in prange(n_chunks):
            t = chunk_tensor[c]
            if resum[t] != 0:
                _sum_g2, partials[n_chunks + c], partials[2 * n_chunks + c] = _fadam_sums(
                    as_pointer(theta_addrs[t], one),
                    as_pointer(grad_addrs[t], one),
                    as_pointer(f_addrs[t], one),
                    chunk_start[c],
                    chunk_stop[c],
                    scalars[t],
                    beta2_hat,
                    one_minus_beta2_hat,
                    p,
                    pow_mode,
                    one,
                )

    # Per tensor: clip scales max(1, RMS/c), rounded to the parameter dtype; the hint.
    for t in range(n_tensors):
        sum_gbar2 = 0.0
        sum_wbar2 = 0.0
        for c in range(first[t], first[t + 1]):
            sum_gbar2 += partials[n_chunks + c]
            sum_wbar2 += partials[2 * n_chunks + c]
        y = _rms(sum_gbar2, sizes[t]) / clip
        scalars[n_tensors + t] = y if y > 1.0 else 1.0
        y = _rms(sum_wbar2, sizes[t]) / clip
        scalars[2 * n_tensors + t] = y if y > 1.0 else 1.0
        defer[t] = 1 if scalars[t] != guess[0] else 0
    return True


@njit(parallel=True, cache=True)
def _fadam_apply(
    theta_addrs,
    grad_addrs,
    m_addrs,
    f_addrs,
    chunk_tensor,
    chunk_start,
    chunk_stop,
    scalars,
    beta1,
    one_minus_beta1,
    beta2_hat,
    one_minus_beta2_hat,
    lr,
    weight_decay,
    p,
    pow_mode,
):
    """Pass 2: f ← β̂₂f + (1-β̂₂)g² (stored); m ← β₁m + (1-β₁)ḡ/clip_g; θ ← θ - lr (m + λ w̄/clip_w)."""
    n_tensors = (scalars.size - 1) // 3
    one = scalars.dtype.type(1)
    for c in prange(chunk_tensor.size):
        t = chunk_tensor[c]
        theta = as_pointer(theta_addrs[t], one)
        g = as_pointer(grad_addrs[t], one)
        m = as_pointer(m_addrs[t], one)
        f = as_pointer(f_addrs[t], one)
        eps_t = scalars[t]
        inv_clip_g = one / scalars[n_tensors + t]
        inv_clip_w = one / scalars[2 * n_tensors + t]
        start, stop = chunk_start[c], chunk_stop[c]
        if pow_mode == 0:  # one loop per pow_mode: LLVM does not unswitch this one by itself
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                f[i] = fi
                _fadam_update(
                    theta,
                    g,
                    m,
                    i,
                    one / (np.sqrt(fi) + eps_t),
                    beta1,
                    one_minus_beta1,
                    lr,
                    weight_decay,
                    inv_clip_g,
                    inv_clip_w,
                )
        elif pow_mode == 1:
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                f[i] = fi
                _fadam_update(
                    theta, g, m, i, one / (fi + eps_t), beta1, one_minus_beta1, lr, weight_decay, inv_clip_g, inv_clip_w
                )
        else:
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                f[i] = fi
                _fadam_update(
                    theta,
                    g,
                    m,
                    i,
                    one / (fi**p + eps_t),
                    beta1,
                    one_minus_beta1,
                    lr,
                    weight_decay,
                    inv_clip_g,
                    inv_clip_w,
                )


def _build_plan(lists):
    # The flat plan plus, per dtype group, the "defer" hint (see above), all 0 to start.
    return [entry + (np.zeros(len(entry[1]), dtype=np.uint8),) for entry in build_flat_plan(lists)]


def _row(*, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """The launch's host scalars: float64 from the descriptor (rounded per dtype below)."""
    beta2_hat = RULE.coefficients(step, beta2=beta2)["beta2_hat"]
    return (
        beta1,
        1 - beta1,
        beta2_hat,
        1 - beta2_hat,
        lr,
        weight_decay,
        p,
        float(eps),
        float(eps2),
        float(2 * p),
        float(clip),
    )


def fadam_launches(params, grads, m, f, *, check, **hyperparams):
    """(reductions, updates): the launches of one step, every argument allocated.

    One pair of launches per dtype and distinct set of hyperparameters (one set, so one
    pair per dtype, unless param groups or per-parameter step counts differ)."""
    sets: dict = {}
    rows = per_tensor_table(range(len(params)), _row, hyperparams, np.float64)
    for i, param in enumerate(params):
        sets.setdefault((param.dtype, tuple(rows[i])), []).append(i)
    reduce, apply = [], []
    for (dt, row), members in sets.items():
        T = dt.type
        beta1, one_minus_beta1, beta2_hat, one_minus_beta2_hat, lr, weight_decay, p = (T(x) for x in row[:7])
        eps, eps2, two_p, clip = row[7:]
        pow_mode = _pow_mode(float(row[6]))
        lists = tuple([lst[i] for i in members] for lst in (params, m, f))
        ((_dt, _idx, (theta_addrs, m_addrs, f_addrs), chunk_tensor, start, stop, first, sizes, n, defer),) = PLANS.get(
            "fadam", lists, _build_plan
        )
        grad_addrs = addresses(grads, members)
        scalars = np.empty(3 * len(members) + 1, dtype=dt)
        reduce.append(
            (
                _fadam_reduce,
                n,
                (
                    theta_addrs,
                    grad_addrs,
                    f_addrs,
                    sizes,
                    chunk_tensor,
                    start,
                    stop,
                    first,
                    scalars,
                    defer,
                    np.zeros(3 * chunk_tensor.size, np.float64),
                    np.zeros(len(members), np.uint8),
                    beta2_hat,
                    one_minus_beta2_hat,
                    p,
                    pow_mode,
                    eps,
                    eps2,
                    two_p,
                    clip,
                    np.finfo(dt).tiny,
                    check,
                ),
            )
        )
        apply.append(
            (
                _fadam_apply,
                n,
                (
                    theta_addrs,
                    grad_addrs,
                    m_addrs,
                    f_addrs,
                    chunk_tensor,
                    start,
                    stop,
                    scalars,
                    beta1,
                    one_minus_beta1,
                    beta2_hat,
                    one_minus_beta2_hat,
                    lr,
                    weight_decay,
                    p,
                    pow_mode,
                ),
            )
        )
    return reduce, apply


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    run_phases(*fadam_launches(params, grads, m, f, check=False, **hp), check=False)


def fadam_step_checked(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay) -> bool:
    """:func:`fadam_step` with the finiteness check fused into pass 1: returns False, having
    written nothing, when a gradient holds NaN or Inf (no extra read of the gradients)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    return run_phases(*fadam_launches(params, grads, m, f, check=True, **hp), check=True)
