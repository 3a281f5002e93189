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

from fisheropt.refimpl.fadam import RULE, adaptive_epsilon

from ._core import KERNEL_LOCK, PLANS, addresses, all_finite_at, as_pointer, fma64, launch, per_tensor_table
from .adam import build_flat_plan

__all__ = ["fadam_step", "fadam_step_checked", "fadam_partials", "fadam_apply"]

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
def _fadam_update(theta, g, m, f, i, fi, r, k):
    # Pass 2 for element i, r = 1/(f^p + ε_t), k = (β₁, 1-β₁, lr, λ, 1/s_g, 1/s_w):
    # f ← fi (stored);  m ← β₁m + (1-β₁)ḡ/s_g;  θ ← θ - lr (m + λ w̄/s_w).
    f[i] = fi
    ti = theta[i]
    mi = k[0] * m[i] + k[1] * ((g[i] * r) * k[4])
    m[i] = mi
    theta[i] = ti - k[2] * (mi + k[3] * ((ti * r) * k[5]))


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


# What pass 1 sums for a tensor (bits of its entry in ``mode``): Σg²; Σḡ² and Σw̄².
SUM_G2, SUM_BARS = 1, 2
SUM_ALL = SUM_G2 | SUM_BARS


@njit(parallel=True, cache=True)
def _fadam_partials(
    theta_addrs,
    grad_addrs,
    f_addrs,
    chunk_tensor,
    chunk_start,
    chunk_stop,
    first,
    eps_t,
    mode,
    scratch,
    sums,
    beta2_hat,
    one_minus_beta2_hat,
    p,
    pow_mode,
):
    """Pass 1: per tensor t, the float64 sums that mode[t] asks for into sums[t] (Σg², Σḡ², Σw̄²),
    ḡ and w̄ formed with eps_t[t] (parameter dtype). Per chunk into ``scratch`` (3 per chunk),
    then the chunks of each tensor added in chunk order. Reads θ, g, f; writes nothing else."""
    n_chunks = chunk_tensor.size
    one = eps_t.dtype.type(1)
    for c in prange(n_chunks):
        t = chunk_tensor[c]
        g = as_pointer(grad_addrs[t], one)
        if mode[t] == SUM_G2:
            scratch[c] = _sumsq(g, chunk_start[c], chunk_stop[c])
        elif mode[t] != 0:
            scratch[c], scratch[n_chunks + c], scratch[2 * n_chunks + c] = _fadam_sums(
                as_pointer(theta_addrs[t], one),
                g,
                as_pointer(f_addrs[t], one),
                chunk_start[c],
                chunk_stop[c],
                eps_t[t],
                beta2_hat,
                one_minus_beta2_hat,
                p,
                pow_mode,
                one,
            )
    for t in range(first.size - 1):
        for k in range(3):
            if mode[t] & (SUM_G2 if k == 0 else SUM_BARS):
                total = 0.0
                for c in range(first[t], first[t + 1]):
                    total += scratch[k * n_chunks + c]
                sums[t, k] = total


@njit(cache=True)
def _fadam_epsilons(sums, counts, eps, eps2, two_p, tiny, guess, scalars, mode, failed):
    """ε_t = min(ε, ε₂·RMS(g))^{2p} per tensor from Σg² (sums[:, 0]) and the element counts, in
    float64, rounded to the parameter dtype into scalars[t]; ε^{2p} where that is 0; then at least
    the dtype's smallest normal. failed[t]: ε_t is not the guess. mode[t] becomes SUM_BARS where
    Σḡ², Σw̄² were summed with another ε_t (or not at all), else 0. Returns whether any is."""
    again = False
    for t in range(counts.size):
        x = eps2 * _rms(sums[t, 0], counts[t])
        scalars[t] = (x if x < eps else eps) ** two_p  # rounded to the parameter dtype
        if scalars[t] == 0:
            scalars[t] = eps**two_p
        if scalars[t] < tiny:
            scalars[t] = tiny
        failed[t] = scalars[t] != guess
        mode[t] = SUM_BARS if failed[t] or not mode[t] & SUM_BARS else 0
        again |= mode[t] != 0
    return again


@njit(cache=True)
def _fadam_clip_scales(sums, counts, clip, scalars):
    # max(1, RMS/c) of ḡ and w̄ per tensor, rounded to the parameter dtype, after the ε_t values.
    n = counts.size
    for t in range(n):
        y = _rms(sums[t, 1], counts[t]) / clip
        scalars[n + t] = y if y > 1.0 else 1.0
        y = _rms(sums[t, 2], counts[t]) / clip
        scalars[2 * n + t] = y if y > 1.0 else 1.0


@njit(cache=True)
def _fadam_finite(sums, grad_addrs, sizes, one):
    # A NaN/Inf in g makes Σg² non-finite; so can a float64 |g| above 1e154 (g² overflows):
    # only then is the tensor read again, to tell the two apart.
    for t in range(sizes.size):
        if not np.isfinite(sums[t, 0]) and not all_finite_at(as_pointer(grad_addrs[t], one), sizes[t]):
            return False
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
    """Pass 2: f ← β̂₂f + (1-β̂₂)g² (stored); m ← β₁m + (1-β₁)ḡ/clip_g; θ ← θ - lr (m + λ w̄/clip_w).
    scalars: ε_t, then the two clip scales, per tensor (parameter dtype)."""
    n_tensors = scalars.size // 3
    one = scalars.dtype.type(1)
    for c in prange(chunk_tensor.size):
        t = chunk_tensor[c]
        theta = as_pointer(theta_addrs[t], one)
        g = as_pointer(grad_addrs[t], one)
        m = as_pointer(m_addrs[t], one)
        f = as_pointer(f_addrs[t], one)
        eps_t = scalars[t]
        k = (beta1, one_minus_beta1, lr, weight_decay, one / scalars[n_tensors + t], one / scalars[2 * n_tensors + t])
        start, stop = chunk_start[c], chunk_stop[c]
        if pow_mode == 0:  # one loop per pow_mode: LLVM does not unswitch this one by itself
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                _fadam_update(theta, g, m, f, i, fi, one / (np.sqrt(fi) + eps_t), k)
        elif pow_mode == 1:
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                _fadam_update(theta, g, m, f, i, fi, one / (fi + eps_t), k)
        else:
            for i in range(start, stop):
                fi = _new_f(f, g, i, beta2_hat, one_minus_beta2_hat)
                _fadam_update(theta, g, m, f, i, fi, one / (fi**p + eps_t), k)


def _build_plan(lists):
    # The flat plan plus, per dtype group, the "defer" hint (see above), all 0 to start.
    return [entry + (np.zeros(len(entry[1]), dtype=np.uint8),) for entry in build_flat_plan(lists)]


def _row(*, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """The launch's host scalars: float64 from the descriptor (rounded per dtype below)."""
    beta2_hat = RULE.coefficients(step, beta2=beta2)["beta2_hat"]
    return (beta1, 1 - beta1, beta2_hat, 1 - beta2_hat, lr, weight_decay, p, float(eps), float(eps2), clip)


class _Launches:
    """The tensors of one dtype and one set of hyperparameters (one set, so one of these per dtype,
    unless param groups or per-parameter step counts differ): their plan, and the step's scratch."""

    def __init__(self, dt: np.dtype, row, members, plan, grad_addrs):
        T = dt.type
        beta1, one_minus_beta1, beta2_hat, one_minus_beta2_hat, lr, weight_decay, p = (T(x) for x in row[:7])
        self.members, self.grad_addrs, self.one, self.tiny = members, grad_addrs, T(1), np.finfo(dt).tiny
        (_dt, _idx, (self.theta_addrs, self.m_addrs, self.f_addrs), *chunks, self.sizes, self.n, self.defer) = plan
        self.chunks = tuple(chunks)  # chunk_tensor, start, stop, first
        self.eps, self.eps2, self.clip = row[7], row[8], row[9]
        self.two_p = float(2 * row[6])
        self.pow_mode = _pow_mode(float(row[6]))
        self.guess = adaptive_epsilon(math.inf, eps=row[7], eps2=row[8], p=float(row[6]), dtype=T)
        self.scalars = np.empty(3 * len(members), dtype=dt)  # ε_t | clip_g | clip_w
        self.sums = np.zeros((len(members), 3), np.float64)
        self.mode = np.full(len(members), SUM_ALL, np.uint8)
        self.pass1 = (beta2_hat, one_minus_beta2_hat, p, self.pow_mode)
        self.pass2 = (beta1, one_minus_beta1, beta2_hat, one_minus_beta2_hat, lr, weight_decay, p, self.pow_mode)

    def partials(self, eps_t) -> None:
        """Pass 1 for the tensors that ``mode`` selects, ḡ and w̄ with ``eps_t`` (one per tensor)."""
        chunk_tensor, start, stop, first = self.chunks
        scratch = np.empty(3 * chunk_tensor.size, np.float64)
        args = (self.theta_addrs, self.grad_addrs, self.f_addrs, *self.chunks, eps_t, self.mode, scratch, self.sums)
        launch(_fadam_partials, self.n, *args, *self.pass1)

    def finite(self) -> bool:
        return _fadam_finite(self.sums, self.grad_addrs, self.sizes, self.one)

    def scales(self, counts, failed, *, resum=True) -> None:
        """ε_t from Σg² (with ``resum``, Σḡ², Σw̄² summed again where they used another one), then
        the clip scales."""
        n = len(self.members)
        args = (self.eps, self.eps2, self.two_p, self.tiny, self.guess, self.scalars, self.mode, failed)
        if _fadam_epsilons(self.sums, counts, *args) and resum:
            self.partials(self.scalars[:n])
        _fadam_clip_scales(self.sums, counts, self.clip, self.scalars)

    def apply(self) -> None:
        chunk_tensor, start, stop, _first = self.chunks
        args = (self.theta_addrs, self.grad_addrs, self.m_addrs, self.f_addrs, chunk_tensor, start, stop)
        launch(_fadam_apply, self.n, *args, self.scalars, *self.pass2)


def _launches(params, grads, m, f, hyperparams) -> list:
    sets: dict = {}
    rows = per_tensor_table(range(len(params)), _row, hyperparams, np.float64)
    for i, param in enumerate(params):
        sets.setdefault((param.dtype, tuple(rows[i])), []).append(i)
    out = []
    for (dt, row), members in sets.items():
        lists = tuple([lst[i] for i in members] for lst in (params, m, f))
        (plan,) = PLANS.get("fadam", lists, _build_plan)
        out.append(_Launches(dt, row, members, plan, addresses(grads, members)))
    return out


def _step(params, grads, m, f, check, hyperparams) -> bool:
    """One process's step: pass 1 (guessed ε_t; Σg² alone where the hint says the guess will fail)
    for every dtype group before anything is written, then ε_t and the clip scales, then pass 2."""
    groups = _launches(params, grads, m, f, hyperparams)
    with KERNEL_LOCK:
        for group in groups:
            group.mode[:] = np.where(group.defer != 0, SUM_G2, SUM_ALL)
            group.partials(np.full(len(group.members), group.guess))
        if check and not all(group.finite() for group in groups):
            return False
        for group in groups:
            group.scales(group.sizes, group.defer)
            group.apply()
    return True


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    _step(params, grads, m, f, False, hp)


def fadam_step_checked(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay) -> bool:
    """:func:`fadam_step` with the finiteness check fused into pass 1: returns False, having
    written nothing, when a gradient holds NaN or Inf (no extra read of the gradients)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    return _step(params, grads, m, f, True, hp)


def fadam_partials(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, eps_t=None):
    """Pass 1 of a sharded step (spec/distributed.md §5): (T, 3) float64, per tensor Σg², Σḡ², Σw̄² over
    its local elements, ḡ and w̄ formed with ``eps_t`` (one per tensor; None: the guess ε^{2p}).
    Writes nothing."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    out = np.zeros((len(params), 3), np.float64)
    with KERNEL_LOCK:
        for group in _launches(params, grads, m, f, hp):
            dt = group.scalars.dtype
            given = None if eps_t is None else np.asarray(eps_t, np.float64)[group.members].astype(dt)
            group.partials(np.full(len(group.members), group.guess) if given is None else given)
            out[group.members] = group.sums
    return out


def fadam_apply(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, sums, counts):
    """Pass 2 of a sharded step: the update of the local elements from the whole tensors' sums
    (``sums``: (T, 3) as :func:`fadam_partials` returns them, added over the shards, Σḡ² and Σw̄²
    with the ε_t that Σg² gives) and element counts. With a tensor's own partials and size it is
    :func:`fadam_step`, bit for bit."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    with KERNEL_LOCK:
        for group in _launches(params, grads, m, f, hp):
            group.sums[:] = np.asarray(sums, np.float64)[group.members]
            failed = np.zeros(len(group.members), np.uint8)
            group.scales(np.asarray(counts, np.int64)[group.members], failed, resum=False)
            group.apply()
