"""The benchmarks' yardsticks: the in-process bandwidth ceiling, round-robin timing, PyTorch.

Memory-bound kernels are judged against what this machine, in this process, with
these threads, can stream *now*: ``a += s*b`` reads a and b and writes a back
(12 bytes per float32 element, no write-allocate penalty since a was read), as a
Numba parallel kernel. Measure it next to the kernel under test and report the ratio
``achieved GB/s / ceiling GB/s``; absolute GB/s on a shared machine mean little.

Physical placement matters on some machines (VMs especially): the same kernel can
stream 1.5-1.7x faster through one set of buffers than through another of the same
size. :func:`ceiling_on` therefore runs the ceiling over the *same* arrays the kernel
under test uses (``a += 0*b`` over lists of tensors, one fused call per dtype), and
:func:`interleaved_times` times it round-robin with them, so that load drift hits all
of them alike; :func:`paired_ratio` then compares the two within each round. The other
yardstick is PyTorch's counterpart of a rule (:func:`torch_baseline`), stepping the very
same NumPy buffers (:func:`torch_stepper`); the 147-tensor model is :func:`transformer_shapes`.

This file imports nothing from fisheropt, on purpose: ``fisheropt bench`` imports it as
``fisheropt.bench_ceiling``, and the asv benchmarks (``asv_bench/benchmarks/_ceiling.py``)
load the working tree's copy by path, so that every commit of the history, including
those whose fisheropt predates this module, is measured with the same instruments.
Numba is imported when a ceiling is first built: without it :func:`ceiling_on` raises
NotImplementedError (asv reports a skipped benchmark); the timing needs only NumPy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np

BYTES_PER_ELEMENT = 3  # itemsizes moved per element: read a, read b, write a
CHUNK = 1 << 16  # elements per parallel work item, unless the caller passes its backend's

_KERNEL = []


def ceiling_kernel():
    """The compiled ``a += s*b`` over chunks of many arrays given by address; NotImplementedError
    without numba."""
    if not _KERNEL:
        try:
            from numba import njit, prange, types
            from numba.extending import intrinsic
        except ImportError as exc:
            raise NotImplementedError(f"the bandwidth ceiling needs numba: {exc}") from exc

        def as_pointer(typingctx, address, like):
            """The int ``address`` as a pointer to ``typeof(like)`` elements (an inttoptr)."""
            if not isinstance(address, types.Integer):
                return None
            ptrty = types.CPointer(like)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(ptrty))

            return ptrty(address, like), codegen

        # Compiled code calls it without the typing context, which @intrinsic drops: numba
        # ships no annotations to tell a type checker so.
        pointer_to = cast("Callable[[Any, Any], Any]", intrinsic(as_pointer))

        @njit(parallel=True, cache=True)
        def axpy_chunks(a_addr, b_addr, chunk_tensor, chunk_start, chunk_stop, s):
            for c in prange(chunk_tensor.size):
                t = chunk_tensor[c]
                a = pointer_to(a_addr[t], s)
                b = pointer_to(b_addr[t], s)
                for i in range(chunk_start[c], chunk_stop[c]):
                    a[i] += s * b[i]

        _KERNEL.append(axpy_chunks)
    return _KERNEL[0]


def _direct(kernel, n_elements, *args):
    return kernel(*args)


def ceiling_on(a_list, b_list, scale: float = 0.0, *, chunk: int = CHUNK, launch=_direct):
    """(callable doing ``a += scale*b`` over aligned lists of C-contiguous arrays, bytes it moves).

    One fused parallel call per dtype over chunks of every tensor (so 147 small tensors cost
    one launch, like the optimizer's multi-tensor kernels); ``launch(kernel, n_elements, *args)``
    runs it (``fisheropt bench`` passes the numba backend's, with its chunk size, so the ceiling
    runs as that backend's kernels do). With the default scale 0 the arrays keep their values
    (x + 0·y == x for finite y), so it can run on live parameters, gradients and state."""
    kernel = ceiling_kernel()
    a_list, b_list = list(a_list), list(b_list)
    if len(a_list) != len(b_list):
        raise ValueError("a_list and b_list must have the same length")
    groups = {}
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.shape != b.shape or a.dtype != b.dtype or not (a.flags.c_contiguous and b.flags.c_contiguous):
            raise ValueError(f"pair {i}: a and b must be C-contiguous with the same shape and dtype")
        groups.setdefault(a.dtype, []).append(i)
    calls, nbytes = [], 0
    for dt, idx in groups.items():
        sizes = [a_list[i].size for i in idx]
        tens, start, stop = [], [], []
        for k, size in enumerate(sizes):
            for s0 in range(0, size, chunk):
                tens.append(k)
                start.append(s0)
                stop.append(min(size, s0 + chunk))
        a_addr = np.array([a_list[i].__array_interface__["data"][0] for i in idx], np.int64)
        b_addr = np.array([b_list[i].__array_interface__["data"][0] for i in idx], np.int64)
        table = (np.asarray(tens, np.int64), np.asarray(start, np.int64), np.asarray(stop, np.int64))
        calls.append((sum(sizes), (a_addr, b_addr, *table, dt.type(scale))))
        nbytes += BYTES_PER_ELEMENT * dt.itemsize * sum(sizes)
    keep = (a_list, b_list)  # the addresses are valid while these live

    def run():
        for n, args in calls:
            launch(kernel, n, *args)
        return keep

    return run, nbytes


def ceiling_buffers(params, grads, state=None):
    """(a_list, b_list) for :func:`ceiling_on`: the parameters and gradients and, given an
    optimizer's ``state`` ({name: list of arrays}), its parameter-sized state (m with v or f,
    else m with the gradients), so that the ceiling crosses the memory the step crosses."""
    a_list, b_list = list(params), list(grads)
    full = [
        list(arrays)
        for arrays in (state or {}).values()
        if len(arrays) == len(params) and all(x.shape == p.shape for x, p in zip(arrays, params))
    ]
    if full:
        a_list += full[0]
        b_list += full[1] if len(full) > 1 else list(grads)
    return a_list, b_list


def interleaved_times(fns: dict, repeats: int = 7, warmup: int = 1, pause: dict | None = None) -> dict:
    """{name: [seconds of round 1, round 2, ...]}, the callables timed round-robin (name order).

    ``pause`` maps a name to seconds to sleep after each of its calls (not timed), e.g. to let
    another runtime's spinning threads go quiet before the next measurement."""
    pause = pause or {}
    times = {name: [] for name in fns}
    for round_ in range(warmup + max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
            if pause.get(name):
                time.sleep(pause[name])
    return times


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1, pause: dict | None = None) -> dict:
    """{name: median seconds}, the callables timed round-robin (see :func:`interleaved_times`)."""
    return {name: float(np.median(v)) for name, v in interleaved_times(fns, repeats, warmup, pause).items()}


def paired_ratio(numerator, denominator) -> float:
    """Median over rounds of numerator[i] / denominator[i] (times of one round-robin round).

    Load on a shared machine comes and goes over seconds; two calls of the same round see
    nearly the same machine, so the per-round ratio cancels most of it, where a ratio of
    medians taken over different rounds would not."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


# ---- the PyTorch baselines ------------------------------------------------------------------
def torch_baseline(rule: str):
    """(name, factory(list of torch tensors) -> optimizer) of PyTorch's counterpart of ``rule``:
    ``torch.optim.Adam/AdamW(fused=True)``, ``pytorch_optimizer.FAdam``/``Lion``; None where
    there is none (Coupled Adam) or it is not installed."""
    try:
        import torch
    except Exception:
        return None
    if rule in ("adam", "adamw"):
        cls = torch.optim.Adam if rule == "adam" else torch.optim.AdamW
        wd = 0.0 if rule == "adam" else 0.01
        return (f"torch-{rule}-fused", lambda ps: cls(ps, lr=1e-3, weight_decay=wd, fused=True))
    if rule in ("fadam", "lion"):
        try:
            import pytorch_optimizer
        except Exception:
            return None
        cls = pytorch_optimizer.FAdam if rule == "fadam" else pytorch_optimizer.Lion
        return (f"pytorch_optimizer-{rule}", lambda ps: cls(ps, lr=1e-3))
    return None


def torch_stepper(factory, params, grads, shared_m_v=None):
    """A callable taking one step of ``factory``'s optimizer on the NumPy ``params`` with ``grads``
    in place (``torch.from_numpy``: the same memory), after a first step that creates its state.

    ``shared_m_v`` = (list of m, list of v) makes an Adam's ``exp_avg``/``exp_avg_sq`` those
    arrays, e.g. fisheropt's: both then race over the same memory."""
    import torch

    tparams = []
    for p, g in zip(params, grads):
        tp = torch.from_numpy(p).requires_grad_()
        tp.grad = torch.from_numpy(g)
        tparams.append(tp)
    opt = factory(tparams)
    with torch.no_grad():
        opt.step()
    for tp, m, v in zip(tparams, *(shared_m_v or ((), ()))):
        st = opt.state[tp]
        if "exp_avg" in st and "exp_avg_sq" in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.from_numpy(m), torch.from_numpy(v)

    def step():
        with torch.no_grad():
            opt.step()

    return step


def transformer_shapes(layers: int = 12, d: int = 768, vocab: int = 8192):
    """Shapes of a GPT-2-small-like model: 12 per layer + embedding + final norm = 147 tensors."""
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]  # q, k, v, o; MLP in, out
        shapes += [(d,), (d,), (d,), (d,), (4 * d,), (d,)]  # 2 layer norms (w, b), MLP biases
    shapes += [(vocab, d), (d,), (d,)]  # embedding, final norm
    return shapes
