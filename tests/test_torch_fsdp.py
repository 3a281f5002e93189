"""fisheropt.torch on DTensor parameters (spec/distributed.md §5): FSDP2's fully_shard and distribute_tensor
on gloo processes, against one process stepping the whole tensors; and the backends' two-pass split
(``<rule>_partials`` / ``<rule>_apply``) that the sharded step runs.

Three launches of real processes (tests/distributed_workers/fsdp_worker.py, bounded by LAUNCH_TIMEOUT,
killed on failure): 3 ranks (uneven shards, one empty) for FSDP2 training and distribute_tensor, 2 ranks
saving DCP checkpoints, 3 ranks resuming them."""

import numpy as np
import pytest
import torch
from cupy_emulated import HAVE_CXX, EmulatedBackend
from distributed_workers import common, launcher

import fisheropt.torch as fot
from fisheropt import backends
from fisheropt.refimpl import RULES

LAUNCH_TIMEOUT = 300  # seconds per launch (~30-60 s on 2 loaded cores)
EPS64 = float(np.finfo(np.float64).eps)
ELEMENTWISE = sorted(name for name in fot.CLASSES if not RULES[name].reduces)
# the backends with the two passes; "cupy-emulated": the cupy backend's kernels on the CPU (tests/cupy_emulated.py)
SHARDED_BACKENDS = [name for name in ("numpy", "numba") if name in backends.available()] + [
    pytest.param("cupy-emulated", marks=pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator"))
]

distributed = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def launch(world, scenarios, tmp_path, **env):
    return launcher.launch("fsdp_worker.py", world, scenarios, tmp_path, LAUNCH_TIMEOUT, env=env)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(3, ["fsdp", "dtensor"], tmp_path_factory.mktemp("fsdp3"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(what 2 ranks saved and resumed, what 3 ranks resumed from the 2 ranks' checkpoints)."""
    ckpt = tmp_path_factory.mktemp("dcp")
    saved = launch(2, ["save"], tmp_path_factory.mktemp("save2"), FISHEROPT_CKPT=str(ckpt))
    resumed = launch(3, ["resume"], tmp_path_factory.mktemp("resume3"), FISHEROPT_CKPT=str(ckpt))
    return saved, resumed


def bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


def tolerance(name, n, steps):
    """spec/distributed.md §5.3: the only difference from one process is the order of the float64 sums
    (over n elements at most), a relative difference ≤ (n−1)ε₆₄ per sum; through the clip scales, ε_t or
    the column means it moves each step's update by that fraction, and K steps add up. Element-wise
    rules have no sum: bitwise."""
    return 0.0 if name in ELEMENTWISE else 4 * steps * n * EPS64


def assert_close(name, got, want, n, steps, what):
    tol = tolerance(name, n, steps)
    if tol == 0:
        assert bitwise(got, want), what
    else:
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
        assert err <= tol, (what, err, tol)


def _set_grads(params, flat):
    i = 0
    for p in params:
        p.grad = flat[i : i + p.numel()].reshape(p.shape).clone()
        i += p.numel()


def _single_process(name, model, groups, grads_of_step, steps, bad_step=None):
    params = list(model.parameters())
    opt = fot.CLASSES[name](groups, **common.HYPER[name])
    out = []
    for step in steps:
        _set_grads(params, grads_of_step(step))
        if step == bad_step:
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
        out.append((common.flat(params), common.state_flat(opt, params)))
        opt.zero_grad()
    return out, opt


# ---- FSDP2 fully_shard ----------------------------------------------------------------------------------
@distributed
def test_fsdp_shards_are_uneven_and_one_is_empty(three):
    shapes = [out["fsdp"]["fadam-placements"] for out in three]
    assert ((2,), (1,)) in shapes[0] and ((2,), (0,)) in shapes[2]  # the gain: 1, 1, 0 elements
    assert ((13, 8), (5, 8)) in shapes[0] and ((13, 8), (3, 8)) in shapes[2]


@distributed
@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_fsdp_equals_one_process_on_the_whole_tensors(three, name):
    """FSDP2 on 3 ranks, 10 steps: the gathered parameters and state equal one process fed the same (gathered)
    gradients, within the float64-summation tolerance (element-wise rules: bitwise)."""
    trace = three[0]["fsdp"][name][0]
    model = common.make_shard_model()
    n = max(p.numel() for p in model.parameters())
    ref, _ = _single_process(
        name,
        model,
        common.param_groups(name, model),
        lambda step: trace[step]["grad"],
        range(common.STEPS),
        common.BAD_STEP,
    )
    for step, ((param, state), rec) in enumerate(zip(ref, trace)):
        assert_close(name, rec["param"], param, n, step + 1, (name, step, "param"))
        assert_close(name, rec["state"], state, n, step + 1, (name, step, "state"))


@distributed
@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_fsdp_bitwise_across_ranks_and_runs(three, name):
    first = three[0]["fsdp"][name][0]
    for out in three:
        for run in out["fsdp"][name]:
            for step, (a, b) in enumerate(zip(run, first)):
                for key in ("param", "state", "grad"):
                    assert bitwise(a[key], b[key]), (name, out["rank"], step, key)
                for x, y in zip(a["replicated"], b["replicated"]):  # Coupled Adam's v̄, stored on every rank
                    assert bitwise(x, y), (name, out["rank"], step)


@distributed
@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_fsdp_non_finite_shard_on_one_rank_every_rank_skips(three, name):
    for out in three:
        trace = out["fsdp"][name][0]
        rec = trace[common.BAD_STEP]
        assert rec["raised"] is not None and "non-finite" in rec["raised"], (name, out["rank"])
        assert bitwise(rec["param"], rec["before"])  # nothing written on any rank
        assert bitwise(rec["state"], trace[common.BAD_STEP - 1]["state"])
        assert all(r["raised"] is None for i, r in enumerate(trace) if i != common.BAD_STEP)
    assert "on this rank" in three[-1]["fsdp"][name][0][common.BAD_STEP]["raised"]  # the rank with the NaN
    assert "on this rank" not in three[0]["fsdp"][name][0][common.BAD_STEP]["raised"]


# ---- distribute_tensor: Shard(1) and Shard(0) ---------------------------------------------------------------
def _dtensor_reference(name):
    from distributed_workers.fsdp_worker import SHAPES

    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    groups = [{"params": params[:1], "coupled": True}, {"params": params[1:]}] if name == "coupled_adam" else params
    model = torch.nn.Module()
    model.ps = torch.nn.ParameterList(params)

    def grads(step):
        return common.flat(common.synthetic_grads(step, SHAPES))

    return _single_process(name, model, groups, grads, range(common.STEPS))[0], max(p.numel() for p in params)


@distributed
@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_distribute_tensor_shard0_and_shard1_equal_one_process(three, name):
    ref, n = _dtensor_reference(name)
    for out in three:
        trace = out["dtensor"][name]
        for step, ((param, state), rec) in enumerate(zip(ref, trace)):
            assert_close(name, rec["param"], param, n, step + 1, (name, step, "param"))
            assert_close(name, rec["state"], state, n, step + 1, (name, step, "state"))
            assert bitwise(rec["param"], three[0]["dtensor"][name][step]["param"])


@distributed
def test_communication_per_step(three):
    """FAdam: one collective of 3T + 1 float64 (T sharded tensors, the flag); where the guessed ε_t fails
    (tensor 1's tiny gradient, odd steps), a second one of 2 per such tensor + 1. Coupled Adam with its
    matrix split by columns: the flag only; element-wise rules: the flag only."""
    for out in three:
        fadam = [rec["sent"] for rec in out["dtensor"]["fadam"]]
        for step, sent in enumerate(fadam):
            assert sent == ({"collectives": 2, "values": 10 + 3} if step % 2 else {"collectives": 1, "values": 10})
        assert all(rec["sent"] == {"collectives": 1, "values": 1} for rec in out["dtensor"]["coupled_adam"])
        for name in ELEMENTWISE:
            assert all(rec["sent"] == {"collectives": 1, "values": 1} for rec in out["dtensor"][name])


# ---- DCP checkpoints ---------------------------------------------------------------------------------------
def _ckpt_reference(name, steps):
    model = common.make_shard_model()
    shapes = [tuple(p.shape) for p in model.parameters()]
    ref, opt = _single_process(
        name, model, common.param_groups(name, model), lambda s: common.flat(common.synthetic_grads(s, shapes)), steps
    )
    return ref[-1], max(p.numel() for p in model.parameters())


@distributed
@pytest.mark.parametrize("name", ["adamw", "fadam", "coupled_adam"])
def test_dcp_checkpoint_resumes_on_the_same_trajectory(checkpoints, name):
    """Saved after 5 steps on 2 ranks and loaded back: the loaded state is the saved one, and the 5 more steps
    give the uninterrupted run's bits."""
    saved, _ = checkpoints
    for out in saved:
        res = out["save"][name]
        for key in ("param", "state"):
            assert bitwise(res["loaded"][key], res["saved"][key]), (name, key)
            assert bitwise(res["resumed"][key], res["uninterrupted"][key]), (name, key)


@distributed
@pytest.mark.parametrize("name", ["adamw", "fadam", "coupled_adam"])
def test_dcp_checkpoint_saved_on_2_ranks_resumes_on_3(checkpoints, name):
    """DCP reshards the DTensor state from 2 to 3 ranks: loaded bitwise, then the trajectory of one process
    (and of the uninterrupted 2-rank run) within the summation tolerance."""
    saved, resumed = checkpoints
    (param, state), n = _ckpt_reference(name, range(common.STEPS))
    for out in resumed:
        loaded, final = out["resume"][name]
        for key in ("param", "state"):
            assert bitwise(loaded[key], saved[0]["save"][name]["saved"][key]), (name, key)
        assert_close(name, final["param"], param, n, common.STEPS, name)
        assert_close(name, final["state"], state, n, common.STEPS, name)
        assert_close(name, final["param"], saved[0]["save"][name]["uninterrupted"]["param"], n, common.STEPS, name)


# ---- the backends' two passes ----------------------------------------------------------------------------
def _problem(seed, dtype, tiny):
    rng = np.random.default_rng(seed)
    shapes = [(70, 9), (129,), (3, 4), (0, 4)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [(rng.standard_normal(s) * (1e-12 if tiny and i == 1 else 1.0)).astype(dtype) for i, s in enumerate(shapes)]
    return params, grads


@pytest.mark.parametrize("backend", SHARDED_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tiny", [False, True])
def test_fadam_partials_then_apply_is_the_step_bit_for_bit(backend, dtype, tiny):
    """R = 1: apply given the tensors' own partials (Σḡ², Σw̄² again with the true ε_t where the guess
    failed) and sizes is the single-process step, bit for bit."""
    from fisheropt.torch.sharded import true_epsilons

    be = EmulatedBackend() if backend == "cupy-emulated" else backends.get(backend)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, eps2=0.01, clip=0.5, p=0.5, weight_decay=0.1)
    results = []
    for split in (False, True):
        params, grads = _problem(3, dtype, tiny)
        m, f = [np.zeros_like(x) for x in params], [np.full_like(x, 0.5) for x in params]
        for t in (1, 2):
            if not split:
                be.fadam_step(params, grads, m, f, step=t, **hp)
                continue
            before = [x.copy() for x in params + m + f]
            sums = be.fadam_partials(params, grads, m, f, step=t, **hp)
            counts = [x.size for x in params]
            redo, eps_t = true_epsilons(sums, counts, params, hp)
            assert bool(redo) == tiny
            if redo:
                pick = [[x[i] for i in redo] for x in (params, grads, m, f)]
                sums[redo, 1:] = be.fadam_partials(*pick, step=t, **hp, eps_t=eps_t)[:, 1:]
            assert all(a.tobytes() == b.tobytes() for a, b in zip(before, params + m + f))  # pass 1 wrote nothing
            be.fadam_apply(params, grads, m, f, step=t, **hp, sums=sums, counts=counts)
        results.append(params + m + f)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", SHARDED_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coupled_adam_partials_then_apply_is_the_step_bit_for_bit(backend, dtype):
    be = EmulatedBackend() if backend == "cupy-emulated" else backends.get(backend)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    coupled = [True, False, True, True]
    results = []
    for split in (False, True):
        params, grads = _problem(4, dtype, False)
        m = [np.zeros_like(x) for x in params]
        v = [np.zeros(x.shape[1], dtype) if c else np.zeros_like(x) for x, c in zip(params, coupled)]
        for t in (1, 2):
            if not split:
                be.coupled_adam_step(params, grads, m, v, step=t, coupled=coupled, **hp)
                continue
            before = [x.copy() for x in params + m + v]
            sums = be.coupled_adam_partials(params, grads, m, v, step=t, coupled=coupled, **hp)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(before, params + m + v))  # pass 1 wrote nothing
            assert [s.shape for s in sums] == [(9,), (4,), (4,)]
            rows = [x.shape[0] for x, c in zip(params, coupled) if c]
            be.coupled_adam_apply(params, grads, m, v, step=t, coupled=coupled, **hp, column_sums=sums, rows=rows)
        results.append(params + m + v)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()
