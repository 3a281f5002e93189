"""The cupy backend without CuPy: its CuPy-free modules, its kernels on the CPU emulator, and the
agreement check against the reference, shared by tests/test_cupy_backend.py (agreement, GPU) and
tests/backends/test_cupy_internals.py (tables, engine, CUDA text, plumbing).

The host modules (``_kernels``, ``_plan``, ``_emulate`` and the rule modules) are imported under
their own package name, without running backends/cupy/__init__.py (which imports cupy).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

import fisheropt.backends
from fisheropt import refimpl
from fisheropt.refimpl import esimcse_momentum

HOST_PACKAGE = "_fisheropt_cupy_host"
CUPY_DIR = Path(fisheropt.backends.__file__).parent / "cupy"


def _host_modules():
    """_kernels, _plan and _emulate, without running backends/cupy/__init__.py (which imports cupy)."""
    if HOST_PACKAGE not in sys.modules:
        pkg = types.ModuleType(HOST_PACKAGE)
        pkg.__path__ = [str(CUPY_DIR)]
        sys.modules[HOST_PACKAGE] = pkg
    return tuple(importlib.import_module(f"{HOST_PACKAGE}.{m}") for m in ("_kernels", "_plan", "_emulate"))


cuda_kernels, planner, emulator = _host_modules()
#: the step-function modules (finite, one per rule with a module, and esimcse), imported without cupy
MODULES = {
    m: importlib.import_module(f"{HOST_PACKAGE}.{m}")
    for m in cuda_kernels.kernel_modules()
    if (CUPY_DIR / f"{m}.py").exists()
}
DTYPES = ("float32", "float64")
HAVE_CXX = emulator.compiler() is not None


def _function(fn):
    """The backend function ``fn`` (``all_finite``, ``<rule>_step[_checked]``, ``<rule>_partials``,
    ``<rule>_apply`` and ``ema_update``) from its module."""
    for module in MODULES.values():
        if hasattr(module, fn):
            return getattr(module, fn)
    raise AttributeError(fn)


class Steps:
    """The backend's functions, each run on ``engine`` (``_plan.using``), as the package runs
    them on the CuPy engine: ``Steps(engine).adamw_step(...)``."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, fn):
        function = _function(fn)

        def call(*args, **kwargs):
            with planner.using(self.engine):
                return function(*args, **kwargs)

        return call


HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
FHP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1)
LHP = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1)


class EmulatedBackend:
    """The cupy backend's engine over the CPU emulation of its kernels."""

    name = "emulated"

    def __init__(self, block=32, chunk=96, min_rows=2, max_rows=3, transform=None):
        self.engine = planner.Engine(
            emulator.CpuLauncher(block, transform), chunk=chunk, tile_kw=dict(min_rows=min_rows, max_rows=max_rows)
        )

    def __getattr__(self, fn):
        # all_finite, <rule>_step[_checked], <rule>_partials/_apply, ema_update: the modules' own functions
        # on this engine
        if fn.startswith("_"):
            raise AttributeError(fn)
        return getattr(Steps(self.engine), fn)

    @staticmethod
    def to_device(a, misaligned=False):
        a = np.asarray(a)
        if not misaligned:
            return np.array(a, copy=True)
        buf = np.empty(a.size + 1, a.dtype)
        out = buf[1:].reshape(a.shape)
        out[...] = a
        return out

    @staticmethod
    def to_host(a):
        return np.array(a)


RULES = {
    "adam": ("adam_step", ("m", "v")),
    "adamw": ("adamw_step", ("m", "v")),
    "fadam": ("fadam_step", ("m", "f")),
    "coupled_adam": ("coupled_adam_step", ("m", "v")),
    "lion": ("lion_step", ("m",)),
}


def _default_hp(rule):
    return dict(FHP) if rule == "fadam" else dict(LHP) if rule == "lion" else dict(HP)


def fixed_problem(rule, shapes, dtypes, seed, **overrides):
    """A problem for ``_run_both`` (the keys of ``problems``): unit scales, two steps from the first,
    aligned arrays and the rule's default hyperparameters, unless ``overrides`` says otherwise."""
    defaults = dict(scale=1.0, grad_scale=1.0, first_step=1, steps=2, misaligned=False, hp=_default_hp(rule))
    return {**defaults, "shapes": shapes, "dtypes": dtypes, "seed": seed, **overrides}


TOL = {np.dtype("float32"): (2e-5, 1e-6), np.dtype("float64"): (1e-12, 1e-13)}

any_shape = st.one_of(st.lists(st.integers(0, 6), max_size=3).map(tuple), st.integers(1, 700).map(lambda n: (n,)))
matrix_shape = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 7)), st.tuples(st.integers(1, 40), st.integers(30, 80))
)


#: the values each hyperparameter of a rule is drawn from (Adam's for AdamW and Coupled Adam)
HP_CHOICES = {
    "fadam": dict(
        lr=[1e-3, 0.05],
        beta1=[0.0, 0.9],
        beta2=[0.5, 0.999],
        eps=[1e-8, 1e-3],
        eps2=[0.01, 0.1],
        clip=[0.5, 1.0, 2.0],
        p=[0.5, 1.0, 0.25],
        weight_decay=[0.0, 0.1],
    ),
    "lion": dict(lr=[1e-4, 0.05], beta1=[0.0, 0.9], beta2=[0.5, 0.99], weight_decay=[0.0, 0.1, 1.0]),
    "adam": dict(
        lr=[1e-3, 0.05], beta1=[0.0, 0.5, 0.9], beta2=[0.5, 0.999], eps=[1e-8, 1e-3], weight_decay=[0.0, 0.01, 0.5]
    ),
}


@st.composite
def problems(draw, rule):
    coupled = rule == "coupled_adam"
    shapes = draw(st.lists(matrix_shape if coupled else any_shape, min_size=1, max_size=4))
    mixed = draw(st.booleans())
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in shapes] if mixed else [draw(st.sampled_from(DTYPES))] * len(shapes)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    # 0: zero grads; 1e-40: float32 subnormals (no flush-to-zero allowed); 3e19: g² overflows float32
    grad_scale = draw(st.sampled_from([0.0, 1e-40, 1e-18, 1e-3, 1.0, 1e3, 1e15, 3e19]))
    first_step = draw(st.sampled_from([1, 2, 1000]))
    steps = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    misaligned = draw(st.booleans())
    hp = {name: draw(st.sampled_from(values)) for name, values in HP_CHOICES.get(rule, HP_CHOICES["adam"]).items()}
    if coupled:  # coupled and uncoupled (AdamW) tensors in one call, as the optimizer class makes it
        hp["coupled"] = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    drawn = dict(scale=scale, grad_scale=grad_scale, first_step=first_step, steps=steps, misaligned=misaligned)
    return fixed_problem(rule, shapes, dtypes, seed, hp=hp, **drawn)


def _hyperparams(rule, pb):
    hp = dict(pb["hp"])
    if rule == "coupled_adam":
        hp.setdefault("coupled", [True] * len(pb["shapes"]))
    return hp


def _make(rule, pb):
    rng = np.random.default_rng(pb["seed"])
    params = [np.asarray(rng.standard_normal(s) * pb["scale"], dtype=d) for s, d in zip(pb["shapes"], pb["dtypes"])]
    coupled = _hyperparams(rule, pb).get("coupled", [False] * len(params))

    def state_shape(k, s, c):
        return (s[1],) if c and k == "v" else s

    state = {}
    for k in RULES[rule][1]:
        arrs = []
        for s, d, c in zip(pb["shapes"], pb["dtypes"], coupled):
            s = state_shape(k, s, c)
            if pb["first_step"] == 1:
                arrs.append(np.zeros(s, d))
            else:
                x = rng.standard_normal(s) * max(pb["grad_scale"], 1e-3)
                arrs.append(np.asarray(x * x if k in ("v", "f") else 0.1 * x, dtype=d))
        state[k] = arrs
    grads = [
        [np.asarray(rng.standard_normal(s) * pb["grad_scale"], dtype=d) for s, d in zip(pb["shapes"], pb["dtypes"])]
        for _ in range(pb["steps"])
    ]
    return params, state, grads


def _run_both(backend, rule, pb):
    fn, order = RULES[rule]
    params, state, grads = _make(rule, pb)
    ref_p = [p.copy() for p in params]
    ref_s = [[a.copy() for a in state[k]] for k in order]
    dev_p = [backend.to_device(p, pb["misaligned"]) for p in params]
    dev_s = [[backend.to_device(a, pb["misaligned"]) for a in state[k]] for k in order]
    for i, g in enumerate(grads):
        t = pb["first_step"] + i
        getattr(refimpl, fn)(ref_p, [x.copy() for x in g], *ref_s, step=t, **_hyperparams(rule, pb))
        getattr(backend, fn)(
            dev_p, [backend.to_device(x, pb["misaligned"]) for x in g], *dev_s, step=t, **_hyperparams(rule, pb)
        )
    return (ref_p, ref_s), ([backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s])


def ema_both(backend, targets, sources, decay, *, misaligned=False, updates=1):
    """``ema_update`` (ESimCSE's momentum encoder) by the reference and by ``backend`` from the same
    NumPy arrays, ``updates`` times: (the reference's targets, the backend's back on the host)."""
    want = [t.copy() for t in targets]
    dev_targets = [backend.to_device(t, misaligned) for t in targets]
    dev_sources = [backend.to_device(q, misaligned) for q in sources]
    for _ in range(updates):
        esimcse_momentum.ema_update(want, sources, decay=decay)
        backend.ema_update(dev_targets, dev_sources, decay=decay)
    return want, [backend.to_host(t) for t in dev_targets]


def _assert_agree(ref, got, *, exact, magnitude):
    (rp, rs), (gp, gs) = ref, got
    for want_list, got_list, what in [(rp, gp, "params")] + [
        (a, b, f"state{j}") for j, (a, b) in enumerate(zip(rs, gs))
    ]:
        for i, (w, g) in enumerate(zip(want_list, got_list)):
            assert g.dtype == w.dtype and g.shape == w.shape
            if exact:
                np.testing.assert_array_equal(g, w, err_msg=f"{what}[{i}]")
            else:
                rtol, atol = TOL[w.dtype]
                # An entry that is a sum of cancelling terms (m after a few steps) carries the
                # terms' rounding: a few ulp of the array's scale, not of the entry. pow() is not
                # correctly rounded in any libm, so FAdam with p ∉ {0.5, 1} differs by an ulp there.
                finite = np.abs(w[np.isfinite(w)])
                atol = atol * magnitude + 8 * np.finfo(w.dtype).eps * (float(finite.max()) if finite.size else 0.0)
                np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what}[{i}]")
