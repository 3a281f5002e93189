"""The library's promises under attack: silent corruption, half-done steps, destroyed checkpoints.

Each test reproduces a failure found by an audit (issue 13) and checks the fix:
a refused call changes nothing, a step is all or nothing, a checkpoint write
never destroys the previous checkpoint.
"""

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import host_backend_params
from rules import CLASS_NAMES, make_optimizer, snapshot

import fisheropt as fo
from fisheropt.refimpl import RULES as REGISTRY

RULES = CLASS_NAMES  # every rule of the registry


def mixed_model(rng, n=6):
    """float32 and float64 tensors, matrices and vectors: several kernel groups per step."""
    shapes = [(5, 3), (4,), (3, 7), (2,), (6, 2), ()][:n]
    return [np.asarray(rng.standard_normal(s), dtype=(np.float32, np.float64)[i % 2]) for i, s in enumerate(shapes)]


def grads_for(params, rng):
    return [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]


# ---- 1. non-native byte order ------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
def test_big_endian_arrays_are_refused_everywhere(backend, rule):
    """Before: Adam gave 8.47e24 where the reference gives 0.9; Coupled Adam updated an
    uncoupled tensor and then failed with step_count still 0."""
    swapped = np.dtype(np.float32).newbyteorder()
    with pytest.raises(TypeError, match=r"params\[0\] has non-native byte order"):
        make_optimizer(rule, [np.ones(4, swapped)], backend)
    params = [np.ones(4, np.float32), np.ones((2, 2), np.float32)]
    opt = make_optimizer(rule, params, backend, lr=0.1)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\[1\] has non-native byte order"):
        opt.step([np.ones(4, np.float32), np.ones((2, 2), swapped)])
    assert snapshot(opt) == before
    with pytest.raises(ValueError, match="shape"):  # a state dict with swapped bytes
        sd = opt.state_dict()
        sd["state"]["m"] = [a.astype(a.dtype.newbyteorder()) for a in sd["state"]["m"]]
        opt.load_state_dict(sd)
    assert snapshot(opt) == before


# ---- 2. overlapping memory ---------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
def test_tied_weight_listed_twice_is_refused(backend, rule):
    w = np.ones((8, 4))
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] share memory"):
        make_optimizer(rule, [w, np.ones(3), w.reshape(4, 8)], backend)


def test_overlap_check_cost_is_linear_in_tensors():
    """The check reads no element: one gradient view among many tensors is still found."""
    params = [np.zeros(n) for n in range(1, 300)]
    opt = fo.Adam(params, backend="numpy")
    grads = [np.zeros_like(p) for p in params]
    grads[150] = params[200][:151]
    with pytest.raises(ValueError, match=r"params\[200\] and grads\[150\] share memory"):
        opt.step(grads)


# ---- 3. all or nothing -------------------------------------------------------------------
def fail_on_call(monkeypatch, module, name, k, exc=MemoryError):
    """Make ``module.name`` (``module[name]`` for a dict) raise ``exc`` on its k-th call;
    returns a counter of calls made."""
    original = module[name] if isinstance(module, dict) else getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise exc("injected failure")
        return original(*args, **kwargs)

    if isinstance(module, dict):
        monkeypatch.setitem(module, name, wrapper)
    else:
        monkeypatch.setattr(module, name, wrapper)
    return calls


def _injection_points(backend, rule):
    """(module or object, function name) pairs called between the step's start and its first write."""
    descriptor = next(r for r in REGISTRY.values() if r.title == rule)
    if backend == "numpy":
        # The pure per-tensor updates the reference step computes before writing anything. The
        # step reads them from the (frozen) descriptor at call time, so they are patched in its __dict__.
        return [(vars(descriptor), name) for name in ("update", "update_unflagged") if getattr(descriptor, name)]
    from fisheropt.backends.numba import _core

    module = importlib.import_module(f"fisheropt.backends.numba.{descriptor.name}")
    return [(_core.PLANS, "get"), (_core, "per_tensor_table")] + [
        (module, name) for name in ("addresses", "per_tensor_table", "adam_launches") if hasattr(module, name)
    ]


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
def test_failure_anywhere_before_the_first_write_changes_nothing(monkeypatch, backend, rule, exc):
    """Before: a MemoryError or Ctrl-C after the first of several backend calls (mixed dtypes,
    Coupled Adam's two kinds of tensor, the reference's tensor-by-tensor loop) left some
    tensors updated and step_count unchanged, so a retry applied the step twice to them."""
    rng = np.random.default_rng(1)
    params = mixed_model(rng)
    shadow_params = [p.copy() for p in params]
    opt = make_optimizer(rule, params, backend, lr=1e-2)
    shadow = make_optimizer(rule, shadow_params, backend, lr=1e-2)
    injected = 0
    for point in _injection_points(backend, rule):
        for k in range(1, 8):
            if backend == "numba":
                fo.backends.get("numba").clear_cache()  # planning runs again, so it can fail too
            grads = grads_for(params, rng)
            before = snapshot(opt)
            with monkeypatch.context() as mp:
                calls = fail_on_call(mp, *point, k, exc)
                try:
                    opt.step(grads)
                except exc:
                    injected += 1
                    assert snapshot(opt) == before, f"{point[1]} failing at call {k} left a partial step"
                    continue
            shadow.step(grads)  # the step completed: the shadow takes it too
            assert snapshot(opt)[:3] == snapshot(shadow)[:3]
            if calls[0] < k:
                break  # fewer than k calls: later k cannot fail either
    assert injected > 0, "no injection point was reached"
    grads = grads_for(params, rng)
    opt.step(grads)
    shadow.step(grads)
    assert snapshot(opt)[:3] == snapshot(shadow)[:3]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
@pytest.mark.parametrize("rule", RULES)
def test_real_ctrl_c_never_leaves_a_partial_step(rule):
    """Real SIGINTs at random moments of the reference's multi-tensor step (the slowest
    path, one tensor at a time): afterwards the optimizer equals a shadow that took
    exactly the steps its step_count says."""
    rng = np.random.default_rng(7)
    params = [np.asarray(rng.standard_normal((40, 30)), dtype=(np.float32, np.float64)[i % 2]) for i in range(12)]
    opt = make_optimizer(rule, params, "numpy", lr=1e-2)
    shadow = make_optimizer(rule, [p.copy() for p in params], "numpy", lr=1e-2)
    main = threading.main_thread().ident
    step_time = _time_one_step(rule, rng)
    interrupted = 0
    for trial in range(60):
        grads = grads_for(params, rng)
        timer = threading.Timer(rng.uniform(0, 1.2 * step_time), signal.pthread_kill, (main, signal.SIGINT))
        count = opt.step_count
        try:
            timer.start()
            opt.step(grads)
            time.sleep(1.5 * step_time)  # a late signal lands here, outside the step
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            timer.cancel()
            timer.join()
        if opt.step_count == count + 1:
            shadow.step(grads)
        assert opt.step_count == shadow.step_count
        assert snapshot(opt)[:2] == snapshot(shadow)[:2], f"trial {trial}: partial step"
    assert interrupted > 10, "too few interrupts landed inside a step to test anything"


def _time_one_step(rule, rng):
    params = [np.asarray(rng.standard_normal((40, 30)), dtype=(np.float32, np.float64)[i % 2]) for i in range(12)]
    opt = make_optimizer(rule, params, "numpy")
    t = time.perf_counter()
    for _ in range(3):
        opt.step(grads_for(params, rng))
    return (time.perf_counter() - t) / 3


# ---- 4. parameters changed after construction --------------------------------------------
CHANGES = {
    "reshaped in place": (lambda p: setattr(p, "shape", (3, 4)), r"params\[1\] changed shape"),
    "resized": (lambda p: p.resize((13,), refcheck=False), r"params\[1\] (changed shape|was moved)"),
    "made read-only": (lambda p: setattr(p.flags, "writeable", False), r"params\[1\] is read-only"),
}


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("change", CHANGES)
def test_parameter_changed_after_construction_is_refused(backend, rule, change):
    """Before: numba's plan cache kept Coupled Adam's old column count; the reference failed half-way."""
    rng = np.random.default_rng(2)
    params = [rng.standard_normal((4, 3)), rng.standard_normal((2, 6)).reshape(12)]
    params[1] = params[1].copy()  # owns its data, so resize can move it
    opt = make_optimizer(rule, params, backend)
    opt.step(grads_for(params, rng))
    mutate, match = CHANGES[change]
    try:
        mutate(opt.params[1])
    except ValueError as exc:
        # NumPy refuses to resize an array that has weak references (numba's plan cache holds one)
        assert change == "resized" and "cannot resize" in str(exc)
        return
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step([np.ones_like(p) for p in opt.params])
    assert snapshot(opt) == before


def test_state_cannot_be_swapped_for_an_unchecked_array():
    opt = fo.Adam([np.ones(3)], backend="numpy")
    with pytest.raises(TypeError):
        opt.state["m"] = [np.ones(3, np.float32)]
    with pytest.raises(TypeError):
        opt.state["m"][0] = np.ones(3, np.float32)


# ---- 5. atomic, exact checkpoints ---------------------------------------------------------
def _trained(rule="FAdam", n=3000):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(n), rng.standard_normal((10, 4))]
    opt = make_optimizer(rule, params, "numpy")
    opt.step(grads_for(params, rng))
    return opt


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """Before: a write cut short by a full disk (RLIMIT_FSIZE) turned a good 9 KB checkpoint
    into a corrupt 1 MiB file. Now the old file stays whole and no temporary is left."""
    small = _trained(n=100)
    path = tmp_path / "ckpt.npz"
    fo.save_state(small.state_dict(), path)
    good = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        import fisheropt as fo
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(400_000)]
        opt = fo.FAdam(params, backend="numpy")
        opt.step([rng.standard_normal(400_000)])
        sd = opt.state_dict()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            fo.save_state(sd, {str(path)!r})
        except OSError as exc:
            print("failed as expected:", exc.errno)
            sys.exit(0)
        sys.exit("the write should have failed")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "failed as expected" in out.stdout
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]
    loaded = fo.load_state(path)
    assert loaded["step"] == 1


def test_save_writes_exactly_the_path_given(tmp_path):
    opt = _trained(n=10)
    with pytest.raises(ValueError, match="must end in .npz"):
        fo.save_state(opt.state_dict(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        fo.save_state(opt.state_dict(), tmp_path / "dir.npz")
    fo.save_state(opt.state_dict(), tmp_path / "ckpt.npz")
    assert fo.load_state(tmp_path / "ckpt.npz")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz", "dir.npz"]


def test_object_arrays_are_never_pickled_into_a_checkpoint(tmp_path):
    opt = _trained(n=10)
    sd = opt.state_dict()
    sd["state"]["m"][0] = np.array([object()] * 10)
    with pytest.raises(ValueError, match=r"state\['m'\]\[0\] must be a float array"):
        fo.save_state(sd, tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []


# ---- 6. loading bad state -----------------------------------------------------------------
@pytest.mark.parametrize(
    "rule,name,index,value,match",
    [
        ("Adam", "m", 0, np.nan, r"state\['m'\]\[0\] holds NaN or Inf"),
        ("FAdam", "m", 1, np.inf, r"state\['m'\]\[1\] holds NaN or Inf"),
        ("Adam", "v", 1, -1.0, r"state\['v'\]\[1\] has negative entries"),
        ("FAdam", "f", 0, -1e-30, r"state\['f'\]\[0\] has negative entries"),
        ("CoupledAdam", "v", 0, -2.0, r"state\['v'\]\[0\] has negative entries"),
    ],
)
def test_corrupt_moments_are_refused(rule, name, index, value, match):
    """Before: NaN in m or a negative second moment loaded, and the next step made θ NaN."""
    opt = _trained(rule)
    sd = opt.state_dict()
    sd["state"][name][index].flat[0] = value
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before


def test_load_state_explains_files_that_are_not_checkpoints(tmp_path):
    cases = {
        "a.npz": lambda p: np.save(open(p, "wb"), np.ones(3)),  # a .npy under an .npz name
        "b.npz": lambda p: p.write_text("hello\n"),
        "c.npz": lambda p: np.savez(p, other=np.ones(2)),  # no metadata
        "d.npz": lambda p: np.savez(p, meta=np.frombuffer(b"{not json", np.uint8)),
        "e.npz": lambda p: np.savez(
            p, meta=np.frombuffer(b'{"format": "fisheropt.optimizer_state", "layout": {"m": 2}}', np.uint8)
        ),
        "f.npz": lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40),  # a broken zip
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match="not a fisheropt checkpoint|single .npy"):
            fo.load_state(path)
    with pytest.raises(FileNotFoundError):
        fo.load_state(tmp_path / "missing.npz")


# ---- 7. hyperparameters that round to 0 or Inf in the parameter dtype ------------------------
def test_eps_that_rounds_to_zero_in_float32_is_refused():
    """Before: eps=1e-50 is positive but 0 in float32, and 0/0 gave [nan, 0.999, nan]."""
    with pytest.raises(ValueError, match=r"eps = 1e-50 is below the smallest normal float32"):
        fo.Adam([np.ones(3, np.float32)], eps=1e-50, backend="numpy")
    fo.Adam([np.ones(3, np.float64)], eps=1e-50, backend="numpy")  # a normal float64: fine
    with pytest.raises(ValueError, match="eps2 = 1e-40 is below the smallest normal float32"):
        fo.FAdam([np.ones(3), np.ones(2, np.float32)], eps2=1e-40, backend="numpy")
    opt = fo.FAdam([np.ones(3, np.float32)], backend="numpy")
    with pytest.raises(ValueError, match="lr = 1e\\+300 overflows to Inf in float32"):
        opt.set_hyperparams(lr=1e300)
    assert opt.lr == 1e-3


# ---- 12. concurrent steps under numba's workqueue layer -------------------------------------
@pytest.mark.skipif("numba" in fo.backends.unavailable(), reason="numba backend unavailable")
def test_two_threads_stepping_under_the_workqueue_layer():
    """Before: NUMBA_THREADING_LAYER=workqueue with two Python threads stepping aborted the process."""
    script = textwrap.dedent("""
        import threading
        import numpy as np
        import fisheropt as fo
        def run(seed, out):
            rng = np.random.default_rng(seed)
            params = [rng.standard_normal(300_000).astype(np.float32), rng.standard_normal((500, 64))]
            opt = fo.FAdam(params, backend="numba")
            for _ in range(40):
                opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
            out[seed] = [p.copy() for p in params]
        together, alone = {}, {}
        threads = [threading.Thread(target=run, args=(s, together)) for s in (1, 2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for s in (1, 2):
            run(s, alone)
            assert all(np.array_equal(a, b) for a, b in zip(together[s], alone[s]))
        import numba
        print("layer", numba.threading_layer())
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layer workqueue" in out.stdout
