"""Memory claims, tracked (airspeed velocity).

* ``OptimizerState`` (one process for all pairs) and ``OptimizerStatePeak`` (one process
  each): an optimizer is built and takes one step on P = 2^23 float32
  parameters (params and gradients exist before; Coupled Adam steps a 16384 × 512
  coupled matrix, so its second moment is one length-512 vector: 1/16384 of Adam's).

  - ``track_state_bytes_per_param``: bytes of optimizer state per parameter, from the
    arrays themselves (exact: Adam/AdamW/FAdam 8, Coupled Adam 4 + 4/16384).
  - ``track_step_extra_mib``: peak resident memory of construction + first step above
    what was resident before (state plus any temporaries; Linux VmHWM, so NumPy,
    Numba and BLAS allocations all count). Kernels are compiled beforehand.
  - ``OptimizerStatePeak.peakmem_step``: asv's peak RSS of the whole benchmark process
    (imports, params, grads, state, temporaries; and the compiler's memory where the
    kernels were not cached yet, so it moves by up to 15 % between runs).

* ``NaturalGradientDirection``: the EF direction d = Gᵀ(GGᵀ + λI)⁻¹·1 for N = 128
  samples and P = 2^18 float32 parameters (G = 128 MiB). The claim is O(N² + P)
  extra memory, no float64 copy of G and nothing P × P:
  ``track_direction_extra_mib`` (VmHWM above resident before) and
  ``peakmem_direction``.

Memory is deterministic where time is not: the ``track_`` figures repeat to within 0.2 %
from run to run, so the regression gate holds them to a tight threshold.
"""

from __future__ import annotations

import functools
import gc

import numpy as np

from . import _common as C

P_STATE = 1 << 23
COUPLED_SHAPE = (1 << 14, 512)
DIRECTION_NP = (128, 1 << 18)


def _optimizer_problem(rule, backend):
    """(params, grads, coupled) for the memory figures, after compiling the kernels on a small
    problem of the same dtype and rank (so that the compiler's memory is not counted)."""
    C.backend(backend)
    shapes = [COUPLED_SHAPE] if rule == "coupled_adam" else [(P_STATE,)]
    coupled = [rule == "coupled_adam"]
    small = [(64, 32)] if rule == "coupled_adam" else [(2048,)]
    warm = C.make_optimizer(rule, backend, C.random_arrays(small, 2), coupled)
    warm.step(C.random_arrays(small, 3, 1e-3))
    del warm
    params, grads = C.random_arrays(shapes, 0), C.random_arrays(shapes, 1, 1e-3)
    gc.collect()
    return params, grads, coupled


def _construct_and_step(rule, backend, params, grads, coupled):
    opt = C.make_optimizer(rule, backend, params, coupled)
    opt.step(grads)
    return opt


class OptimizerState:
    """Exact state size and the resident-memory peak of construction + first step, all
    (rule, backend) pairs measured one after the other in one process (setup_cache)."""

    params = (list(C.RULES), ["numpy", "numba"])
    param_names = ["rule", "backend"]
    timeout = 600
    rounds = 1

    def setup_cache(self):
        figures = {}
        for rule in C.RULES:
            for backend in ("numpy", "numba"):
                try:
                    problem = _optimizer_problem(rule, backend)
                    extra, opt = C.peak_extra_bytes(functools.partial(_construct_and_step, rule, backend, *problem))
                    figures[(rule, backend)] = {
                        "state_bytes_per_param": C.state_nbytes(opt) / sum(p.size for p in problem[0]),
                        "step_extra_mib": extra / 2**20,
                    }
                    del opt, problem
                except NotImplementedError as exc:
                    figures[(rule, backend)] = {"skip": str(exc)}
                gc.collect()
        return figures

    def setup(self, figures, rule, backend):
        if "skip" in figures[(rule, backend)]:
            C.skip(figures[(rule, backend)]["skip"])

    def track_state_bytes_per_param(self, figures, rule, backend):
        return figures[(rule, backend)]["state_bytes_per_param"]

    track_state_bytes_per_param.unit = "bytes/param"

    def track_step_extra_mib(self, figures, rule, backend):
        return figures[(rule, backend)]["step_extra_mib"]

    track_step_extra_mib.unit = "MiB"


class OptimizerStatePeak:
    """asv's peak RSS of a process that builds the optimizer and steps once (one process each)."""

    params = (list(C.RULES), ["numpy", "numba"])
    param_names = ["rule", "backend"]
    timeout = 300
    rounds = 1
    repeat = 1
    number = 1

    def setup(self, rule, backend):
        self.problem = _optimizer_problem(rule, backend)

    def teardown(self, rule, backend):
        self.problem = None
        gc.collect()

    def peakmem_step(self, rule, backend):
        _construct_and_step(rule, backend, *self.problem)


class NaturalGradientDirection:
    params = (["numpy", "numba"],)
    param_names = ["backend"]
    timeout = 300
    rounds = 1
    repeat = 1
    number = 1

    def setup(self, backend):
        self.mod = C.backend(backend)
        if not hasattr(self.mod, "fisher_sample_space_direction"):
            C.skip(f"{backend} has no fisher_sample_space_direction at this commit")
        N, P = DIRECTION_NP
        rng = np.random.default_rng(0)
        self.G = rng.standard_normal((N, P), dtype=np.float32)
        self.rhs = np.ones(N)
        # compile / load on a small problem (same dtypes and ranks)
        self.mod.fisher_sample_space_direction(self.G[:8, :256].copy(), self.rhs[:8].copy(), 1e-3)
        gc.collect()

    def teardown(self, backend):
        self.G = None
        gc.collect()

    def track_direction_extra_mib(self, backend):
        extra, _ = C.peak_extra_bytes(lambda: self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3))
        return extra / 2**20

    track_direction_extra_mib.unit = "MiB"

    def peakmem_direction(self, backend):
        self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)
