"""Coupled Adam on the GPU: fused, multi-tensor CUDA kernels (reference: refimpl/coupled_adam.py).

A coupled tensor is a V×d embedding whose second moment is one value per column,
the row mean of g². Per dtype and set of host scalars, three launches whatever
the number of tensors, with no host synchronisation:

1. ``colsumsq``: float64 column sums of g² over tiles of rows (a thread per
   column, rows in order), one partial row per row tile (read g, 4 B per float32
   element, plus the partials, about 1/rows_per_tile of g in float64);
2. ``coupled_v``: per column, the partials summed in a fixed order, the mean over
   the V rows rounded to the parameter dtype, v̄ ← β₂v̄ + (1-β₂)·mean;
3. ``coupled_apply``: AdamW with the column's v̄ (read θ, g, m; write θ, m: 20 B).

Tensors with ``coupled[i]`` False take Adam's kernel in AdamW mode in the same
call. The step size and √(1-β2^t) come from the rule's descriptor.
``coupled_adam_step_checked`` fuses the finiteness check into pass 1 (see there).
"""

from fisheropt.refimpl.coupled_adam import RULE

from ._kernels import Kernel
from ._plan import check_per_tensor, current, pick, select
from .adam import adam_launches
from .finite import exactly_finite, finite_launches, partials_finite_launch

__all__ = ["coupled_adam_step", "coupled_adam_step_checked", "coupled_adam_launches"]

KERNELS = {
    # ---- Coupled Adam pass 1: float64 column sums of g^2 over a tile of rows (thread = column).
    "colsumsq": Kernel(
        [
            ("const long long*", "tiles"),
            ("const long long*", "meta"),
            ("const unsigned long long*", "grad_ptrs"),
            ("double*", "partials"),
        ],
        r"""
    const long long* tile = tiles + (long long)TILE_ROW * blockIdx.x;
    const int t = (int)tile[0];
    const long long row_begin = tile[1], row_end = tile[2];
    const long long col = tile[3] + threadIdx.x;
    const long long d = meta[(long long)META_ROW * t + 4];
    if (col < d) {
        TENSOR(const T, g, grad_ptrs);
        double acc = 0;
#pragma unroll 8
        for (long long r = row_begin; r < row_end; ++r) { const double x = (double)g[r * d + col]; acc += x * x; }
        partials[tile[4] + col] = acc;
    }
""",
    ),
    # ---- Coupled Adam pass 2: column mean over all rows (fixed order), v_col EMA.
    "coupled_v": Kernel(
        [
            ("const long long*", "col_tiles"),
            ("const long long*", "meta"),
            ("const double*", "partials"),
            ("const unsigned long long*", "v_col_ptrs"),
            ("T", "beta2"),
            ("T", "one_minus_beta2"),
        ],
        r"""
    const int t = (int)col_tiles[(long long)COL_TILE_ROW * blockIdx.x];
    const long long col = col_tiles[(long long)COL_TILE_ROW * blockIdx.x + 1] + threadIdx.x;
    const long long* tensor_meta = meta + (long long)META_ROW * t;
    const long long rows = tensor_meta[3], d = tensor_meta[4];
    const long long partial_base = tensor_meta[5], n_row_tiles = tensor_meta[6];
    if (col < d) {
        double col_sum = 0;
        for (long long k = 0; k < n_row_tiles; ++k) col_sum += partials[partial_base + k * d + col];
        const T col_mean = (T)(col_sum / (double)rows);
        TENSOR(T, v, v_col_ptrs);
        v[col] = beta2 * v[col] + one_minus_beta2 * col_mean;
    }
""",
    ),
    # ---- Coupled Adam pass 3: AdamW with the per-column second moment.
    "coupled_apply": Kernel(
        [
            ("const long long*", "chunks"),
            ("const long long*", "meta"),
            ("const unsigned long long*", "param_ptrs"),
            ("const unsigned long long*", "grad_ptrs"),
            ("const unsigned long long*", "m_ptrs"),
            ("const unsigned long long*", "v_col_ptrs"),
            ("T", "decay_factor"),
            ("T", "beta1"),
            ("T", "one_minus_beta1"),
            ("T", "step_size"),
            ("T", "bias_correction2_sqrt"),
            ("T", "eps"),
        ],
        r"""
    CHUNK_HEADER
    const long long d = meta[(long long)META_ROW * t + 4];
    TENSOR(T, theta, param_ptrs);
    TENSOR(const T, g, grad_ptrs);
    TENSOR(T, m, m_ptrs);
    TENSOR(const T, v, v_col_ptrs);
    const bool aligned = aligned16(param_ptrs[t] | grad_ptrs[t] | m_ptrs[t]);
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        // column of element `base`: (start % d) + offset in chunk, reduced mod d without a
        // 64-bit division (offset < chunk < 2^31, so 32 bits suffice below 2^31 columns)
        long long col = chunk[3] + (base - start);
        if (d >= 0x80000000LL) { if (col >= d) col -= d; }
        else col = (long long)((unsigned)col % (unsigned)d);
        T theta_group[VEC], g_group[VEC], m_group[VEC];
        load_group(theta, base, stop, full, theta_group);
        load_group(g, base, stop, full, g_group);
        load_group(m, base, stop, full, m_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = {SQRT}(v[col]) / bias_correction2_sqrt + eps;
            theta_group[k] = theta_group[k] * decay_factor;
            m_group[k] = beta1 * m_group[k] + one_minus_beta1 * g_group[k];
            theta_group[k] = theta_group[k] - step_size * (m_group[k] / denom);
            if (++col == d) col = 0;
        }
        store_group(theta, base, stop, full, theta_group);
        store_group(m, base, stop, full, m_group);
    }
""",
    ),
}


def coupled_scalars(*, step, lr, beta1, beta2, eps, weight_decay):
    """One coupled tensor's kernel scalars, float64 on the host."""
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return dict(
        decay_factor=1 - lr * weight_decay,
        beta1=beta1,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        step_size=c["step_size"],
        bias_correction2_sqrt=c["bias_correction2_sqrt"],
        eps=eps,
    )


def _coupled_only(engine, params, grads, m, v_col, check, flag, hyperparams):
    first, rest = [], []
    for dtype, scalars, plan, pointers in engine.launch_groups(
        "coupled", coupled_scalars, hyperparams, param_ptrs=params, grad_ptrs=grads, m_ptrs=m, v_col_ptrs=v_col
    ):
        (partials,) = plan.scratch("colsum", plan.n_partial)
        available = {**plan.tables, **pointers, **scalars, "partials": partials}
        first.append(engine.prepared_from("colsumsq", dtype, plan.n_tiles, available))
        if check:
            first.append(partials_finite_launch(engine, dtype, partials, plan.n_partial, flag))
        rest += [
            engine.prepared_from("coupled_v", dtype, plan.n_col_tiles, available),
            engine.prepared_from("coupled_apply", dtype, plan.n_chunks, available),
        ]
    return first, rest


def coupled_adam_launches(engine, params, grads, m, v, *, coupled, check=False, flag=None, **hyperparams):
    """(reads only, writes): the launches of one step, every argument converted.

    ``coupled[i]`` True: a V×d tensor, v[i] of shape (d,);
    False: AdamW, v[i] like params[i]. With ``check`` the first list also sets ``flag``
    for a non-finite gradient of either kind."""
    n = len(params)
    coupled = list(coupled)
    check_per_tensor(n, {**hyperparams, "coupled": coupled})
    coupled_idx = [i for i, c in enumerate(coupled) if c]
    adamw_idx = [i for i, c in enumerate(coupled) if not c]
    first, rest = _coupled_only(
        engine, *select(coupled_idx, params, grads, m, v), check, flag, pick(coupled_idx, hyperparams)
    )
    uncoupled = select(adamw_idx, params, grads, m, v)
    if check:
        first += finite_launches(engine, uncoupled[1], flag)
    return first, rest + adam_launches(engine, *uncoupled, decoupled=True, **pick(adamw_idx, hyperparams))


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam (no host synchronisation)."""
    engine = current()
    first, rest = coupled_adam_launches(
        engine,
        params,
        grads,
        m,
        v,
        coupled=coupled,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
    engine.run(first + rest)


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf.

    The coupled gradients are checked through the column sums pass 1 computes anyway
    (a launch over the float64 partials), the AdamW ones by the all_finite kernel, all
    into one flag read back before any write: 24 B per float32 element of a coupled
    tensor instead of 28, and the same single host synchronisation per step. A
    float64 g above 1e154 overflows its column sum although finite: only then are the
    gradients read again."""
    engine = current()
    flag = engine.new_flag()
    first, rest = coupled_adam_launches(
        engine,
        params,
        grads,
        m,
        v,
        coupled=coupled,
        check=True,
        flag=flag,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
    engine.run(first)
    if engine.flag_set(flag) and not exactly_finite(engine, grads):
        return False
    engine.run(rest)
    return True
