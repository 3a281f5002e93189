"""The cupy backend: host-side planning and kernel text (CPU), the kernels themselves run
on the CPU by the emulator (``backends/cupy/_emulate.py``, needs g++), and on a GPU.

Three layers, so that as much as possible is checked without a GPU:

* plain CPU tests: chunk tables, column tiles, argument typing, caches and the
  number of launches (through a recording fake launcher), the generated CUDA
  text for both dtypes, the registry's behaviour when no GPU is present;
* NVRTC tests (when the NVRTC library can be loaded — no GPU needed): the
  sources compile for sm_90 and the PTX has no flush-to-zero, no FMA
  contraction in the elementwise update kernels and uses 16-byte global loads;
* NVCC tests (when the CUDA toolkit's ``nvcc`` is on the PATH — no GPU needed):
  the same PTX checks on the same source, compiled by nvcc with the same options;
* agreement tests run by two backends: ``emulated`` (the exact CUDA source,
  compiled by g++ with a CUDA prelude, small block and chunk sizes so that
  every multi-chunk / multi-tile path is exercised, through the rule modules'
  own ``<rule>_step`` functions on an emulated engine) and ``cupy`` (marked
  ``gpu``; skipped with the registry's reason when CuPy or a GPU is absent).
"""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fisheropt as fo
import fisheropt.backends
from fisheropt import refimpl, vectors


# ---- loading the CuPy-free modules ---------------------------------------------------
HOST_PACKAGE = "_fisheropt_cupy_host"
CUPY_DIR = Path(fisheropt.backends.__file__).parent / "cupy"


def _host_modules():
    """_kernels, _plan and _emulate, without running backends/cupy/__init__.py (which imports cupy)."""
    if HOST_PACKAGE not in sys.modules:
        pkg = types.ModuleType(HOST_PACKAGE)
        pkg.__path__ = [str(CUPY_DIR)]
        sys.modules[HOST_PACKAGE] = pkg
    return tuple(importlib.import_module(f"{HOST_PACKAGE}.{m}") for m in ("_kernels", "_plan", "_emulate"))


K, P, E = _host_modules()
#: the step-function modules (finite and one per rule with a module), imported without cupy
MODULES = {m: importlib.import_module(f"{HOST_PACKAGE}.{m}") for m in K.kernel_modules()
           if (CUPY_DIR / f"{m}.py").exists()}
DTYPES = ("float32", "float64")
HAVE_CXX = E.compiler() is not None
NVCC = shutil.which("nvcc")


def _function(fn):
    """The backend function ``fn`` (``all_finite``, ``<rule>_step[_checked]``) from its module."""
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
            with P.using(self.engine):
                return function(*args, **kwargs)
        return call


def _cupy_reason():
    return fo.backends.unavailable().get("cupy")


def _nvrtc():
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


# =====================================================================================
# CPU: tables
# =====================================================================================
@given(sizes=st.lists(st.integers(0, 1000), min_size=1, max_size=8), chunk=st.sampled_from([4, 8, 96, 256]))
def test_chunk_table_covers_every_element_exactly_once(sizes, chunk):
    table, first = P.chunk_table(sizes, chunk)
    assert table.dtype == np.int64 and table.shape[1] == K.CW
    assert first[0] == 0 and first[-1] == len(table)
    for i, size in enumerate(sizes):
        rows = table[first[i]:first[i + 1]]
        assert (rows[:, 0] == i).all()
        seen = np.zeros(size, dtype=int)
        for _, start, stop, _ in rows:
            assert 0 <= start < stop <= size
            assert start % chunk == 0                     # alignment carries over
            assert stop - start <= chunk                  # balanced: no oversized chunk
            seen[start:stop] += 1
        assert (seen == 1).all()
        full = rows[:-1]
        assert ((full[:, 2] - full[:, 1]) == chunk).all()  # only a tensor's last chunk is short
        assert len(rows) == -(-size // chunk)


def test_chunk_table_start_mod_cols_and_validation():
    table, _ = P.chunk_table([35, 12], 8, cols=[5, 4])
    for t, start, _, mod in table:
        assert mod == start % [5, 4][t]
    with pytest.raises(ValueError):
        P.chunk_table([3], 6)


@given(shapes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 70)), min_size=1, max_size=4),
       block=st.sampled_from([32, 64]), min_rows=st.integers(1, 4), extra=st.integers(0, 3))
def test_coupled_tiles_cover_every_entry_once(shapes, block, min_rows, extra):
    tiles, ctiles, pbase, nrc, n_partial = P.coupled_tables(shapes, block, min_rows=min_rows,
                                                             max_rows=min_rows + extra)
    used = np.zeros(n_partial, dtype=int)
    for i, (rows, cols) in enumerate(shapes):
        covered = np.zeros((rows, cols), dtype=int)
        mine = tiles[tiles[:, 0] == i]
        for _, r0, r1, c0, off in mine:
            assert c0 % block == 0 and 0 <= r0 < r1 <= rows
            cs = slice(c0, min(c0 + block, cols))
            covered[r0:r1, cs] += 1
            k = (off - pbase[i]) // cols
            assert off == pbase[i] + k * cols and 0 <= k < nrc[i]
            used[off + c0:off + min(c0 + block, cols)] += 1
        assert (covered == 1).all()
        cmine = ctiles[ctiles[:, 0] == i]
        assert sorted(cmine[:, 1].tolist()) == list(range(0, cols, block))
    assert (used == 1).all()  # partial slots are disjoint and all written


def test_rows_per_tile_bounds():
    assert P.rows_per_tile(8192, 768, 256) == 32
    assert P.rows_per_tile(131072, 1024, 256) == 128
    assert P.rows_per_tile(10**7, 4, 256) == 256
    assert P.rows_per_tile(0, 5, 256) == 32


def test_kernel_args_have_the_exact_c_types():
    args = P.kernel_args("adam", "float32", dict(chunks="C", P="P", G="G", M="M", V="V", mode=2, wd=0.1,
                                                 decay=0.99, b1=0.9, omb1=0.1, b2=0.999, omb2=1e-3,
                                                 step_size=1e-3, bc2s=0.5, eps=1e-8))
    assert args[:5] == ["C", "P", "G", "M", "V"]
    assert type(args[5]) is np.int32
    assert all(type(a) is np.float32 for a in args[6:])
    assert args[7] == np.float32(0.99)
    e = P.kernel_args("fadam_eps", "float32", dict(meta=1, partial=2, scal=3, eps=1e-8, eps2=0.01, two_p=1.0,
                                                    two_p_is_one=1, eps2p=1e-8, tiny=1e-38))
    assert [type(a) for a in e[3:]] == [np.float64, np.float64, np.float64, np.int32, np.float32, np.float32]
    d = P.kernel_args("adam", "float64", dict(chunks=0, P=0, G=0, M=0, V=0, mode=0, wd=0, decay=1, b1=0.9,
                                              omb1=0.1, b2=0.9, omb2=0.1, step_size=1, bc2s=1, eps=1e-8))
    assert all(type(a) is np.float64 for a in d[6:])
    with pytest.raises(TypeError, match="missing"):
        P.kernel_args("sumsq", "float32", dict(chunks=0, G=0))
    with pytest.raises(TypeError, match="unexpected"):
        P.kernel_args("sumsq", "float32", dict(chunks=0, G=0, partial=0, bogus=1))


# =====================================================================================
# CPU: the engine's host logic, with a recording fake launcher (no kernels run)
# =====================================================================================
class RecordingLauncher:
    block = 256

    def __init__(self):
        self.launches, self.uploads, self.args, self.reads, self.flag_value = [], 0, [], 0, 0

    def device_key(self):
        return 0

    def upload(self, host):
        self.uploads += 1
        return np.array(host)

    def empty_f64(self, n):
        return np.empty(n)

    def zeros_i32(self, n):
        return np.zeros(n, np.int32)

    def read_i32(self, a):
        self.reads += 1
        return self.flag_value    # what the check kernels would have left in the flag

    def ptr(self, a):
        return a.ctypes.data

    def ptrs(self, arrays):
        return tuple(self.ptr(a) for a in arrays)

    def launch(self, dtype, name, grid, args):
        assert len(args) == len(K.SIGNATURES[name])
        self.launches.append((dtype, name, grid))
        self.args.append(dict(zip([a for _, a in K.SIGNATURES[name]], args)))


def _model(n_layers, dtype=np.float32):
    shapes = [(64, 16)] + [(16, 16), (16, 48), (48,), (16,)] * n_layers
    return [np.zeros(s, dtype) for s in shapes]


HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
FHP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1)
LHP = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1)


@pytest.mark.parametrize("rule,expected", [("adam", ["adam"]),
                                           ("fadam", ["sumsq", "fadam_eps", "fadam_precond", "fadam_scales",
                                                      "fadam_apply"]),
                                           ("coupled", ["colsumsq", "coupled_v", "coupled_apply"]),
                                           ("lion", ["lion"])])
def test_launches_per_step_do_not_grow_with_the_tensor_count(rule, expected):
    for n_layers in (1, 37):   # 5 and 149 tensors
        L = RecordingLauncher()
        eng = P.Engine(L)
        params = _model(n_layers)
        if rule == "coupled":
            params = [p for p in params if p.ndim == 2]
        grads = [np.zeros_like(p) for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros(p.shape[1], p.dtype) for p in params] if rule == "coupled" else [np.zeros_like(p)
                                                                                       for p in params]
        for step in (1, 2):
            L.launches.clear()
            if rule == "adam":
                Steps(eng).adamw_step(params, grads, m, v, step=step, **HP)
            elif rule == "fadam":
                Steps(eng).fadam_step(params, grads, m, v, step=step, **FHP)
            elif rule == "lion":
                Steps(eng).lion_step(params, grads, m, step=[step] * len(params), **LHP)
            else:
                Steps(eng).coupled_adam_step(params, grads, m, v, step=step, coupled=[True] * len(params), **HP)
            assert [n for _, n, _ in L.launches] == expected


def test_tables_are_cached_and_only_new_grads_are_uploaded():
    L = RecordingLauncher()
    eng = P.Engine(L)
    params = _model(3)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    grads = [np.zeros_like(p) for p in params]
    steps = Steps(eng)
    steps.adam_step(params, grads, m, v, step=1, **HP)
    first = L.uploads
    assert first == 2 + 4          # chunks + meta, then P, G, M, V pointer tables
    steps.adam_step(params, grads, m, v, step=2, **HP)
    assert L.uploads == first      # same arrays: nothing uploaded
    new_grads = [np.ones_like(p) for p in params]
    assert steps.all_finite(new_grads)
    steps.adam_step(params, new_grads, m, v, step=3, **HP)
    assert L.uploads == first + 1  # one pointer table, shared by all_finite and the step


def test_mixed_dtypes_make_one_group_each_and_noncontiguous_is_refused():
    L = RecordingLauncher()
    eng = P.Engine(L)
    params = [np.zeros(5, np.float32), np.zeros(7, np.float64), np.zeros(3, np.float32)]
    state = [[np.zeros_like(p) for p in params] for _ in range(3)]
    steps = Steps(eng)
    steps.adamw_step(params, *state, step=1, **HP)
    assert [(d, n) for d, n, _ in L.launches] == [("float32", "adam"), ("float64", "adam")]
    with pytest.raises(TypeError, match="float32 and float64"):
        steps.adamw_step([np.zeros(3, np.float16)], [np.zeros(3, np.float16)] * 1, [np.zeros(3, np.float16)],
                         [np.zeros(3, np.float16)], step=1, **HP)
    bad = np.zeros((4, 4), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        steps.adamw_step([bad.copy()], [bad], [bad.copy()], [bad.copy()], step=1, **HP)


def _adam_problem(specs):
    params = [np.zeros(shape, dtype) for shape, dtype in specs]
    return params, [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params], [np.zeros_like(p)
                                                                                           for p in params]


def test_per_tensor_values_make_one_launch_per_distinct_set_of_host_scalars():
    L = RecordingLauncher()
    steps = Steps(P.Engine(L))
    params, grads, m, v = _adam_problem([((5,), np.float32), ((7,), np.float64), ((3,), np.float32),
                                         ((4,), np.float32)])
    hp = dict(HP, lr=[1e-3, 1e-3, 1e-3, 2e-3])
    steps.adamw_step(params, grads, m, v, step=1, **hp)
    # float32: tensors 0 and 2 share their scalars, 3 has its own lr; float64: tensor 1
    assert [(d, n) for d, n, _ in L.launches] == [("float32", "adam"), ("float32", "adam"), ("float64", "adam")]
    assert [a["step_size"] for a in L.args] == [np.float32(1e-3 / (1 - 0.9)), np.float32(2e-3 / (1 - 0.9)),
                                                np.float64(1e-3 / (1 - 0.9))]
    assert L.args[1]["decay"] == np.float32(1 - 2e-3 * 0.01)
    L.launches.clear()
    steps.adamw_step(params, grads, m, v, step=[1, 2, 1, 2], **dict(HP, lr=1e-3))   # own step counts
    assert [(d, n) for d, n, _ in L.launches] == [("float32", "adam"), ("float32", "adam"), ("float64", "adam")]
    L.launches.clear()
    steps.lion_step(params, grads, m, step=[1, 9, 3, 4], **LHP)   # Lion's scalars do not depend on t
    assert [(d, n) for d, n, _ in L.launches] == [("float32", "lion"), ("float64", "lion")]


def test_a_step_that_cannot_be_prepared_launches_nothing():
    """All or nothing: a bad list length, a non-contiguous array or an unsupported dtype in the
    last group is found while preparing, before the first launch of the step."""
    L = RecordingLauncher()
    steps = Steps(P.Engine(L))
    params, grads, m, v = _adam_problem([((5,), np.float32), ((7,), np.float64), ((3, 4), np.float32)])
    with pytest.raises(ValueError, match="lr has 2 values for 3 tensors"):
        steps.adam_step(params, grads, m, v, step=1, **dict(HP, lr=[1e-3, 1e-3]))
    with pytest.raises(ValueError, match="step has 4 values"):
        steps.lion_step(params, grads, m, step=[1, 2, 3, 4], **LHP)
    bad = np.zeros((3, 8), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        steps.adamw_step(params, grads[:2] + [bad], m, v, step=1, **dict(HP, lr=[1e-3, 1e-3, 5e-3]))
    with pytest.raises(ValueError, match="C-contiguous"):
        steps.fadam_step(params, grads[:2] + [bad], m, v, step=1, **dict(FHP, p=[0.5, 0.5, 1.0]))
    cp, cg, cm = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)], [np.zeros((4, 3), np.float32), bad], \
        [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)]
    with pytest.raises(ValueError, match="C-contiguous"):   # the AdamW tensor's, after the coupled ones
        steps.coupled_adam_step(cp, cg, cm, [np.zeros(3, np.float32), np.zeros(5, np.float32)], step=1,
                                coupled=[True, False], **HP)
    with pytest.raises(ValueError, match="coupled has 1 values for 2 tensors"):
        steps.coupled_adam_step(cp, cp, cm, [np.zeros(3, np.float32), np.zeros(5, np.float32)], step=1,
                                coupled=[True], **HP)
    with pytest.raises(TypeError, match="float32 and float64"):
        steps.lion_step(params + [np.zeros(2, np.float16)], grads + [np.zeros(2, np.float16)],
                        m + [np.zeros(2, np.float16)], step=1, **LHP)
    assert L.launches == []


def test_many_hyperparameter_groups_do_not_thrash_the_caches():
    """40 groups (layer-wise learning rates): 40 plans and 160 pointer tables, more than the
    caches keep by default; a step never evicts what it uses, so the next step builds and
    uploads nothing, and the caches shrink back to their limits afterwards."""
    L = RecordingLauncher()
    eng = P.Engine(L)
    steps = Steps(eng)
    params, grads, m, v = _adam_problem([((16, 16), np.float32)] * 40)
    lrs = [1e-3 * 0.9**i for i in range(40)]
    steps.adamw_step(params, grads, m, v, step=1, **dict(HP, lr=lrs))
    assert len(L.launches) == 40
    built, uploads = eng.stats["plans_built"], L.uploads
    steps.adamw_step(params, grads, m, v, step=2, **dict(HP, lr=lrs))
    assert (eng.stats["plans_built"], L.uploads) == (built, uploads)
    other = _adam_problem([((3,), np.float32)])
    steps.adamw_step(*other, step=1, **HP)
    assert len(eng._plans) <= eng.max_plans and len(eng._ptrs) <= eng.max_pointer_tables


@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_checked_steps_read_the_flag_once_before_any_write(rule):
    L = RecordingLauncher()
    steps = Steps(P.Engine(L))
    params, grads, m, v = _adam_problem([((6, 4), np.float32), ((5,), np.float32), ((3, 2), np.float64)])
    if rule == "fadam":
        run = lambda: steps.fadam_step_checked(params, grads, m, v, step=1, **FHP)   # noqa: E731
        reads_only = ["sumsq", "finite_f64", "sumsq", "finite_f64"]
        writes = ["fadam_eps", "fadam_precond", "fadam_scales", "fadam_apply"] * 2
    else:
        v = [np.zeros(4, np.float32), np.zeros(5, np.float32), np.zeros(2, np.float64)]
        run = lambda: steps.coupled_adam_step_checked(params, grads, m, v, step=1,  # noqa: E731
                                                      coupled=[True, False, True], **HP)
        reads_only = ["colsumsq", "finite_f64", "colsumsq", "finite_f64", "all_finite"]
        writes = ["coupled_v", "coupled_apply"] * 2 + ["adam"]
    assert run() is True
    assert [n for _, n, _ in L.launches] == reads_only + writes and L.reads == 1
    L.launches.clear()
    L.reads, L.flag_value = 0, 1        # a non-finite partial sum, and (re-read) a non-finite g
    assert run() is False
    assert [n for _, n, _ in L.launches] == reads_only + ["all_finite"] * 2 and L.reads == 2


# =====================================================================================
# CPU: the generated CUDA text
# =====================================================================================
@pytest.mark.parametrize("dtype", DTYPES)
def test_generated_source_is_typed_for_its_dtype(dtype):
    src = K.source(dtype)
    ct = "float" if dtype == "float32" else "double"
    assert f"typedef {ct} T;" in src
    assert f"#define VEC {4 if dtype == 'float32' else 2}" in src
    assert not re.search(r"\{[A-Z_]+\}", src), "unsubstituted template field"
    for name, sig in K.SIGNATURES.items():
        text = K.kernel_source(name, dtype)
        assert f"fo_{name}_{K.suffix(dtype)}(" in text
        for ctype, arg in sig:
            want = ct if ctype == "T" else ctype
            assert re.search(rf"\b{re.escape(want)}( __restrict__)? {arg}\b", text), (name, arg)
    if dtype == "float32":
        assert "sqrtf(" in src and "powf(" in src
    else:
        assert "sqrtf(" not in src and "powf(" not in src


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", K.ELEMENTWISE)
def test_elementwise_kernels_have_no_double_literals_or_double_math(dtype, name):
    """In T arithmetic a literal such as 1.0 would promote float32 math to float64;
    float64 may only appear as the reductions' explicit accumulators and casts."""
    text = K.kernel_source(name, dtype)
    assert K.float_literals(text) == [], K.float_literals(text)
    body = text.split("{", 1)[1]
    for line in body.splitlines():
        for _ in re.finditer(r"\bdouble\b", line):
            assert re.search(r"\(double\)|__shared__ double|double \w+ = 0[;,]|double \w+ = block_sum\(", line), line


def test_float_literal_detector():
    assert K.float_literals("x = 1.0 + 2.5f * 3e-4 + a1.5 + 0x7fLL + 15ull + .5") == ["1.0", "2.5f", "3e-4", ".5"]


def test_compile_options_forbid_contraction_and_flush_to_zero():
    assert "--fmad=false" in K.COMPILE_OPTIONS and "--ftz=false" in K.COMPILE_OPTIONS
    assert K.CHUNK % (4 * K.BLOCK) == 0


def _check_ptx(ptx: str, dtype: str) -> None:
    """What the PTX of the generated source must show, whichever compiler made it."""
    # (powf's own implementation uses rcp/ex2.approx.ftz internally; that is libdevice, not our math)
    assert not re.search(r"\b(add|sub|mul|div|sqrt|cvt|setp|fma)\.[\w.]*ftz", ptx)
    entries = {e.split("(")[0]: e.split("\n.func")[0] for e in re.split(r"\.visible \.entry ", ptx)[1:]}
    assert set(entries) == {K.kernel_name(n, dtype) for n in K.SIGNATURES}
    sfx, w = K.suffix(dtype), ("v4.f32" if dtype == "float32" else "v2.f64")
    bits = "f32" if dtype == "float32" else "f64"
    for name in ("adam", "coupled_apply", "all_finite", "sumsq", "lion"):
        assert not re.search(rf"\bfma\.rn\.{bits}", entries[f"fo_{name}_{sfx}"]), f"contracted FMA in {name}"
        assert ".ftz" not in entries[f"fo_{name}_{sfx}"], name
    for name in ("adam", "fadam_precond", "fadam_apply", "coupled_apply", "all_finite", "sumsq", "lion"):
        assert f"ld.global.{w}" in entries[f"fo_{name}_{sfx}"], f"no 16-byte global loads in {name}"
    for name in ("adam", "fadam_apply", "coupled_apply", "lion"):
        assert f"st.global.{w}" in entries[f"fo_{name}_{sfx}"], name
    if dtype == "float32":
        for name in ("adam", "lion"):
            assert not re.search(r"\.(add|mul|div|sqrt)\.rn\.f64", entries[f"fo_{name}_f32"]), \
                f"float64 math in {name}_f32"


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC library not loadable here (pip install cupy-cuda12x "
                                             "nvidia-cuda-nvrtc-cu12 for this check)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvrtc_compiles_for_h100_without_ftz_or_contraction(dtype):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(K.source(dtype), f"fo_{dtype}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90", *K.COMPILE_OPTIONS])
        except Exception:
            pytest.fail(nvrtc.getProgramLog(prog))
        ptx = nvrtc.getPTX(prog).decode()
    finally:
        nvrtc.destroyProgram(prog)
    _check_ptx(ptx, dtype)


@pytest.mark.skipif(NVCC is None, reason="no nvcc (CUDA toolkit) on the PATH for this check")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvcc_compiles_for_h100_without_ftz_or_contraction(dtype, tmp_path):
    """The NVRTC check above, with the toolkit's nvcc and the same options (no GPU, no CuPy)."""
    cu, out = tmp_path / f"fo_{dtype}.cu", tmp_path / f"fo_{dtype}.ptx"
    cu.write_text(K.source(dtype))
    res = subprocess.run([NVCC, "-ptx", "-arch=compute_90", *K.COMPILE_OPTIONS, "-o", str(out), str(cu)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    _check_ptx(out.read_text(), dtype)


def test_step_functions_have_the_reference_signatures_without_importing_cupy():
    """Each function is defined in its module (finite.py, <rule>.py), which imports no cupy:
    compare its source (AST) and the function itself with the reference's signature;
    ``<rule>_step_checked`` takes the same arguments and returns bool."""
    import ast
    import inspect

    from fisheropt.backends import FUNCTIONS, reference
    from fisheropt.backends.interface import FAMILIES
    checked_found = []
    for fn in FAMILIES["update rules"]:
        module = "finite" if fn == "all_finite" else fn[:-len("_step")]
        path = CUPY_DIR / f"{module}.py"
        assert path.exists(), f"{fn}: no backends/cupy/{module}.py"
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), \
            "from __future__ import annotations turns annotations into strings: signatures would differ"
        defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        ref = inspect.signature(getattr(reference, fn))
        for name in (fn, fn + "_checked"):
            if name != fn and name not in defs:
                continue
            assert fn in FUNCTIONS and name in defs, name
            a = defs[name].args
            pos = [x.arg for x in a.args]
            kwonly = [x.arg for x in a.kwonlyargs]
            want_pos = [n for n, p in ref.parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
            want_kw = [n for n, p in ref.parameters.items() if p.kind == p.KEYWORD_ONLY]
            assert (pos, kwonly) == (want_pos, want_kw), name
            assert not a.defaults and not any(a.kw_defaults), name
            ret = ref.return_annotation
            got = ast.unparse(defs[name].returns) if defs[name].returns is not None else None
            want = "bool" if name != fn else (None if ret is inspect.Signature.empty
                                              else getattr(ret, "__name__", str(ret)))
            assert got == want, name
            function = getattr(MODULES[module], name)
            assert list(inspect.signature(function).parameters) == list(ref.parameters), name
            if name != fn:
                checked_found.append(name)
    # the fused check is offered where it saves a pass over g (see the modules), nowhere else
    assert sorted(checked_found) == ["coupled_adam_step_checked", "fadam_step_checked"]


def test_package_discovers_each_rule_from_its_module(monkeypatch):
    """backends/cupy/__init__.py imported with a stand-in ``cupy`` module (no GPU, no CuPy):
    every rule of the registry that has a module here gives its <rule>_step (and
    _step_checked) to the package, and those run on the engine selected by _plan.using."""
    stub = types.ModuleType("cupy")
    stub.ndarray = type("ndarray", (), {})
    stub.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0))
    monkeypatch.setitem(sys.modules, "cupy", stub)
    parent = "_fisheropt_backends_stubbed"
    backends = types.ModuleType(parent)
    backends.__path__ = [str(CUPY_DIR.parent)]
    monkeypatch.setitem(sys.modules, parent, backends)
    for name in [n for n in sys.modules if n.startswith(parent + ".")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        _check_stubbed_package(importlib.import_module(f"{parent}.cupy"), stub)
    finally:
        for name in [n for n in sys.modules if n.startswith(parent + ".")]:
            del sys.modules[name]


def _check_stubbed_package(pkg, stub):
    for rule in refimpl.RULES.values():
        assert callable(getattr(pkg, rule.step_function, None)) == (CUPY_DIR / f"{rule.name}.py").exists()
    for fn in ("all_finite", "from_dlpack_list", "clear_cache", "check_usable", "owns", "fadam_step_checked",
               "coupled_adam_step_checked", "fisher_gram", "fisher_sample_space_direction", "ema_update"):
        assert callable(getattr(pkg, fn)), fn
    assert not hasattr(pkg, "adam_step_checked") and not hasattr(pkg, "lion_step_checked")
    assert pkg.NAME == "cupy" and pkg.array_module is stub
    with pytest.raises(pkg.BackendUnavailable, match="no CUDA device"):
        pkg.check_usable()
    assert pkg._plan.current() is pkg.engine          # the step functions' default engine
    if HAVE_CXX:
        emu = pkg._plan.Engine(E.CpuLauncher(32), chunk=96)
        p, g, m = [np.ones(5, np.float32)], [np.full(5, -2.0, np.float32)], [np.zeros(5, np.float32)]
        with pkg._plan.using(emu):
            pkg.lion_step(p, g, m, step=1, **LHP)
            assert pkg.all_finite(g) is True
        want = [np.ones(5, np.float32)], [np.zeros(5, np.float32)]
        refimpl.lion_step(want[0], g, want[1], step=1, **LHP)
        np.testing.assert_array_equal(p[0], want[0][0])
        np.testing.assert_array_equal(m[0], want[1][0])
    pkg.clear_cache()


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy/NVRTC not loadable here")
def test_cupy_launcher_compiles_caches_and_launches_without_a_gpu(monkeypatch, tmp_path):
    """_device.py's device-facing code with the device faked: the real NVRTC compile to an
    sm_90 cubin, the disk cache, the module/function caches and the launch call."""
    import cupy
    from cupy.cuda import function
    device = importlib.import_module(f"{HOST_PACKAGE}._device")
    monkeypatch.setenv("FISHEROPT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: types.SimpleNamespace(compute_capability="90", id=0))
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    loaded, calls = [], []

    class FakeModule:
        def load(self, data):
            loaded.append(bytes(data))

        def get_function(self, fname):
            return lambda grid, block, args: calls.append((fname, grid, block, args))

    monkeypatch.setattr(function, "Module", FakeModule)
    device.load_module("float32")
    assert loaded[0][:4] == b"\x7fELF"                      # SASS for the device, not PTX
    assert [f.suffix for f in tmp_path.iterdir()] == [".cubin"]
    device.load_module("float32")                               # second time: from the disk cache
    assert loaded[1] == loaded[0] and len(list(tmp_path.iterdir())) == 1

    launcher = device.CupyLauncher()
    args = P.kernel_args("sumsq", "float32", dict(chunks="c", G="g", partial="p"))
    launcher.launch("float32", "sumsq", 7, args)
    launcher.launch("float32", "sumsq", 3, args)
    assert calls == [("fo_sumsq_f32", (7,), (K.BLOCK,), ("c", "g", "p")),
                     ("fo_sumsq_f32", (3,), (K.BLOCK,), ("c", "g", "p"))]
    assert len(loaded) == 3                                  # one module per (device, dtype)


# =====================================================================================
# CPU: registry behaviour without a GPU
# =====================================================================================
def test_registry_reports_cupy_unusable_with_a_reason():
    reason = _cupy_reason()
    if reason is None:
        pytest.skip("cupy is usable on this machine")
    assert "cupy" not in fo.backends.available()
    assert isinstance(reason, str) and reason
    with pytest.raises(fo.BackendUnavailable, match=re.escape(reason[:40])):
        fo.backends.get("cupy")
    with pytest.raises(fo.BackendUnavailable, match="cupy"):
        fo.Adam([np.zeros(3, np.float32)], backend="cupy")


def test_explicit_cupy_backend_refuses_host_arrays_when_usable():
    if _cupy_reason() is not None:
        pytest.skip(f"cupy backend unavailable: {_cupy_reason()}")
    with pytest.raises(TypeError, match="does not operate"):
        fo.Adam([np.zeros(3, np.float32)], backend="cupy")


# =====================================================================================
# Agreement with the reference: the emulated kernels (CPU) and the real ones (GPU)
# =====================================================================================
class EmulatedBackend:
    """The cupy backend's engine over the CPU emulation of its kernels."""

    name = "emulated"

    def __init__(self, block=32, chunk=96, min_rows=2, max_rows=3, transform=None):
        self.engine = P.Engine(E.CpuLauncher(block, transform), chunk=chunk,
                               tile_kw=dict(min_rows=min_rows, max_rows=max_rows))

    def __getattr__(self, fn):
        # all_finite, <rule>_step, <rule>_step_checked: the modules' own functions on this engine
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


class CupyBackend:
    name = "cupy"

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.module = fo.backends.get("cupy")

    def __getattr__(self, fn):  # the backend's functions (all of FUNCTIONS, for the vector suites)
        return getattr(self.module, fn)

    def to_device(self, a, misaligned=False):
        a = np.asarray(a)
        if not misaligned:
            return self.cupy.asarray(a)
        buf = self.cupy.empty(a.size + 1, a.dtype)
        out = buf[1:].reshape(a.shape)
        out[...] = self.cupy.asarray(a)
        return out

    def to_host(self, a):
        return self.cupy.asnumpy(a)


@pytest.fixture(scope="module", params=[
    pytest.param("emulated", marks=pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")),
    pytest.param("cupy", marks=pytest.mark.gpu),
])
def backend(request):
    if request.param == "emulated":
        return EmulatedBackend()
    reason = _cupy_reason()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return CupyBackend()


RULES = {
    "adam": ("adam_step", ("m", "v")),
    "adamw": ("adamw_step", ("m", "v")),
    "fadam": ("fadam_step", ("m", "f")),
    "coupled_adam": ("coupled_adam_step", ("m", "v")),
    "lion": ("lion_step", ("m",)),
}


def _default_hp(rule):
    return dict(FHP) if rule == "fadam" else dict(LHP) if rule == "lion" else dict(HP)
TOL = {np.dtype("float32"): (2e-5, 1e-6), np.dtype("float64"): (1e-12, 1e-13)}

any_shape = st.one_of(st.lists(st.integers(0, 6), max_size=3).map(tuple),
                      st.integers(1, 700).map(lambda n: (n,)))
matrix_shape = st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 7)),
                         st.tuples(st.integers(1, 40), st.integers(30, 80)))


@st.composite
def problems(draw, rule):
    coupled = rule == "coupled_adam"
    shapes = draw(st.lists(matrix_shape if coupled else any_shape, min_size=1, max_size=4))
    mixed = draw(st.booleans())
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in shapes] if mixed else [draw(st.sampled_from(DTYPES))] * len(
        shapes)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    # 0: zero grads; 1e-40: float32 subnormals (no flush-to-zero allowed); 3e19: g² overflows float32
    grad_scale = draw(st.sampled_from([0.0, 1e-40, 1e-18, 1e-3, 1.0, 1e3, 1e15, 3e19]))
    first_step = draw(st.sampled_from([1, 2, 1000]))
    steps = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    misaligned = draw(st.booleans())
    if rule == "fadam":
        hp = dict(lr=draw(st.sampled_from([1e-3, 0.05])), beta1=draw(st.sampled_from([0.0, 0.9])),
                  beta2=draw(st.sampled_from([0.5, 0.999])), eps=draw(st.sampled_from([1e-8, 1e-3])),
                  eps2=draw(st.sampled_from([0.01, 0.1])), clip=draw(st.sampled_from([0.5, 1.0, 2.0])),
                  p=draw(st.sampled_from([0.5, 1.0, 0.25])), weight_decay=draw(st.sampled_from([0.0, 0.1])))
    elif rule == "lion":
        hp = dict(lr=draw(st.sampled_from([1e-4, 0.05])), beta1=draw(st.sampled_from([0.0, 0.9])),
                  beta2=draw(st.sampled_from([0.5, 0.99])), weight_decay=draw(st.sampled_from([0.0, 0.1, 1.0])))
    else:
        hp = dict(lr=draw(st.sampled_from([1e-3, 0.05])), beta1=draw(st.sampled_from([0.0, 0.5, 0.9])),
                  beta2=draw(st.sampled_from([0.5, 0.999])), eps=draw(st.sampled_from([1e-8, 1e-3])),
                  weight_decay=draw(st.sampled_from([0.0, 0.01, 0.5])))
    if coupled:  # coupled and uncoupled (AdamW) tensors in one call, as the optimizer class makes it
        hp["coupled"] = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    return dict(shapes=shapes, dtypes=dtypes, scale=scale, grad_scale=grad_scale, first_step=first_step,
                steps=steps, seed=seed, misaligned=misaligned, hp=hp)


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
    grads = [[np.asarray(rng.standard_normal(s) * pb["grad_scale"], dtype=d)
              for s, d in zip(pb["shapes"], pb["dtypes"])] for _ in range(pb["steps"])]
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
        getattr(backend, fn)(dev_p, [backend.to_device(x, pb["misaligned"]) for x in g], *dev_s, step=t,
                             **_hyperparams(rule, pb))
    return (ref_p, ref_s), ([backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s])


def _assert_agree(ref, got, *, exact, magnitude):
    (rp, rs), (gp, gs) = ref, got
    for want_list, got_list, what in [(rp, gp, "params")] + [(a, b, f"state{j}") for j, (a, b) in
                                                                 enumerate(zip(rs, gs))]:
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



@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("rule", ["adam", "adamw"])
@given(data=st.data())
@settings(max_examples=15)
def test_adam_family_is_bitwise_the_reference(backend, rule, data):
    """Same order of operations, no contraction, no flush-to-zero: identical bits."""
    pb = data.draw(problems(rule))
    ref, got = _run_both(backend, rule, pb)
    _assert_agree(ref, got, exact=True, magnitude=1)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
@given(data=st.data())
@settings(max_examples=15)
def test_reduction_rules_agree_with_the_reference(backend, rule, data):
    pb = data.draw(problems(rule))
    ref, got = _run_both(backend, rule, pb)
    _assert_agree(ref, got, exact=False, magnitude=max(pb["scale"], pb["grad_scale"], 1.0))


@pytest.mark.parametrize("rule", list(RULES))
def test_results_are_deterministic(backend, rule):
    pb = dict(shapes=[(37, 61), (5, 3)] if rule == "coupled_adam" else [(37, 61), (700,), ()],
              dtypes=["float32", "float64"] + ([] if rule == "coupled_adam" else ["float32"]),
              scale=1.0, grad_scale=1.0, first_step=1, steps=3, seed=11, misaligned=False,
              hp=_default_hp(rule))
    _, first = _run_both(backend, rule, pb)
    _, second = _run_both(backend, rule, pb)
    _assert_agree(first, second, exact=True, magnitude=1)


@pytest.mark.parametrize("misaligned", [False, True])
def test_all_finite(backend, misaligned):
    arrays = [np.ones(s, d) for s, d in [((3, 4), "float32"), ((), "float64"), ((0,), "float32"),
                                         ((701,), "float64"), ((129,), "float32")]]
    dev = [backend.to_device(a, misaligned) for a in arrays]
    assert backend.all_finite(dev) is True
    assert backend.all_finite([]) is True
    for bad in (np.nan, np.inf, -np.inf):
        for i, pos in [(3, 700), (4, 0), (1, ())]:
            broken = [a.copy() for a in arrays]
            broken[i][pos] = bad
            assert backend.all_finite([backend.to_device(a, misaligned) for a in broken]) is False


# ---- Lion: bit for bit, edge values included ---------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@given(data=st.data())
@settings(max_examples=15)
def test_lion_is_bitwise_the_reference(backend, data):
    """spec/lion.md's order of operations, no contraction, no flush-to-zero: identical bits."""
    pb = data.draw(problems("lion"))
    ref, got = _run_both(backend, "lion", pb)
    _assert_agree(ref, got, exact=True, magnitude=1)


def _assert_bits(got, want, what):
    """Identical values, the sign of zero included; NaN in the same places (payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    bits = np.dtype(f"u{want.dtype.itemsize}")
    np.testing.assert_array_equal(got[~nan].view(bits), want[~nan].view(bits), err_msg=f"{what}: bits")


_EDGE = {"float32": [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1e-45, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-3],
         "float64": [0.0, -0.0, 1.0, -1.0, 1e-310, -1e-310, 5e-324, np.nan, np.inf, -np.inf, 1.7e308, -1.7e308,
                     1e-3]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta1,weight_decay", [(0.0, 0.0), (0.5, 0.1), (0.9, 1.0)])
def test_lion_edge_values_are_bitwise_the_reference(backend, dtype, beta1, weight_decay):
    """Every triple (m, g, θ) of zeros of both signs, ±1, subnormals, NaN, ±Inf and huge
    values: sign(0) = 0 (with β1 = 0.5, m = 1 and g = -1 give c = 0 exactly), sign(±Inf) = ±1,
    sign(NaN) = NaN, a subnormal c still moves θ by lr (no flush to zero)."""
    vals = np.array(_EDGE[dtype], dtype=dtype)
    mm, gg, theta = (np.ascontiguousarray(a) for a in np.meshgrid(vals, vals, vals, indexing="ij"))
    hp = dict(lr=0.25, beta1=beta1, beta2=0.99, weight_decay=weight_decay)
    want = [theta.copy()], [mm.copy()]
    refimpl.lion_step(want[0], [gg.copy()], want[1], step=3, **hp)
    dev_p, dev_m = [backend.to_device(theta)], [backend.to_device(mm)]
    backend.lion_step(dev_p, [backend.to_device(gg)], dev_m, step=3, **hp)
    got = backend.to_host(dev_p[0])
    _assert_bits(got, want[0][0], "params")
    _assert_bits(backend.to_host(dev_m[0]), want[1][0], "m")
    T = np.dtype(dtype).type
    one, zero, sub = list(vals).index(1.0), list(vals).index(0.0), list(vals).index(vals[vals > 0].min())
    t0 = vals[one]                                   # θ = 1, where θ's own value can show the move
    if beta1 == 0.5:    # c = 0.5·1 + 0.5·(-1) = 0: only the decay moves θ
        assert got[one, list(vals).index(-1.0), one] == t0 - T(0.25) * (T(0) + T(weight_decay) * t0)
    if beta1 == 0.0:    # m = 0, g subnormal: c subnormal, sign 1; m = g = 0: c = 0, sign 0
        assert got[zero, sub, one] == t0 - T(0.25) * (T(1) + T(weight_decay) * t0)
        assert got[zero, zero, one] == t0 - T(0.25) * (T(0) + T(weight_decay) * t0)


def _cancelling_pairs(dtype, beta1, n, seed):
    """(m, g) with β1·m + (1-β1)·g exactly 0 in ``dtype`` (two roundings), while β1·m itself is
    not exact: a fused multiply-add would leave its rounding error there, a sign of ±1."""
    from fractions import Fraction
    T = np.dtype(dtype).type
    b1, omb1 = T(beta1), T(1 - beta1)
    rng = np.random.default_rng(seed)
    ms, gs = [], []
    for m in rng.standard_normal(4 * n).astype(dtype):
        q = b1 * m
        if Fraction(float(q)) == Fraction(float(b1)) * Fraction(float(m)):
            continue
        g = T(-q / omb1)
        for _ in range(4):
            if omb1 * g == -q:
                ms.append(m)
                gs.append(g)
                break
            g = np.nextafter(g, T(np.inf) if omb1 * g < -q else T(-np.inf))
        if len(ms) == n:
            break
    return np.array(ms, dtype), np.array(gs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lion_exact_cancellation_does_not_move_theta(backend, dtype):
    """c = 0 after two roundings: sign 0, θ moved by the decay alone, as the reference. A
    contracted c (FMA) keeps the product's rounding error and moves θ by ±lr."""
    m, g = _cancelling_pairs(dtype, 0.9, 200, seed=3)
    assert len(m) >= 100
    theta = np.linspace(-1, 1, len(m)).astype(dtype)
    hp = dict(lr=0.25, beta1=0.9, beta2=0.99, weight_decay=0.1)
    want = [theta.copy()], [m.copy()]
    refimpl.lion_step(want[0], [g], want[1], step=1, **hp)
    T = np.dtype(dtype).type
    np.testing.assert_array_equal(want[0][0], theta - T(0.25) * (T(0) + T(0.1) * theta))
    dev_p, dev_m = [backend.to_device(theta)], [backend.to_device(m)]
    backend.lion_step(dev_p, [backend.to_device(g)], dev_m, step=1, **hp)
    _assert_bits(backend.to_host(dev_p[0]), want[0][0], "params")
    _assert_bits(backend.to_host(dev_m[0]), want[1][0], "m")


# ---- per-tensor hyperparameters (param groups, per-parameter step counts) ----------------
def _per_tensor_problem(rule, seed):
    rng = np.random.default_rng(seed)
    if rule == "coupled_adam":
        shapes, coupled = [(40, 7), (3, 5), (9, 11), (40, 7), (6,)], [True, False, True, True, False]
    else:
        shapes, coupled = [(40, 7), (3, 5), (701,), (64, 9), (40, 7), ()], None
    dtypes = ["float32", "float64", "float32", "float64", "float32", "float32"][:len(shapes)]
    n = len(shapes)
    # tensors 0 and 4 share every value (one launch); the others differ in something
    hp = dict(step=[5, 1, 17, 3, 5, 2][:n], lr=[1e-2, 0.05, 1e-3, 1e-2, 1e-2, 0.2][:n],
              beta1=[0.9, 0.5, 0.0, 0.9, 0.9, 0.9][:n], beta2=[0.99, 0.999, 0.9, 0.5, 0.99, 0.999][:n],
              weight_decay=[0.0, 0.1, 0.01, 0.5, 0.0, 0.1][:n])
    if rule != "lion":
        hp["eps"] = [1e-8, 1e-3, 1e-8, 1e-6, 1e-8, 1e-8][:n]
    if rule == "fadam":
        hp.update(eps2=[0.01, 0.1, 0.01, 1.0, 0.01, 0.01], clip=[1.0, 0.5, 2.0, 1.0, 1.0, 0.25],
                  p=[0.5, 1.0, 0.25, 0.5, 0.5, 0.75])
    if rule == "coupled_adam":
        hp["coupled"] = coupled
    state_names = RULES[rule][1]
    params = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes)]
    state = []
    for k in state_names:
        arrs = []
        for i, (s, d) in enumerate(zip(shapes, dtypes)):
            s = (s[1],) if coupled and coupled[i] and k == "v" else s
            x = rng.standard_normal(s)
            arrs.append(np.asarray(x * x if k in ("v", "f") else 0.1 * x, dtype=d))
        state.append(arrs)
    grads = [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2), dtype=d)
              for s, d in zip(shapes, dtypes)] for _ in range(3)]
    return params, state, grads, hp


@pytest.mark.parametrize("rule", list(RULES))
def test_per_tensor_hyperparameters_match_the_reference(backend, rule):
    """``step`` and every hyperparameter as one value per tensor, in one call (FAdam's p, eps2
    and clip too, Coupled Adam with coupled and AdamW tensors mixed): the reference's
    results, bit for bit where the rule's arithmetic is elementwise."""
    params, state, grads, hp = _per_tensor_problem(rule, 7)
    fn = RULES[rule][0]
    ref_p, ref_s = [p.copy() for p in params], [[a.copy() for a in s] for s in state]
    dev_p, dev_s = [backend.to_device(p) for p in params], [[backend.to_device(a) for a in s] for s in state]
    for k, g in enumerate(grads):
        kw = dict(hp, step=[t + k for t in hp["step"]])
        if k == 2:   # tuples are per-tensor too
            kw = {name: tuple(v) if isinstance(v, list) else v for name, v in kw.items()}
        getattr(refimpl, fn)(ref_p, [x.copy() for x in g], *ref_s, **kw)
        getattr(backend, fn)(dev_p, [backend.to_device(x) for x in g], *dev_s, **kw)
    got = [backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s]
    _assert_agree((ref_p, ref_s), got, exact=rule in ("adam", "adamw", "lion"), magnitude=10)


@pytest.mark.parametrize("rule", ["adam", "fadam", "lion"])
def test_shared_and_per_tensor_values_give_the_same_bits(backend, rule):
    """A list whose values are all equal is the same step as the one value."""
    params, state, grads, hp = _per_tensor_problem(rule, 8)
    shared = {k: v[0] for k, v in hp.items()}
    listed = {k: [v] * len(params) for k, v in shared.items()}
    fn = RULES[rule][0]
    out = []
    for kw in (shared, listed):
        p, st = [backend.to_device(x) for x in params], [[backend.to_device(a) for a in s] for s in state]
        getattr(backend, fn)(p, [backend.to_device(x) for x in grads[0]], *st, **kw)
        out.append(([backend.to_host(x) for x in p], [[backend.to_host(a) for a in s] for s in st]))
    _assert_agree(out[0], out[1], exact=True, magnitude=1)


# ---- <rule>_step_checked: the finiteness check fused into the reductions -------------------
@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_fused_finiteness_check_refuses_before_any_write(backend, rule):
    """A NaN/Inf in any tensor's gradient (coupled or AdamW, any dtype group) is found by the
    reductions, which run for every group before any write: False, nothing written; with
    finite gradients the checked step is the unchecked one, bit for bit."""
    params, state, grads, hp = _per_tensor_problem(rule, 9)
    fn = RULES[rule][0]
    hp = dict(hp)
    dev_p, dev_s = [backend.to_device(p) for p in params], [[backend.to_device(a) for a in s] for s in state]
    for bad in range(len(params)):
        g = [x.copy() for x in grads[0]]
        g[bad].flat[g[bad].size // 2] = (np.nan, np.inf, -np.inf)[bad % 3]
        before = [backend.to_host(a).tobytes() for a in dev_p + [a for s in dev_s for a in s]]
        assert getattr(backend, fn + "_checked")(dev_p, [backend.to_device(x) for x in g], *dev_s, **hp) is False
        assert [backend.to_host(a).tobytes() for a in dev_p + [a for s in dev_s for a in s]] == before, bad
    unchecked_p = [backend.to_device(backend.to_host(p)) for p in dev_p]
    unchecked_s = [[backend.to_device(backend.to_host(a)) for a in s] for s in dev_s]
    g = [backend.to_device(x) for x in grads[1]]
    assert getattr(backend, fn + "_checked")(dev_p, g, *dev_s, **hp) is True
    getattr(backend, fn)(unchecked_p, g, *unchecked_s, **hp)
    _assert_agree(([backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s]),
                  ([backend.to_host(p) for p in unchecked_p], [[backend.to_host(a) for a in s] for s in unchecked_s]),
                  exact=True, magnitude=1)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_fused_check_accepts_huge_finite_float64_gradients(backend, rule):
    """Σg² overflows to Inf for |g| > 1e154 in float64 although g is finite: the gradients are
    then read again, and the step goes ahead as the reference's does."""
    params = [np.ones((50, 20)), np.ones((4, 3))]
    grads = [np.full((50, 20), 1e200), np.full((4, 3), 1e-3)]
    m = [np.zeros_like(p) for p in params]
    if rule == "fadam":
        state = [np.zeros_like(p) for p in params]
        hp = dict(step=1, **FHP)
    else:
        state = [np.zeros(20), np.zeros(3)]
        hp = dict(step=1, coupled=[True, True], **HP)
    fn = RULES[rule][0]
    ref_p, ref_m, ref_s = [p.copy() for p in params], [a.copy() for a in m], [a.copy() for a in state]
    getattr(refimpl, fn)(ref_p, grads, ref_m, ref_s, **hp)
    dev = [[backend.to_device(a) for a in lst] for lst in (params, m, state)]
    assert getattr(backend, fn + "_checked")(dev[0], [backend.to_device(g) for g in grads], dev[1], dev[2],
                                             **hp) is True
    assert np.isinf(backend.to_host(dev[2][0])).all()   # g² overflowed: the step went ahead
    _assert_agree((ref_p, [ref_m, ref_s]), ([backend.to_host(a) for a in dev[0]],
                                            [[backend.to_host(a) for a in dev[1]],
                                             [backend.to_host(a) for a in dev[2]]]), exact=False, magnitude=1)


@pytest.mark.parametrize("suite", sorted(vectors.SUITES))
def test_spec_vectors(backend, suite):
    """Every suite; the emulator only has the update rules, the real backend must run every case."""
    failures, ran = [], 0
    for case in vectors.load_suite(suite)["cases"]:
        if backend.name == "emulated" and not hasattr(backend, case["function"]):
            continue
        failures += vectors.run_case(case, backend, to_device=backend.to_device)
        ran += 1
    if ran == 0:
        pytest.skip(f"suite {suite}: no update-rule cases (emulator covers the update rules only)")
    assert failures == []


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_fadam_epsilon_follows_rms_of_tiny_gradients():
    """With eps2·RMS(g) < eps the adaptive epsilon depends on the float64 RMS reduction
    (it does not for ordinary gradients, where min(eps, eps2·RMS) = eps)."""
    emu = EmulatedBackend()
    pb = dict(shapes=[(37, 61), (700,), ()], dtypes=["float32", "float64", "float32"], scale=1.0,
              grad_scale=1e-9, first_step=1, steps=3, seed=2, misaligned=True, hp=dict(FHP, p=0.25))
    ref, got = _run_both(emu, "fadam", pb)
    _assert_agree(ref, got, exact=False, magnitude=1e-9)


MUTANTS = {  # (rule, original text, broken text): each must be caught by the agreement check
    "coupled column wrap": ("coupled_adam", "if (++col == d) col = 0;", "if (++col == d) col = (d > 1);"),
    "fadam clip of w_bar uses g_bar's scale": ("fadam", "const T sw = (T)scal[3 * t + 2];",
                                               "const T sw = (T)scal[3 * t + 1];"),
    "sumsq drops the first group of each chunk": ("fadam", "FOR_GROUPS(base) {\n        const bool full = al && "
                                                  "base + VEC <= stop;\n        T gr[VEC];\n        load_group(g,",
                                                  "FOR_GROUPS(base) {\n        const bool full = al && base + VEC "
                                                  "<= stop;\n        T gr[VEC];\n        if (base == start) "
                                                  "continue;\n        load_group(g,"),
}


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_agreement_checks_catch_a_broken_kernel(mutant):
    rule, before, after = MUTANTS[mutant]
    assert K.source("float32").count(before) >= 1, "mutation anchor not found: update the test"
    emu = EmulatedBackend(transform=lambda src: src.replace(before, after))
    shapes = [(37, 61), (5, 3)] if rule == "coupled_adam" else [(37, 61), (700,)]
    pb = dict(shapes=shapes, dtypes=["float32"] * 2, scale=1.0, grad_scale=1e-9 if rule == "fadam" else 1.0,
              first_step=1, steps=2, seed=4, misaligned=False,
              hp=dict(FHP, clip=0.5) if rule == "fadam" else dict(HP))
    ref, got = _run_both(emu, rule, pb)
    with pytest.raises(AssertionError):
        _assert_agree(ref, got, exact=False, magnitude=max(pb["grad_scale"], 1e-9))


# =====================================================================================
# The production configuration (block 256, chunk 16384) on the emulator: one large case
# =====================================================================================
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_production_block_and_chunk_sizes_on_the_emulator():
    emu = EmulatedBackend(block=K.BLOCK, chunk=K.CHUNK, min_rows=32, max_rows=256)
    for rule in ("adamw", "fadam", "coupled_adam", "lion"):
        pb = dict(shapes=[(70, 300)] if rule == "coupled_adam" else [(16384 + 5,), (3, 7)],
                  dtypes=["float32"] * (1 if rule == "coupled_adam" else 2), scale=1.0, grad_scale=1.0,
                  first_step=1, steps=2, seed=3, misaligned=False, hp=_default_hp(rule))
        ref, got = _run_both(emu, rule, pb)
        _assert_agree(ref, got, exact=rule in ("adamw", "lion"), magnitude=1)


# =====================================================================================
# GPU only: the optimizer classes, DLPack, a large multi-chunk problem
# =====================================================================================
def _cupy_or_skip():
    reason = _cupy_reason()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    import cupy
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [(fo.Adam, dict(weight_decay=0.01)), (fo.AdamW, {}), (fo.FAdam, {}),
                                    (fo.CoupledAdam, dict(coupled=[True, False, False])),
                                    (fo.Lion, dict(weight_decay=0.1))])
def test_optimizer_classes_on_cupy_arrays(cls, kw):
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(d) for s, d in [((50, 8), "float32"), ((8,), "float64"), ((), "float32")]]
    dev = [cupy.asarray(h) for h in host]
    ref = cls([h.copy() for h in host], backend="numpy", **kw)
    opt = cls(dev, backend="auto", **kw)
    assert opt.backend.NAME == "cupy"
    for _ in range(3):
        g = [rng.standard_normal(h.shape).astype(h.dtype) for h in host]
        ref.step([x.copy() for x in g])
        opt.step([cupy.asarray(x) for x in g])
    for a, b in zip(opt.params, ref.params):
        rtol = 2e-5 if b.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=rtol, atol=1e-7)
    before = [cupy.asnumpy(p) for p in opt.params]
    bad = [cupy.zeros_like(p) for p in dev]
    bad[0][3] = cupy.nan
    with pytest.raises(FloatingPointError):
        opt.step(bad)
    for a, b in zip(opt.params, before):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
    sd = opt.state_dict()
    clone = cls([p.copy() for p in opt.params], backend="cupy", **kw)
    clone.load_state_dict(sd)
    g = [cupy.asarray(rng.standard_normal(h.shape).astype(h.dtype)) for h in host]
    opt.step(g)
    clone.step(g)
    for a, b in zip(opt.params, clone.params):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))


@pytest.mark.gpu
def test_large_multi_chunk_problem_agrees():
    cupy = _cupy_or_skip()
    backend = CupyBackend()
    for rule in RULES:
        shapes = [(4099, 257), (33,)] if rule != "coupled_adam" else [(4099, 257), (7, 3)]
        pb = dict(shapes=shapes, dtypes=["float32", "float64"], scale=1.0, grad_scale=1.0, first_step=1, steps=2,
                  seed=5, misaligned=False, hp=_default_hp(rule))
        ref, got = _run_both(backend, rule, pb)
        _assert_agree(ref, got, exact=rule in ("adam", "adamw", "lion"), magnitude=1)
    cupy.cuda.Device().synchronize()


@pytest.mark.gpu
def test_dlpack_from_torch_is_zero_copy_and_updates_the_model():
    _cupy_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    module = fo.backends.get("cupy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin.load_state_dict(model.state_dict())
    views = module.from_dlpack_list(model.parameters())
    assert all(v.data.ptr == p.data_ptr() for v, p in zip(views, model.parameters()))
    opt = fo.AdamW(views, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(64, 16, device="cuda")
    for _ in range(3):
        for net in (model, twin):
            net.zero_grad()
            net(x).square().mean().backward()
        grads = module.from_dlpack_list([p.grad for p in model.parameters()])
        opt.step(grads)
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
