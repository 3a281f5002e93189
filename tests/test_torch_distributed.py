"""fisheropt.torch under torch.distributed (spec/distributed.md): DDP, ZeroRedundancyOptimizer, the
all-or-nothing step across ranks, and the distributed EF/iEF/SF/exact direction.

Each world size is one launch of real processes (tests/distributed_workers/worker.py, gloo on
localhost, a free port), bounded by LAUNCH_TIMEOUT and killed on failure; the module-scoped fixtures
run them once and the tests compare what the ranks saved with single-process runs made here."""

import numpy as np
import pytest
import torch
from distributed_workers import common, launcher

import fisheropt.torch as fot
from fisheropt import fisher
from fisheropt.torch import distributed as fd

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

LAUNCH_TIMEOUT = 240  # seconds per launch (all scenarios of one world size; ~40 s on 2 loaded cores)


def launch(world, scenarios, tmp_path):
    return launcher.launch("worker.py", world, scenarios, tmp_path, LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(2, ["ddp", "zero", "finite", "ngd", "natgrad"], tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(3, ["finite", "ngd"], tmp_path_factory.mktemp("world3"))


def bitwise(a, b):
    """The same bytes (NaN included; torch.equal says NaN != NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


def _set_grads(params, flat):
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i : i + n].reshape(p.shape).clone()
        i += n


# ---- DDP -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_ddp_every_rank_identical_after_every_step(two, name):
    traces = [out["ddp"][name] for out in two]
    assert len(traces[0]) == common.STEPS
    for step in range(common.STEPS):
        for other in traces[1:]:
            for key in ("grad", "param", "state"):
                assert bitwise(traces[0][step][key], other[step][key]), (name, step, key)


@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_ddp_equals_single_process_on_the_averaged_gradient(two, name):
    """Bitwise: the same rule in one process, fed DDP's averaged gradients, takes the same steps."""
    trace = two[0]["ddp"][name]
    model = common.make_model()
    params = list(model.parameters())
    opt = fot.CLASSES[name](common.param_groups(name, model), **common.HYPER[name])
    for step, rec in enumerate(trace):
        _set_grads(params, rec["grad"])
        if step == common.BAD_STEP:
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
        assert bitwise(common.flat(params), rec["param"]), (name, step)
        assert bitwise(common.state_flat(opt, params), rec["state"]), (name, step)
        opt.zero_grad()


@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_ddp_matches_single_process_full_batch_training(two, name):
    """The DDP run is the full-batch run (mean loss over the global batch), up to the gradient's
    float64 summation order (DDP averages rank means; here one mean over all tokens)."""
    trace = two[0]["ddp"][name]
    model = common.make_model()
    params = list(model.parameters())
    opt = fot.CLASSES[name](common.param_groups(name, model), **common.HYPER[name])
    for step, rec in enumerate(trace):
        x, y = common.batch(step, 2)
        common.loss_of(model, x, y).backward()
        if step != common.BAD_STEP:  # the DDP run skipped it (a NaN on the last rank)
            opt.step()
        opt.zero_grad()
        torch.testing.assert_close(common.flat(params), rec["param"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(fot.CLASSES))
def test_ddp_non_finite_gradient_on_one_rank_every_rank_skips(two, name):
    for out in two:
        rec = out["ddp"][name][common.BAD_STEP]
        assert rec["raised"] is not None and "non-finite" in rec["raised"]
        assert bitwise(rec["param"], rec["before"])  # byte-identical: nothing was written
        assert torch.isnan(rec["grad"]).any()
        assert all(r["raised"] is None for i, r in enumerate(out["ddp"][name]) if i != common.BAD_STEP)


def test_all_finite_agrees_across_ranks(two, three):
    for out in two + three:
        assert out["finite"] == {"good": True, "bad": False}


# ---- ZeroRedundancyOptimizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fadam", "coupled_adam"])
def test_zero_redundancy_optimizer_equals_single_process(two, name):
    res = [out["zero"][name] for out in two]
    assert all(r["inner"] == fot.CLASSES[name].__name__ for r in res)
    owned = [set(r["owned"]) for r in res]
    n_params = len(list(common.make_model().parameters()))
    assert set().union(*owned) == set(range(n_params)) and not owned[0] & owned[1]  # each tensor on one rank
    assert all(owned)  # both ranks own some
    model = common.make_model()
    params = list(model.parameters())
    opt = fot.CLASSES[name](common.param_groups(name, model), **common.HYPER[name])
    for step in range(common.STEPS):
        for r in res[1:]:
            assert bitwise(r["trace"][step]["param"], res[0]["trace"][step]["param"]), (name, step)
        _set_grads(params, res[0]["trace"][step]["grad"])
        opt.step()
        opt.zero_grad()
        assert bitwise(common.flat(params), res[0]["trace"][step]["param"]), (name, step)
    # the consolidated state (rank 0) is the single-process optimizer's state, tensor for tensor
    full = res[0]["state_dict"]
    ours = opt.state_dict()
    assert set(full["state"]) == set(ours["state"])
    for pid, entry in ours["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(full["state"][pid][key]), torch.as_tensor(value)), (pid, key)


# ---- distributed EF / iEF / SF / exact -------------------------------------------------------------------
def _reference(key, world):
    kind, columns, _, dt, empty = key.split("-")
    empty = None if empty == "emptyNone" else int(empty[len("empty") :])
    dtype = getattr(torch, dt)
    parts = [common.fisher_problem(r, world, empty_rank=empty, dtype=dtype) for r in range(world)]
    G = torch.cat([p[0] for p in parts]).numpy()
    s, J, probs = (torch.cat([p[i] for p in parts]).numpy() for i in (1, 2, 3))
    ls = torch.cat([p[5] for p in parts], dim=1).numpy()
    kw = {
        "ef": {},
        "ief": {"s": s.astype(G.dtype)},
        "sf": {"J": J, "probs": probs, "labels_sampled": ls},
        "exact": {"J": J, "probs": probs, "exact_method": "woodbury"},
    }[kind]
    ref = fisher.ngd_direction(kind, G=G, damping=0.5, **kw)
    cols = fd.shard_columns(common.SHAPES, world) if columns == "shard0" else None
    return ref, fd.Columns(common.P, world, cols), dtype


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_direction_equals_ngd_direction_on_the_gathered_G(request, world):
    outs = request.getfixturevalue("two" if world == 2 else "three")
    keys = [k for k in outs[0]["ngd"] if k not in ("nan", "tiny")]
    assert len(keys) == 20
    for key in keys:
        ref, cols, dtype = _reference(key, world)
        # spec/distributed.md §3: the Gram's partial sums in another order, κ ≈ 1 here
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        scale = float(np.abs(ref).max())
        for r, out in enumerate(outs):
            res = out["ngd"][key]
            d = res["d"].numpy()
            assert d.dtype == ref.dtype
            mine = ref[cols.index[r].numpy()] if cols.index is not None else ref[cols.offsets[r] : cols.offsets[r + 1]]
            assert d.shape == mine.shape, key
            assert np.abs(d - mine).max() <= tol * scale, (key, r, np.abs(d - mine).max() / scale)
            assert torch.equal(res["full"], outs[0]["ngd"][key]["full"])  # gathered: the same on every rank
            assert np.abs(res["full"].numpy() - ref).max() <= tol * scale
            assert res["stats"]["collectives"] == 3


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_direction_refuses_on_every_rank(request, world):
    outs = request.getfixturevalue("two" if world == 2 else "three")
    assert all("NaN" in out["ngd"]["nan"] for out in outs)
    assert all(out["ngd"]["tiny"] == "DampingTooSmall" for out in outs)


def test_distributed_direction_communication_volume(two, three):
    """Each rank sends N_r·(P − P_r) numbers of G and an (N² + N)-float64 reduction, never all of G."""
    for world, outs in ((2, two), (3, three)):
        for r, out in enumerate(outs):
            st = out["ngd"]["ief-balanced-allreduce-float64-emptyNone"]["stats"]
            N_r, P_r, N = common.rows_of(r, world), fd.column_split(common.P, world)[r], st["N"]
            reduce_bytes = (N * N + N) * 8 * 2 * (world - 1) / world
            assert st["bytes_sent"] == pytest.approx(32 + N_r * (common.P - P_r) * 8 + reduce_bytes)
            assert st["bytes_received"] == pytest.approx(32 * world + (N - N_r) * P_r * 8 + reduce_bytes)


def test_columns_and_shards():
    assert fd.column_split(50, 3) == [17, 17, 16]
    cols = fd.shard_columns([(5, 2), (3,), ()], 2)  # (5,2): rows 3|2; (3,): 2|1; 0-d on rank 0
    assert cols[0].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 13]
    assert cols[1].tolist() == [6, 7, 8, 9, 12]
    assert [c.numel() for c in fd.shard_columns([(2, 3)], 3)] == [3, 3, 0]  # an empty shard
    with pytest.raises(ValueError, match="partition"):
        fd.Columns(4, 2, [torch.tensor([0, 1]), torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="sizes"):
        fd.Columns(4, 2, [3, 2])


def test_direction_needs_an_initialized_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        fd.ngd_direction("ef", G=torch.ones(2, 3, dtype=torch.float64), damping=1.0)


@pytest.mark.parametrize("kind", ["ief", "ef"])
def test_natural_gradient_with_a_process_group_equals_one_process_on_the_global_batch(two, kind):
    """fot.NaturalGradient(process_group=...): each rank's slice of the batch in, the global batch's
    direction out (one all-to-all of G's columns, one all-reduce of the Gram): every rank ends with the
    parameters of a single process that stepped on the whole batch."""
    from distributed_workers.worker import natgrad_problem

    model, x, y = natgrad_problem(world=2)
    opt = fot.NaturalGradient(model, kind=kind, lr=0.5, damping=1e-2, backend="numpy")
    losses = [float(opt.step(x, y)) for _ in range(3)]
    want = [p.detach() for p in model.parameters()]
    for out in two:
        got = out["natgrad"][kind]
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        for a, b in zip(got["params"], want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(two[0]["natgrad"][kind]["params"], two[1]["natgrad"][kind]["params"]):
        assert torch.equal(a, b), "ranks differ"


def test_natural_gradient_process_group_refuses_kinds_it_cannot_assemble():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(NotImplementedError, match="only 'ief' and 'ef'"):
        fot.NaturalGradient(model, kind="exact", process_group=object())
