"""The cupy backend's internals, checked on the CPU: chunk tables and column tiles, the engine's
host logic (through a recording fake launcher: launches per step, caches, grouping, all or
nothing), the generated CUDA text and its PTX (NVRTC or nvcc, no GPU), the package's plumbing
without CuPy, and that the agreement check catches a broken kernel (mutants on the emulator).

Agreement with the reference and the GPU tests: tests/test_cupy_backend.py.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import types
from functools import partial

import numpy as np
import pytest
from cupy_emulated import (
    CUPY_DIR,
    DTYPES,
    FHP,
    HAVE_CXX,
    HOST_PACKAGE,
    HP,
    LHP,
    MODULES,
    EmulatedBackend,
    Steps,
    _assert_agree,
    _run_both,
    cuda_kernels,
    ema_both,
    emulator,
    fixed_problem,
    planner,
)
from hypothesis import given
from hypothesis import strategies as st

from fisheropt import refimpl, vectors
from fisheropt.backends import interface
from fisheropt.refimpl import esimcse_momentum

NVCC = shutil.which("nvcc")


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
    table, first = planner.chunk_table(sizes, chunk)
    assert table.dtype == np.int64 and table.shape[1] == cuda_kernels.CHUNK_ROW
    assert first[0] == 0 and first[-1] == len(table)
    for i, size in enumerate(sizes):
        rows = table[first[i] : first[i + 1]]
        assert (rows[:, 0] == i).all()
        seen = np.zeros(size, dtype=int)
        for _, start, stop, _ in rows:
            assert 0 <= start < stop <= size
            assert start % chunk == 0  # alignment carries over
            assert stop - start <= chunk  # balanced: no oversized chunk
            seen[start:stop] += 1
        assert (seen == 1).all()
        full = rows[:-1]
        assert ((full[:, 2] - full[:, 1]) == chunk).all()  # only a tensor's last chunk is short
        assert len(rows) == -(-size // chunk)


def test_chunk_table_start_mod_cols_and_validation():
    table, _ = planner.chunk_table([35, 12], 8, cols=[5, 4])
    for t, start, _, mod in table:
        assert mod == start % [5, 4][t]
    with pytest.raises(ValueError):
        planner.chunk_table([3], 6)


@given(
    shapes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 70)), min_size=1, max_size=4),
    block=st.sampled_from([32, 64]),
    min_rows=st.integers(1, 4),
    extra=st.integers(0, 3),
)
def test_coupled_tiles_cover_every_entry_once(shapes, block, min_rows, extra):
    tiles, ctiles, pbase, nrc, n_partial = planner.coupled_tables(
        shapes, block, min_rows=min_rows, max_rows=min_rows + extra
    )
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
            used[off + c0 : off + min(c0 + block, cols)] += 1
        assert (covered == 1).all()
        cmine = ctiles[ctiles[:, 0] == i]
        assert sorted(cmine[:, 1].tolist()) == list(range(0, cols, block))
    assert (used == 1).all()  # partial slots are disjoint and all written


def test_rows_per_tile_bounds():
    assert planner.rows_per_tile(8192, 768, 256) == 32
    assert planner.rows_per_tile(131072, 1024, 256) == 128
    assert planner.rows_per_tile(10**7, 4, 256) == 256
    assert planner.rows_per_tile(0, 5, 256) == 32


def test_kernel_args_have_the_exact_c_types():
    pointers = dict(chunks="C", param_ptrs="P", grad_ptrs="G", m_ptrs="M", v_ptrs="V", mode=2)
    moments = dict(beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=1e-3)
    scalars = dict(weight_decay=0.1, decay_factor=0.99, step_size=1e-3, bias_correction2_sqrt=0.5, eps=1e-8)
    args = planner.kernel_args("adam", "float32", {**pointers, **moments, **scalars})
    assert args[:5] == ["C", "P", "G", "M", "V"]
    assert type(args[5]) is np.int32
    assert all(type(a) is np.float32 for a in args[6:])
    assert args[7] == np.float32(0.99)
    eps_buffers = dict(counts=1, tensor_sums=2, tensor_scalars=3)
    eps_scalars = dict(eps=1e-8, eps2=0.01, two_p=1.0, two_p_is_one=1, eps_pow_2p=1e-8, tiny=1e-38, n_tensors=4)
    e = planner.kernel_args("fadam_eps", "float32", {**eps_buffers, **eps_scalars})
    want = [np.float64, np.float64, np.float64, np.int32, np.float32, np.float32, np.int64]
    assert [type(a) for a in e[3:]] == want
    # Python ints given for T parameters are converted as well
    ints = dict(weight_decay=0, decay_factor=1, step_size=1, bias_correction2_sqrt=1)
    d = planner.kernel_args("adam", "float64", {**pointers, "mode": 0, **moments, **ints, "eps": 1e-8})
    assert all(type(a) is np.float64 for a in d[6:])
    with pytest.raises(TypeError, match="missing"):
        planner.kernel_args("sumsq", "float32", dict(chunks=0, grad_ptrs=0))
    with pytest.raises(TypeError, match="unexpected"):
        planner.kernel_args("sumsq", "float32", dict(chunks=0, grad_ptrs=0, g2_partials=0, bogus=1))


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
        return self.flag_value  # what the check kernels would have left in the flag

    def ptr(self, a):
        return a.ctypes.data

    def ptrs(self, arrays):
        return tuple(self.ptr(a) for a in arrays)

    def launch(self, dtype, name, grid, args):
        assert len(args) == len(cuda_kernels.SIGNATURES[name])
        self.launches.append((dtype, name, grid))
        self.args.append(dict(zip([a for _, a in cuda_kernels.SIGNATURES[name]], args)))


def _model(n_layers, dtype=np.float32):
    shapes = [(64, 16)] + [(16, 16), (16, 48), (48,), (16,)] * n_layers
    return [np.zeros(s, dtype) for s in shapes]


#: a step's launches after the first (the one that reads g): pass 1's sums, then pass 2
FADAM_WRITES = ["fadam_tensor_sums", "fadam_eps", "fadam_sums", "fadam_tensor_sums", "fadam_scales", "fadam_apply"]
COUPLED_WRITES = ["coupled_column_sums", "coupled_v", "coupled_apply"]


@pytest.mark.parametrize(
    "rule,expected",
    [
        ("adam", ["adam"]),
        ("fadam", ["sumsq", *FADAM_WRITES]),
        ("coupled", ["colsumsq", *COUPLED_WRITES]),
        ("lion", ["lion"]),
    ],
)
def test_launches_per_step_do_not_grow_with_the_tensor_count(rule, expected):
    for n_layers in (1, 37):  # 5 and 149 tensors
        launcher = RecordingLauncher()
        engine = planner.Engine(launcher)
        params = _model(n_layers)
        if rule == "coupled":
            params = [p for p in params if p.ndim == 2]
        grads = [np.zeros_like(p) for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros(p.shape[1], p.dtype) for p in params] if rule == "coupled" else [np.zeros_like(p) for p in params]
        for step in (1, 2):
            launcher.launches.clear()
            if rule == "adam":
                Steps(engine).adamw_step(params, grads, m, v, step=step, **HP)
            elif rule == "fadam":
                Steps(engine).fadam_step(params, grads, m, v, step=step, **FHP)
            elif rule == "lion":
                Steps(engine).lion_step(params, grads, m, step=[step] * len(params), **LHP)
            else:
                Steps(engine).coupled_adam_step(params, grads, m, v, step=step, coupled=[True] * len(params), **HP)
            assert [n for _, n, _ in launcher.launches] == expected


def test_tables_are_cached_and_only_new_grads_are_uploaded():
    launcher = RecordingLauncher()
    engine = planner.Engine(launcher)
    params = _model(3)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    grads = [np.zeros_like(p) for p in params]
    steps = Steps(engine)
    steps.adam_step(params, grads, m, v, step=1, **HP)
    first = launcher.uploads
    assert first == 2 + 4  # chunks + meta, then P, G, M, V pointer tables
    steps.adam_step(params, grads, m, v, step=2, **HP)
    assert launcher.uploads == first  # same arrays: nothing uploaded
    new_grads = [np.ones_like(p) for p in params]
    assert steps.all_finite(new_grads)
    steps.adam_step(params, new_grads, m, v, step=3, **HP)
    assert launcher.uploads == first + 1  # one pointer table, shared by all_finite and the step


def test_mixed_dtypes_make_one_group_each_and_noncontiguous_is_refused():
    launcher = RecordingLauncher()
    engine = planner.Engine(launcher)
    params = [np.zeros(5, np.float32), np.zeros(7, np.float64), np.zeros(3, np.float32)]
    state = [[np.zeros_like(p) for p in params] for _ in range(3)]
    steps = Steps(engine)
    steps.adamw_step(params, *state, step=1, **HP)
    assert [(d, n) for d, n, _ in launcher.launches] == [("float32", "adam"), ("float64", "adam")]
    with pytest.raises(TypeError, match="float32 and float64"):
        steps.adamw_step(
            [np.zeros(3, np.float16)],
            [np.zeros(3, np.float16)] * 1,
            [np.zeros(3, np.float16)],
            [np.zeros(3, np.float16)],
            step=1,
            **HP,
        )
    bad = np.zeros((4, 4), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        steps.adamw_step([bad.copy()], [bad], [bad.copy()], [bad.copy()], step=1, **HP)


def _adam_problem(specs):
    params = [np.zeros(shape, dtype) for shape, dtype in specs]
    return (
        params,
        [np.zeros_like(p) for p in params],
        [np.zeros_like(p) for p in params],
        [np.zeros_like(p) for p in params],
    )


def test_per_tensor_values_make_one_launch_per_distinct_set_of_host_scalars():
    launcher = RecordingLauncher()
    steps = Steps(planner.Engine(launcher))
    params, grads, m, v = _adam_problem(
        [((5,), np.float32), ((7,), np.float64), ((3,), np.float32), ((4,), np.float32)]
    )
    hp = dict(HP, lr=[1e-3, 1e-3, 1e-3, 2e-3])
    steps.adamw_step(params, grads, m, v, step=1, **hp)
    # float32: tensors 0 and 2 share their scalars, 3 has its own lr; float64: tensor 1
    assert [(d, n) for d, n, _ in launcher.launches] == [("float32", "adam"), ("float32", "adam"), ("float64", "adam")]
    assert [a["step_size"] for a in launcher.args] == [
        np.float32(1e-3 / (1 - 0.9)),
        np.float32(2e-3 / (1 - 0.9)),
        np.float64(1e-3 / (1 - 0.9)),
    ]
    assert launcher.args[1]["decay_factor"] == np.float32(1 - 2e-3 * 0.01)
    launcher.launches.clear()
    steps.adamw_step(params, grads, m, v, step=[1, 2, 1, 2], **dict(HP, lr=1e-3))  # own step counts
    assert [(d, n) for d, n, _ in launcher.launches] == [("float32", "adam"), ("float32", "adam"), ("float64", "adam")]
    launcher.launches.clear()
    steps.lion_step(params, grads, m, step=[1, 9, 3, 4], **LHP)  # Lion's scalars do not depend on t
    assert [(d, n) for d, n, _ in launcher.launches] == [("float32", "lion"), ("float64", "lion")]


def test_a_step_that_cannot_be_prepared_launches_nothing():
    """All or nothing: a bad list length, a non-contiguous array or an unsupported dtype in the
    last group is found while preparing, before the first launch of the step."""
    launcher = RecordingLauncher()
    steps = Steps(planner.Engine(launcher))
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
    cp, cg, cm = (
        [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)],
        [np.zeros((4, 3), np.float32), bad],
        [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)],
    )
    with pytest.raises(ValueError, match="C-contiguous"):  # the AdamW tensor's, after the coupled ones
        steps.coupled_adam_step(
            cp, cg, cm, [np.zeros(3, np.float32), np.zeros(5, np.float32)], step=1, coupled=[True, False], **HP
        )
    with pytest.raises(ValueError, match="coupled has 1 values for 2 tensors"):
        steps.coupled_adam_step(
            cp, cp, cm, [np.zeros(3, np.float32), np.zeros(5, np.float32)], step=1, coupled=[True], **HP
        )
    with pytest.raises(TypeError, match="float32 and float64"):
        steps.lion_step(
            params + [np.zeros(2, np.float16)],
            grads + [np.zeros(2, np.float16)],
            m + [np.zeros(2, np.float16)],
            step=1,
            **LHP,
        )
    assert launcher.launches == []


def test_many_hyperparameter_groups_do_not_thrash_the_caches():
    """40 groups (layer-wise learning rates): 40 plans and 160 pointer tables, more than the
    caches keep by default; a step never evicts what it uses, so the next step builds and
    uploads nothing, and the caches shrink back to their limits afterwards."""
    launcher = RecordingLauncher()
    engine = planner.Engine(launcher)
    steps = Steps(engine)
    params, grads, m, v = _adam_problem([((16, 16), np.float32)] * 40)
    lrs = [1e-3 * 0.9**i for i in range(40)]
    steps.adamw_step(params, grads, m, v, step=1, **dict(HP, lr=lrs))
    assert len(launcher.launches) == 40
    built, uploads = engine.stats["plans_built"], launcher.uploads
    steps.adamw_step(params, grads, m, v, step=2, **dict(HP, lr=lrs))
    assert (engine.stats["plans_built"], launcher.uploads) == (built, uploads)
    other = _adam_problem([((3,), np.float32)])
    steps.adamw_step(*other, step=1, **HP)
    assert len(engine._plans) <= engine.max_plans and len(engine._ptrs) <= engine.max_pointer_tables


@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_checked_steps_read_the_flag_once_before_any_write(rule):
    launcher = RecordingLauncher()
    steps = Steps(planner.Engine(launcher))
    params, grads, m, v = _adam_problem([((6, 4), np.float32), ((5,), np.float32), ((3, 2), np.float64)])
    if rule == "fadam":
        run = partial(steps.fadam_step_checked, params, grads, m, v, step=1, **FHP)
        reads_only = ["sumsq", "finite_f64", "sumsq", "finite_f64"]
        writes = FADAM_WRITES * 2
    else:
        v = [np.zeros(4, np.float32), np.zeros(5, np.float32), np.zeros(2, np.float64)]
        run = partial(steps.coupled_adam_step_checked, params, grads, m, v, step=1, coupled=[True, False, True], **HP)
        reads_only = ["colsumsq", "finite_f64", "colsumsq", "finite_f64", "all_finite"]
        writes = COUPLED_WRITES * 2 + ["adam"]
    assert run() is True
    assert [n for _, n, _ in launcher.launches] == reads_only + writes and launcher.reads == 1
    launcher.launches.clear()
    launcher.reads, launcher.flag_value = 0, 1  # a non-finite partial sum, and (re-read) a non-finite g
    assert run() is False
    assert [n for _, n, _ in launcher.launches] == reads_only + ["all_finite"] * 2 and launcher.reads == 2


def test_sharded_passes_split_the_steps_launches():
    """A sharded step's two passes launch the single-process step's kernels: pass 1 those that read
    θ, g, f and write scratch (FAdam's ε_t given, not derived), pass 2 the rest, with the whole
    tensors' sums and counts; per dtype group, in the same order."""
    launcher = RecordingLauncher()
    steps = Steps(planner.Engine(launcher))
    params, grads, m, v = _adam_problem([((6, 4), np.float32), ((5, 2), np.float64), ((3, 2), np.float32)])

    def launched(run):
        launcher.launches.clear()
        launcher.args.clear()
        run()
        return [n for _, n, _ in launcher.launches]

    pass1 = launched(lambda: steps.fadam_partials(params, grads, m, v, step=1, **FHP))
    assert pass1 == ["sumsq", "fadam_tensor_sums", "fadam_sums", "fadam_tensor_sums"] * 2
    counts = [240, 10, 6]  # the whole tensors' sizes, in the order of the tensors
    pass2 = launched(lambda: steps.fadam_apply(params, grads, m, v, step=1, **FHP, sums=np.ones((3, 3)), counts=counts))
    assert pass2 == ["fadam_eps", "fadam_scales", "fadam_apply"] * 2
    assert [list(a["counts"]) for a in launcher.args if "n_tensors" in a] == [[240, 6]] * 2 + [[10]] * 2
    step = launched(lambda: steps.fadam_step(params, grads, m, v, step=1, **FHP))
    assert step == ["sumsq"] * 2 + FADAM_WRITES * 2  # every group's first read, then the rest
    coupled, v_col = [True, False, True], [np.zeros(4, np.float32), np.zeros((5, 2)), np.zeros(2, np.float32)]
    pass1 = launched(lambda: steps.coupled_adam_partials(params, grads, m, v_col, step=1, coupled=coupled, **HP))
    assert pass1 == ["colsumsq", "coupled_column_sums"]
    sums = [np.ones(4), np.ones(2)]
    apply = partial(steps.coupled_adam_apply, params, grads, m, v_col, step=1, coupled=coupled, **HP)
    assert launched(lambda: apply(column_sums=sums, rows=[60, 3])) == ["coupled_v", "coupled_apply", "adam"]
    assert list(launcher.args[0]["counts"]) == [60, 3] and list(launcher.args[0]["column_sums"]) == [1.0] * 6


def test_ema_update_makes_one_launch_per_dtype_with_the_references_coefficients():
    """ESimCSE's momentum encoder: one launch per dtype whatever the number of tensors, its scalars
    λ and 1 − λ computed in float64 and rounded once to the dtype (``ema_coefficients``), not
    1 − round(λ) in the dtype (which differs, e.g. for λ = 0.995 in float32)."""
    ema_launches = MODULES["esimcse"].ema_launches
    assert np.float32(1 - 0.995) != np.float32(1) - np.float32(0.995)  # the rounding that matters here
    for n_layers in (1, 37):
        launcher = RecordingLauncher()
        engine = planner.Engine(launcher)
        targets = _model(n_layers) + _model(1, np.float64)
        sources = [np.ones_like(t) for t in targets]
        for decay in (0.995, 1 / 3, 0.1, 0.999999, 0.0, 1.0):
            launcher.launches.clear()
            launcher.args.clear()
            engine.run(ema_launches(engine, targets, sources, decay))
            assert [(d, n) for d, n, _ in launcher.launches] == [("float32", "esimcse_ema"), ("float64", "esimcse_ema")]
            for (dtype, _, _), args in zip(launcher.launches, launcher.args):
                want = esimcse_momentum.ema_coefficients(decay, dtype)
                got = (args["decay"], args["one_minus_decay"])
                assert [type(x) for x in got] == [type(x) for x in want]
                assert [x.tobytes() for x in got] == [x.tobytes() for x in want], (decay, dtype)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_ema_update_that_cannot_be_prepared_writes_nothing():
    """All or nothing: an upload that fails while the float64 group is prepared leaves the float32
    targets, prepared before, unwritten: nothing is launched before every launch is prepared."""
    emu = EmulatedBackend()
    launcher = emu.engine.launcher
    upload, uploads = launcher.upload, []

    def failing_upload(host):
        uploads.append(1)
        if len(uploads) == 5:  # float32: chunks, meta, targets' and sources' pointers; then float64's chunks
            raise MemoryError("out of device memory")
        return upload(host)

    launcher.upload = failing_upload
    targets = [np.zeros(7, np.float32), np.zeros(5, np.float64)]
    strided = np.ones((5, 2))[:, 0]
    with pytest.raises(MemoryError):
        emu.ema_update(targets, [np.ones(7, np.float32), strided], decay=0.5)
    assert len(uploads) == 5 and launcher.calls == []
    assert not targets[0].any() and not targets[1].any()
    launcher.upload = upload
    emu.ema_update(targets, [np.ones(7, np.float32), strided], decay=0.5)  # and then it works
    assert (targets[0] == 0.5).all() and (targets[1] == 0.5).all()


# =====================================================================================
# CPU: the generated CUDA text, and its PTX (NVRTC or nvcc, no GPU)
# =====================================================================================
@pytest.mark.parametrize("dtype", DTYPES)
def test_generated_source_is_typed_for_its_dtype(dtype):
    src = cuda_kernels.source(dtype)
    ct = "float" if dtype == "float32" else "double"
    assert f"typedef {ct} T;" in src
    assert f"#define VEC {4 if dtype == 'float32' else 2}" in src
    assert not re.search(r"\{[A-Z_]+\}", src), "unsubstituted template field"
    for name, sig in cuda_kernels.SIGNATURES.items():
        text = cuda_kernels.kernel_source(name, dtype)
        assert f"fo_{name}_{cuda_kernels.suffix(dtype)}(" in text
        for ctype, arg in sig:
            want = ct if ctype == "T" else ctype
            assert re.search(rf"\b{re.escape(want)}( __restrict__)? {arg}\b", text), (name, arg)
    if dtype == "float32":
        assert "sqrtf(" in src and "powf(" in src
    else:
        assert "sqrtf(" not in src and "powf(" not in src


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", cuda_kernels.ELEMENTWISE)
def test_elementwise_kernels_have_no_double_literals_or_double_math(dtype, name):
    """In T arithmetic a literal such as 1.0 would promote float32 math to float64;
    float64 may only appear as the reductions' explicit accumulators and casts."""
    text = cuda_kernels.kernel_source(name, dtype)
    assert cuda_kernels.float_literals(text) == [], cuda_kernels.float_literals(text)
    body = text.split("{", 1)[1]
    for line in body.splitlines():
        for _ in re.finditer(r"\bdouble\b", line):
            assert re.search(r"\(double\)|__shared__ double|double \w+ = 0[;,]|double \w+ = block_sum\(", line), line


def test_float_literal_detector():
    assert cuda_kernels.float_literals("x = 1.0 + 2.5f * 3e-4 + a1.5 + 0x7fLL + 15ull + .5") == [
        "1.0",
        "2.5f",
        "3e-4",
        ".5",
    ]


def test_compile_options_forbid_contraction_and_flush_to_zero():
    assert "--fmad=false" in cuda_kernels.COMPILE_OPTIONS and "--ftz=false" in cuda_kernels.COMPILE_OPTIONS
    assert cuda_kernels.CHUNK % (4 * cuda_kernels.BLOCK) == 0


def _check_ptx(ptx: str, dtype: str) -> None:
    """What the PTX of the generated source must show, whichever compiler made it."""
    # (powf's own implementation uses rcp/ex2.approx.ftz internally; that is libdevice, not our math)
    assert not re.search(r"\b(add|sub|mul|div|sqrt|cvt|setp|fma)\.[\w.]*ftz", ptx)
    entries = {e.split("(")[0]: e.split("\n.func")[0] for e in re.split(r"\.visible \.entry ", ptx)[1:]}
    assert set(entries) == {cuda_kernels.kernel_name(n, dtype) for n in cuda_kernels.SIGNATURES}
    sfx, w = cuda_kernels.suffix(dtype), ("v4.f32" if dtype == "float32" else "v2.f64")
    bits = "f32" if dtype == "float32" else "f64"
    for name in ("adam", "coupled_apply", "all_finite", "sumsq", "lion", "esimcse_ema"):
        assert not re.search(rf"\bfma\.rn\.{bits}", entries[f"fo_{name}_{sfx}"]), f"contracted FMA in {name}"
        assert ".ftz" not in entries[f"fo_{name}_{sfx}"], name
    for name in ("adam", "fadam_sums", "fadam_apply", "coupled_apply", "all_finite", "sumsq", "lion", "esimcse_ema"):
        # (.nc: through the read-only data cache, where the kernel writes none of the arrays it reads)
        assert re.search(rf"ld\.global(\.nc)?\.{w}", entries[f"fo_{name}_{sfx}"]), f"no 16-byte global loads in {name}"
    for name in ("adam", "fadam_apply", "coupled_apply", "lion", "esimcse_ema"):
        assert f"st.global.{w}" in entries[f"fo_{name}_{sfx}"], name
    if dtype == "float32":
        for name in ("adam", "lion", "esimcse_ema"):
            assert not re.search(r"\.(add|mul|div|sqrt)\.rn\.f64", entries[f"fo_{name}_f32"]), (
                f"float64 math in {name}_f32"
            )


@pytest.mark.skipif(
    _nvrtc() is None,
    reason="NVRTC library not loadable here (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 for this check)",
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvrtc_compiles_for_h100_without_ftz_or_contraction(dtype):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(cuda_kernels.source(dtype), f"fo_{dtype}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90", *cuda_kernels.COMPILE_OPTIONS])
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
    cu.write_text(cuda_kernels.source(dtype))
    res = subprocess.run(
        [NVCC, "-ptx", "-arch=compute_90", *cuda_kernels.COMPILE_OPTIONS, "-o", str(out), str(cu)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    _check_ptx(out.read_text(), dtype)


# =====================================================================================
# CPU: the package's plumbing without CuPy (signatures, rule discovery, the NVRTC launcher)
# =====================================================================================
def test_step_functions_have_the_reference_signatures_without_importing_cupy():
    """Each function of the update rules and of the sharded steps is defined in its module
    (finite.py, <rule>.py), which imports no cupy: compare its source (AST) and the function
    itself with the reference's signature; ``<rule>_step_checked`` takes the same arguments and
    returns bool."""
    import ast
    import inspect

    from fisheropt.backends import FUNCTIONS, reference
    from fisheropt.backends.interface import FAMILIES

    checked_found = []
    for fn in FAMILIES["update rules"] + FAMILIES["sharded"]:
        module = "finite" if fn == "all_finite" else fn.rsplit("_", 1)[0]  # <rule>_step, _partials, _apply
        path = CUPY_DIR / f"{module}.py"
        assert path.exists(), f"{fn}: no backends/cupy/{module}.py"
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), (
            "from __future__ import annotations turns annotations into strings: signatures would differ"
        )
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
            defaults = [ast.unparse(d) if d is not None else None for d in a.kw_defaults]
            want_defaults = [None if p.default is p.empty else repr(p.default) for p in ref.parameters.values()]
            assert not a.defaults and defaults == want_defaults[len(want_pos) :], name
            ret = ref.return_annotation
            got = ast.unparse(defs[name].returns) if defs[name].returns is not None else None
            want = (
                "bool"
                if name != fn
                else (None if ret is inspect.Signature.empty else getattr(ret, "__name__", str(ret)))
            )
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
    for fn in (
        "all_finite",
        "from_dlpack_list",
        "clear_cache",
        "check_usable",
        "owns",
        "fadam_step_checked",
        "coupled_adam_step_checked",
        *interface.SHARDED_FUNCTIONS,  # the sharded family: FSDP2 / DTensor parameters on CUDA
        "fisher_gram",
        "fisher_sample_space_direction",
        "ema_update",
    ):
        assert callable(getattr(pkg, fn)), fn
    assert not hasattr(pkg, "adam_step_checked") and not hasattr(pkg, "lion_step_checked")
    assert pkg.NAME == "cupy" and pkg.array_module is stub
    with pytest.raises(pkg.BackendUnavailable, match="no CUDA device"):
        pkg.check_usable()
    assert pkg._plan.current() is pkg.engine  # the step functions' default engine
    if HAVE_CXX:
        emu = pkg._plan.Engine(emulator.CpuLauncher(32), chunk=96)
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
    assert loaded[0][:4] == b"\x7fELF"  # SASS for the device, not PTX
    assert [f.suffix for f in tmp_path.iterdir()] == [".cubin"]
    device.load_module("float32")  # second time: from the disk cache
    assert loaded[1] == loaded[0] and len(list(tmp_path.iterdir())) == 1

    launcher = device.CupyLauncher()
    args = planner.kernel_args("sumsq", "float32", dict(chunks="c", grad_ptrs="g", g2_partials="p"))
    launcher.launch("float32", "sumsq", 7, args)
    launcher.launch("float32", "sumsq", 3, args)
    assert calls == [
        ("fo_sumsq_f32", (7,), (cuda_kernels.BLOCK,), ("c", "g", "p")),
        ("fo_sumsq_f32", (3,), (cuda_kernels.BLOCK,), ("c", "g", "p")),
    ]
    assert len(loaded) == 3  # one module per (device, dtype)


# =====================================================================================
# The agreement check catches a broken kernel (mutants of the CUDA text, on the emulator)
# =====================================================================================
MUTANTS = {  # (rule, original text, broken text): each must be caught by the agreement check
    "coupled column wrap": ("coupled_adam", "if (++col == d) col = 0;", "if (++col == d) col = (d > 1);"),
    "fadam clip of w_bar uses g_bar's scale": (
        "fadam",
        "const T clip_w = (T)tensor_scalars[3 * t + 2];",
        "const T clip_w = (T)tensor_scalars[3 * t + 1];",
    ),
    "sumsq drops the first group of each chunk": (
        "fadam",
        "FOR_GROUPS(base) {\n        const bool full = aligned && "
        "base + VEC <= stop;\n        T g_group[VEC];\n        "
        "load_group(g,",
        "FOR_GROUPS(base) {\n        const bool full = aligned && base + "
        "VEC <= stop;\n        T g_group[VEC];\n        if (base == "
        "start) continue;\n        load_group(g,",
    ),
}


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_agreement_checks_catch_a_broken_kernel(mutant):
    rule, before, after = MUTANTS[mutant]
    assert cuda_kernels.source("float32").count(before) >= 1, "mutation anchor not found: update the test"
    emu = EmulatedBackend(transform=lambda src: src.replace(before, after))
    shapes = [(37, 61), (5, 3)] if rule == "coupled_adam" else [(37, 61), (700,)]
    fadam = rule == "fadam"
    pb = fixed_problem(
        rule,
        shapes,
        ["float32"] * 2,
        seed=4,
        grad_scale=1e-9 if fadam else 1.0,
        hp=dict(FHP, clip=0.5) if fadam else dict(HP),
    )
    ref, got = _run_both(emu, rule, pb)
    with pytest.raises(AssertionError):
        _assert_agree(ref, got, exact=False, magnitude=max(pb["grad_scale"], 1e-9))


#: CUDA's flush-to-zero (-ftz=true, as CuPy's ElementwiseKernel compiles), on the emulator: every
#: float32 operand and result of the EMA that is subnormal becomes a zero of its sign
EMA_LINE = "target_group[k] = decay * target_group[k] + one_minus_decay * source_group[k];"
EMA_FLUSHED = (
    "target_group[k] = fo_ftz(fo_ftz(decay * fo_ftz(target_group[k])) + "
    "fo_ftz(one_minus_decay * fo_ftz(source_group[k])));"
)
FTZ_HELPER = "static inline T fo_ftz(T x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign((T)0, x) : x; }\n"


def _flush_float32_ema(src):
    if "typedef float T;" not in src:
        return src
    entry = 'extern "C" __global__ void __launch_bounds__(BLOCK) fo_esimcse_ema_f32('
    assert src.count(entry) == 1 and src.count(EMA_LINE) == 1, "mutation anchor not found: update the test"
    return src.replace(entry, FTZ_HELPER + entry).replace(EMA_LINE, EMA_FLUSHED)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_ema_agreement_catches_a_kernel_that_flushes_subnormals():
    """The EMA kernel as a GPU would run it with flush-to-zero: the bitwise comparison catches it on
    float32 subnormals (the golden case ``ema_float32_subnormal`` included), and only there."""
    emu = EmulatedBackend(transform=_flush_float32_ema)
    rng = np.random.default_rng(21)
    normal = [rng.standard_normal(s).astype(np.float32) for s in [(37, 5), (3,)] * 2]
    want, got = ema_both(emu, normal[:2], normal[2:], 0.995)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # the mutant is the kernel wherever nothing is subnormal
    subnormal = [rng.uniform(-2.5e-40, 2.5e-40, (37, 5)).astype(np.float32) for _ in range(2)]
    want, got = ema_both(emu, subnormal[:1], subnormal[1:], 0.995)
    assert np.count_nonzero(want[0]) > 100 and not np.any(got[0])  # all flushed, where the reference has values
    case = next(c for c in vectors.load_suite("esimcse")["cases"] if c["name"] == "ema_float32_subnormal")
    assert vectors.run_case(case, emu, to_device=emu.to_device) != []
    assert vectors.run_case(case, EmulatedBackend(), to_device=emu.to_device) == []
