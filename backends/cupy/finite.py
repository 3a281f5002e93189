"""all_finite on the GPU: the optimizers' pre-step check (reference: refimpl/finite.py).

One kernel per dtype over the chunk table, then one 4-byte device-to-host read:
the only host synchronisation of an unchecked step. ``finite_f64`` checks float64
partial sums instead of the gradients: the rules that reduce over g anyway (FAdam,
Coupled Adam) use it for ``<rule>_step_checked`` (see there), a non-finite g
making its partial sum non-finite.
"""

from ._kernels import Kernel, streaming_kernel
from ._plan import current

__all__ = ["all_finite", "finite_launches", "partials_finite_launch", "exactly_finite"]

KERNELS = {
    # ---- pre-step check: one int flag, set (never cleared) by any block that sees a NaN/Inf.
    "all_finite": streaming_kernel(
        {"g": "grad_ptrs"},
        "int* flag",
        "bad = bad || !isfinite(g_group[k]);",
        before="bool bad = false;",
        after="if (bad) *flag = 1;",
    ),
    # ---- the same flag from n float64 partial sums (one thread each).
    "finite_f64": Kernel(
        [("const double*", "partials"), ("long long", "n"), ("int*", "flag")],
        r"""
    const long long i = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (i < n && !isfinite(partials[i])) *flag = 1;
""",
    ),
}


def _no_scalars() -> dict:
    return {}


def finite_launches(engine, arrays, flag) -> list:
    """The launches that set ``flag`` when an element of ``arrays`` is NaN or ±Inf (one per dtype)."""
    return engine.streaming_launches("all_finite", _no_scalars, {}, dict(grad_ptrs=arrays), flag=flag)


def partials_finite_launch(engine, dtype, partials, n, flag):
    """The launch that sets ``flag`` when one of ``partials[:n]`` (float64) is not finite."""
    return engine.prepared("finite_f64", dtype, -(-int(n) // engine.block), partials=partials, n=n, flag=flag)


def exactly_finite(engine, arrays) -> bool:
    """all_finite on ``engine``: after a partial sum came out non-finite, tells a NaN/Inf in g
    from a float64 g² that overflowed (|g| > 1e154), which must not refuse the step."""
    arrays = list(arrays)
    if not arrays or all(a.size == 0 for a in arrays):
        return True
    flag = engine.new_flag()
    engine.run(finite_launches(engine, arrays, flag))
    return not engine.flag_set(flag)


def all_finite(arrays) -> bool:
    """True when every element of every array is finite (one kernel per dtype, one 4-byte read)."""
    return exactly_finite(current(), arrays)
