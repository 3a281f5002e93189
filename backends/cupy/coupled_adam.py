"""Coupled Adam on the GPU: fused, multi-tensor CUDA kernels (reference: refimpl/coupled_adam.py).

A coupled tensor is a V×d embedding whose second moment is one value per column,
the row mean of g². Per dtype and set of host scalars, four launches whatever
the number of tensors, with no host synchronisation:

1. ``colsumsq``: float64 column sums of g² over tiles of rows (a thread per
   column, rows in order), one partial row per row tile (read g, 4 B per float32
   element, plus the partials, about 1/rows_per_tile of g in float64);
2. ``coupled_column_sums``: per column, the row tiles' partials added in order;
3. ``coupled_v``: per column, the mean over the V rows rounded to the parameter
   dtype, v̄ ← β₂v̄ + (1-β₂)·mean;
4. ``coupled_apply``: AdamW with the column's v̄ (read θ, g, m; write θ, m: 20 B).

Launches 1 and 2 are pass 1 (they read g, write scratch), 3 and 4 pass 2. A sharded
step (spec/distributed.md §5) runs the same two passes: ``coupled_adam_partials``
reads the column sums of pass 1 back, ``coupled_adam_apply`` takes the whole
tensors' column sums and row counts and runs pass 2; with a tensor's own, that is
the single-process step, bit for bit.

Tensors with ``coupled[i]`` False take Adam's kernel in AdamW mode in the same
call. The step size and √(1-β2^t) come from the rule's descriptor.
``coupled_adam_step_checked`` fuses the finiteness check into pass 1 (see there).
"""

import numpy as np

from fisheropt.refimpl.coupled_adam import RULE

from ._kernels import Kernel
from ._plan import check_per_tensor, current, pick, select
from .adam import adam_launches
from .finite import exactly_finite, finite_launches, partials_finite_launch

__all__ = ["coupled_adam_step", "coupled_adam_step_checked", "coupled_adam_partials", "coupled_adam_apply"]


def _per_column(signature, body) -> Kernel:
    """A kernel over the column tiles (``col_tiles``, ``meta``): a thread per column ``col`` < d of
    tensor ``t``."""
    head = r"""
    const int t = (int)col_tiles[(long long)COL_TILE_ROW * blockIdx.x];
    const long long col = col_tiles[(long long)COL_TILE_ROW * blockIdx.x + 1] + threadIdx.x;
    const long long* tensor_meta = meta + (long long)META_ROW * t;
    const long long d = tensor_meta[4], first_column = tensor_meta[7];
    if (col < d) {"""
    return Kernel(
        [("const long long*", "col_tiles"), ("const long long*", "meta"), *signature], f"{head}{body}    }}\n"
    )


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
    # ---- the column sums over all rows: the row tiles' partials added in order.
    "coupled_column_sums": _per_column(
        [("const double*", "partials"), ("double*", "column_sums")],
        r"""
        const long long partial_base = tensor_meta[5], n_row_tiles = tensor_meta[6];
        double col_sum = 0;
        for (long long k = 0; k < n_row_tiles; ++k) col_sum += partials[partial_base + k * d + col];
        column_sums[first_column + col] = col_sum;
""",
    ),
    # ---- the column mean over the V = counts[t] rows of the whole tensor, v_col EMA.
    "coupled_v": _per_column(
        [
            ("const double*", "column_sums"),
            ("const long long*", "counts"),
            ("const unsigned long long*", "v_col_ptrs"),
            ("T", "beta2"),
            ("T", "one_minus_beta2"),
        ],
        r"""
        const T col_mean = (T)(column_sums[first_column + col] / (double)counts[t]);
        TENSOR(T, v, v_col_ptrs);
        v[col] = beta2 * v[col] + one_minus_beta2 * col_mean;
""",
    ),
    # ---- Coupled Adam pass 2: AdamW with the per-column second moment.
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


class _Split:
    """One call's tensors, split: the coupled ones by launch group (``_plan.LaunchGroup``, their
    scratch among their arguments), and the AdamW launches of the others (prepared, not run)."""

    def __init__(self, engine, params, grads, m, v, coupled, hyperparams):
        check_per_tensor(len(params), {**hyperparams, "coupled": list(coupled)})
        self.coupled = [i for i, c in enumerate(coupled) if c]
        adamw = [i for i, c in enumerate(coupled) if not c]
        params_c, grads_c, m_c, v_c = select(self.coupled, params, grads, m, v)
        self.groups = list(
            engine.launch_groups(
                "coupled",
                coupled_scalars,
                pick(self.coupled, hyperparams),
                param_ptrs=params_c,
                grad_ptrs=grads_c,
                m_ptrs=m_c,
                v_col_ptrs=v_c,
            )
        )
        for group in self.groups:
            plan = group.plan
            partials, column_sums = plan.scratch("colsum", plan.n_partial, plan.n_columns)
            group.args.update(partials=partials, column_sums=column_sums, counts=plan.counts)
        self.adamw_grads = select(adamw, grads)[0]
        uncoupled = select(adamw, params, grads, m, v)
        self.adamw = adam_launches(engine, *uncoupled, decoupled=True, **pick(adamw, hyperparams))


def _pass1(group) -> list:
    """The column sums of g² over the group's local rows, into its scratch."""
    plan = group.plan
    return [group.launch("colsumsq", plan.n_tiles), group.launch("coupled_column_sums", plan.n_col_tiles)]


def _pass2(group) -> list:
    """v̄ from the column sums and row counts, then the update."""
    plan = group.plan
    return [group.launch("coupled_v", plan.n_col_tiles), group.launch("coupled_apply", plan.n_chunks)]


def _step(params, grads, m, v, coupled, check, hyperparams) -> bool:
    """One process's step: pass 1 of every group (and with ``check`` the test of the partial
    column sums and of the AdamW gradients) before anything is written, then pass 2 and AdamW."""
    engine = current()
    flag = engine.new_flag() if check else None
    split = _Split(engine, params, grads, m, v, coupled, hyperparams)
    reads, writes = [], []
    for group in split.groups:
        first, column_sums = _pass1(group)
        reads.append(first)
        if check:
            reads.append(
                partials_finite_launch(engine, group.dtype, group.args["partials"], group.plan.n_partial, flag)
            )
        writes += [column_sums, *_pass2(group)]
    if check:
        reads += finite_launches(engine, split.adamw_grads, flag)
    return engine.run_checked(reads, writes + split.adamw, flag, lambda: exactly_finite(engine, grads))


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam (no host synchronisation).

    ``coupled[i]`` True: a V×d tensor, v[i] of shape (d,); False: AdamW, v[i] like params[i]."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _step(params, grads, m, v, coupled, False, hp)


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf.

    The coupled gradients are checked through the column sums pass 1 computes anyway
    (a launch over the float64 partials), the AdamW ones by the all_finite kernel, all
    into one flag read back before any write: 24 B per float32 element of a coupled
    tensor instead of 28, and the same single host synchronisation per step. A
    float64 g above 1e154 overflows its column sum although finite: only then are the
    gradients read again."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    return _step(params, grads, m, v, coupled, True, hp)


def coupled_adam_partials(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Pass 1 of a sharded step (spec/distributed.md §5): per coupled tensor, in order, its float64
    column sums Σ_i g²_ij over the local rows ((d,) each, on the host). Writes nothing but scratch;
    reads the sums back (one host synchronisation)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    engine = current()
    split = _Split(engine, params, grads, m, v, coupled, hp)
    engine.run([launch for group in split.groups for launch in _pass1(group)])
    out = [np.zeros(0)] * len(split.coupled)
    for group in split.groups:
        sums, meta = engine.download(group.args["column_sums"]), group.plan.host["meta"]
        for k, t in enumerate(group.indices):  # tensor k's columns start at meta[k, 7]
            out[t] = sums[meta[k, 7] : meta[k, 7] + meta[k, 4]]
    return out


def coupled_adam_apply(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled, column_sums, rows):
    """Pass 2 of a sharded step: coupled tensor k (in order) takes the column sums ``column_sums[k]``
    of all its V = ``rows[k]`` rows (added over the shards); the others AdamW. With the tensors' own
    partials and row counts it is :func:`coupled_adam_step`, bit for bit."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    engine = current()
    split = _Split(engine, params, grads, m, v, coupled, hp)
    for group in split.groups:
        group.args["column_sums"] = engine.upload(np.concatenate([column_sums[t] for t in group.indices]))
        group.args["counts"] = engine.upload(np.array([rows[t] for t in group.indices], np.int64))
    engine.run([launch for group in split.groups for launch in _pass2(group)] + split.adamw)
