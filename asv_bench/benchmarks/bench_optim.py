"""Optimizer step times (airspeed velocity), for the record: Adam, AdamW, FAdam, Coupled Adam.

* ``Step.time_step`` / ``StepChecked.time_step_checked``: one optimizer step (the class's
  ``step``, ``check_finite=False`` / ``True``) per rule × backend × size, where
  backend is a fisheropt backend ("numpy" reference, "numba") or "torch"
  (``torch.optim.Adam/AdamW(fused=True)``; ``pytorch_optimizer.FAdam`` for FAdam).
* ``Finite.time_all_finite``: the pre-step finiteness check alone.

Absolute times move by up to 1.7x between runs on a shared machine; the figures that
are tracked and gated are the in-process ratios of ``bench_track.py`` and the memory
figures of ``bench_memory.py``.

Sizes: element counts of one tensor, or "many" (147 tensors of a GPT-2-small-like
model, 91.3 M parameters). The numpy reference is skipped above 2^22 elements
(seconds per step).
"""

from __future__ import annotations

import gc
import math

from . import _common as C

SIZES = ["2^16", "2^20", "2^25", "many"]
NUMPY_MAX_ELEMENTS = 1 << 22


def _problem(rule, size):
    shapes, coupled = C.problem_shapes(rule, size)
    return shapes, coupled, sum(math.prod(s) for s in shapes)


def _fisheropt_stepper(rule, backend, shapes, coupled, check_finite):
    params = C.random_arrays(shapes, 0)
    grads = C.random_arrays(shapes, 1, 1e-3)
    opt = C.make_optimizer(rule, backend, params, coupled, check_finite=check_finite)
    opt.step(grads)  # compile / load the kernels, allocate nothing later
    return lambda: opt.step(grads)


def _torch_stepper(rule, shapes):
    base = C.torch_baseline(rule, C.random_arrays(shapes, 0), C.random_arrays(shapes, 1, 1e-3))
    if base is None:
        C.skip(f"no PyTorch baseline for {rule} here")
    return base[1]


class _Stepping:
    """setup/teardown of one optimizer step per rule × backend × size (no benchmark of its own)."""

    param_names = ["rule", "backend", "size"]
    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)
    CHECK_FINITE = False

    def setup(self, rule, backend, size):
        shapes, coupled, n = _problem(rule, size)
        if backend == "numpy" and n > NUMPY_MAX_ELEMENTS:
            C.skip("the numpy reference is too slow at this size")
        if backend == "torch":
            self.step = _torch_stepper(rule, shapes)
        else:
            self.step = _fisheropt_stepper(rule, backend, shapes, coupled, check_finite=self.CHECK_FINITE)

    def teardown(self, rule, backend, size):
        self.step = None
        gc.collect()


class Step(_Stepping):
    params = (list(C.RULES), ["numpy", "numba", "torch"], SIZES)

    def time_step(self, rule, backend, size):
        self.step()


class StepChecked(_Stepping):
    """A step with the default finiteness check (one more read of every gradient)."""

    params = (list(C.RULES), ["numpy", "numba"], SIZES)
    CHECK_FINITE = True

    def time_step_checked(self, rule, backend, size):
        self.step()


class Finite:
    params = (["numpy", "numba"], SIZES)
    param_names = ["backend", "size"]
    timeout = 300

    def setup(self, backend, size):
        self.mod = C.backend(backend)
        shapes, _, _ = _problem("adam", size)
        self.grads = C.random_arrays(shapes, 1)
        assert self.mod.all_finite(self.grads)

    def teardown(self, backend, size):
        self.grads = None
        gc.collect()

    def time_all_finite(self, backend, size):
        self.mod.all_finite(self.grads)


class Overhead:
    """One Adam step of the NumPy reference on a single 1024-element tensor: the fixed per-step cost
    (input checks, dispatch) more than arithmetic. Tiny and present at every commit, it is also the
    benchmark tests/test_asv_site.py publishes and renders."""

    number = 20
    repeat = (3, 10, 5.0)

    def setup(self):
        self.params = C.random_arrays([(1024,)], 0)
        self.grads = C.random_arrays([(1024,)], 1, 1e-3)
        self.opt = C.make_optimizer("adam", "numpy", self.params, [False], check_finite=True)
        self.opt.step(self.grads)

    def time_adam_step_small(self):
        self.opt.step(self.grads)
